"""Triton kernels and their launchers, one kernel family a file; imported lazily by the ops."""
