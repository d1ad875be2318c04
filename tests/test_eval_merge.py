"""eval/fid.py rank-0 merge (issue 13 item 7): features merged without loading images, images streamed where they are
needed; every output equals what the old in-memory merge (tests/fid_legacy.py) gives on the same part files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.files import atomic_save_npz
from eval import fid, inception
from eval.fid import EvalSettings, evaluate, merge_parts, save_samples_npz, score
from eval.metrics import load_reference, save_reference
from eval.npzio import NpyMember, iter_member_rows, save_npz_streamed
from tests.fid_legacy import legacy_merge_parts, legacy_outputs, legacy_score

POOL_DIM = 64  # stands in for Inception's 2048 (the FID's matrix square root at 2048 costs ~15 s per call here)


def write_parts(parts: Path, n: int, world: int, batch: int, size: int = 8, channels: int = 3,
                features: bool = True, seed: int = 0, num_classes: int = 5, pool_dim: int = POOL_DIM) -> None:
    """Part files laid out as ``generate_parts`` writes them on ``world`` ranks (random images and features)."""
    rng = np.random.default_rng(seed)
    for r in range(world):
        todo = list(range(r, n, world))
        for k in range(0, len(todo), batch):
            idx = todo[k:k + batch]
            arrays = {"index": np.asarray(idx, np.int64), "labels": np.asarray(idx, np.int64) % num_classes,
                      "images": rng.integers(0, 256, (len(idx), size, size, channels), dtype=np.uint8)}
            if features:
                arrays["pool"] = rng.normal(size=(len(idx), pool_dim)).astype(np.float32)
                arrays["logits"] = rng.normal(size=(len(idx), 1008)).astype(np.float32)
            atomic_save_npz(parts / f"part_{idx[0]:08d}_{idx[-1]:08d}.npz", **arrays)


class FakeGenerator:
    """Stands in for eval.inference.Generator when every sample is already on disk (nothing is generated)."""

    num_classes, device, objective = 5, torch.device("cpu"), "ddpm"

    def sample_batch(self, *args, **kwargs):
        raise AssertionError("no sample should be generated: the part files hold them all")


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> Path:
    return inception.write_random_weights(tmp_path_factory.mktemp("inception") / "inception-random.pth", seed=0)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few images, so the tiny test sets are read in many chunks as 50K samples would be."""
    monkeypatch.setattr(fid, "CHUNK_BYTES", 5 * 8 * 8 * 3)
    import eval.metrics

    monkeypatch.setattr(eval.metrics, "REFERENCE_CHUNK_BYTES", 3 * 8 * 8 * 3)


def _overlapping_parts(tmp_path: Path) -> Path:
    """Parts of 3 ranks plus a rerun's parts beyond N and a duplicate of samples already stored (which must lose to
    the first part in name order, as before)."""
    parts = tmp_path / "parts"
    write_parts(parts, 23, world=3, batch=4)
    rng = np.random.default_rng(9)
    dup = {"index": np.array([2, 25, 5], np.int64), "labels": np.array([2, 0, 0], np.int64),
           "images": rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8),
           "pool": rng.normal(size=(3, POOL_DIM)).astype(np.float32),
           "logits": rng.normal(size=(3, 1008)).astype(np.float32)}
    atomic_save_npz(parts / "part_00000002_00000005.npz", **dup)  # sorts before part_00000002_00000020 (rank 2)
    (parts / "notes.txt").write_text("not a part")
    return parts


def test_merge_equals_the_in_memory_merge_without_reading_images(tmp_path, monkeypatch):
    parts = _overlapping_parts(tmp_path)
    old = legacy_merge_parts(parts, 21)
    read = []
    orig = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda self, k: read.append(k) or orig(self, k))
    new = merge_parts(parts, 21)
    assert "images" not in read  # only what scoring needs is loaded
    assert set(new) == set(old) - {"images"} == {"index", "labels", "pool", "logits"}
    for k in new:
        assert new[k].dtype == old[k].dtype and np.array_equal(new[k], old[k]), k
    assert np.array_equal(new["index"], np.arange(21))
    assert np.array_equal(new.images(0, 21), old["images"])
    assert np.array_equal(new.images(4, 9), old["images"][4:9])
    assert np.array_equal(np.concatenate(list(new.iter_images(4))), old["images"])
    # the duplicate part sorts first, so samples 2 and 5 come from it, as before
    with np.load(parts / "part_00000002_00000005.npz") as z:
        assert np.array_equal(new.images(2, 3)[0], z["images"][0]) and np.array_equal(new["pool"][5], z["pool"][2])
    # a missing sample: the same one-line error naming the first missing index
    for p in parts.glob("part_00000001_*.npz"):
        p.unlink()
    with pytest.raises(RuntimeError) as e_old:
        legacy_merge_parts(parts, 21)
    with pytest.raises(RuntimeError) as e_new:
        merge_parts(parts, 21)
    assert str(e_new.value) == str(e_old.value) and "(first: 1)" in str(e_new.value)


def test_scores_equal_the_in_memory_merge(tmp_path):
    parts = _overlapping_parts(tmp_path)
    rng = np.random.default_rng(1)
    save_reference(tmp_path / "ref.npz", rng.normal(size=(300, POOL_DIM)).astype(np.float32) + 0.1,
                   {"source": "random"})
    s = EvalSettings(num_samples=21, metrics=("fid", "is", "kid", "pr"), ref=str(tmp_path / "ref.npz"))
    old = legacy_score(legacy_merge_parts(parts, 21), s, None, 5)
    new = score(merge_parts(parts, 21), s, None, 5)
    assert new == old and np.isfinite(new["fid"]) and new["fid"] > 0


@pytest.mark.parametrize("chunked", [False, True])
def test_samples_npz_and_grid_equal_the_old_files(tmp_path, monkeypatch, chunked):
    parts = _overlapping_parts(tmp_path)
    if chunked:
        monkeypatch.setattr(fid, "CHUNK_BYTES", 5 * 8 * 8 * 3)
        calls = []
        orig = fid.MergedSamples.images
        monkeypatch.setattr(fid.MergedSamples, "images",
                            lambda self, a, b: calls.append(min(b, self.num_samples) - a) or orig(self, a, b))
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    s = EvalSettings(num_samples=21, metrics=(), save_npz=True, grid=7)
    old_dir.mkdir()
    legacy_outputs(legacy_merge_parts(parts, 21), s, old_dir)
    merged = merge_parts(parts, 21)
    save_samples_npz(merged, new_dir / "samples.npz")
    assert (new_dir / "samples.npz").read_bytes() == (old_dir / "samples.npz").read_bytes()
    if chunked:
        assert calls and max(calls) == 5 and sum(calls) == 21
    with np.load(new_dir / "samples.npz") as z:
        assert z["arr_0"].shape == (21, 8, 8, 3) and z["arr_1"].tolist() == [i % 5 for i in range(21)]
    from eval.visuals import save_image_grid

    save_image_grid(merged.images(0, 7), new_dir / "grid.png", nrow=3)
    assert (new_dir / "grid.png").read_bytes() == (old_dir / "grid.png").read_bytes()


def test_evaluate_on_stored_parts_writes_what_the_old_merge_gave(tmp_path, random_weights, small_chunks):
    """evaluate() end to end on rank 0 (all samples already on disk): metrics, grid.png and samples.npz."""
    out = tmp_path / "out"
    write_parts(out / "parts", 13, world=2, batch=3, seed=4)
    rng = np.random.default_rng(2)
    save_reference(tmp_path / "ref.npz", rng.normal(size=(200, POOL_DIM)).astype(np.float32), {"source": "random"})
    s = EvalSettings(num_samples=13, batch_size=3, metrics=("fid", "is"), ref=str(tmp_path / "ref.npz"),
                     inception_weights=str(random_weights), save_npz=True, grid=5)
    rec = evaluate(FakeGenerator(), {"weights_file": None, "step": 7}, s, out, single_process=True)
    old = legacy_merge_parts(out / "parts", 13)
    expect = legacy_score(dict(old), s, None, 5)
    assert rec["metrics"] == {k: v for k, v in expect.items() if k != "reference"}
    assert json.loads((out / "metrics.json").read_text())["metrics"] == json.loads(json.dumps(rec["metrics"]))
    legacy_outputs(old, s, tmp_path)
    assert (out / "samples.npz").read_bytes() == (tmp_path / "samples.npz").read_bytes()
    assert (out / "grid.png").read_bytes() == (tmp_path / "grid.png").read_bytes()
    assert rec["timing"]["per_rank"][0]["generated"] == 0 and not list(out.glob(".tmp-*"))


def test_parts_without_features_are_featurized_in_chunks(tmp_path, random_weights, monkeypatch):
    """Parts written without Inception features (--metrics none, then a rerun with metrics): features of all samples
    come from the images, read a chunk at a time, in the batches of the old all-at-once extraction."""
    parts = tmp_path / "parts"
    write_parts(parts, 7, world=2, batch=2, size=16, features=False, seed=3)
    # one part has features: as before, features come from one extractor for all samples when any part lacks them
    with np.load(parts / "part_00000000_00000002.npz") as z:
        d = dict(z)
    atomic_save_npz(parts / "part_00000000_00000002.npz", **d, pool=np.ones((2, 2048), np.float32),
                    logits=np.ones((2, 1008), np.float32))
    monkeypatch.setattr(fid, "CHUNK_BYTES", 5 * 16 * 16 * 3)  # 5 images → chunks of 4 (batch 2)
    calls = []
    orig = fid.MergedSamples.images
    monkeypatch.setattr(fid.MergedSamples, "images",
                        lambda self, a, b: calls.append(min(b, self.num_samples) - a) or orig(self, a, b))
    ext = inception.load_extractor(random_weights)
    s = EvalSettings(num_samples=7, batch_size=2, metrics=("is",))  # FID: the same features, tested above
    merged = merge_parts(parts, 7)
    assert "pool" not in merged
    new = score(merged, s, ext, 5)
    assert calls == [4, 3]
    old_merged = legacy_merge_parts(parts, 7)
    old = legacy_score(old_merged, s, ext, 5)
    assert np.array_equal(merged["pool"], old_merged["pool"]) and np.array_equal(merged["logits"], old_merged["logits"])
    assert new == old


def test_classifier_metrics_in_chunks_equal_all_at_once(tmp_path, monkeypatch):
    from eval.metrics import fid_statistics
    from eval.mnist_classifier import DigitClassifier, DigitNet

    torch.manual_seed(0)
    clf = DigitClassifier(DigitNet(), fid_statistics(torch.randn(400, 128)), {"heldout_accuracy": 0.5})
    parts = tmp_path / "parts"
    write_parts(parts, 1100, world=3, batch=64, size=28, channels=1, features=False, num_classes=10)
    merged = merge_parts(parts, 1100)
    calls = []
    orig = fid.MergedSamples.images
    monkeypatch.setattr(fid.MergedSamples, "images",
                        lambda self, a, b: calls.append(min(b, self.num_samples) - a) or orig(self, a, b))
    labels = torch.from_numpy(merged["labels"])
    new = fid._classifier_metrics(clf, merged, labels)
    assert calls == [500, 500, 100]
    old = legacy_merge_parts(parts, 1100)
    assert new == clf.metrics(torch.from_numpy(old["images"]).permute(0, 3, 1, 2), labels)
    assert set(new) == {"digits_n", "digits_accuracy", "digits_fd", "digits_classifier_heldout_accuracy"}
    # what score() runs for --classifier mnist (labels only for a 10-class model)
    monkeypatch.setattr(fid, "get_classifier", lambda data=None: clf)
    assert score(merged, EvalSettings(num_samples=1100, metrics=(), classifier="mnist"), None, 10) == new
    assert "digits_accuracy" not in score(merged, EvalSettings(num_samples=1100, metrics=(), classifier="mnist"),
                                          None, 0)


def test_reference_images_are_featurized_in_chunks(tmp_path, small_chunks):
    """An ADM reference with images only (or KID/PR against it): arr_0 is read a few rows at a time."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "adm.npz", arr_0=imgs, mu=np.zeros(3), sigma=np.eye(3))
    calls = []

    def featurize(arr):
        calls.append(len(arr))
        return arr.reshape(len(arr), -1)[:, :5].astype(np.float64) * 2

    ref = load_reference(tmp_path / "adm.npz", need_features=True, featurize=featurize, batch_size=2)
    assert calls == [2, 2, 2, 2, 2]  # 3 images' worth of bytes → chunks of one batch of 2
    assert np.array_equal(ref.pool, featurize(imgs)) and ref.pool.dtype == np.float32
    assert np.array_equal(ref.mu, np.zeros(3)) and ref.info["features_from"] == "arr_0"
    calls.clear()
    load_reference(tmp_path / "adm.npz")  # FID only: mu/sigma are there, the images are not read
    assert calls == []
    np.savez(tmp_path / "only.npz", arr_0=imgs[:, :, :, :1])
    ref = load_reference(tmp_path / "only.npz", featurize=featurize, batch_size=1)
    assert calls == [9, 1] and np.array_equal(ref.pool, featurize(imgs[:, :, :, :1]))
    np.savez(tmp_path / "bad.npz", arr_0=imgs.astype(np.float32))
    with pytest.raises(ValueError, match="arr_0 must be uint8"):
        load_reference(tmp_path / "bad.npz", featurize=featurize)


def test_reference_cli_reads_npz_images_in_chunks(tmp_path):
    from eval.reference import iter_npz_images

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=imgs, arr_1=np.arange(7) + 10)
    items = list(iter_npz_images(tmp_path / "s.npz", chunk=3))
    assert [lab for _, lab in items] == list(range(10, 17))
    assert np.array_equal(np.stack([im for im, _ in items]), imgs)
    np.savez(tmp_path / "short.npz", arr_0=imgs, arr_1=np.arange(5))  # as zip(): as many as both have
    assert len(list(iter_npz_images(tmp_path / "short.npz", chunk=2))) == 5
    np.savez(tmp_path / "nolab.npz", arr_0=imgs)
    assert [lab for _, lab in iter_npz_images(tmp_path / "nolab.npz")] == [0] * 7


def test_npz_rows_and_streamed_writing(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(9, 3, 2)).astype(">f4")  # non-native byte order survives both ways
    b = np.arange(9, dtype=np.int64)
    np.savez(tmp_path / "ref.npz", a=a, b=b)
    save_npz_streamed(tmp_path / "s.npz", [("a", a.shape, a.dtype, [a[:4], a[4:4], a[4:]]),
                                           ("b", b.shape, b.dtype, iter([b]))])
    assert (tmp_path / "s.npz").read_bytes() == (tmp_path / "ref.npz").read_bytes()
    with NpyMember(tmp_path / "s.npz", "a") as m:
        assert m.shape == a.shape and m.dtype == a.dtype and np.array_equal(m.read(2, 6), a[2:6])
        assert m.read(7, 100).shape == (2, 3, 2) and m.read(5, 3).shape == (0, 3, 2)
    np.savez_compressed(tmp_path / "c.npz", a=a)  # compressed members are read whole, once
    assert np.array_equal(np.concatenate(list(iter_member_rows(tmp_path / "c.npz", "a", 4))), a)
    with pytest.raises(KeyError, match="no member 'x'"):
        NpyMember(tmp_path / "s.npz", "x")
    # chunks that do not add up: an error, no file left behind, the existing file untouched
    before = (tmp_path / "s.npz").read_bytes()
    with pytest.raises(ValueError, match="chunks hold 4 rows, 9 declared"):
        save_npz_streamed(tmp_path / "s.npz", [("a", a.shape, a.dtype, [a[:4]])])
    with pytest.raises(ValueError, match="does not fit"):
        save_npz_streamed(tmp_path / "s.npz", [("a", a.shape, a.dtype, [a[:4].astype(np.float64)])])
    assert (tmp_path / "s.npz").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == \
        ["c.npz", "ref.npz", "s.npz"]
