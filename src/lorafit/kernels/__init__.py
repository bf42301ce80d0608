"""Fused kernels for the QLoRA training fast path.

Each op lives in its own module (Triton kernel -> launcher -> autograd.Function) and has a
plain-PyTorch twin in `reference.py` that the tests compare against, forward and backward.
Nothing here imports model code, and importing does nothing: Triton is imported by the op
modules only, which `lorafit.fast` loads when a CUDA device is in use.
"""
