"""DiG's token sequence split over the devices of a mesh axis by rows of the token grid (sequence parallelism).

One image's tokens are a G x G grid in raster order. With the tokens split over a mesh axis of size S (G a
multiple of S), device d holds grid rows [d G/S, (d+1) G/S): a contiguous piece of the raster sequence. A DiG
block's per-token layers need nothing more; the three ops that mix tokens take collectives:
  - the GLA scan: `sequence_parallel_chunk_gla`, which passes [H, K, V] states between devices;
  - the column-major scan orders: the grid transpose as an all-to-all, after which device d holds grid columns
    [d G/S, (d+1) G/S), again a contiguous piece of the (column-major) sequence; reversed orders need no data
    movement for the scan (it runs backwards over the devices), only the U-shape's skips reverse whole sequences
    (a ppermute to the mirrored device);
  - the depthwise 3x3 conv: each device receives one grid row from each neighbour (a halo exchange; zero rows at
    the grid's top and bottom, exactly the conv's zero padding), applies the conv to its rows plus the halo rows,
    and drops the halo rows' outputs.

`DiG` runs its block stack inside `shard_map(tokens_split_over_axis)` when the active mesh has the model's
`sequence_axis` with more than one device; elsewhere (no mesh, e.g. sampling on one device) the same parameters
run unsplit. These functions run inside that shard_map, where the axis is manual.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

SEQUENCE_AXIS = "seq"  # the training mesh's axis that splits tokens (dig_jax.sharding)


def mesh_splits_tokens(axis_name) -> bool:
    """Whether the active mesh has an automatic axis `axis_name` of more than one device to split tokens over."""
    mesh = jax.sharding.get_abstract_mesh()
    if axis_name is None or mesh.empty or axis_name not in mesh.axis_names:
        return False
    axis_type = dict(zip(mesh.axis_names, mesh.axis_types))[axis_name]
    return axis_type != AxisType.Manual and mesh.shape[axis_name] > 1


def is_split(axis_name) -> bool:
    """Whether tokens are split over `axis_name` here: inside a shard_map where it is a manual axis."""
    mesh = jax.sharding.get_abstract_mesh()
    return axis_name is not None and not mesh.empty and axis_name in mesh.manual_axes


def split_tokens(fn, module, axis_name):
    """fn(module, h [N, T_d, D], c [N, D]) -> [N, T_d, D] on each device's grid rows, wrapped as
    (h, c) -> [N, T, D] taking and returning the whole token sequence [N, T, D] (T = G * G) split over `axis_name`.

    A shard_map over that axis only: the batch keeps the sharding of the other mesh axes; c and the module's state
    (its parameters) are replicated over the axis, and their gradients summed over it. The module enters as an
    argument, not a closure, so that nnx transforms inside `fn` (the blocks' remat) see it at the shard_map's trace
    level. check_vma=False: the Pallas GLA kernels are not typed for varying manual axes.
    """
    tokens = P(None, axis_name)
    graphdef, state = nnx.split(module)

    def call(h, c):
        # c enters in float32 (an exact round trip for bfloat16): its gradient is a sum over the axis, and XLA:CPU
        # in jaxlib 0.10.2 aborts compiling a bfloat16 all-reduce.
        def local(state, h, c32):
            return fn(nnx.merge(graphdef, state), h, c32.astype(c.dtype))

        grid = math.isqrt(h.shape[1])
        size = jax.sharding.get_abstract_mesh().shape[axis_name]
        if grid % size:
            raise ValueError(f"the token grid's {grid} rows must split evenly over the {size} devices of mesh axis "
                             f"{axis_name!r} (choose input_size / patch_size divisible by it)")
        # The patch embedding's output stays whole along T: with it split over the axis (which the shard_map's
        # in_spec would propagate backwards) and a batch replicated over another mesh axis, XLA's SPMD partitioner
        # in jaxlib 0.10.2 returns the patch-embedding kernel's gradient multiplied by that axis's size. The cost
        # is one [N, T, D] activation per device, outside the block stack.
        h = jax.lax.with_sharding_constraint(h, P(P.UNCONSTRAINED, None, P.UNCONSTRAINED))
        return jax.shard_map(local, in_specs=(P(), tokens, P()), out_specs=tokens, axis_names={axis_name},
                             check_vma=False)(state, h, c.astype(jnp.float32))

    return call


def _grid_rows(x, axis_name):
    """This device's tokens [N, T_d, D] as grid rows [N, T_d / G, G, D]."""
    n, local_tokens, d = x.shape
    width = math.isqrt(local_tokens * jax.lax.axis_size(axis_name))
    return x.reshape(n, local_tokens // width, width, d)


def transpose_token_grid(x, axis_name):
    """Raster tokens split by grid rows -> column-major tokens split by grid columns, [N, T_d, D] on each device.

    Its own inverse. One all-to-all: device d sends the columns of device e's block to device e.
    """
    n, local_tokens, d = x.shape
    rows = _grid_rows(x, axis_name)  # [N, G/S rows, G columns, D]
    columns = jax.lax.all_to_all(rows, axis_name, split_axis=2, concat_axis=1, tiled=True)  # [N, G, G/S, D]
    return columns.transpose(0, 2, 1, 3).reshape(n, local_tokens, d)


def reverse_tokens(x, axis_name):
    """The whole sequence reversed: device d's tokens flipped and sent to device S-1-d. x: [N, T_d, D]."""
    size = jax.lax.axis_size(axis_name)
    return jax.lax.ppermute(x[:, ::-1], axis_name, [(device, size - 1 - device) for device in range(size)])


def permute_tokens(x, order, axis_name):
    """`dig.permute_tokens` on tokens split over `axis_name`: raster -> `order` (anything with booleans
    `transposed` and `reversed`), its own inverse. x: [N, T_d, D]."""
    if order.transposed:
        x = transpose_token_grid(x, axis_name)
    if order.reversed:
        x = reverse_tokens(x, axis_name)
    return x


def with_halo_rows(rows, axis_name):
    """[N, R, W, D] grid rows -> [N, R + 2, W, D]: the neighbours' adjacent rows above and below, zeros at the top
    of the first device and the bottom of the last."""
    size = jax.lax.axis_size(axis_name)
    # Devices that receive nothing get zeros from ppermute: exactly the conv's zero padding at the grid's edges.
    above = jax.lax.ppermute(rows[:, -1:], axis_name, [(device, device + 1) for device in range(size - 1)])
    below = jax.lax.ppermute(rows[:, :1], axis_name, [(device + 1, device) for device in range(size - 1)])
    return jnp.concatenate([above, rows, below], axis=1)


def depthwise_conv3x3(conv, x, order, axis_name):
    """`conv(x, order)` (a `DepthwiseConv3x3`) on raster tokens split by grid rows: [N, T_d, D] -> [N, T_d, D].

    The conv runs on this device's rows with one halo row on each side; the halo rows' own outputs are dropped.
    """
    n, _, d = x.shape
    rows = with_halo_rows(_grid_rows(x, axis_name), axis_name)  # [N, R + 2, W, D]
    width = rows.shape[2]
    y = conv(rows.reshape(n, -1, d), order, grid_width=width)
    return y[:, width:-width]
