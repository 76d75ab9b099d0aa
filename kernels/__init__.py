"""Triton/CUDA sources of fastsort's fused kernels, imported lazily through ``fastsort.ops``."""
