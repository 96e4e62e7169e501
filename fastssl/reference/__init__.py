"""Plain PyTorch semantics of every fastssl op: the CPU path and the test oracle.

Each function here is the definition the fast paths (Triton kernels, the native
extension) are checked against. They favour clarity over speed, but stay chunked where
the full intermediate would not fit in memory.
"""
from fastssl.reference.kmeans import assign_grouped_reference, assign_reference

__all__ = ["assign_reference", "assign_grouped_reference"]
