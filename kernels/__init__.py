"""Triton kernels for lorakit's cuda-triton backend (imported lazily; triton is optional)."""
