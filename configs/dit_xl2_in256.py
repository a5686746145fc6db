"""DiT-XL/2 on ImageNet 256x256, the paper's recipe (400K steps, global batch 256, AdamW 1e-4, EMA 0.9999).

Commands (one host; docs/imagenet.md says how to get the data and the VAE, README the multi-host launches).
Pre-encoded latents (written once by `python -m dig_jax.encode --config configs/encode_in256.py`; faster steps):
    python -m dig_jax.train --config configs/dit_xl2_in256.py --workdir workdirs/dit_xl2_in256 \
        --config.data.name=latents --config.data.kwargs.data_dir=$LATENT_DIR
Online encoding (the VAE encodes every batch; no encode job):
    python -m dig_jax.train --config configs/dit_xl2_in256.py --workdir workdirs/dit_xl2_in256 \
        --config.data.kwargs.data_dir=$TFDS_DATA_DIR --config.vae.path=$VAE_DIR
Both sample a fresh posterior latent each step, as the reference does; a workdir keeps the one it started with.
Expected result: FID-50K 19.47 at 400K steps without guidance (paper Table/Fig.; 250 DDPM steps).
Expected runtime: see docs/benchmarks.md for measured images/s; 400K steps x 256 images on 8 accelerators.
"""

from dig_jax.config_base import paper_config


def get_config(arg=None):
    del arg
    return paper_config("DiT-XL/2")
