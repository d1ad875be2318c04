"""Shards in object stores and behind commands: S3 through a real S3 API (moto_server on loopback, filled with the
awscli, read back through the spec a user writes for real S3), ``pipe:`` commands, and ``gs://`` (the gsutil
command line, served by a stand-in ``gsutil`` script: no GCS emulator ships in a package)."""
import json
import os
import stat

import numpy as np
import pytest

from data_pipeline.loader import build_stream
from data_pipeline.synthetic import ids_from_images, write_image_shards
from tests.support.servers import MotoServer

COUNTS = [10, 12, 9, 11]
SLOW_TOOL = dict(timeout=60.0, retries=1, retry_backoff=0.1)  # the aws CLI starts in seconds on a busy machine


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


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores") / "img"
    write_image_shards(d, COUNTS)
    return d


# ------------------------------------------------------------------------------------------------ pipe:
def test_pipe_spec_streams_and_caches_like_local_shards(shard_dir, tmp_path):
    spec = f"pipe:cat {shard_dir}/train-{{000000..000003}}.tar"
    local = build_stream(str(shard_dir), batch_size=4, seed=1)
    exact = build_stream(spec, batch_size=4, seed=1, cache_dir=str(tmp_path))
    n = 2 * local.batches_per_epoch
    assert same_batches(take(exact, n), take(local, n))
    resampled = build_stream(spec, batch_size=4, seed=1, mode="resampled", num_workers=2)
    ids = np.concatenate([ids_from_images(x.numpy()) for x, _ in take(resampled, n)])
    assert set(ids.tolist()) <= set(range(42)) and resampled.bad_shards == {}


def test_a_failing_pipe_command_is_counted_with_its_last_error_line(shard_dir, tmp_path):
    work = tmp_path / "img"
    work.mkdir()
    for p in shard_dir.iterdir():
        (work / p.name).write_bytes(p.read_bytes())
    (work / "train-000003.tar").unlink()
    s = build_stream(f"pipe:cat {work}/train-{{000000..000003}}.tar", batch_size=4, retries=0,
                     cache_dir=str(tmp_path / "cache"))
    take(s, s.batches_per_epoch)
    why = s.bad_shards["train-000003.tar"]
    assert "No such file or directory" in why and "\n" not in why and s.corrupt_count > 0


# ------------------------------------------------------------------------------------------------ gs://
@pytest.fixture
def fake_gsutil(tmp_path, monkeypatch, shard_dir):
    """A `gsutil` on PATH that serves gs://bucket/... from a local directory (only `gsutil -q cat URL`)."""
    root = shard_dir.parent
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "gsutil"
    script.write_text(f"""#!/bin/sh
[ "$1" = "-q" ] && shift
[ "$1" = "cat" ] || {{ echo "fake gsutil: unexpected arguments $*" >&2; exit 2; }}
f="{root}/${{2#gs://bucket/}}"
[ -f "$f" ] || {{ echo "CommandException: No URLs matched: $2" >&2; exit 1; }}
exec cat "$f"
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return script


def test_gs_spec_reads_through_gsutil(fake_gsutil, shard_dir, tmp_path):
    local = build_stream(str(shard_dir), batch_size=4, seed=2)
    remote = build_stream("gs://bucket/img", batch_size=4, seed=2, cache_dir=str(tmp_path))
    assert same_batches(take(remote, local.batches_per_epoch), take(local, local.batches_per_epoch))
    streamed = build_stream("gs://bucket/img/train-{000001..000002}.tar", batch_size=4, mode="resampled")
    ids = np.concatenate([ids_from_images(x.numpy()) for x, _ in take(streamed, streamed.batches_per_epoch)])
    assert set(ids.tolist()) <= set(range(10, 31)) and streamed.bad_shards == {}
    (shard_dir / "train-000002.tar").rename(tmp_path / "away.tar")
    try:
        s = build_stream("gs://bucket/img", batch_size=4, retries=0, cache_dir=str(tmp_path / "other"))
        take(s, s.batches_per_epoch)
    finally:
        (tmp_path / "away.tar").rename(shard_dir / "train-000002.tar")
    assert "CommandException: No URLs matched: gs://bucket/img/train-000002.tar" in s.bad_shards["train-000002.tar"]


# ------------------------------------------------------------------------------------------------ s3://
@pytest.fixture(scope="module")
def s3(tmp_path_factory, shard_dir):
    """moto_server with bucket `shards` holding the shard directory under `img/` (uploaded with `aws s3 cp`)."""
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    try:
        server.aws_cli("s3", "mb", "s3://shards")
        server.aws_cli("s3", "cp", "--recursive", "--only-show-errors", str(shard_dir), "s3://shards/img/")
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws_env(s3, monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_s3_spec_reads_what_the_aws_cli_uploaded(aws_env, shard_dir, tmp_path):
    local = build_stream(str(shard_dir), batch_size=4, seed=3, world_size=2, rank=1)
    exact = build_stream("s3://shards/img", batch_size=4, seed=3, world_size=2, rank=1, num_workers=2,
                         cache_dir=str(tmp_path), **SLOW_TOOL)
    n = local.batches_per_epoch
    assert same_batches(take(exact, n), take(local, n))
    piped = build_stream("pipe:aws s3 cp s3://shards/img/train-{000000..000003}.tar -", batch_size=4, seed=3,
                         mode="resampled", **SLOW_TOOL)
    ids = np.concatenate([ids_from_images(x.numpy()) for x, _ in take(piped, 3)])
    assert set(ids.tolist()) <= set(range(42)) and piped.bad_shards == {}
    assert aws_env.env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(exact.position())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_s3_missing_object_is_counted_with_the_cli_error(aws_env, shard_dir, tmp_path):
    aws_env.aws_cli("s3", "cp", "--recursive", "--only-show-errors", str(shard_dir), "s3://shards/gap/")
    aws_env.aws_cli("s3", "rm", "--only-show-errors", "s3://shards/gap/train-000000.tar")
    s = build_stream("s3://shards/gap", batch_size=4, seed=0, cache_dir=str(tmp_path), **SLOW_TOOL)
    take(s, s.batches_per_epoch)
    why = s.bad_shards.get("train-000000.tar", "")
    assert "s3://shards/gap/train-000000.tar" in why and ("404" in why or "does not exist" in why), s.bad_shards
