"""Chunked Gated Linear Attention: one public op, a reference, an XLA path and Pallas kernels."""

from pallas_kernels.gla import IMPLS, chunk_gla

__all__ = ["IMPLS", "chunk_gla"]
