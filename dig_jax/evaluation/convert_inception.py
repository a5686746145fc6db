"""pytorch-fid's Inception weights file -> the Flax FID Inception (`dig_jax.evaluation.inception`).

    model = load_inception("pt_inception-2015-12-05-6726825d.pth")   # or the converted .safetensors

The file is user-supplied (nothing is downloaded): pytorch-fid's release asset pt_inception-2015-12-05-6726825d.pth,
a state dict of `pytorch_fid.inception.fid_inception_v3()`. A `.pth` is read with torch.load(weights_only=True)
and needs PyTorch; convert it once to a `.safetensors` (same names and layouts, no PyTorch needed to read):

    python -m dig_jax.evaluation.convert_inception --input pt_inception-2015-12-05-6726825d.pth \
        --output inception_fid.safetensors

Every tensor is checked by name and shape; a file of another network fails with the names that differ.
"""

import argparse
import os
import sys

import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from dig_jax.convert import CONV, LINEAR, SAME, load_torch_state_dict
from dig_jax.evaluation.inception import InceptionV3
from dig_jax.images import atomic_write_bytes

SUFFIXES = (".pth", ".pt", ".safetensors")
# In the file but not used: the classifier bias (ADM's Inception Score drops it, see inception.py) and batch-norm
# step counters.
UNUSED_KEYS = ("fc.bias",)
UNUSED_SUFFIX = ".num_batches_tracked"
_BATCH_NORM_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_LISTED = 10


class InceptionWeightsError(ValueError):
    """The Inception weights file is missing or is not pytorch-fid's FID Inception; the message says which."""


def torch_name(path: tuple) -> tuple[str, object]:
    """nnx path of an InceptionV3 variable -> (pytorch-fid state-dict name, Layout)."""
    *module, leaf = (str(part) for part in path)
    prefix = ".".join(module)
    if leaf == "kernel":
        return f"{prefix}.weight", CONV if module[-1] == "conv" else LINEAR
    return f"{prefix}.{_BATCH_NORM_NAMES[leaf]}", SAME


def _variables(model: nnx.Module) -> dict[tuple, nnx.Variable]:
    return dict(nnx.to_flat_state(nnx.state(model)))


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """pytorch-fid state-dict name -> shape, for every tensor the Flax model reads."""
    model = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
    shapes = {}
    for path, variable in _variables(model).items():
        name, layout = torch_name(path)
        shapes[name] = layout.torch_shape(variable.get_value().shape)
    return shapes


def read_state_dict(path) -> dict[str, np.ndarray]:
    """The weights file at `path` (.pth/.pt: torch.load(weights_only=True); .safetensors) as name -> array."""
    path = os.fspath(path)
    if not path.endswith(SUFFIXES):
        raise InceptionWeightsError(f"Inception weights {path!r} must end in one of {SUFFIXES} (pytorch-fid's "
                                    f"pt_inception-2015-12-05-*.pth or its converted .safetensors)")
    if not os.path.isfile(path):
        raise InceptionWeightsError(f"Inception weights file {path!r} does not exist: download pytorch-fid's "
                                    f"pt_inception-2015-12-05-6726825d.pth (docs/evaluation.md) and pass its path")
    try:
        return load_torch_state_dict(path)
    except ImportError as error:  # a .pth without PyTorch installed: the message says what to do instead
        raise InceptionWeightsError(f"Inception weights {path!r}: {error}") from error
    except Exception as error:  # torch's and safetensors' readers raise many kinds for a corrupt file
        raise InceptionWeightsError(f"Inception weights {path!r} could not be read as a state dict "
                                    f"({type(error).__name__}: {error})") from error


def check_state_dict(state_dict: dict[str, np.ndarray], source: str) -> None:
    """Raises InceptionWeightsError listing missing, unexpected and mis-shaped tensors."""
    expected = expected_shapes()
    missing = [name for name in expected if name not in state_dict]
    unexpected = sorted(name for name in state_dict if name not in expected and name not in UNUSED_KEYS
                        and not name.endswith(UNUSED_SUFFIX))
    mismatched = [f"{name}: expected {shape}, got {tuple(state_dict[name].shape)}"
                  for name, shape in expected.items() if name in state_dict and tuple(state_dict[name].shape) != shape]
    if missing or unexpected or mismatched:
        problems = [f"{label} {items[:_LISTED]}" + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")
                    for label, items in (("missing", missing), ("unexpected", unexpected),
                                         ("shape mismatches", mismatched)) if items]
        raise InceptionWeightsError(f"{source} is not pytorch-fid's FID Inception state dict: " + "; ".join(problems))


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights with the file's names and shapes (He-scaled convolutions, batch-norm statistics near
    identity, so activations keep their size through the network): for tests and benchmarks without the file."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_shapes().items():
        if name.endswith(("running_var", "bn.weight")):
            weights[name] = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(("running_mean", "bias")):
            weights[name] = 0.1 * rng.standard_normal(shape)
        else:  # convolution and classifier weights
            weights[name] = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    return {name: value.astype(np.float32) for name, value in weights.items()}


def inception_from_state_dict(state_dict: dict[str, np.ndarray], source: str = "state dict") -> InceptionV3:
    """A Flax InceptionV3 holding `state_dict` (pytorch-fid names and layouts), checked by name and shape."""
    check_state_dict(state_dict, source)
    model = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
    values = {}
    for path, variable in _variables(model).items():
        name, layout = torch_name(path)
        values[path] = jnp.asarray(layout.to_flax(np.asarray(state_dict[name], np.float32)))
    graphdef, _ = nnx.split(model)
    return nnx.merge(graphdef, nnx.from_flat_state(values))


def load_inception(path) -> InceptionV3:
    """The Flax FID Inception from pytorch-fid's weights file (.pth) or its converted .safetensors."""
    return inception_from_state_dict(read_state_dict(path), source=f"Inception weights {os.fspath(path)!r}")


def convert(input_path, output_path) -> None:
    """Checks the weights at `input_path` and writes them as a .safetensors (same names and layouts)."""
    if not os.fspath(output_path).endswith(".safetensors"):
        raise InceptionWeightsError(f"--output must end in .safetensors, got {output_path!r}")
    state_dict = read_state_dict(input_path)
    check_state_dict(state_dict, source=f"Inception weights {os.fspath(input_path)!r}")
    kept = {name: np.ascontiguousarray(array, np.float32) for name, array in state_dict.items()
            if not name.endswith(UNUSED_SUFFIX)}
    atomic_write_bytes(os.fspath(output_path), safetensors.numpy.save(kept))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dig_jax.evaluation.convert_inception",
                                     description="Convert pytorch-fid's Inception .pth to a .safetensors once.")
    parser.add_argument("--input", required=True, help="pt_inception-2015-12-05-*.pth (pytorch-fid's weights)")
    parser.add_argument("--output", required=True, help="where to write the .safetensors")
    args = parser.parse_args(argv)
    try:
        convert(args.input, args.output)
    except InceptionWeightsError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
