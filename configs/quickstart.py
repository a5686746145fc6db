"""Quickstart: a small DiG trained in pixel space on the built-in "shapes" dataset (12 classes, 32x32).

Command:
    python -m dig_jax.train --config configs/quickstart.py --workdir workdirs/quickstart
Expected runtime: about 6-10 minutes on a 2-core CPU (compilation included; faster on any GPU).
Expected result: the loss falls from ~1.0 to ~0.1 and the run ends by writing
workdirs/quickstart/samples_<steps>.png, one row per class, where most samples show the row's shape and colour.
Rerunning the command resumes from the last checkpoint (and finishes at once if the run is complete).
"""

from dig_jax.config_base import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.model.name = "DiG-S/4"  # patch 4: an 8x8 token grid keeps CPU steps cheap
    c.model.input_size = 32
    c.model.in_channels = 3
    c.model.num_classes = 12
    c.model.options = dict(depth=4, hidden_size=128, num_heads=4, gla_impl="xla")
    c.data.name = "shapes"
    c.data.space = "pixel"
    c.data.image_size = 32
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 100
    c.ema_decay = 0.995
    c.global_batch_size = 32
    c.num_steps = 500
    c.log_every = 50
    c.checkpoint_every = 250
    c.sample.per_class = 8
    c.sample.num_steps = 50
    c.sample.cfg_scale = 2.0
    return c
