"""FID during training (`config.eval`): samples from the EMA weights scored against reference statistics.

    check_eval_config(config)                       # before training: names the bad key or file
    evaluator = TrainingEvaluator(config, decode)   # loads the Inception weights and the reference
    scalars = evaluator(model)                      # {"fid", "sfid", "inception_score", "seconds"}

Every evaluation draws the same config.eval.num_images labels and noise (from config.seed), with config.sample's
sampler, steps and guidance, so successive values differ only by the weights. FID from fewer samples than the
reference's is biased upwards: compare values of one setting with each other, and report FID-50K from
`python -m dig_jax.sample` and `python -m dig_jax.evaluate`.
"""

import os
import time

from flax import nnx
from ml_collections import ConfigDict

from dig_jax.evaluation.convert_inception import SUFFIXES, load_inception
from dig_jax.evaluation.metrics import (
    STATISTICS_KEYS,
    FeatureExtractor,
    image_count,
    load_reference,
    npz_keys,
    sample_metrics,
)
from dig_jax.sampling import random_classes, sample_images


def check_eval_config(config: ConfigDict) -> None:
    """Raises ValueError naming the config.eval key when in-training FID cannot run; reads only file headers."""
    e = config.eval
    if e.every == 0:
        return
    if e.every < 0 or e.every % config.steps_per_call:
        raise ValueError(f"config.eval.every must be 0 (off) or a positive multiple of config.steps_per_call="
                         f"{config.steps_per_call}, got {e.every}")
    if e.num_images < 2:
        raise ValueError(f"config.eval.num_images must be >= 2, got {e.num_images}")
    if e.batch_size < 1:
        raise ValueError(f"config.eval.batch_size must be >= 1, got {e.batch_size}")
    if not e.inception_weights.endswith(SUFFIXES) or not os.path.isfile(e.inception_weights):
        raise ValueError(f"config.eval.inception_weights must be an existing pytorch-fid Inception file "
                         f"({', '.join(SUFFIXES)}), got {e.inception_weights!r}")
    argument = "config.eval.reference"
    keys = npz_keys(e.reference, argument)
    if not set(STATISTICS_KEYS) <= set(keys):
        image_count(e.reference, argument)  # no statistics: its images must be readable
    if config.data.space == "latent" and not config.vae.path:
        raise ValueError("config.eval needs config.vae.path: latent samples are decoded to images for the "
                         "Inception network")


class TrainingEvaluator:
    """Samples config.eval.num_images images from a model and computes FID, sFID and IS against the reference."""

    def __init__(self, config: ConfigDict, decode=None):
        """decode: latents -> images in [-1, 1] (DataSpace.decode) for latent-space models, else None."""
        self.config = config
        self.decode = decode
        self.extractor = FeatureExtractor(load_inception(config.eval.inception_weights), config.eval.batch_size)
        self.reference = load_reference(config.eval.reference, self.extractor, with_images=False,
                                        argument="config.eval.reference")
        self.labels = random_classes(config.seed, config.eval.num_images, config.model.num_classes)

    def _image_batches(self, model: nnx.Module):
        s, batch_size = self.config.sample, self.config.eval.batch_size
        for start in range(0, len(self.labels), batch_size):
            # Image i is image i of config.seed's stream (dig_jax.sampling): the images
            # `python -m dig_jax.sample --num_images N --seed <config.seed>` samples with the same settings.
            yield sample_images(model, self.labels[start:start + batch_size], self.config.seed, batch_size=batch_size,
                                first_index=start, decode=self.decode, num_steps=s.num_steps, sampler=s.sampler,
                                cfg_scale=s.cfg_scale, clip_denoised=self.config.data.space == "pixel")

    def __call__(self, model: nnx.Module) -> dict:
        """model: the network holding the weights to score (the EMA) -> {"fid", "sfid", "inception_score",
        "seconds"}."""
        start = time.perf_counter()
        metrics = sample_metrics(self.extractor(self._image_batches(model)), self.reference)
        scalars = {name: metrics[name] for name in ("fid", "sfid", "inception_score")}
        return {**scalars, "seconds": time.perf_counter() - start}
