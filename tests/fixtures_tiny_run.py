"""A tiny quickstart training run (16x16 pixels, depth 1, 4 steps), trained once per test session.

Import the fixture into a test module with `from tests.fixtures_tiny_run import tiny_run  # noqa: F401`. Each module
that imports it registers its own fixture, so the run itself is cached here to train only once per session.
"""

import functools
import pathlib

import pytest

from configs.quickstart import get_config
from dig_jax.train import train

TINY_IMAGE_SIZE = 16
TINY_NUM_STEPS = 4
TINY_CHECKPOINT_STEPS = (2, 4)


def tiny_config():
    config = get_config()
    config.num_steps = TINY_NUM_STEPS
    config.global_batch_size = 8
    config.log_every = 2
    config.checkpoint_every = 2
    config.sample.per_class = 0
    config.model.options.depth = 1
    config.model.options.hidden_size = 32
    config.model.options.num_heads = 2
    config.data.image_size = TINY_IMAGE_SIZE
    config.model.input_size = TINY_IMAGE_SIZE
    return config


@functools.cache
def _train_tiny_run(session_temp_dir: pathlib.Path) -> str:
    workdir = str(session_temp_dir / "tiny_run")
    train(tiny_config(), workdir)
    return workdir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> str:
    """The workdir of a finished tiny run: config.json and checkpoints at TINY_CHECKPOINT_STEPS."""
    return _train_tiny_run(tmp_path_factory.getbasetemp())
