"""The sharded loader: exact epochs over ranks and workers, equal batch counts, resume, corrupt samples."""
import json
import os

import numpy as np
import pytest
import torch

from data_pipeline import order
from data_pipeline.loader import NoReadableSamplesError, build_stream
from data_pipeline.manifest import ManifestError
from data_pipeline.synthetic import flipped_from_images, ids_from_images, write_image_shards

COUNTS = [10, 30, 7, 25, 24]  # 96 samples in uneven shards


def take(stream, n):
    it = iter(stream)
    out = [next(it) for _ in range(n)]
    stream.close()
    return out


def ids_of(batches):
    return [ids_from_images(x.numpy()) for x, _ in batches]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    write_image_shards(d, COUNTS)
    return str(d)


def test_two_ranks_two_workers_exact_epochs(shards):
    world, b = 2, 8
    streams = [build_stream(shards, batch_size=b, rank=r, world_size=world, num_workers=2, seed=3,
                            shuffle_buffer=16) for r in range(world)]
    bpe = streams[0].batches_per_epoch
    assert bpe == 6 and all(s.batches_per_epoch == bpe for s in streams)  # 96 // 2 // 8
    per_rank = [ids_of(take(s, 2 * bpe)) for s in streams]
    for epoch in range(2):
        seen = np.concatenate([np.concatenate(p[epoch * bpe:(epoch + 1) * bpe]) for p in per_rank])
        assert sorted(seen.tolist()) == list(range(96)), f"epoch {epoch}: every sample exactly once"
    for p in per_rank:
        assert all(len(x) == b for x in p)
        e0, e1 = np.concatenate(p[:bpe]), np.concatenate(p[bpe:])
        assert not np.array_equal(e0, e1), "a new epoch reshuffles"
    # same seed, same order, and the worker count does not change the stream
    again = ids_of(take(build_stream(shards, batch_size=b, rank=1, world_size=world, num_workers=0, seed=3,
                                     shuffle_buffer=16), 2 * bpe))
    assert all(np.array_equal(a, c) for a, c in zip(again, per_rank[1]))
    other = ids_of(take(build_stream(shards, batch_size=b, rank=1, world_size=world, num_workers=0, seed=4,
                                     shuffle_buffer=16), bpe))
    assert not all(np.array_equal(a, c) for a, c in zip(other, per_rank[1]))


def test_labels_values_and_flips(shards):
    s = build_stream(shards, batch_size=16, num_workers=0, seed=0)
    batches = take(s, s.batches_per_epoch)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (1, 8, 8)
    assert x.min() == -1.0 and x.max() == 1.0
    ids = ids_from_images(x.numpy())
    assert np.array_equal(y.numpy(), ids % 10)
    flips = flipped_from_images(x.numpy())
    assert 0.25 < flips.mean() < 0.75
    assert np.array_equal(flips, order.flip_bits(0, 0, ids))  # a function of (seed, epoch, sample id)
    no_flip = take(build_stream(shards, batch_size=16, num_workers=0, seed=0, flip=False), 2)
    assert not flipped_from_images(torch.cat([b[0] for b in no_flip]).numpy()).any()


def test_uneven_total_drops_remainder_equally(tmp_path):
    write_image_shards(tmp_path, [13, 50, 38])  # 101 samples, 3 ranks, batch 4: 33 per rank -> 8 batches
    streams = [build_stream(str(tmp_path), batch_size=4, rank=r, world_size=3, num_workers=0, seed=1)
               for r in range(3)]
    assert {s.batches_per_epoch for s in streams} == {8}
    ids = np.concatenate([np.concatenate(ids_of(take(s, 8))) for s in streams])
    assert len(ids) == 96 and len(set(ids.tolist())) == 96


def test_fewer_shards_than_ranks_times_workers(tmp_path):
    write_image_shards(tmp_path, [40])
    got = [ids_of(take(build_stream(str(tmp_path), batch_size=4, rank=r, world_size=2, num_workers=2, seed=0),
                       5)) for r in range(2)]
    ids = np.concatenate([np.concatenate(g) for g in got])
    assert sorted(ids.tolist()) == list(range(40))


def test_too_small_dataset_is_a_clear_error(tmp_path):
    write_image_shards(tmp_path, [5])
    with pytest.raises(ManifestError, match="cannot give each of 2 ranks one batch of 4"):
        build_stream(str(tmp_path), batch_size=4, world_size=2, rank=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bitwise_identical(shards, workers):
    kw = dict(batch_size=8, rank=1, world_size=2, seed=7, shuffle_buffer=32)
    full = take(build_stream(shards, num_workers=workers, **kw), 15)  # crosses the epoch boundary at 6 and 12
    s = build_stream(shards, num_workers=workers, **kw)
    it = iter(s)
    head = [next(it) for _ in range(7)]
    pos = json.loads(json.dumps(s.position()))
    s.close()
    assert pos["epoch"] == 1 and pos["batch_in_epoch"] == 1 and pos["batches"] == 7
    resumed = build_stream(shards, num_workers=2 - workers, position=pos, **kw)
    assert resumed.epoch == 1
    tail = take(resumed, 8)
    for a, b in zip(head + tail, full):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert resumed.epoch == 2


def test_position_from_another_setup_is_refused(shards):
    s = build_stream(shards, batch_size=8, seed=1)
    take(s, 1)
    with pytest.raises(ValueError, match="batch_size"):
        build_stream(shards, batch_size=4, seed=1, position=s.position())


def test_resampled_mode(shards):
    kw = dict(batch_size=8, world_size=2, num_workers=0, seed=5, mode="resampled")
    a = [ids_of(take(build_stream(shards, rank=r, **kw), 12)) for r in range(2)]
    b = ids_of(take(build_stream(shards, rank=0, **kw), 12))
    assert all(np.array_equal(x, y) for x, y in zip(a[0], b))  # deterministic
    assert not all(np.array_equal(x, y) for x, y in zip(a[0], a[1]))  # ranks draw different shards
    assert all(len(x) == 8 for x in a[0] + a[1])


def garble(path, ids):
    """Damage the PNG data of samples ``ids`` in the shard at ``path`` in place (sizes and headers unchanged)."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    for i in ids:
        start = data.index(b"\x89PNG", data.index(b"%09d.png" % i))
        data[start + 40:start + 60] = b"\x00" * 20  # inside the image data: zlib error / bad CRC
    with open(path, "wb") as f:
        f.write(data)


def _corrupt_copy(src, dst):
    """Copy the shards and garble the image of sample 12 (shard 1) and of samples 50..69 (shard 3)."""
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f:
            data = f.read()
        with open(os.path.join(dst, name), "wb") as f:
            f.write(data)
    garble(os.path.join(dst, "train-000001.tar"), [12])
    garble(os.path.join(dst, "train-000003.tar"), range(50, 70))


def test_corrupt_samples_are_skipped_and_counted(shards, tmp_path):
    bad_dir = str(tmp_path / "bad")
    _corrupt_copy(shards, bad_dir)
    s = build_stream(bad_dir, batch_size=8, num_workers=2, seed=0, shuffle_buffer=8)
    batches = take(s, s.batches_per_epoch)
    ids = np.concatenate(ids_of(batches))
    assert len(batches) == 12 and all(len(b[0]) == 8 for b in batches)
    missing = {12} | set(range(50, 70))
    assert s.corrupt_count == len(missing)  # every unreadable sample of the epoch, counted once
    assert set(ids.tolist()) == set(range(96)) - missing  # the rest all appear


def test_all_corrupt_is_a_clear_error(tmp_path):
    write_image_shards(tmp_path, [8, 8])
    garble(tmp_path / "train-000000.tar", range(8))
    garble(tmp_path / "train-000001.tar", range(8, 16))
    s = build_stream(str(tmp_path), batch_size=4, num_workers=0)
    with pytest.raises(NoReadableSamplesError, match="train-000000.tar, train-000001.tar") as err:
        take(s, 1)
    assert err.value.shards == ["train-000000.tar", "train-000001.tar"] and err.value.rank == 0
    assert s.position()["batches"] == 0  # the stream still answers for a checkpoint


def test_brace_pattern_selects_shards(shards):
    s = build_stream(os.path.join(shards, "train-{000000..000001}.tar"), batch_size=4, num_workers=0,
                     flip=False)
    assert s.manifest["total"] == 40 and s.batches_per_epoch == 10
    ids = np.concatenate(ids_of(take(s, 10)))
    assert sorted(ids.tolist()) == list(range(40))


def test_shards_are_readable_by_webdataset(shards):
    import webdataset as wds

    ds = wds.WebDataset(os.path.join(shards, "train-{000000..000004}.tar"), shardshuffle=False,
                        empty_check=False).decode("l8").to_tuple("__key__", "png", "cls")
    got = [(int(k), int(img[0, 0]), int(c)) for k, img, c in ds]
    assert [g[0] for g in got] == list(range(96))
    assert all(g[1] == g[0] % 256 and g[2] == g[0] % 10 for g in got)


@pytest.mark.parametrize("fmt", ["USTAR_FORMAT", "GNU_FORMAT", "PAX_FORMAT"])
def test_tar_index_reads_every_tar_format(tmp_path, fmt):
    import io
    import tarfile

    from data_pipeline.tario import index_tar

    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=getattr(tarfile, fmt)) as tf:
        for k in range(3):
            for ext, data in (("png", b"p" * (k + 600)), ("cls", str(k).encode())):
                info = tarfile.TarInfo("d" * 120 + f"/{k:03d}.{ext}")  # long names: prefix / longname / pax
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    idx = index_tar(str(path))
    raw = path.read_bytes()
    assert not idx.damaged and [k[-3:] for k in idx.keys] == ["000", "001", "002"]
    for k, members in enumerate(idx.samples):
        off, size = members["cls"]
        assert raw[off:off + size] == str(k).encode() and members["png"][1] == k + 600
