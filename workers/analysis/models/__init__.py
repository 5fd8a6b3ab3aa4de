"""Built-in reference models. Each module that defines ``analyses() -> list[Analysis]`` is found by
``workers.registry``; each that defines ``train(out, quick) -> dict`` is found by
``workers.training`` (named by its ``TRAIN_NAME``, else the module name)."""
