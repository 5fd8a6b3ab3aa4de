"""celery_app (to be built; see ARCHITECTURE)."""
