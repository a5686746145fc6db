"""Pallas ops for DiG: the chunked Gated Linear Attention op and the depthwise 3x3 token-grid convolution, each with
a plain-JAX reference and fused kernels."""

from pallas_kernels.depthwise_conv import depthwise_conv3x3
from pallas_kernels.gla import IMPLS, chunk_gla

__all__ = ["IMPLS", "chunk_gla", "depthwise_conv3x3"]
