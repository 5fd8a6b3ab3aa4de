"""Built-in reference models, inference half: each model module defines ``analyses() -> list[Analysis]``
and is listed in ``workers.analysis.registry.MODEL_MODULES``; its training half (``train(out, quick)``)
is ``workers.training.<module>``, listed in ``workers.training.TRAINER_MODULES``."""
