"""Pallas ops for DiG: the chunked Gated Linear Attention op, the depthwise 3x3 token-grid convolution, the GLA
output gate (RMSNorm-swish) and the SwiGLU activation, each with a plain-JAX reference and fused kernels; the GLA
op on a sequence split over devices; and the GLA layer's core (scan and gate) on its packed input projection."""

from pallas_kernels.depthwise_conv import IMPLS as CONV_IMPLS
from pallas_kernels.depthwise_conv import depthwise_conv3x3
from pallas_kernels.gla import IMPLS as GLA_IMPLS
from pallas_kernels.gla import chunk_gla
from pallas_kernels.gla_layer import gated_gla, gated_gla_split
from pallas_kernels.gla_sequence_parallel import sequence_parallel_chunk_gla
from pallas_kernels.gla_triton import CHECKPOINT_NAME as GLA_CHECKPOINT_NAME
from pallas_kernels.output_gate import rms_norm_swish_gate
from pallas_kernels.swiglu import swiglu
from pallas_kernels.token_grid import transpose_grid

__all__ = ["CONV_IMPLS", "GLA_CHECKPOINT_NAME", "GLA_IMPLS", "chunk_gla", "depthwise_conv3x3", "gated_gla",
           "gated_gla_split", "rms_norm_swish_gate", "sequence_parallel_chunk_gla", "swiglu", "transpose_grid"]
