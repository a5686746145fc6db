"""Encodes ImageNet train at 256x256 with sd-vae-ft-ema into the latent dir the paper configs train on.

Command (one host; docs/imagenet.md has the multi-host launch and how to get the data and the VAE):
    python -m dig_jax.encode --config configs/encode_in256.py --out $LATENT_DIR \
        --config.data.kwargs.data_dir=$TFDS_DATA_DIR --config.vae.path=$VAE_DIR
Output: 1,281,167 records (label + [2, 32, 32, 8] float16 moments: the image and its mirror) in 257 shards, 42 GB.
Then train with --config.data.name=latents --config.data.kwargs.data_dir=$LATENT_DIR (see configs/imagenet256.py).
Rerunning the command resumes; it ends with a count check of every shard.
"""

from ml_collections import ConfigDict

from dig_jax.config_base import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.data.name = "imagenet2012"
    c.data.split = "train"
    c.data.image_size = 256
    c.data.kwargs = ConfigDict({"data_dir": ""})
    c.vae.path = ""
    c.vae.compute_dtype = "float32"  # the reference encodes in float32
    c.encode.batch_size = 128
    c.encode.shard_size = 5000
    c.encode.flip = True
    c.encode.dtype = "float16"
    return c
