"""ainode's analysis side: Celery app and tasks, imaging, models, result writers, training."""
