"""Timestep respacing: sampling with a subset of a diffusion's steps (ADM's SpacedDiffusion semantics)."""

from collections.abc import Iterable, Sequence

import numpy as np

from dig_jax.diffusion.gaussian import GaussianDiffusion
from dig_jax.diffusion.schedule import NoiseSchedule

_DDIM_PREFIX = "ddim"


def _ddim_steps(num_timesteps: int, desired_count: int) -> set:
    """{0, s, 2s, ...} with the smallest integer stride s that yields exactly desired_count steps."""
    for stride in range(1, num_timesteps):
        steps = range(0, num_timesteps, stride)
        if len(steps) == desired_count:
            return set(steps)
    raise ValueError(f"cannot take exactly {desired_count} of {num_timesteps} steps with an integer stride")


def _section_steps(start: int, size: int, count: int) -> list:
    """`count` steps spread evenly over [start, start + size), both ends included (when count > 1)."""
    if count > size:
        raise ValueError(f"cannot take {count} steps from a section of {size} steps")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    # Accumulated (not multiplied) fractional index, rounded with Python's round: ADM's exact rule.
    steps, index = [], 0.0
    for _ in range(count):
        steps.append(start + round(index))
        index += stride
    return steps


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set:
    """The original steps kept when respacing a `num_timesteps`-step diffusion.

    Args:
      section_counts: steps per equal section of the original process, as a list or a comma-separated string
        ("250" -> 250 steps over all 1000, i.e. round(i * 999 / 249); "10,15,20" splits the process in three);
        or "ddimN": exactly N steps with the fixed integer stride of the DDIM paper ("ddim50" -> 0, 20, ..., 980).
        Sections differ in size by at most one step, the first ones being the larger.

    Returns:
      The set of kept original step indices.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith(_DDIM_PREFIX):
            return _ddim_steps(num_timesteps, int(section_counts[len(_DDIM_PREFIX) :]))
        section_counts = [int(count) for count in section_counts.split(",")]
    base_size, extra = divmod(num_timesteps, len(section_counts))
    kept, start = [], 0
    for i, count in enumerate(section_counts):
        size = base_size + (1 if i < extra else 0)
        kept += _section_steps(start, size, count)
        start += size
    return set(kept)


def respaced(diffusion: GaussianDiffusion, use_timesteps: Iterable[int]) -> GaussianDiffusion:
    """A diffusion that walks only `use_timesteps` (indices of `diffusion`'s steps), with the same marginals there.

    Step i of the result keeps abar of the i-th kept step, so its beta is 1 - abar_{t_i} / abar_{t_{i-1}}
    (abar_{t_{-1}} = 1), and its timestep_map sends i to the ORIGINAL timestep the model is conditioned on.
    """
    kept = np.array(sorted({int(t) for t in use_timesteps}), dtype=np.int64)
    if kept.size < 2 or kept[0] < 0 or kept[-1] >= diffusion.num_timesteps:
        raise ValueError(
            f"use_timesteps must hold at least 2 distinct steps in [0, {diffusion.num_timesteps}), got {kept.tolist()}"
        )
    kept_alphas_cumprod = diffusion.schedule.alphas_cumprod[kept]
    betas = 1.0 - kept_alphas_cumprod / np.append(1.0, kept_alphas_cumprod[:-1])
    return GaussianDiffusion(NoiseSchedule.from_betas(betas), diffusion.timestep_map[kept], diffusion.learn_sigma)
