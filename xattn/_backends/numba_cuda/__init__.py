"""Numba CUDA kernels: attention with user-programmable score and mask functions."""
