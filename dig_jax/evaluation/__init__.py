"""ADM-compatible sample evaluation: the FID Inception network in Flax and FID, sFID, IS, precision and recall.

    from dig_jax.evaluation import FeatureExtractor, evaluate, load_inception
    extractor = FeatureExtractor(load_inception("pt_inception-2015-12-05-6726825d.pth"), batch_size=64)
    print(evaluate("samples.npz", "VIRTUAL_imagenet256_labeled.npz", extractor))

Command line: `python -m dig_jax.evaluate` (docs/evaluation.md).
"""

from dig_jax.evaluation.convert_inception import InceptionWeightsError, load_inception
from dig_jax.evaluation.inception import InceptionV3
from dig_jax.evaluation.metrics import (
                                        EvaluationError,
                                        FeatureExtractor,
                                        Features,
                                        Reference,
                                        Statistics,
                                        evaluate,
                                        frechet_distance,
                                        inception_score,
                                        load_reference,
                                        manifold_radii,
                                        precision_recall,
                                        read_image_batches,
                                        sample_metrics,
                                        write_reference,
)

__all__ = ["EvaluationError", "FeatureExtractor", "Features", "InceptionV3", "InceptionWeightsError", "Reference",
           "Statistics", "evaluate", "frechet_distance", "inception_score", "load_inception", "load_reference",
           "manifold_radii", "precision_recall", "read_image_batches", "sample_metrics", "write_reference"]
