"""Model families, found through :mod:`gpu_worker.model_executor.models.registry`."""
