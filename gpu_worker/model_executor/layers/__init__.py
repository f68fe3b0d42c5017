"""Layers shared by the model families; compute goes through ``kernels.KernelOps``."""
