"""Quickstart: a small DiG trained in pixel space on the built-in "shapes" dataset (12 classes, 32x32).

Command:
    python -m dig_jax.train --config configs/quickstart.py --workdir workdirs/quickstart
Expected runtime: about 16-17 minutes on a 2-core CPU (1500 steps at ~1.6 steps/s plus compilation and the
final sampling; far faster on any GPU).
Expected result: the loss falls from ~1.0 to ~0.02-0.05 and the run ends by writing
workdirs/quickstart/samples_1500.png, one row per class (4 per row): every row in its class's colour, most with
its texture (checks, stripes, dots), shapes still blocky blobs (docs/quickstart_samples.png). With
--config.num_steps=3000 (about half an hour on the CPU; it resumes a finished 1500-step run) the shapes become
recognisable (docs/quickstart_samples_longer.png; docs/quickstart.md tells how the recipe was chosen).
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
    c.data.read_threads = 0  # images are rendered in memory: reader threads only compete for the CPU's cores
    c.data.worker_count = 0  # on a CPU the step, not the loader, sets the pace; workers would take its cores
    c.optimizer.learning_rate = 2e-3  # 1e-3 gives mostly wrong colours at 1500 steps (docs/quickstart.md)
    c.optimizer.warmup_steps = 100
    c.ema_decay = 0.995
    c.global_batch_size = 32
    c.num_steps = 1500
    c.log_every = 50
    c.checkpoint_every = 500
    c.sample.per_class = 4
    c.sample.num_steps = 50
    c.sample.cfg_scale = 4.0
    return c
