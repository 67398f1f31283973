"""Triton kernels of the GPU decode path; each beside its torch reference."""
