"""eval/: our FID/IS/KID/PR equal torch-fidelity's; reference statistics; missing weights; the eval CLI."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval import inception
from eval.metrics import (fid_statistics, frechet_distance, inception_score, kid, load_reference, precision_recall,
                          save_reference)
from tests.conftest import run_entry

N_IMAGES = 4  # Inception at 299x299 costs ~6 GFLOP per image: keep the sets tiny


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory) -> Path:
    """An Inception weights file with random weights (stands in for the real one, which is a download)."""
    return inception.write_random_weights(tmp_path_factory.mktemp("inception") / "inception-random.pth", seed=0)


def _images(seed: int, n: int = N_IMAGES, size: int = 24) -> np.ndarray:
    """Structured random RGB images (smooth blobs + noise), uint8 NHWC."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        c = rng.uniform(0.2, 0.8, size=(3, 2))
        img = np.stack([np.exp(-((xx - c[k, 0]) ** 2 + (yy - c[k, 1]) ** 2) * rng.uniform(5, 30)) for k in range(3)], -1)
        img = img * 200 + rng.uniform(0, 55, size=img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def _write_folder(root: Path, images: np.ndarray) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(root / f"{i:04d}.png")
    return root


def test_missing_weights_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(inception.InceptionWeightsMissing) as err:
        inception.resolve_weights(None)
    msg = str(err.value)
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / inception.WEIGHTS_FILENAME) in msg
    assert inception.WEIGHTS_URL in msg and "\n" not in msg
    with pytest.raises(inception.InceptionWeightsMissing, match="--inception-weights"):
        inception.load_extractor(tmp_path / "nope.pth")
    # the CLIs fail before doing any work, with one line and exit code 2
    proc = run_entry(["eval/reference.py", "--folder", str(tmp_path), "--out", str(tmp_path / "r.npz")],
                     TORCH_HOME=str(tmp_path / "torch_home"))
    assert proc.returncode == 2 and "Inception weights not found" in proc.stderr
    proc = run_entry(["eval/fid.py", "--ckpt", str(tmp_path / "x.safetensors"), "--metrics", "is"],
                     TORCH_HOME=str(tmp_path / "torch_home"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: Inception weights")


def test_pickled_objects_in_weights_are_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1), "obj": Path("x")}, bad)  # a non-tensor object needs full unpickling
    with pytest.raises(ValueError, match="not a loadable Inception state dict"):
        inception.load_extractor(bad)


def test_metrics_equal_torch_fidelity(tmp_path, random_weights):
    import torch_fidelity

    a = _write_folder(tmp_path / "a", _images(1))
    b = _write_folder(tmp_path / "b", _images(2))
    theirs = torch_fidelity.calculate_metrics(
        input1=str(a), input2=str(b), isc=True, fid=True, kid=True, prc=True, cuda=False, cache=False,
        verbose=False, feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(random_weights),
        kid_subset_size=N_IMAGES, kid_subsets=7, isc_splits=2, prc_neighborhood=2, save_cpu_ram=True)

    from eval.reference import batched_chw, iter_folder_images

    ext = inception.load_extractor(random_weights)
    fa = inception.extract_features(ext, batched_chw(iter_folder_images(a), 4))
    fb = inception.extract_features(ext, batched_chw(iter_folder_images(b), 4))
    fid = frechet_distance(fid_statistics(fa[inception.POOL]), fid_statistics(fb[inception.POOL]))
    assert theirs["frechet_inception_distance"] > 1.0  # the sets really differ
    assert fid == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    isc = inception_score(fa[inception.LOGITS], splits=2)
    assert isc["is_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-5)
    k = kid(fa[inception.POOL], fb[inception.POOL], subsets=7, subset_size=N_IMAGES)
    assert k["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)
    pr = precision_recall(fa[inception.POOL], fb[inception.POOL], neighborhood=2)
    assert (pr["precision"], pr["recall"]) == (theirs["precision"], theirs["recall"])
    # FID of a set with itself is ~0 (relative to the scale of the features)
    st = fid_statistics(fa[inception.POOL])
    assert abs(frechet_distance(st, st)) < 1e-5 * np.trace(st["sigma"])


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    d = 5
    a = rng.normal(size=(d, d))
    s1 = a @ a.T + np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # sigma2 = c^2 sigma1  →  FID = |mu1-mu2|^2 + (1 - c)^2 tr(sigma1)
    c = 1.7
    expected = float(((mu1 - mu2) ** 2).sum() + (1 - c) ** 2 * np.trace(s1))
    got = frechet_distance({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": c * c * s1})
    assert got == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance({"mu": mu1, "sigma": s1}, {"mu": mu1[:3], "sigma": s1[:3, :3]})


def _write_shards(root: Path, images: np.ndarray, per_shard: int = 4) -> Path:
    from data_pipeline.files import atomic_write_json
    from data_pipeline.manifest import MANIFEST_NAME, shard_name
    from data_pipeline.tario import ShardWriter

    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(images), per_shard):
        name = shard_name("train", s // per_shard)
        with ShardWriter(root / name) as w:
            for i in range(s, min(s + per_shard, len(images))):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="PNG")
                w.write(f"{i:06d}", {"png": buf.getvalue(), "cls": str(i % 3).encode()})
        shards.append({"name": name, "num_samples": min(per_shard, len(images) - s)})
    atomic_write_json(root / MANIFEST_NAME, {
        "kind": "image", "shards": shards, "total": len(images), "image_size": images.shape[1],
        "channels": images.shape[-1], "class_names": ["a", "b", "c"], "source": "test", "command": "", "skipped": []})
    return root


def test_reference_from_shards_equals_folder_and_roundtrips(tmp_path, random_weights):
    imgs = _images(3)
    shards = _write_shards(tmp_path / "shards", imgs)
    folder = _write_folder(tmp_path / "folder", imgs)
    out_s, out_f = tmp_path / "ref_shards.npz", tmp_path / "ref_folder.npz"
    proc = run_entry(["eval/reference.py", "--shards", str(shards), "--out", str(out_s),
                      "--inception-weights", str(random_weights), "--batch-size", "4"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    from eval.reference import compute_reference, iter_folder_images

    ref_f = compute_reference(iter_folder_images(folder), out_f, weights=str(random_weights), batch_size=5)
    ref_s = load_reference(out_s, need_features=True)
    assert ref_s.info["num_images"] == len(imgs) and ref_s.info["source"].startswith("shards:")
    np.testing.assert_allclose(ref_s.pool, ref_f.pool, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref_s.mu, ref_f.mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref_s.sigma, ref_f.sigma, rtol=1e-4, atol=1e-7)
    assert frechet_distance({"mu": ref_s.mu, "sigma": ref_s.sigma}, {"mu": ref_f.mu, "sigma": ref_f.sigma}) \
        == pytest.approx(0.0, abs=1e-5 * np.trace(ref_f.sigma))


def test_adm_reference_files_are_accepted_as_they_are(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=8), np.eye(8) * 2.0
    np.savez(tmp_path / "adm.npz", mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=sigma[:2, :2])
    ref = load_reference(tmp_path / "adm.npz")
    assert np.array_equal(ref.mu, mu) and np.array_equal(ref.sigma, sigma) and ref.pool is None
    with pytest.raises(ValueError, match="need reference features"):
        load_reference(tmp_path / "adm.npz", need_features=True)
    # images only (arr_0): featurized by the callback
    np.savez(tmp_path / "imgs.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    feats = rng.normal(size=(4, 8)).astype(np.float32)
    ref = load_reference(tmp_path / "imgs.npz", featurize=lambda arr: feats)
    np.testing.assert_allclose(ref.mu, feats.mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="no Inception network"):
        load_reference(tmp_path / "imgs.npz")
    np.savez(tmp_path / "junk.npz", foo=np.zeros(3))
    with pytest.raises(ValueError, match="no reference statistics"):
        load_reference(tmp_path / "junk.npz")
    save_reference(tmp_path / "ours.npz", feats, {"source": "x"})
    ours = load_reference(tmp_path / "ours.npz", need_features=True)
    assert ours.info["num_images"] == 4 and np.array_equal(ours.pool, feats)


def test_fid_cli_scores_against_a_reference(tmp_path, random_weights):
    """End to end on the CLI: generation, features per batch, FID/IS/KID/PR against a reference, outputs."""
    from tests.test_inference import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "m.safetensors", dict(input_size=8, patch_size=2, in_channels=3,
                                                              hidden_size=32, depth=1, num_heads=2, num_classes=4))
    ref = save_reference(tmp_path / "ref.npz", torch.randn(8, 2048).abs(), {"source": "random"})
    out = tmp_path / "out"
    args = ["eval/fid.py", "--ckpt", str(ckpt), "--num-samples", "5", "--batch-size", "3", "--steps", "3",
            "--ref", str(tmp_path / "ref.npz"), "--inception-weights", str(random_weights), "--out", str(out),
            "--metrics", "fid,is,kid,pr", "--save-npz", "--dtype", "bf16", "--cfg-scale", "2"]
    proc = run_entry(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((out / "metrics.json").read_text())
    m = rec["metrics"]
    assert np.isfinite(m["fid"]) and m["fid"] > 0 and m["is_mean"] >= 1.0 - 1e-9 and 0 <= m["precision"] <= 1
    s = rec["settings"]
    assert (s["num_samples"], s["steps"], s["sampler"], s["cfg_scale"], s["dtype"], s["guide_channels"]) == \
        (5, 3, "ddpm", 2.0, "bf16", "all")
    assert rec["checkpoint"]["weights_file"] == str(ckpt.resolve()) and rec["checkpoint"]["step"] == 3
    assert rec["reference"]["source"] == "random" and "torch-fidelity" in rec["versions"]
    samples = np.load(out / "samples.npz")
    assert samples["arr_0"].shape == (5, 8, 8, 3) and samples["arr_1"].tolist() == [0, 1, 2, 3, 0]
    assert (out / "grid.png").is_file()
    # our features of the saved samples reproduce the FID in the record
    ext = inception.load_extractor(random_weights)
    f = inception.extract_features(ext, torch.from_numpy(samples["arr_0"]).permute(0, 3, 1, 2))[inception.POOL]
    assert frechet_distance(fid_statistics(f), {"mu": ref.mu, "sigma": ref.sigma}) == pytest.approx(m["fid"], rel=1e-5)
    # other settings into the same directory are refused instead of mixing samples
    proc = run_entry(args[:-2] + ["--cfg-scale", "3"])
    assert proc.returncode != 0 and "other settings (cfg_scale)" in proc.stderr
