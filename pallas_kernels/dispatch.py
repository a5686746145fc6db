"""How every op reads its `impl` argument: "auto" picks the op's kernel on the backends it is built for, when the
shape fits it, and the op's plain-JAX implementation otherwise; any other name must be one of the op's IMPLS."""

import jax


def resolve_impl(impl: str, impls, *, kernel: str, fallback: str, backends=("gpu",), kernel_fits: bool = True) -> str:
    """The implementation name `impl` stands for on the default backend."""
    if impl == "auto":
        return kernel if jax.default_backend() in backends and kernel_fits else fallback
    if impl not in impls:
        raise ValueError(f"impl must be 'auto' or one of {sorted(impls)}, got {impl!r}")
    return impl
