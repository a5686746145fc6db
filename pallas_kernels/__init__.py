"""Pallas ops for DiG: the chunked Gated Linear Attention op and the depthwise 3x3 token-grid convolution, each with
a plain-JAX reference and fused kernels; and the GLA op on a sequence split over devices."""

from pallas_kernels.depthwise_conv import IMPLS as CONV_IMPLS
from pallas_kernels.depthwise_conv import depthwise_conv3x3
from pallas_kernels.gla import IMPLS as GLA_IMPLS
from pallas_kernels.gla import chunk_gla
from pallas_kernels.gla_sequence_parallel import sequence_parallel_chunk_gla
from pallas_kernels.gla_triton import CHECKPOINT_NAME as GLA_CHECKPOINT_NAME

__all__ = ["CONV_IMPLS", "GLA_CHECKPOINT_NAME", "GLA_IMPLS", "chunk_gla", "depthwise_conv3x3",
           "sequence_parallel_chunk_gla"]
