"""Shards that do not match their manifest, and data errors raised in DataLoader workers (issue 14, items 3-5, 9).

Exact mode: a shard missing on disk or of the wrong size is a ShardError (a ManifestError, exit 2 in the trainers)
at build time, one line naming it; a tar that holds fewer samples than the manifest says is one when it is read.
Resampled mode: such shards are skipped loudly (one warning each, counted in ``bad_shards``). An error raised in a
worker reaches the training process as itself, with no worker left running.
"""
import json
import logging
import os
import pickle

import numpy as np
import psutil
import pytest

from data_pipeline import order
from data_pipeline.loader import NoReadableSamplesError, RemoteShardError, ShardError, build_stream
from data_pipeline.manifest import MANIFEST_NAME, ManifestError
from data_pipeline.synthetic import ids_from_images, write_image_shards
from data_pipeline.tario import index_tar

from .test_data_loader import garble

COUNTS = [10, 12, 9, 11]  # ids 0-9, 10-21, 22-30, 31-41
LOADER_LOG = "data_pipeline.loader"


def take(stream, n):
    it = iter(stream)
    try:
        return [next(it) for _ in range(n)]
    finally:
        stream.close()


def ids_of(batches):
    return np.concatenate([ids_from_images(x.numpy()) for x, _ in batches])


def worker_processes():
    return [p for p in psutil.Process().children(recursive=True) if p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]


def cut(path, keep_samples, drop_sizes=None):
    """Cut the shard at ``path`` right after its first ``keep_samples`` samples (a whole number of tar blocks, as a
    copy interrupted between two files would leave it); with ``drop_sizes`` (the manifest path) also remove the
    recorded file sizes, as in a manifest written before sizes were recorded."""
    idx = index_tar(str(path))
    end = max(off + size for off, size in idx.samples[keep_samples - 1].values())
    end = (end + 511) // 512 * 512
    with open(path, "r+b") as f:
        f.truncate(end)
    if drop_sizes is not None:
        m = json.loads(open(drop_sizes).read())
        for s in m["shards"]:
            s.pop("bytes", None)
        with open(drop_sizes, "w") as f:
            json.dump(m, f)


@pytest.fixture
def shard_dir(tmp_path):
    write_image_shards(tmp_path, COUNTS)
    return tmp_path


def test_manifests_record_shard_sizes(shard_dir):
    m = json.loads((shard_dir / MANIFEST_NAME).read_text())
    assert [s["bytes"] for s in m["shards"]] == [os.path.getsize(shard_dir / s["name"]) for s in m["shards"]]


# ------------------------------------------------------------------------------------------------ exact mode
def test_missing_shard_is_an_error_at_build_time_on_every_rank(shard_dir):
    (shard_dir / "train-000002.tar").unlink()
    for rank in range(2):  # both ranks decide alike, whether or not they read that shard this epoch
        with pytest.raises(ShardError) as err:
            build_stream(str(shard_dir), batch_size=4, rank=rank, world_size=2)
        msg = str(err.value)
        assert "\n" not in msg and "train-000002.tar: listed in" in msg and "missing on disk" in msg
        assert err.value.shards == ["train-000002.tar"] and isinstance(err.value, ManifestError)


def test_several_missing_shards_are_named_with_a_count(shard_dir):
    for k in (0, 1, 3):
        (shard_dir / f"train-00000{k}.tar").unlink()
    with pytest.raises(ShardError, match=r"3 of the 4 shards listed in .* are missing on disk: "
                                         r"train-000000.tar, train-000001.tar, train-000003.tar"):
        build_stream(str(shard_dir), batch_size=4)


def test_short_shard_is_an_error_at_build_time(shard_dir):
    cut(shard_dir / "train-000001.tar", 5)
    with pytest.raises(ShardError, match=r"train-000001.tar: \d+ bytes on disk, the manifest says \d+") as err:
        build_stream(str(shard_dir), batch_size=4)
    assert "\n" not in str(err.value) and err.value.shards == ["train-000001.tar"]


def test_size_check_without_recorded_sizes_catches_a_partial_block(shard_dir):
    m = json.loads((shard_dir / MANIFEST_NAME).read_text())
    for s in m["shards"]:
        del s["bytes"]
    (shard_dir / MANIFEST_NAME).write_text(json.dumps(m))
    with open(shard_dir / "train-000003.tar", "r+b") as f:
        f.truncate(3000)
    with pytest.raises(ShardError, match="train-000003.tar: 3000 bytes on disk, not a whole number of 512-byte"):
        build_stream(str(shard_dir), batch_size=4)


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_tar_found_while_reading_names_the_shard(shard_dir, workers):
    # a size the build-time check cannot fault (no recorded sizes, whole blocks): found when the tar is indexed
    cut(shard_dir / "train-000002.tar", 4, drop_sizes=shard_dir / MANIFEST_NAME)
    s = build_stream(str(shard_dir), batch_size=4, num_workers=workers, seed=1)
    with pytest.raises(ShardError) as err:
        take(s, s.batches_per_epoch)
    msg = str(err.value)
    assert "\n" not in msg and "train-000002.tar: only 4 of the 9 samples the manifest lists are readable" in msg
    assert err.value.shards == ["train-000002.tar"]
    assert 0 <= s.position()["batches"] < s.batches_per_epoch
    assert worker_processes() == []


# ------------------------------------------------------------------------------------------------ resampled mode
def test_resampled_mode_skips_a_missing_shard_loudly(shard_dir, caplog):
    (shard_dir / "train-000001.tar").unlink()
    with caplog.at_level(logging.WARNING, logger=LOADER_LOG):
        s = build_stream(str(shard_dir), batch_size=4, mode="resampled", seed=2)
        ids = ids_of(take(s, 3 * s.batches_per_epoch))
    warned = [r.getMessage() for r in caplog.records if "train-000001.tar" in r.getMessage()]
    assert len(warned) == 1 and "missing on disk" in warned[0], warned
    assert s.bad_shards == {"train-000001.tar": "missing on disk"} and s.bad_shard_count == 1
    assert not np.isin(ids, np.arange(10, 22)).any()  # never drawn
    assert s.corrupt_count == 0 and len(ids) == 3 * s.batches_per_epoch * 4


def test_resampled_mode_with_every_shard_missing_is_an_error(shard_dir):
    for k in range(4):
        (shard_dir / f"train-00000{k}.tar").unlink()
    with pytest.raises(ShardError, match="no shard is left"):
        build_stream(str(shard_dir), batch_size=4, mode="resampled")


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_mode_counts_a_short_shard_once(shard_dir, caplog, workers):
    cut(shard_dir / "train-000001.tar", 6, drop_sizes=shard_dir / MANIFEST_NAME)  # found while reading
    with caplog.at_level(logging.WARNING, logger=LOADER_LOG):
        s = build_stream(str(shard_dir), batch_size=4, mode="resampled", seed=0, num_workers=workers,
                         shuffle_buffer=1)
        n = 2 * s.batches_per_epoch
        ids = ids_of(take(s, n))
    warned = [r.getMessage() for r in caplog.records if "train-000001.tar" in r.getMessage()]
    assert len(warned) == 1 and "only 6 of the 12 samples" in warned[0] and "skipped" in warned[0], warned
    assert list(s.bad_shards) == ["train-000001.tar"] and s.bad_shard_count == 1
    drawn = np.concatenate([order.epoch_order(COUNTS, seed=0, epoch=e, rank=0, world_size=1, batch_size=4,
                                              shuffle_buffer=1, mode="resampled") for e in range(2)])
    lost = np.arange(10 + 6, 22)  # the samples cut off
    assert s.corrupt_count == int(np.isin(drawn, lost).sum()) > 0  # each served slot of a lost sample
    assert not np.isin(ids, lost).any()


# ------------------------------------------------------------------------------------------------ workers
def test_all_corrupt_with_workers_is_one_line_in_the_main_process(tmp_path):
    write_image_shards(tmp_path, [8, 8, 8])
    for k in range(3):
        garble(tmp_path / f"train-00000{k}.tar", range(8 * k, 8 * k + 8))
    s = build_stream(str(tmp_path), batch_size=4, num_workers=2)
    with pytest.raises(NoReadableSamplesError) as err:
        take(s, 1)
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg and "worker" not in msg
    assert msg.startswith("rank 0: no readable sample in 3 shard(s) train-000000.tar, train-000001.tar, "
                          "train-000002.tar")
    assert err.value.shards == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert s.position()["batches"] == 0
    assert worker_processes() == []


def test_data_errors_survive_pickling_with_their_attributes():
    for err in (NoReadableSamplesError("m", shards=["a.tar"], rank=3, epoch=2), ShardError("m", ["b.tar"]),
                RemoteShardError("m", ["c.tar", "d.tar"])):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == "m" and back.__dict__ == err.__dict__


# ------------------------------------------------------------------------------------------------ counting
@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_count_and_epoch_summary_match_the_samples_replaced(tmp_path, caplog, workers):
    write_image_shards(tmp_path, [40, 40, 40])
    garble(tmp_path / "train-000001.tar", range(43, 80))  # 37 corrupt samples in one shard
    with caplog.at_level(logging.WARNING, logger=LOADER_LOG):
        s = build_stream(str(tmp_path), batch_size=8, num_workers=workers, seed=0, shuffle_buffer=8)
        ids = ids_of(take(s, s.batches_per_epoch))
    assert s.corrupt_count == 37 == 120 - len(set(ids.tolist()))
    assert s.position()["corrupt_count"] == 37
    summary = [r.getMessage() for r in caplog.records if "replaced in epoch" in r.getMessage()]
    assert summary == ["rank 0: 37 corrupt sample(s) replaced in epoch 0 (37 since the run began)"]


def test_encode_latents_refuses_missing_input_shards(shard_dir, tmp_path):
    from data_pipeline.encode_latents import encode_shards

    (shard_dir / "train-000002.tar").unlink()
    out = tmp_path / "latents"
    with pytest.raises(ShardError, match="1 of the 4 image shards listed in its manifest are missing on disk: "
                                         "train-000002.tar$"):
        encode_shards(lambda x: (x, x.abs() + 0.1), str(shard_dir), out, merge_timeout=5)
    assert not list(out.glob("*.tar")) and not (out / MANIFEST_NAME).exists()


def test_unreadable_sample_warnings_are_capped_per_process(tmp_path, caplog):
    write_image_shards(tmp_path, [2] * 25)
    for k in range(25):
        garble(tmp_path / f"train-{k:06d}.tar", [2 * k, 2 * k + 1])
    s = build_stream(str(tmp_path), batch_size=2, num_workers=0)
    with caplog.at_level(logging.WARNING, logger=LOADER_LOG), pytest.raises(NoReadableSamplesError) as err:
        take(s, 1)
    warned = [r.getMessage() for r in caplog.records if "unreadable, skipped" in r.getMessage()]
    assert len(warned) == 20 and warned[-1].endswith("no more such warnings from this process")
    assert len(err.value.shards) == 25 and "train-000004.tar and 20 more" in str(err.value)
