"""Shards served over HTTP from loopback (nginx, or http.server without it), read by the training stream.

Exact mode goes through the local shard cache and must give the very batches of the local reader (every sample once
per epoch, exact mid-epoch resume, the second epoch from the cache alone); resampled mode streams the shards. Faults:
a missing shard (404), a truncated shard, the server stopped mid-epoch, a server that stalls mid-transfer: each is
counted and logged, or one clear error, never a hang (every fault test runs under a pytest timeout, by design far
above what it needs).
"""
import json
import logging
import os
import time

import numpy as np
import pytest

from data_pipeline import order
from data_pipeline.loader import RemoteShardError, build_stream
from data_pipeline.manifest import MANIFEST_NAME, ManifestError
from data_pipeline.synthetic import flipped_from_images, ids_from_images, write_image_shards
from tests.support.servers import HttpServer, StallServer

from .test_data_faults import cut, worker_processes

COUNTS = [10, 12, 9, 11]  # ids 0-9, 10-21, 22-30, 31-41
FAST = dict(retries=1, retry_backoff=0.01, timeout=5.0)  # fault tests: fail fast (defaults: 3 retries from 1 s)
LOG = "data_pipeline"


def take(stream, n):
    it = iter(stream)
    try:
        return [next(it) for _ in range(n)]
    finally:
        stream.close()


def same_batches(a, b):
    return len(a) == len(b) and all(np.array_equal(x.numpy(), u.numpy()) and np.array_equal(y.numpy(), v.numpy())
                                    for (x, y), (u, v) in zip(a, b))


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch):
    """A proxy set in the environment (CI machines have them) must not carry requests to 127.0.0.1."""
    for key in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(key, "127.0.0.1,localhost")


@pytest.fixture
def served(tmp_path):
    """(shard directory, HTTP server serving its parent), the server stopped after the test."""
    data = tmp_path / "www" / "img"
    write_image_shards(data, COUNTS)
    server = HttpServer(tmp_path / "www", tmp_path / "server").start()
    yield data, server
    server.stop()


def strays(server):
    """Child processes left besides the server: DataLoader workers, download commands."""
    return [p for p in worker_processes() if server.proc is None or p.pid != server.proc.pid]


def url_of(server, data, *tail):
    return "/".join([server.url, data.name, *tail])


# ------------------------------------------------------------------------------------------------ exact mode
@pytest.mark.timeout(300)
def test_exact_mode_through_the_cache_gives_the_local_batches_and_the_second_epoch_needs_no_server(served, tmp_path):
    data, server = served
    cache = tmp_path / "cache"
    opts = dict(batch_size=4, world_size=2, seed=5, shuffle_buffer=8)
    remote = [build_stream(url_of(server, data), rank=r, num_workers=2 * r, cache_dir=str(cache), **opts)
              for r in range(2)]  # rank 0 without workers, rank 1 with two
    local = [build_stream(str(data), rank=r, **opts) for r in range(2)]
    bpe = local[0].batches_per_epoch
    its = [iter(s) for s in remote]
    first = [[next(it) for _ in range(bpe)] for it in its]
    server.stop()  # every shard is in the node's cache now: the next epoch is read from it alone
    second = [[next(it) for _ in range(bpe)] for it in its]
    for s in remote:
        s.close()
    for r in range(2):
        assert same_batches(first[r] + second[r], take(local[r], 2 * bpe)), f"rank {r}"
        assert remote[r].corrupt_count == 0 and remote[r].bad_shards == {}
    for epoch in (first, second):  # every sample once per epoch over the ranks
        seen = np.concatenate([ids_from_images(x.numpy()) for rank in epoch for x, _ in rank])
        assert sorted(seen.tolist()) == sorted(set(seen.tolist())) and len(seen) == 2 * bpe * 4
    (entry,) = [p for p in cache.iterdir()]
    assert sorted(p.name for p in entry.iterdir() if not p.name.startswith(".")) == \
        sorted(f"train-00000{k}.tar" for k in range(4))
    manifest = json.loads((data / MANIFEST_NAME).read_text())
    assert all((entry / s["name"]).stat().st_size == s["bytes"] for s in manifest["shards"])
    assert worker_processes() == []


@pytest.mark.timeout(300)
def test_exact_mode_resumes_mid_epoch_as_an_uninterrupted_run(served, tmp_path):
    data, server = served
    opts = dict(batch_size=4, seed=2, shuffle_buffer=8, num_workers=2, cache_dir=str(tmp_path / "cache"))
    spec = url_of(server, data)
    straight = build_stream(spec, **opts)
    bpe = straight.batches_per_epoch
    whole = take(straight, bpe + 3)
    first = build_stream(spec, **opts)
    part = take(first, 4)
    position = json.loads(json.dumps(first.position()))  # as a checkpoint stores it
    rest = take(build_stream(spec, position=position, **opts), bpe - 1)
    assert same_batches(part + rest, whole)


@pytest.mark.timeout(300)
def test_cache_stays_under_its_size_and_evicts_least_recently_used(served, tmp_path):
    data, server = served
    sizes = sorted(os.path.getsize(p) for p in data.glob("*.tar"))
    bound = sizes[-1] + sizes[-2] + 100  # room for two shards of four
    cache = tmp_path / "cache"
    s = build_stream(url_of(server, data), batch_size=4, seed=1, shuffle_buffer=1, cache_dir=str(cache),
                     cache_max_gb=bound / 1e9)
    local = build_stream(str(data), batch_size=4, seed=1, shuffle_buffer=1)
    assert same_batches(take(s, 2 * s.batches_per_epoch), take(local, 2 * s.batches_per_epoch))
    (entry,) = list(cache.iterdir())
    kept = [p for p in entry.iterdir() if not p.name.startswith(".")]
    assert 1 <= len(kept) <= 2 and sum(p.stat().st_size for p in kept) <= bound


# ------------------------------------------------------------------------------------------------ resampled mode
@pytest.mark.timeout(300)
def test_resampled_mode_streams_two_ranks_with_two_workers(served):
    data, server = served
    spec = url_of(server, data)
    streams = [build_stream(spec, batch_size=4, rank=r, world_size=2, num_workers=2, seed=3, mode="resampled",
                            shuffle_buffer=8) for r in range(2)]
    bpe = streams[0].batches_per_epoch
    assert bpe == 42 // 2 // 4
    got = []
    for s in streams:
        got.append(batches := take(s, 2 * bpe))
        ids = np.concatenate([ids_from_images(x.numpy()) for x, _ in batches])
        labels = np.concatenate([y.numpy() for _, y in batches])
        assert ids.min() >= 0 and ids.max() < 42 and len(set(ids.tolist())) > 10
        assert np.array_equal(labels, ids % 10)
        assert s.corrupt_count == 0 and s.bad_shards == {} and s.position()["batches"] == 2 * bpe
        assert s.position()["epoch"] == 2
    again = take(build_stream(spec, batch_size=4, rank=1, world_size=2, num_workers=2, seed=3, mode="resampled",
                              shuffle_buffer=8), 2)
    assert same_batches(again, got[1][:2]), "the same seed and workers give the same stream"
    assert not same_batches(got[0][:2], got[1][:2]), "ranks draw differently"
    resumed = build_stream(spec, batch_size=4, rank=1, world_size=2, num_workers=2, seed=3, mode="resampled",
                           shuffle_buffer=8, position=streams[1].position())
    take(resumed, 1)
    assert resumed.position()["batches"] == 2 * bpe + 1 and resumed.epoch == 2
    assert strays(server) == []


def test_resampled_flips_are_those_of_the_sample_ids(served):
    data, server = served
    s = build_stream(url_of(server, data), batch_size=6, seed=9, mode="resampled", shuffle_buffer=4)
    (x, _), = take(s, 1)
    ids = ids_from_images(x.numpy())
    assert np.array_equal(flipped_from_images(x.numpy()), order.flip_bits(9, 0, ids))


# ------------------------------------------------------------------------------------------------ faults
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_a_missing_shard_is_skipped_counted_and_logged_with_its_url(served, tmp_path, caplog, mode):
    data, server = served
    (data / "train-000001.tar").unlink()  # 404 from now on
    spec = url_of(server, data) + "?token=s3cr3t"  # a credential in the URL must never be shown
    with caplog.at_level(logging.WARNING, logger=LOG):
        s = build_stream(spec, batch_size=4, seed=0, mode=mode, cache_dir=str(tmp_path / "cache"), **FAST)
        batches = take(s, 2 * s.batches_per_epoch)
    ids = np.concatenate([ids_from_images(x.numpy()) for x, _ in batches])
    assert not np.isin(ids, np.arange(10, 22)).any()
    assert list(s.bad_shards) == ["train-000001.tar"]
    why = s.bad_shards["train-000001.tar"]
    assert "download failed" in why and "HTTP 404" in why and f"{server.url}/img/train-000001.tar?***" in why
    warned = [r.getMessage() for r in caplog.records if "train-000001.tar" in r.getMessage()]
    assert len(warned) == 1 and "HTTP 404" in warned[0], warned
    assert s.corrupt_count > 0  # the shard's samples: replaced (exact) or lost (resampled), counted either way
    assert "s3cr3t" not in caplog.text + json.dumps(s.position()) + json.dumps(s.bad_shards)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_a_truncated_shard_is_detected_counted_and_never_cached(served, tmp_path, mode):
    data, server = served
    cut(data / "train-000002.tar", 4)  # the manifest still lists 9 samples and the full size
    cache = tmp_path / "cache"
    s = build_stream(url_of(server, data), batch_size=4, seed=0, mode=mode, cache_dir=str(cache),
                     shuffle_buffer=1, **FAST)
    ids = np.concatenate([ids_from_images(x.numpy()) for x, _ in take(s, 2 * s.batches_per_epoch)])
    why = s.bad_shards["train-000002.tar"]
    assert list(s.bad_shards) == ["train-000002.tar"]
    if mode == "exact":
        assert "truncated download" in why and not any(cache.glob("*/train-000002.tar"))
        drawn = np.concatenate([order.epoch_order(COUNTS, seed=0, epoch=e, rank=0, world_size=1, batch_size=4,
                                                  shuffle_buffer=1) for e in range(2)])
        assert not np.isin(ids, np.arange(22, 31)).any()
        assert s.corrupt_count == int(np.isin(drawn, np.arange(22, 31)).sum()) > 0  # each one replaced
    else:  # streamed: the 4 samples that arrived are used, the 5 others counted each time the shard is drawn
        assert "4 of its 9 samples used" in why
        assert not np.isin(ids, np.arange(26, 31)).any() and s.corrupt_count > 0 and s.corrupt_count % 5 == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["exact", "resampled"])
@pytest.mark.parametrize("workers", [0, 2])
def test_server_stopped_mid_epoch_is_one_clear_error(tmp_path, request, mode, workers):
    # 24 small shards: when the server stops, most are not cached yet; 16 distinct ones failing in a row with
    # none succeeding is the verdict "the source is down" (a few bad shards among good ones never add up to it)
    data = tmp_path / "www" / "img"
    write_image_shards(data, [2] * 24)
    server = HttpServer(tmp_path / "www", tmp_path / "server").start()
    request.addfinalizer(server.stop)
    s = build_stream(url_of(server, data), batch_size=2, seed=0, mode=mode, num_workers=workers, shuffle_buffer=1,
                     cache_dir=str(tmp_path / "cache"), **FAST)
    it = iter(s)
    next(it)
    server.stop()
    start = time.monotonic()
    with pytest.raises(RemoteShardError) as err:
        for _ in range(4 * s.batches_per_epoch):
            next(it)
    s.close()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{server.url}/img: ") and "shard downloads failed in a row" in msg
    assert "first error: " in msg and ("refused" in msg.lower() or "reset" in msg.lower()), msg
    assert isinstance(err.value, ManifestError)  # the trainers exit 2
    assert time.monotonic() - start < 60  # bounded by design: a few retries of a few refused connections
    assert strays(server) == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_a_stalled_server_times_out_instead_of_hanging(tmp_path, mode):
    data = tmp_path / "www" / "img"
    write_image_shards(data, COUNTS)
    server = StallServer(tmp_path / "www")
    try:
        s = build_stream(f"{server.url}/img", batch_size=4, mode=mode, retries=0, timeout=1.0,
                         cache_dir=str(tmp_path / "cache"))
        start = time.monotonic()
        with pytest.raises(RemoteShardError, match=r"no data for 1 s"):
            take(s, s.batches_per_epoch)
        assert time.monotonic() - start < 60  # 4 shards x 1 s timeout, by design
        assert server.stalled >= 1
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_unreadable_manifest_is_one_line_naming_the_spec(served):
    data, server = served
    (data / MANIFEST_NAME).unlink()
    with pytest.raises(ManifestError) as err:
        build_stream(url_of(server, data) + "?sig=abc", batch_size=4, **FAST)
    msg = str(err.value)
    assert msg.startswith(f"{server.url}/img?***: cannot read its manifest (") and "HTTP 404" in msg
    assert "\n" not in msg and "abc" not in msg


@pytest.mark.timeout(120)
def test_all_shards_missing_is_one_clear_error_not_an_empty_epoch(served, tmp_path):
    data, server = served
    for p in data.glob("*.tar"):
        p.unlink()
    s = build_stream(url_of(server, data), batch_size=4, mode="resampled", **FAST)
    with pytest.raises(RemoteShardError, match=r"4 shard downloads failed in a row .*first error: .*HTTP 404"):
        take(s, 1)
    s = build_stream(url_of(server, data), batch_size=4, cache_dir=str(tmp_path / "c"), **FAST)
    with pytest.raises(RemoteShardError, match=r"4 shard downloads failed in a row .*first error: .*HTTP 404"):
        take(s, 1)


# ------------------------------------------------------------------------------------------------ the trainer
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_trainer_streams_mnist_shards_over_http_on_two_ranks_with_two_workers(small_shards, tmp_path):
    from tests.test_train import run_train

    server = HttpServer(small_shards.parent, tmp_path / "server").start()
    try:
        run = tmp_path / "run"
        out = run_train(run, f"{server.url}/{small_shards.name}", "data.mode=resampled", "data.num_workers=2",
                        "train.max_steps=4", "train.ckpt_every=4", "train.log_every=1")
    finally:
        server.stop()
    meta = json.loads((run / "checkpoints" / "step_0000004" / "meta.json").read_text())
    assert meta["step"] == 4 and len(meta["positions"]) == 2
    assert all(p["batches"] == 4 and p["mode"] == "resampled" for p in meta["positions"])
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(np.isfinite(losses)), out[-3000:]
