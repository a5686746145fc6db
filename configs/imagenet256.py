"""The paper's ImageNet 256x256 recipe for one model, named after the colon: `configs/imagenet256.py:DiG-XL/2`.

Models: DiG-S/2, DiG-B/2, DiG-L/2, DiG-XL/2 and their baselines DiT-S/2, DiT-B/2, DiT-L/2, DiT-XL/2. The recipe
(spec section 3): 32x32x4 latents of sd-vae-ft-ema, AdamW 1e-4 constant, global batch 256, EMA 0.9999, 400K steps,
float32 compute, learned sigma.

Commands (one host; docs/imagenet.md says how to get the data and the VAE, launch/README.md the multi-host launches).
Pre-encoded latents (written once by `python -m dig_jax.encode --config configs/encode_in256.py`; faster steps):
    python -m dig_jax.train --config configs/imagenet256.py:DiG-XL/2 --workdir workdirs/dig_xl2_in256 \
        --config.data.name=latents --config.data.kwargs.data_dir=$LATENT_DIR
Online encoding (the VAE encodes every batch; no encode job):
    python -m dig_jax.train --config configs/imagenet256.py:DiG-XL/2 --workdir workdirs/dig_xl2_in256 \
        --config.data.kwargs.data_dir=$TFDS_DATA_DIR --config.vae.path=$VAE_DIR
Both sample a fresh posterior latent each step, as the reference does; a workdir keeps the one it started with.

Expected runtime: 400K steps x 256 = 102.4M images. At the train step's measured bf16 rates on one H100
(docs/benchmarks.md; add --config.compute_dtype=bfloat16) that is about 78 GPU-hours for DiG-XL/2 (363 img/s), 63
for DiT-XL/2 (455 img/s), 11 for DiG-S/2 (2592 img/s) and 9 for DiT-S/2 (3267 img/s): about 10 hours for DiG-XL/2
on 8 GPUs if data parallelism scales linearly. B/2 and L/2 and float32 compute are not measured.

Expected result (config_base.PAPER_RESULTS): FID-50K at 400K steps, 250 DDPM steps, no guidance:
    DiG-S/2 62.06   DiG-B/2 39.50   DiG-L/2 22.90   DiG-XL/2 18.53
    DiT-S/2 68.40   DiT-B/2 43.47   DiT-L/2 23.33   DiT-XL/2 19.47
"""

from dig_jax.config_base import PAPER_RESULTS, paper_config


def get_config(model_name=None):
    if model_name not in PAPER_RESULTS:
        raise ValueError(f"configs/imagenet256.py takes the model after a colon, one of {', '.join(PAPER_RESULTS)}; "
                         f"got {model_name!r} (e.g. --config configs/imagenet256.py:DiG-XL/2)")
    return paper_config(model_name)
