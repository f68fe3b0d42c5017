"""Executors: how the engine core runs a step on the model, on one device or on several ranks.

:class:`~gpu_worker.executor.base.Executor` is the seam (``execute_async(step) -> pending
output``); :func:`~gpu_worker.executor.factory.make_executor` picks the implementation.
"""
