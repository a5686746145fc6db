"""ADM's sample metrics: FID, sFID, Inception Score, precision and recall, from Inception features.

    extractor = FeatureExtractor(load_inception("pt_inception-2015-12-05-6726825d.pth"), batch_size=64)
    results = evaluate("samples.npz", "VIRTUAL_imagenet256_labeled.npz", extractor)
    # {"fid": ..., "sfid": ..., "inception_score": ..., "precision": ..., "recall": ..., ...}

Definitions follow ADM's evaluator (guided-diffusion evaluations/evaluator.py):
  - FID / sFID: Frechet distance of Gaussians fitted (mean, np.cov) to the pool / spatial features (the trace
    of the covariance product's square root through symmetric eigendecompositions, see `frechet_distance`).
  - Inception Score: exp(E KL(p(y|x) || p(y))) of softmax(logits) (logits without the classifier bias) in splits of
    5000 samples (10 splits of 50K samples), averaged.
  - Precision / recall: k = 3 nearest-neighbour manifolds of the pool features (radius = squared distance to the
    3rd nearest other point); precision = share of samples inside the reference manifold, recall = share of
    reference images inside the sample manifold. Squared distances are computed like ADM: in float16, or float32
    where float16 overflows.
Image batches are ADM's npz layout: `arr_0` uint8 [N, H, W, 3] (any H, W: the network resizes to 299). Reference
batches may also hold precomputed `mu`, `sigma`, `mu_s`, `sigma_s`, which FID and sFID then use (ADM's choice);
precision and recall always need the reference images.
"""

import contextlib
import dataclasses
import functools
import io
import zipfile
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dig_jax.evaluation.inception import FEATURE_SIZE, SPATIAL_FEATURE_SIZE, InceptionV3
from dig_jax.images import atomic_write_bytes

IMAGES_KEY = "arr_0"
STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
IS_SPLIT_SIZE = 5000
NEIGHBOURHOOD_SIZE = 3
DISTANCE_BLOCK = 10_000  # rows and columns of one pairwise-distance block (ADM's row/col batch size)


class EvaluationError(ValueError):
    """An input cannot be evaluated as given; the message names the argument and what was expected."""


@dataclasses.dataclass(frozen=True)
class Features:
    """Inception features of N images: pool float32 [N, 2048], spatial [N, 2023], logits [N, 1008]."""
    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray

    def __len__(self) -> int:
        return len(self.pool)


@dataclasses.dataclass(frozen=True)
class Statistics:
    """A Gaussian fitted to features: mu float64 [D], sigma float64 [D, D]."""
    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> "Statistics":
        """Mean and unbiased covariance (np.cov, rows are samples) of features [N, D], N >= 2."""
        features = np.asarray(features, np.float64)
        return cls(features.mean(axis=0), np.cov(features, rowvar=False))


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """||mu_a - mu_b||^2 + tr(sigma_a) + tr(sigma_b) - 2 tr((sigma_a sigma_b)^(1/2)): ADM's (and TTUR's) FID.

    ADM takes the trace of scipy's sqrtm(sigma_a sigma_b). The same trace is the sum of the square roots of the
    eigenvalues of sigma_a^(1/2) sigma_b sigma_a^(1/2), a symmetric PSD matrix similar to sigma_a sigma_b: two
    symmetric eigendecompositions, tens of times faster at 2048 dimensions, with no complex round-off and no
    singular-matrix fallback to add (round-off below zero is clipped).
    """
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise EvaluationError(f"statistics of different feature sizes: mu {a.mu.shape} vs {b.mu.shape}, "
                              f"sigma {a.sigma.shape} vs {b.sigma.shape}")
    diff = a.mu - b.mu
    eigenvalues, eigenvectors = np.linalg.eigh(a.sigma)
    root_a = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    product = root_a @ b.sigma @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
    return float(diff.dot(diff) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_sqrt)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Mean over consecutive splits of `split_size` rows of exp(mean_x KL(softmax(logits_x) || split mean)).

    logits: [N, C]. ADM uses splits of 5000 (10 splits for 50K samples); a last shorter split counts as one.
    """
    logits = np.asarray(logits, np.float64)
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start:start + split_size]
        log_marginal = np.log(np.exp(part).mean(axis=0, keepdims=True))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _squared_distances_in(u, v, dtype):
    u, v = u.astype(dtype), v.astype(dtype)
    norm_u = jnp.sum(u * u, axis=1)[:, None]
    norm_v = jnp.sum(v * v, axis=1)[None, :]
    cross = jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(norm_u - 2 * cross + norm_v, 0).astype(jnp.float32)


def _squared_distances(u, v, dtype):
    """[R, D] x [S, D] -> float32 [R, S] squared distances in `dtype`; float16 falls back to float32 on overflow."""
    if dtype == jnp.float32:
        return _squared_distances_in(u, v, jnp.float32)
    low = _squared_distances_in(u, v, dtype)
    return jax.lax.cond(jnp.all(jnp.isfinite(low)), lambda: low, lambda: _squared_distances_in(u, v, jnp.float32))


@functools.partial(jax.jit, static_argnames=("k", "dtype"))
def _update_nearest(nearest, rows, cols, num_cols, *, k, dtype):
    """nearest [R, k+1] (the smallest squared distances so far, ascending) merged with those to cols[:num_cols]."""
    distances = _squared_distances(rows, cols, dtype)
    distances = jnp.where(jnp.arange(cols.shape[0])[None, :] < num_cols, distances, jnp.inf)
    return -jax.lax.top_k(-jnp.concatenate([nearest, distances], axis=1), k + 1)[0]


@functools.partial(jax.jit, static_argnames="dtype")
def _in_manifolds(ref, ref_radii, samples, sample_radii, *, dtype):
    """(ref rows inside some sample ball [R], sample rows inside some ref ball [S]); padded rows have radius -1."""
    distances = _squared_distances(ref, samples, dtype)
    return (jnp.any(distances <= sample_radii[None, :], axis=1), jnp.any(distances <= ref_radii[:, None], axis=0))


def _blocks(features: np.ndarray, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, block zero-padded to `size` rows): one shape, one compilation."""
    for start in range(0, len(features), size):
        block = features[start:start + size]
        yield start, np.pad(block, ((0, size - len(block)), (0, 0)))


def _padded_radii(radii: np.ndarray, size: int) -> np.ndarray:
    # Radius -1: a padding row lies in no ball and holds none.
    return np.pad(radii, (0, size - len(radii)), constant_values=-1.0)


def manifold_radii(features: np.ndarray, k: int = NEIGHBOURHOOD_SIZE, block_size: int = DISTANCE_BLOCK,
                   distance_dtype: str = "float16") -> np.ndarray:
    """float32 [N]: squared distance from each row of features [N, D] to its k-th nearest other row.

    Like ADM, this is entry k of the row's sorted distances, self (distance 0) being entry 0.
    """
    features = np.asarray(features, np.float32)
    size = min(block_size, len(features))
    radii = np.empty(len(features), np.float32)
    for start, rows in _blocks(features, size):
        nearest = jnp.full((size, k + 1), jnp.inf, jnp.float32)
        for col_start, cols in _blocks(features, size):
            nearest = _update_nearest(nearest, rows, cols, min(size, len(features) - col_start), k=k,
                                      dtype=jnp.dtype(distance_dtype))
        radii[start:start + size] = np.asarray(nearest[:, k])[:len(features) - start]
    return radii


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = NEIGHBOURHOOD_SIZE,
                     block_size: int = DISTANCE_BLOCK, distance_dtype: str = "float16") -> tuple[float, float]:
    """ADM's improved precision and recall of sample features [S, D] against reference features [R, D].

    precision: share of samples within the k-NN radius of some reference point; recall: share of reference points
    within the k-NN radius of some sample. Both sets need more than k points.
    """
    for name, features in (("reference", ref), ("samples", samples)):
        if len(features) <= k:
            raise EvaluationError(f"precision/recall with k={k} needs more than {k} {name} images, got "
                                  f"{len(features)}")
    ref, samples = np.asarray(ref, np.float32), np.asarray(samples, np.float32)
    ref_radii = manifold_radii(ref, k, block_size, distance_dtype)
    sample_radii = manifold_radii(samples, k, block_size, distance_dtype)
    ref_size, sample_size = min(block_size, len(ref)), min(block_size, len(samples))
    ref_in, samples_in = np.zeros(len(ref), bool), np.zeros(len(samples), bool)
    dtype = jnp.dtype(distance_dtype)
    for ref_start, ref_block in _blocks(ref, ref_size):
        ref_block_radii = _padded_radii(ref_radii[ref_start:ref_start + ref_size], ref_size)
        for sample_start, sample_block in _blocks(samples, sample_size):
            sample_block_radii = _padded_radii(sample_radii[sample_start:sample_start + sample_size], sample_size)
            ref_hit, sample_hit = jax.device_get(
                _in_manifolds(ref_block, ref_block_radii, sample_block, sample_block_radii, dtype=dtype))
            ref_in[ref_start:ref_start + ref_size] |= ref_hit[:len(ref) - ref_start]
            samples_in[sample_start:sample_start + sample_size] |= sample_hit[:len(samples) - sample_start]
    return float(samples_in.mean()), float(ref_in.mean())


@functools.partial(jax.jit, static_argnames="graphdef")
def _inception_features(graphdef, state, images):
    # Compiled once per batch shape and sharding, shared by every extractor of the network.
    return nnx.merge(graphdef, state)(images)


class FeatureExtractor:
    """Inception features of uint8 image batches, `batch_size` images per compiled call.

    Batches are split over the local devices when batch_size is a multiple of their count (the weights are
    replicated); a short last batch is padded, so every call has one shape.
    """

    def __init__(self, model: InceptionV3, batch_size: int = 64):
        if batch_size < 1:
            raise EvaluationError(f"--batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        graphdef, state = nnx.split(model)
        devices = jax.local_devices()
        if batch_size % len(devices):
            devices = devices[:1]
        mesh = Mesh(np.array(devices), ("batch",))
        self._images_sharding = NamedSharding(mesh, P("batch"))
        self._graphdef = graphdef
        self._state = jax.device_put(state, NamedSharding(mesh, P()))

    def __call__(self, batches: Iterable[np.ndarray]) -> Features:
        """batches: uint8 [b <= batch_size, H, W, 3] arrays (any H, W, the same for all) -> their features."""
        outputs = []
        for batch in batches:
            batch = np.asarray(batch)
            if len(batch) > self.batch_size:
                raise EvaluationError(f"image batch of {len(batch)} exceeds the batch size {self.batch_size}")
            padded = np.pad(batch, ((0, self.batch_size - len(batch)), (0, 0), (0, 0), (0, 0)))
            features = _inception_features(self._graphdef, self._state,
                                           jax.device_put(padded, self._images_sharding))
            outputs.append({name: value[:len(batch)] for name, value in jax.device_get(features).items()})
        if not outputs:
            raise EvaluationError("no images to extract features from")
        return Features(**{name: np.concatenate([out[name] for out in outputs]) for name in ("pool", "spatial",
                                                                                             "logits")})


@contextlib.contextmanager
def _npz_member(path: str, key: str, argument: str):
    """The open .npy member `key` of the npz at `path` (streamed, never unpickled)."""
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError as error:
        raise EvaluationError(f"{argument} {path!r} does not exist") from error
    except (zipfile.BadZipFile, OSError) as error:
        raise EvaluationError(f"{argument} {path!r} is not an .npz file ({error})") from error
    with archive:
        if f"{key}.npy" not in archive.namelist():
            keys = sorted(name.removesuffix(".npy") for name in archive.namelist())
            raise EvaluationError(f"{argument} {path!r} has no {key!r} array (it holds {keys})")
        with archive.open(f"{key}.npy") as member:
            yield member


def npz_keys(path: str, argument: str) -> list[str]:
    """The array names in the npz at `path`."""
    try:
        with zipfile.ZipFile(path) as archive:
            return sorted(name.removesuffix(".npy") for name in archive.namelist())
    except FileNotFoundError as error:
        raise EvaluationError(f"{argument} {path!r} does not exist") from error
    except (zipfile.BadZipFile, OSError) as error:
        raise EvaluationError(f"{argument} {path!r} is not an .npz file ({error})") from error


def image_count(path: str, argument: str) -> int:
    """N of the uint8 [N, H, W, 3] `arr_0` in the npz at `path`, checked, without reading the images."""
    with _npz_member(path, IMAGES_KEY, argument) as member:
        return _images_header(member, path, argument)[0][0]


def _images_header(member, path: str, argument: str):
    version = np.lib.format.read_magic(member)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
        raise EvaluationError(f"{argument} {path!r}: unsupported .npy format version {version} for {IMAGES_KEY}")
    shape, fortran_order, dtype = read_header[version](member)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran_order:
        raise EvaluationError(f"{argument} {path!r}: {IMAGES_KEY} must be uint8 [N, H, W, 3] images (ADM's "
                              f"layout), got {dtype} {list(shape)}{' in Fortran order' if fortran_order else ''}")
    if shape[0] < 2:
        raise EvaluationError(f"{argument} {path!r}: needs at least 2 images, got {shape[0]}")
    return shape, dtype


def read_image_batches(path: str, batch_size: int, argument: str = "--samples") -> Iterator[np.ndarray]:
    """uint8 [<= batch_size, H, W, 3] batches of `arr_0` in the npz at `path`, streamed from the file."""
    with _npz_member(path, IMAGES_KEY, argument) as member:
        shape, dtype = _images_header(member, path, argument)
        image_bytes = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            data = member.read(count * image_bytes)
            if len(data) != count * image_bytes:
                raise EvaluationError(f"{argument} {path!r}: {IMAGES_KEY} is truncated")
            yield np.frombuffer(data, dtype).reshape(count, *shape[1:])


@dataclasses.dataclass(frozen=True)
class Reference:
    """A reference batch: pool and spatial statistics, and the pool features of its images (None without)."""
    pool: Statistics
    spatial: Statistics
    pool_features: np.ndarray | None


def _read_statistics(path: str, argument: str) -> tuple[Statistics, Statistics]:
    with np.load(path, allow_pickle=False) as arrays:
        values = {key: np.asarray(arrays[key], np.float64) for key in STATISTICS_KEYS}
    pool, spatial = Statistics(values["mu"], values["sigma"]), Statistics(values["mu_s"], values["sigma_s"])
    for name, stats in (("mu/sigma", pool), ("mu_s/sigma_s", spatial)):
        size = stats.mu.shape[0] if stats.mu.ndim == 1 else -1
        if size < 1 or stats.sigma.shape != (size, size):
            raise EvaluationError(f"{argument} {path!r}: {name} must be [D] and [D, D], got {stats.mu.shape} and "
                                  f"{stats.sigma.shape}")
    for name, stats, size in (("mu", pool, FEATURE_SIZE), ("mu_s", spatial, SPATIAL_FEATURE_SIZE)):
        if stats.mu.shape[0] != size:
            raise EvaluationError(f"{argument} {path!r}: {name} has {stats.mu.shape[0]} features, the Inception "
                                  f"network gives {size}")
    return pool, spatial


def load_reference(path: str, extractor: FeatureExtractor | None, *, with_images: bool = True,
                   argument: str = "--reference") -> Reference:
    """A reference batch in ADM's layout: `arr_0` images and/or precomputed mu, sigma, mu_s, sigma_s.

    Precomputed statistics are used when present (as ADM does); the images' features are computed when
    `with_images` (precision and recall need them) or when there are no statistics (then `extractor` is needed).
    """
    keys = npz_keys(path, argument)
    present = [key for key in STATISTICS_KEYS if key in keys]
    if present and len(present) < len(STATISTICS_KEYS):
        raise EvaluationError(f"{argument} {path!r} holds {present} but not all of {list(STATISTICS_KEYS)}")
    if not present and IMAGES_KEY not in keys:
        raise EvaluationError(f"{argument} {path!r} holds {keys}: expected {IMAGES_KEY!r} (uint8 images) and/or "
                              f"{list(STATISTICS_KEYS)} (ADM's reference batch layout)")
    features = None
    if IMAGES_KEY in keys and (with_images or not present):
        if extractor is None:
            raise EvaluationError(f"{argument} {path!r} has no precomputed statistics: its images need the "
                                  f"Inception network")
        features = extractor(read_image_batches(path, extractor.batch_size, argument))
    if present:
        pool, spatial = _read_statistics(path, argument)
    else:
        pool, spatial = Statistics.of(features.pool), Statistics.of(features.spatial)
    return Reference(pool, spatial, None if features is None else features.pool)


def sample_metrics(samples: Features, reference: Reference, *, split_size: int = IS_SPLIT_SIZE,
                   distance_dtype: str = "float16") -> dict:
    """FID, sFID, Inception Score and (with reference images) precision and recall of sample features."""
    if len(samples) < 2:
        raise EvaluationError(f"metrics need at least 2 samples, got {len(samples)}")
    results = {
        "fid": frechet_distance(Statistics.of(samples.pool), reference.pool),
        "sfid": frechet_distance(Statistics.of(samples.spatial), reference.spatial),
        "inception_score": inception_score(samples.logits, split_size),
        "precision": None, "recall": None,
        "num_samples": len(samples),
    }
    if reference.pool_features is not None:
        results["precision"], results["recall"] = precision_recall(reference.pool_features, samples.pool,
                                                                   distance_dtype=distance_dtype)
        results["num_reference_images"] = len(reference.pool_features)
    return results


def evaluate(samples_path: str, reference_path: str, extractor: FeatureExtractor, **options) -> dict:
    """ADM's evaluation of the `arr_0` images in `samples_path` against the reference batch `reference_path`.

    Returns {"fid", "sfid", "inception_score", "precision", "recall", "num_samples", ...}; precision and recall
    are None when the reference holds only statistics. options: see `sample_metrics`.
    """
    image_count(samples_path, "--samples")  # fail on a bad sample file before the reference's features
    reference = load_reference(reference_path, extractor)
    samples = extractor(read_image_batches(samples_path, extractor.batch_size, "--samples"))
    return sample_metrics(samples, reference, **options)


def write_reference(path: str, source, extractor: FeatureExtractor, *, num_images: int, store_images: int,
                    seed: int = 0) -> dict:
    """Writes a reference batch in ADM's layout from a random-access image dataset (`dig_jax.data`).

    `num_images` images (a seeded random subset, or all when the dataset is smaller) give mu, sigma, mu_s, sigma_s;
    the first `store_images` of them are stored as `arr_0` for precision and recall (0: statistics only; ADM's
    reference batches hold 10,000). The file is written atomically. Returns {"num_images", "stored_images"}.
    """
    if num_images < 2:
        raise EvaluationError(f"--num_images must be >= 2, got {num_images}")
    if store_images < 0:
        raise EvaluationError(f"--store_images must be >= 0, got {store_images}")
    count = min(num_images, len(source))
    indices = np.sort(np.random.default_rng(seed).permutation(len(source))[:count])
    stored = []

    def batches():
        for start in range(0, count, extractor.batch_size):
            batch = np.stack([np.asarray(source[int(i)]["image"], np.uint8)
                              for i in indices[start:start + extractor.batch_size]])
            if sum(len(b) for b in stored) < store_images:
                stored.append(batch[:store_images - sum(len(b) for b in stored)])
            yield batch

    features = extractor(batches())
    pool, spatial = Statistics.of(features.pool), Statistics.of(features.spatial)
    arrays = {"mu": pool.mu, "sigma": pool.sigma, "mu_s": spatial.mu, "sigma_s": spatial.sigma}
    if stored:
        arrays[IMAGES_KEY] = np.concatenate(stored)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
    return {"num_images": count, "stored_images": len(arrays[IMAGES_KEY]) if stored else 0}
