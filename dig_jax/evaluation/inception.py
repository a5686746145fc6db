"""The FID Inception network (TensorFlow's 2015-12-05 InceptionV3 graph, as ADM's evaluator runs it) in Flax NNX.

    model = load_inception("pt_inception-2015-12-05-6726825d.pth")   # dig_jax.evaluation.convert_inception
    features = model(images)   # uint8 or float [N, H, W, 3] in [0, 255], any H, W

Layers and names follow pytorch-fid's `fid_inception_v3` (torchvision's Inception3 with the FIDInceptionA/C/E_1/E_2
patches), whose weights file is a port of the TensorFlow graph, so its state dict maps onto this module name for name.
What the graph does and torchvision does not: average pools ignore the zero padding, and the last block (E_2)
max-pools its pool branch.

The input path is ADM's, not pytorch-fid's: ADM's evaluator feeds float images in [0, 255] at their own size into
the graph, which resizes them with TensorFlow 1's bilinear resize (no half-pixel centres, no antialiasing) to
299 x 299 and maps them to (x - 128) / 128. pytorch-fid instead resizes with PyTorch's half-pixel bilinear
interpolation and maps [0, 1] to 2x - 1, which changes FID slightly.

Outputs (ADM's evaluator's tensors):
  pool    [N, 2048]: "pool_3:0", the FID features.
  spatial [N, 17 * 17 * 7]: the first 7 channels of "mixed_6/conv:0" (the 1x1 branch of the block torchvision
          names Mixed_6d, after its batch norm and ReLU), flattened in (H, W, C) order like TensorFlow's NHWC
          reshape, so statistics match those stored in ADM's reference batches; the sFID features.
  logits  [N, 1008]: pool @ W of the classifier, without its bias: ADM's Inception Score multiplies "pool_3" by
          the weight of "softmax/logits/MatMul" only.
"""

import jax
import jax.numpy as jnp
from flax import nnx

INPUT_SIZE = 299
SPATIAL_CHANNELS = 7      # ADM's sFID keeps mixed_6/conv[..., :7]
NUM_LOGITS = 1008         # the graph's classifier: 1000 ImageNet classes and 8 unused
FEATURE_SIZE = 2048
SPATIAL_FEATURE_SIZE = 17 * 17 * SPATIAL_CHANNELS  # mixed_6/conv is 17 x 17 for the 299 x 299 input
BATCH_NORM_EPS = 1e-3


def resize_bilinear_tf1(images: jax.Array, size: int) -> jax.Array:
    """TensorFlow 1's ResizeBilinear (align_corners=False, half_pixel_centers=False): [N, H, W, C] -> [N, s, s, C].

    Output pixel i samples the input at i * in / out (no half-pixel offset, so the last rows and columns repeat
    the input's edge); no antialiasing when shrinking. The graph ADM's evaluator runs resizes with exactly this.
    """
    def along(x, axis):
        in_size = x.shape[axis]
        if in_size == size:
            return x
        src = jnp.arange(size, dtype=jnp.float32) * jnp.float32(in_size / size)
        lo = jnp.floor(src).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, in_size - 1)
        frac = (src - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        low, high = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
        return low + (high - low) * frac

    return along(along(images, 1), 2)


class BasicConv2d(nnx.Module):
    """Conv (no bias) -> batch norm (running statistics, eps 1e-3) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, stride: int = 1, padding=0,
                 rngs: nnx.Rngs):
        kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.conv = nnx.Conv(in_channels, out_channels, kernel_size, strides=stride,
                             padding=tuple((p, p) for p in padding), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(out_channels, epsilon=BATCH_NORM_EPS, use_running_average=True, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_same(x):
    # TensorFlow's average pool divides by the number of real (unpadded) pixels in each window.
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME", count_include_pad=False)


def _max_pool(x, stride: int = 2, padding: str = "VALID"):
    return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class InceptionA(nnx.Module):
    def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_avg_pool_same(x))],
                               axis=-1)


class InceptionB(nnx.Module):
    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), branch3x3dbl, _max_pool(x)], axis=-1)


class InceptionC(nnx.Module):
    def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs):
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

    def branches(self, x):
        """(the 1x1 branch, the block's output): the first is ADM's "mixed_6/conv" in the block named Mixed_6d."""
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        out = jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, self.branch_pool(_avg_pool_same(x))], axis=-1)
        return branch1x1, out

    def __call__(self, x):
        return self.branches(x)[1]


class InceptionD(nnx.Module):
    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([branch3x3, branch7x7x3, _max_pool(x)], axis=-1)


class InceptionE(nnx.Module):
    """pool="avg": pytorch-fid's FIDInceptionE_1 (Mixed_7b); "max": FIDInceptionE_2 (Mixed_7c), where the
    TensorFlow graph max-pools the pool branch."""

    def __init__(self, in_channels: int, *, pool: str, rngs: nnx.Rngs):
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = jnp.concatenate([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], axis=-1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = jnp.concatenate([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)],
                                       axis=-1)
        pooled = _avg_pool_same(x) if self.pool == "avg" else _max_pool(x, stride=1, padding="SAME")
        return jnp.concatenate([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
    """The FID InceptionV3; `__call__` maps images in [0, 255] to ADM's pool, spatial and logits features."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, pool="avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, pool="max", rngs=rngs)
        self.fc = nnx.Linear(FEATURE_SIZE, NUM_LOGITS, use_bias=False, rngs=rngs)

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        """Network input x: float32 [N, 299, 299, 3] in [-1, 1] -> {"pool", "spatial", "logits"} (module doc)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool(x)))
        x = _max_pool(x)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        mixed_6_conv, x = self.Mixed_6d.branches(x)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = jnp.mean(x, axis=(1, 2))
        spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        return {"pool": pool, "spatial": spatial, "logits": self.fc(pool)}

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """images: uint8 or float [N, H, W, 3] with values in [0, 255] (any H, W) -> features (module doc)."""
        x = resize_bilinear_tf1(images.astype(jnp.float32), INPUT_SIZE)
        return self.features((x - 128.0) * (1.0 / 128.0))
