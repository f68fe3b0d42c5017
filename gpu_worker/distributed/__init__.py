"""Tensor and pipeline parallelism: process groups, collectives and this rank's place in them.

Built on ``torch.distributed`` (NCCL between GPUs, gloo on the CPU). Nothing here is global:
a :class:`~gpu_worker.distributed.parallel_state.ModelParallel` is created per rank and handed
to the model's layers, which call its collectives.
"""
