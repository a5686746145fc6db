"""The evaluator: Flax FID Inception vs pytorch-fid's network (same random weights), metric maths against closed
forms and brute force, ADM's npz layouts, error paths, the CLI and FID during training."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
from scipy import linalg

from dig_jax.data import ShapesDataset
from dig_jax.evaluate import main as evaluate_main
from dig_jax.evaluation import (
    EvaluationError,
    FeatureExtractor,
    InceptionWeightsError,
    Statistics,
    frechet_distance,
    inception_score,
    load_inception,
    load_reference,
    manifold_radii,
    precision_recall,
    write_reference,
)
from dig_jax.evaluation.convert_inception import convert, random_state_dict
from dig_jax.evaluation.inception import SPATIAL_CHANNELS, resize_bilinear_tf1
from dig_jax.images import save_npz

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytorch_fid_network(seed: int):
    """pytorch-fid's fid_inception_v3 architecture (built as it builds it, without its download) with random
    weights scaled so that activations keep their size through the 94 layers."""
    import torch
    from pytorch_fid import inception as fid  # importable on a CPU-only PyTorch thanks to tests/conftest.py

    net = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid.FIDInceptionE_1(1280)
    net.Mixed_7c = fid.FIDInceptionE_2(2048)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith(("running_var", "bn.weight")):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
            else:  # conv and fc weights
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2.0 / tensor[0].numel()) ** 0.5)
    return net.eval()


def random_weights(path, seed: int = 0) -> str:
    """A random FID Inception weights file (.safetensors, pytorch-fid names and layouts), made without PyTorch."""
    safetensors.numpy.save_file(random_state_dict(seed), str(path))
    return str(path)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    return random_weights(tmp_path_factory.mktemp("inception") / "inception.safetensors")


def relative_error(ours, reference) -> float:
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


def test_flax_inception_matches_pytorch_fid(tmp_path):
    import torch

    net = pytorch_fid_network(seed=0)
    pth = tmp_path / "pt_inception-random.pth"
    torch.save(net.state_dict(), pth)
    model = load_inception(pth)  # through torch.load(weights_only=True) and the name/layout mapping

    images = np.random.default_rng(0).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    captured = {}
    net.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: captured.update(mixed_6_conv=out))
    net.avgpool.register_forward_hook(lambda module, args, out: captured.update(pool=out.flatten(1)))
    with torch.no_grad():  # the TensorFlow graph's input scaling, (x - 128) / 128, at 299 x 299 (no resize)
        logits = net(torch.from_numpy((images.astype(np.float32) - 128) / 128).permute(0, 3, 1, 2))
        expected = {"pool": captured["pool"].numpy(), "logits": (logits - net.fc.bias).numpy(),
                    "spatial": captured["mixed_6_conv"].permute(0, 2, 3, 1)[..., :SPATIAL_CHANNELS]
                    .reshape(2, -1).numpy()}
    ours = model(images)
    assert {name: ours[name].shape for name in expected} == {"pool": (2, 2048), "logits": (2, 1008),
                                                              "spatial": (2, 17 * 17 * SPATIAL_CHANNELS)}
    for name, reference in expected.items():
        assert relative_error(ours[name], reference) < 1e-4, name

    converted = tmp_path / "inception.safetensors"  # the one-time conversion holds the same network
    convert(pth, converted)
    again = load_inception(converted)(images[:1])
    assert relative_error(again["pool"], expected["pool"][:1]) < 1e-4


def test_resize_is_tensorflow1_bilinear():
    square = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    np.testing.assert_array_equal(resize_bilinear_tf1(square, 4), square)
    # Shrinking by 2 samples at i * 2: every other pixel, no averaging (no half-pixel offset, no antialiasing).
    np.testing.assert_array_equal(resize_bilinear_tf1(square, 2), square[:, ::2, ::2])
    # Growing by 2 samples at i / 2: the pixels, midpoints between neighbours, and the edge pixel repeated.
    grown = np.asarray(resize_bilinear_tf1(square, 8))
    np.testing.assert_allclose(grown[:, ::2, ::2], square)
    np.testing.assert_allclose(grown[:, 1:-1:2, ::2], (square[:, :-1] + square[:, 1:]) / 2)
    np.testing.assert_allclose(grown[:, -1, ::2], square[:, -1])


def test_weights_file_errors(tmp_path, weights_file):
    with pytest.raises(InceptionWeightsError, match="does not exist"):
        load_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InceptionWeightsError, match="could not be read"):
        load_inception(garbage)
    with pytest.raises(InceptionWeightsError, match="must end in"):
        load_inception(tmp_path / "weights.bin")
    weights = safetensors.numpy.load_file(weights_file)
    weights["Mixed_6d.branch1x1.conv.weight"] = weights["Mixed_6d.branch1x1.conv.weight"][:, :7]
    del weights["fc.weight"]
    weights["extra.weight"] = np.zeros(3, np.float32)
    broken = tmp_path / "broken.safetensors"
    safetensors.numpy.save_file(weights, str(broken))
    with pytest.raises(InceptionWeightsError, match=r"missing \['fc.weight'\].*unexpected \['extra.weight'\].*"
                                                    r"Mixed_6d.branch1x1.conv.weight: expected \(192, 768, 1, 1\)"):
        load_inception(broken)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    dim = 16
    mu_a, mu_b = rng.standard_normal(dim), rng.standard_normal(dim)
    var_a, var_b = rng.uniform(0.1, 2, dim), rng.uniform(0.1, 2, dim)
    # Diagonal covariances: ||mu_a - mu_b||^2 + sum (sqrt(var_a) - sqrt(var_b))^2.
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    got = frechet_distance(Statistics(mu_a, np.diag(var_a)), Statistics(mu_b, np.diag(var_b)))
    assert got == pytest.approx(expected, rel=1e-10)
    # General covariances (and a singular one) against ADM's formula with scipy's sqrtm.
    for rank in (dim, 5):
        factor_a, factor_b = rng.standard_normal((dim, rank)), rng.standard_normal((dim, dim))
        sigma_a, sigma_b = factor_a @ factor_a.T, factor_b @ factor_b.T
        adm = (np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a) + np.trace(sigma_b)
               - 2 * np.trace(linalg.sqrtm(sigma_a @ sigma_b).real))
        assert frechet_distance(Statistics(mu_a, sigma_a), Statistics(mu_b, sigma_b)) == pytest.approx(adm, rel=1e-7)
    # Itself: 0 up to the round-off of square roots of a singular matrix's zero eigenvalues.
    assert frechet_distance(Statistics(mu_a, sigma_a), Statistics(mu_a, sigma_a)) == pytest.approx(
        0, abs=1e-7 * np.trace(sigma_a))


def test_inception_score_closed_forms():
    classes = 10
    confident = 50.0 * np.eye(classes)[np.arange(200) % classes]  # sure of each class, all classes equally often
    assert inception_score(confident) == pytest.approx(classes, rel=1e-6)
    assert inception_score(np.zeros((200, classes))) == pytest.approx(1.0)
    # Two splits: one holding one class only (score 1), one holding both classes (score 2).
    two = 50.0 * np.eye(classes)[np.r_[np.zeros(100, int), np.arange(100) % 2]]
    assert inception_score(two, split_size=100) == pytest.approx(1.5, rel=1e-6)
    # A known mixture: p(y|x) = [p, 1 - p] for half the samples and [1 - p, p] for the other half.
    p = 0.8
    logits = np.log(np.array([[p, 1 - p]] * 50 + [[1 - p, p]] * 50))
    kl = p * np.log(2 * p) + (1 - p) * np.log(2 * (1 - p))
    assert inception_score(logits) == pytest.approx(np.exp(kl), rel=1e-9)


def brute_force_precision_recall(ref, samples, k):
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]

    d = ((ref[:, None] - samples[None]) ** 2).sum(-1)
    precision = np.mean(np.any(d <= radii(ref)[:, None], axis=0))
    recall = np.mean(np.any(d <= radii(samples)[None, :], axis=1))
    return precision, recall


def test_precision_recall():
    rng = np.random.default_rng(0)
    cloud = rng.standard_normal((40, 8)).astype(np.float32)
    assert precision_recall(cloud, cloud) == (1.0, 1.0)  # ADM's float16 distances
    assert precision_recall(cloud, cloud + 100.0, distance_dtype="float32") == (0.0, 0.0)
    # Overlapping clouds of different spread, in blocks smaller than the sets (padding and merging).
    ref, samples = rng.standard_normal((37, 8)), 0.8 * rng.standard_normal((29, 8)) + 0.8
    expected = brute_force_precision_recall(ref, samples, k=3)
    got = precision_recall(ref.astype(np.float32), samples.astype(np.float32), block_size=8, distance_dtype="float32")
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert got == pytest.approx(expected, abs=1e-12)
    radii = manifold_radii(ref.astype(np.float32), block_size=8, distance_dtype="float32")
    np.testing.assert_allclose(radii, np.sort(((ref[:, None] - ref[None]) ** 2).sum(-1), axis=1)[:, 3], rtol=1e-5)
    with pytest.raises(EvaluationError, match="more than 3 samples"):
        precision_recall(ref, samples[:3])


def shapes_images(count, size=16, split="test"):
    source = ShapesDataset(split=split, image_size=size, num_images=count)
    return np.stack([source[i]["image"] for i in range(count)])


def test_cli_writes_reference_and_evaluates(tmp_path, weights_file, capsys):
    reference, samples, out = tmp_path / "ref.npz", tmp_path / "samples.npz", tmp_path / "results.json"
    evaluate_main(["--write_reference", str(reference), "--dataset", "shapes", "--image_size", "16",
                   "--num_images", "8", "--store_images", "8", "--inception_weights", weights_file,
                   "--batch_size", "4"])
    with np.load(reference, allow_pickle=False) as arrays:
        assert sorted(arrays.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        assert arrays["arr_0"].shape == (8, 16, 16, 3) and arrays["sigma_s"].shape == (2023, 2023)
    save_npz(str(samples), shapes_images(4))
    evaluate_main(["--samples", str(samples), "--reference", str(reference), "--inception_weights", weights_file,
                   "--batch_size", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results == json.loads(printed.strip().splitlines()[-1])
    assert f"FID: {results['fid']}" in printed and f"Recall: {results['recall']}" in printed
    assert results["num_samples"] == 4 and results["num_reference_images"] == 8
    assert results["fid"] > 0 and results["sfid"] > 0 and results["inception_score"] >= 1
    assert 0 <= results["precision"] <= 1 and 0 <= results["recall"] <= 1

    # The same reference as statistics only (no images for precision/recall) or as images only (statistics
    # recomputed from the stored images: the written ones, since all 8 images were stored).
    with np.load(reference, allow_pickle=False) as arrays:
        stored = {key: arrays[key] for key in ("mu", "sigma", "mu_s", "sigma_s")}
        np.savez(tmp_path / "stats.npz", **stored)
        save_npz(str(tmp_path / "images.npz"), arrays["arr_0"])
    extractor = FeatureExtractor(load_inception(weights_file), batch_size=4)
    stats_only = load_reference(str(tmp_path / "stats.npz"), extractor)
    assert stats_only.pool_features is None and np.array_equal(stats_only.spatial.sigma, stored["sigma_s"])
    from_images = load_reference(str(tmp_path / "images.npz"), extractor)
    np.testing.assert_allclose(from_images.pool.mu, stored["mu"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(from_images.spatial.sigma, stored["sigma_s"], rtol=1e-5, atol=1e-6)


def test_bad_npz_inputs(tmp_path, weights_file):
    extractor = FeatureExtractor(load_inception(weights_file), batch_size=4)
    np.savez(tmp_path / "keys.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(EvaluationError, match=r"--reference .* holds \['images'\]: expected 'arr_0'"):
        load_reference(str(tmp_path / "keys.npz"), extractor)
    np.savez(tmp_path / "partial.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(EvaluationError, match="not all of"):
        load_reference(str(tmp_path / "partial.npz"), extractor)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(EvaluationError, match=r"arr_0 must be uint8 \[N, H, W, 3\].*float32 \[4, 8, 8, 3\]"):
        load_reference(str(tmp_path / "float.npz"), extractor)
    (tmp_path / "noise.npz").write_bytes(b"not a zip file" * 10)
    with pytest.raises(EvaluationError, match="is not an .npz file"):
        load_reference(str(tmp_path / "noise.npz"), extractor)


def test_cli_bad_input_is_one_error_line(tmp_path):
    command = [sys.executable, "-m", "dig_jax.evaluate", "--samples", "s.npz", "--reference", "r.npz",
               "--inception_weights", str(tmp_path / "missing.pth")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: Inception weights file {str(tmp_path / 'missing.pth')!r} does not exist: download pytorch-fid's "
        f"pt_inception-2015-12-05-6726825d.pth (docs/evaluation.md) and pass its path"]


def eval_config(weights, reference):
    from tests.fixtures_tiny_run import tiny_config

    config = tiny_config()
    config.sample.num_steps = 2
    config.eval.every = 4
    config.eval.num_images = 4
    config.eval.batch_size = 4
    config.eval.inception_weights = weights
    config.eval.reference = reference
    return config


def test_fid_during_training(tmp_path, weights_file):
    from dig_jax.train import ConfigError, train

    reference = str(tmp_path / "shapes_16.npz")
    extractor = FeatureExtractor(load_inception(weights_file), batch_size=4)
    write_reference(reference, ShapesDataset(split="train", image_size=16, num_images=4), extractor, num_images=4,
                    store_images=0)
    workdir = str(tmp_path / "run")
    train(eval_config(weights_file, reference), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [record for record in map(json.loads, f) if "eval/fid" in record]
    assert [record["step"] for record in evals] == [4]
    for record in evals:
        assert record["eval/fid"] > 0 and record["eval/sfid"] > 0 and record["eval/inception_score"] >= 1
    assert os.listdir(os.path.join(workdir, "tensorboard"))

    # Bad eval settings fail before training starts, naming the key.
    for key, value, message in (("inception_weights", str(tmp_path / "none.pth"), "config.eval.inception_weights"),
                                ("reference", str(tmp_path / "none.npz"), "config.eval.reference"),
                                ("num_images", 1, "config.eval.num_images")):
        config = eval_config(weights_file, reference)
        config.eval[key] = value
        with pytest.raises(ConfigError, match=message):
            train(config, str(tmp_path / f"bad_{key}"))
        assert not os.path.exists(os.path.join(tmp_path, f"bad_{key}", "checkpoints"))
