"""Official PyTorch DiG / DiT checkpoints <-> the Flax NNX models of `dig_jax.models`.

    state = load_torch_state_dict("DiG-XL-2.pt")           # EMA weights of a training checkpoint
    model = import_torch_weights(create_model("DiG-XL/2", rngs=nnx.Rngs(0)), state)
    save_torch_checkpoint(model, "exported.safetensors")   # back to the official names and layouts

Our models keep tokens in raster order and apply each block's scan order inside the block, so every official
tensor maps to exactly one parameter, or to one column block of a parameter that fuses several official Linears
(DiG's GLA `in_proj` = the kernels of q_proj, k_proj, v_proj, g_proj and gk_proj.0 side by side); only layouts
differ:
  - Linear weight [out, in] <-> kernel [in, out];
  - Conv2d weight OIHW <-> kernel HWIO (patch conv [D, C, p, p] <-> [p, p, C, D], depthwise [D, 1, 3, 3] <->
    [3, 3, 1, D]); both frameworks compute cross-correlation, so kernels are transposed, never flipped;
  - fused matrices keep their row blocks as column blocks: DiG gate_proj rows [gate; value], DiT qkv rows [q; k; v].
`pos_embed` [1, T, D] is the fixed sin-cos table, not a parameter: import checks it against the model's own
(a mismatch means another input_size, patch_size or hidden_size), export writes the model's.

Command line (our weights are a .safetensors of the parameter tree, names = '/'-joined nnx paths):
    python -m dig_jax.convert --model DiG-XL/2 --input ckpt.pt --output params.safetensors
    python -m dig_jax.convert --model DiG-XL/2 --direction to_torch --input params.safetensors --output ckpt.pt
"""

import argparse
import dataclasses
import functools
import os
import re
import sys
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.flax
import safetensors.numpy
from flax import nnx

from dig_jax.models import create_model
from dig_jax.models.dig import DiGConfig, gla_input_widths
from dig_jax.models.dit import DiTConfig

POS_EMBED_KEY = "pos_embed"
POS_EMBED_ATOL = 1e-5
TORCH_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
_LISTED_NAMES = 20  # error messages list this many names, then a count


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a PyTorch tensor is laid out relative to its Flax parameter."""
    to_flax_axes: tuple[int, ...] | None  # PyTorch axes in Flax order; None: the same layout

    def to_flax(self, tensor: np.ndarray) -> np.ndarray:
        return tensor if self.to_flax_axes is None else np.transpose(tensor, self.to_flax_axes)

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        if self.to_flax_axes is None:
            return array
        return np.ascontiguousarray(np.transpose(array, np.argsort(self.to_flax_axes)))

    def torch_shape(self, flax_shape) -> tuple[int, ...]:
        if self.to_flax_axes is None:
            return tuple(flax_shape)
        return tuple(int(flax_shape[axis]) for axis in np.argsort(self.to_flax_axes))


SAME = Layout(None)
LINEAR = Layout((1, 0))       # [out, in] -> [in, out]
CONV = Layout((2, 3, 1, 0))   # OIHW -> HWIO


@dataclasses.dataclass(frozen=True)
class Entry:
    """One official tensor and the parameter (or the parameter's column block) it fills."""
    torch_key: str
    path: tuple[str | int, ...]  # nnx path of the Param
    layout: Layout
    columns: tuple[int, int] | None = None  # [start, stop) of the Param's last axis; None: the whole Param

    def part(self, array):
        """The piece of the Param's value this tensor fills."""
        return array if self.columns is None else array[..., self.columns[0]:self.columns[1]]

    def part_shape(self, param_shape) -> tuple[int, ...]:
        if self.columns is None:
            return tuple(param_shape)
        return (*param_shape[:-1], self.columns[1] - self.columns[0])


def _linear(torch_prefix: str, path: tuple, *, bias: bool = True) -> list[Entry]:
    entries = [Entry(f"{torch_prefix}.weight", (*path, "kernel"), LINEAR)]
    if bias:
        entries.append(Entry(f"{torch_prefix}.bias", (*path, "bias"), SAME))
    return entries


def _embedder_entries() -> list[Entry]:
    """Patch, timestep and label embedders, named alike in DiG and DiT."""
    return [
        Entry("x_embedder.proj.weight", ("x_embedder", "proj", "kernel"), CONV),
        Entry("x_embedder.proj.bias", ("x_embedder", "proj", "bias"), SAME),
        *_linear("t_embedder.mlp.0", ("t_embedder", "mlp_in")),
        *_linear("t_embedder.mlp.2", ("t_embedder", "mlp_out")),
        Entry("y_embedder.embedding_table.weight", ("y_embedder", "embedding_table", "embedding"), SAME),
    ]


def _final_layer_entries() -> list[Entry]:
    return [*_linear("final_layer.linear", ("final_layer", "linear")),
            *_linear("final_layer.adaLN_modulation.1", ("final_layer", "adaLN_modulation"))]


def _dig_block_entries(config: DiGConfig, index: int) -> list[Entry]:
    torch_block, block = f"blocks.{index}", ("blocks", index)
    attn = (*block, "attn")
    in_proj_parts = ("q_proj", "k_proj", "v_proj", "g_proj", "gk_proj.0")  # in gla_input_widths' order
    starts = np.cumsum((0, *gla_input_widths(config.hidden_size)))
    entries = [
        *[Entry(f"{torch_block}.attn.{name}.weight", (*attn, "in_proj", "kernel"), LINEAR, (int(start), int(stop)))
          for name, start, stop in zip(in_proj_parts, starts, starts[1:])],
        *_linear(f"{torch_block}.attn.gk_proj.1", (*attn, "gk_proj_up")),
        *_linear(f"{torch_block}.attn.o_proj", (*attn, "o_proj"), bias=False),
        Entry(f"{torch_block}.attn.g_norm_swish_gate.weight", (*attn, "g_norm_weight"), SAME),
        *_linear(f"{torch_block}.mlp.gate_proj", (*block, "mlp", "gate_proj"), bias=False),
        *_linear(f"{torch_block}.mlp.down_proj", (*block, "mlp", "down_proj"), bias=False),
        *_linear(f"{torch_block}.adaLN_modulation.1", (*block, "adaLN_modulation")),
        Entry(f"{torch_block}.dw_conv.weight", (*block, "dw_conv", "kernel"), CONV),
        Entry(f"{torch_block}.dw_conv.bias", (*block, "dw_conv", "bias"), SAME),
    ]
    if config.skip and index > config.depth // 2:
        entries += _linear(f"{torch_block}.skip_linear", (*block, "skip_linear"))
    return entries


def _dit_block_entries(config: DiTConfig, index: int) -> list[Entry]:
    del config  # every DiT block has the same tensors
    torch_block, block = f"blocks.{index}", ("blocks", index)
    return [
        *_linear(f"{torch_block}.attn.qkv", (*block, "attn", "qkv")),
        *_linear(f"{torch_block}.attn.proj", (*block, "attn", "proj")),
        *_linear(f"{torch_block}.mlp.fc1", (*block, "fc1")),
        *_linear(f"{torch_block}.mlp.fc2", (*block, "fc2")),
        *_linear(f"{torch_block}.adaLN_modulation.1", (*block, "adaLN_modulation")),
    ]


_BLOCK_ENTRIES: dict[type, Callable[..., list[Entry]]] = {DiGConfig: _dig_block_entries, DiTConfig: _dit_block_entries}


def weight_table(config) -> list[Entry]:
    """Every trainable official tensor of a model with this config (DiGConfig or DiTConfig), in state-dict order."""
    block_entries = _BLOCK_ENTRIES.get(type(config))
    if block_entries is None:
        raise ValueError(f"config must be one of {[cls.__name__ for cls in _BLOCK_ENTRIES]}, "
                         f"got {type(config).__name__}")
    blocks = [entry for i in range(config.depth) for entry in block_entries(config, i)]
    return _embedder_entries() + blocks + _final_layer_entries()


def _model_params(model: nnx.Module, table: list[Entry]) -> dict[tuple, nnx.Variable]:
    """The model's Params by nnx path; the table must fill each of them exactly once (whole, or by column blocks
    that tile its last axis)."""
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    by_path = _entries_by_path(table)
    unnamed, unknown = sorted(set(params) - set(by_path), key=str), sorted(set(by_path) - set(params), key=str)
    untiled = sorted((path for path, entries in by_path.items() if path in params
                      and not _tiles(entries, params[path].get_value().shape)), key=str)
    if unnamed or unknown or untiled:
        raise ValueError(f"the conversion table of {type(model).__name__} does not match the model: parameters "
                         f"without an official name {_listing(unnamed)}; table paths without a parameter "
                         f"{_listing(unknown)}; parameters not filled exactly once {_listing(untiled)}")
    return params


def _entries_by_path(table: list[Entry]) -> dict[tuple, list[Entry]]:
    """Entries per Param path, column blocks in column order."""
    by_path = {}
    for entry in table:
        by_path.setdefault(entry.path, []).append(entry)
    return {path: sorted(entries, key=lambda e: e.columns or (0, 0)) for path, entries in by_path.items()}


def _tiles(entries: list[Entry], shape) -> bool:
    """Whether the entries' column spans (a whole-Param entry spans all columns), in order, cover [0, last) once."""
    spans = [entry.columns or (0, shape[-1]) for entry in entries]
    ends = [0, *(edge for span in spans for edge in span), shape[-1]]
    return all(stop == start for stop, start in zip(ends[::2], ends[1::2]))


def torch_key_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Official state-dict names -> shapes for this model (works on `nnx.eval_shape` models: nothing is read)."""
    table = weight_table(model.config)
    return _torch_shapes(model, table, _model_params(model, table))


def _torch_shapes(model: nnx.Module, table: list[Entry], params: dict) -> dict[str, tuple[int, ...]]:
    shapes = {POS_EMBED_KEY: (1, *model.pos_embed.get_value().shape)}
    shapes.update({entry.torch_key: entry.layout.torch_shape(entry.part_shape(params[entry.path].get_value().shape))
                   for entry in table})
    return shapes


def export_torch_weights(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's weights as an official PyTorch state dict (numpy arrays), `pos_embed` [1, T, D] included."""
    table = weight_table(model.config)
    params = _model_params(model, table)
    # np.array copies: the arrays are writable and independent of the model (torch.from_numpy wants that)
    weights = {POS_EMBED_KEY: np.array(model.pos_embed.get_value())[None]}
    weights.update({entry.torch_key: entry.layout.to_torch(np.array(entry.part(params[entry.path].get_value())))
                    for entry in table})
    return weights


def import_torch_weights(model: nnx.Module, state_dict: Mapping) -> nnx.Module:
    """Fills every parameter of `model` (in place; returns it) from an official state dict.

    state_dict: official name -> numpy array or torch tensor (a plain state dict; see `load_torch_state_dict` for
    files and training checkpoints). Values are cast to each parameter's dtype. Raises ValueError naming missing
    and unexpected keys and shape mismatches, or when `pos_embed` differs from the model's fixed embedding.
    """
    table = weight_table(model.config)
    params = _model_params(model, table)
    tensors = {name: _to_numpy(value) for name, value in state_dict.items()}
    _check_names_and_shapes(_torch_shapes(model, table, params), tensors, source="PyTorch state dict", model=model)
    _check_pos_embed(model, tensors[POS_EMBED_KEY])
    updates = {path: _like(np.concatenate([e.layout.to_flax(tensors[e.torch_key]) for e in entries], axis=-1),
                           params[path])
               for path, entries in _entries_by_path(table).items()}
    nnx.update(model, nnx.from_flat_state(updates))
    return model


def _like(array: np.ndarray, param: nnx.Variable) -> jax.Array:
    """`array` as a jax array with the parameter's dtype and sharding."""
    current = param.get_value()
    return jax.device_put(jnp.asarray(array, dtype=current.dtype), getattr(current, "sharding", None))


def _check_names_and_shapes(expected: Mapping[str, tuple], given: Mapping[str, np.ndarray], *, source: str,
                            model: nnx.Module) -> None:
    missing = [name for name in expected if name not in given]
    unexpected = sorted(name for name in given if name not in expected)
    mismatched = [f"{name}: expected {tuple(shape)}, got {tuple(given[name].shape)}"
                  for name, shape in expected.items() if name in given and tuple(given[name].shape) != tuple(shape)]
    if not (missing or unexpected or mismatched):
        return
    problems = [f"missing keys {_listing(missing)}" if missing else "",
                f"unexpected keys {_listing(unexpected)}" if unexpected else "",
                f"shape mismatches [{'; '.join(mismatched)}]" if mismatched else ""]
    if any(line.startswith(POS_EMBED_KEY) for line in mismatched):
        problems.append(f"({POS_EMBED_KEY} holds (input_size/patch_size)^2 tokens: is input_size="
                        f"{model.config.input_size} right?)")
    raise ValueError(f"{source} does not fit {type(model).__name__}({_describe(model.config)}): "
                     + "; ".join(problem for problem in problems if problem))


def _check_pos_embed(model: nnx.Module, pos_embed: np.ndarray) -> None:
    ours = np.asarray(model.pos_embed.get_value())
    error = float(np.max(np.abs(pos_embed[0].astype(np.float64) - ours)))
    if not error <= POS_EMBED_ATOL:
        raise ValueError(f"{POS_EMBED_KEY} differs from the model's fixed sin-cos embedding by up to {error:.3g} "
                         f"(tolerance {POS_EMBED_ATOL}): the checkpoint was made for another input_size, patch_size "
                         f"or position embedding than {_describe(model.config)}")


def _describe(config) -> str:
    return (f"depth={config.depth}, hidden_size={config.hidden_size}, patch_size={config.patch_size}, "
            f"input_size={config.input_size}")


def _listing(names: list) -> str:
    shown = ", ".join(str(name) for name in names[:_LISTED_NAMES])
    more = f", ... ({len(names) - _LISTED_NAMES} more)" if len(names) > _LISTED_NAMES else ""
    return f"[{shown}{more}]"


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor; numpy has no (b)float16 of torch's kind: widen exactly to f32
        value = value.detach().cpu()
        if value.dtype.is_floating_point and value.element_size() < 4:
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def load_torch_state_dict(source, *, prefer: str = "ema") -> dict[str, np.ndarray]:
    """An official state dict (name -> numpy array) from a file or a mapping.

    source: a `.pt`/`.pth` file (read with torch.load(weights_only=True)), a `.safetensors` file, or a mapping
    name -> array/tensor. A training checkpoint {"model", "ema", "opt", "args"} yields its `prefer` entry ("ema",
    the weights sampling uses, or "model", the raw weights); a plain state dict is used as is. A `module.` prefix
    carried by every key (DistributedDataParallel) is removed.
    """
    if prefer not in ("ema", "model"):
        raise ValueError(f"prefer must be 'ema' or 'model', got {prefer!r}")
    if isinstance(source, (str, os.PathLike)):
        source = _read_checkpoint_file(Path(source))
    if not isinstance(source, Mapping):
        raise TypeError(f"source must be a checkpoint path or a mapping, got {type(source).__name__}")
    state = _training_checkpoint_entry(source, prefer)
    prefix = "module."
    if state and all(name.startswith(prefix) for name in state):
        state = {name[len(prefix):]: value for name, value in state.items()}
    return {name: _to_numpy(value) for name, value in state.items()}


def _training_checkpoint_entry(checkpoint: Mapping, prefer: str) -> Mapping:
    if not any(isinstance(checkpoint.get(key), Mapping) for key in ("ema", "model")):
        return checkpoint  # a plain state dict
    if prefer not in checkpoint:
        raise ValueError(f"the training checkpoint has no {prefer!r} weights (prefer={prefer!r}); "
                         f"its entries are {sorted(checkpoint)}")
    return checkpoint[prefer]


def _read_checkpoint_file(path: Path) -> Mapping:
    if path.suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return _torch_load(path)
    raise ValueError(f"checkpoint path must end in {', '.join(TORCH_SUFFIXES)} or {SAFETENSORS_SUFFIX}, got {path}")


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    _check_exists(path)
    # The flax reader, unlike the numpy one, handles bfloat16; host memory keeps accelerators free.
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        try:
            return {name: np.asarray(array) for name, array in safetensors.flax.load_file(path).items()}
        except safetensors.SafetensorError as error:
            raise ValueError(f"{path} is not a safetensors file ({error})") from error


def _torch_load(path: Path):
    torch = _import_torch(f"reading {path}")
    _check_exists(path)
    # Official training checkpoints store their command line as an argparse.Namespace, which the weights-only
    # unpickler refuses unless allowed; it is a plain attribute bag, so allowing it keeps the load safe.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for bytes it cannot read (UnicodeDecodeError, ...)
            if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
                raise ValueError(f"{path} is not a PyTorch checkpoint") from error
            refused = re.search(r"WeightsUnpickler error: (.*?)(?= Please use|$)", str(error), re.DOTALL)
            detail = " ".join(refused.group(1).split()) if refused else f"{type(error).__name__}: {error}"
            raise ValueError(f"{path} could not be read as weights alone ({detail}); no code from it is run, so it "
                             "must hold only tensors and plain containers") from error


def _import_torch(purpose: str):
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"{purpose} needs PyTorch: pip install torch, or use a .safetensors file instead") from error
    return torch


def save_torch_checkpoint(model: nnx.Module, path) -> None:
    """Writes `export_torch_weights(model)` as a plain state dict: `.pt`/`.pth` (torch.save) or `.safetensors`."""
    path = Path(path)
    weights = export_torch_weights(model)
    if path.suffix == SAFETENSORS_SUFFIX:
        _write_atomically(path, lambda tmp: safetensors.numpy.save_file(weights, tmp))
    elif path.suffix in TORCH_SUFFIXES:
        torch = _import_torch(f"writing {path}")
        tensors = {name: torch.from_numpy(array) for name, array in weights.items()}
        _write_atomically(path, lambda tmp: torch.save(tensors, tmp))
    else:
        raise ValueError(f"path must end in {', '.join(TORCH_SUFFIXES)} or {SAFETENSORS_SUFFIX}, got {path}")


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename, so a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _flax_name(path: tuple) -> str:
    return "/".join(str(part) for part in path)


def save_flax_weights(model: nnx.Module, path) -> None:
    """Writes the model's Params to a `.safetensors` file, named by '/'-joined nnx paths ('blocks/0/attn/...')."""
    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise ValueError(f"path must end in {SAFETENSORS_SUFFIX}, got {path}")
    weights = {_flax_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    _write_atomically(path, lambda tmp: safetensors.numpy.save_file(weights, tmp))


def load_flax_weights(model: nnx.Module, path) -> nnx.Module:
    """Fills the model's Params (in place; returns it) from a `save_flax_weights` file; ValueError on any mismatch."""
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    tensors = _read_safetensors(Path(path))
    expected = {_flax_name(p): tuple(v.get_value().shape) for p, v in params.items()}
    _check_names_and_shapes(expected, tensors, source=f"Flax weights {path}", model=model)
    nnx.update(model, nnx.from_flat_state({p: _like(tensors[_flax_name(p)], v) for p, v in params.items()}))
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dig_jax.convert",
        description="Convert official PyTorch DiG/DiT weights to this project's Flax weights (to_flax) or back "
                    "(to_torch). Flax weights are a .safetensors of the parameter tree ('/'-joined nnx paths).")
    parser.add_argument("--model", required=True, help="registered model name, e.g. DiG-XL/2, DiG-S/2-U, DiT-XL/2")
    parser.add_argument("--input", required=True, help="to_flax: official .pt/.pth/.safetensors; "
                                                       "to_torch: our .safetensors")
    parser.add_argument("--output", required=True, help="to_flax: .safetensors; to_torch: .pt/.pth/.safetensors")
    parser.add_argument("--input_size", type=int, default=32, help="latent size (image size / 8)")
    parser.add_argument("--direction", choices=("to_flax", "to_torch"), default="to_flax")
    parser.add_argument("--prefer", choices=("ema", "model"), default="ema",
                        help="which weights of a training checkpoint to convert")
    args = parser.parse_args(argv)
    try:
        convert_file(args)
    except (ValueError, OSError, ImportError) as error:  # bad files, names or shapes; unwritable outputs
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def convert_file(args: argparse.Namespace) -> None:
    """What `main` runs: args.input -> args.output in args.direction for model args.model."""
    output_folder = Path(args.output).resolve().parent
    if not output_folder.is_dir():
        raise FileNotFoundError(f"--output {args.output}: folder {output_folder} does not exist")
    new_model = functools.partial(create_model, args.model, input_size=args.input_size, rngs=nnx.Rngs(0))
    if args.direction == "to_flax":
        state = load_torch_state_dict(args.input, prefer=args.prefer)  # read first: fail fast on a bad file
        save_flax_weights(import_torch_weights(new_model(), state), args.output)
    else:
        save_torch_checkpoint(load_flax_weights(new_model(), args.input), args.output)


if __name__ == "__main__":
    main()
