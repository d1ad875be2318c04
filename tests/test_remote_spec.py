"""Remote shard specs without a server: how a spec names its manifest and shards, credentials redacted everywhere,
the streaming tar parser against the indexed reader, and one-line errors for specs that cannot work."""
import io
import os
import tarfile
from collections import namedtuple

import pytest

from data_pipeline import shard_cache
from data_pipeline.loader import build_stream
from data_pipeline.locations import is_remote, redact
from data_pipeline.manifest import ManifestError, load_spec
from data_pipeline.remote import FailureTracker, RemoteOptions, RemoteShardError, parse_remote_spec
from data_pipeline.synthetic import write_image_shards
from data_pipeline.tario import index_tar, iter_tar_samples


@pytest.mark.parametrize("spec,manifest,shard,subset", [
    ("https://h.example/data/lat", "https://h.example/data/lat/manifest.json", "https://h.example/data/lat/a.tar",
     None),
    ("https://h.example/data/lat/", "https://h.example/data/lat/manifest.json", "https://h.example/data/lat/a.tar",
     None),
    ("http://h:8080/d/manifest.json", "http://h:8080/d/manifest.json", "http://h:8080/d/a.tar", None),
    ("s3://bucket/p/train-{000000..000002}.tar", "s3://bucket/p/manifest.json", "s3://bucket/p/a.tar",
     ("train-000000.tar", "train-000001.tar", "train-000002.tar")),
    ("gs://bucket/p?x=1", "gs://bucket/p/manifest.json?x=1", "gs://bucket/p/a.tar?x=1", None),
    ("https://h/d/train-{0..1}.tar?sig=abc", "https://h/d/manifest.json?sig=abc", "https://h/d/a.tar?sig=abc",
     ("train-0.tar", "train-1.tar")),
])
def test_url_specs_name_their_manifest_and_shards(spec, manifest, shard, subset):
    rs = parse_remote_spec(spec)
    assert is_remote(spec)
    assert (rs.manifest_location, rs.location("a.tar"), rs.subset) == (manifest, shard, subset)


def test_pipe_spec_reads_the_manifest_with_the_same_command():
    rs = parse_remote_spec("pipe:aws s3 cp --quiet s3://b/lat/train-{000000..000001}.tar -")
    assert rs.manifest_location == "pipe:aws s3 cp --quiet s3://b/lat/manifest.json -"
    assert rs.location("train-000001.tar") == "pipe:aws s3 cp --quiet s3://b/lat/train-000001.tar -"
    assert rs.subset == ("train-000000.tar", "train-000001.tar")
    rs = parse_remote_spec("pipe:cat 'shards/x-{0..2}.tar'")
    assert rs.manifest_location == "pipe:cat 'shards/manifest.json'" and len(rs.subset) == 3


@pytest.mark.parametrize("spec,why", [
    ("pipe:cat a.json", "needs exactly one argument naming its .tar shards"),
    ("pipe:cat a-{0..1}.tar b-{0..1}.tar", "found 2"),
    ("https://h/{a,b}/x.tar", "must name .tar shards of one directory"),
    ("s3://", "no bucket or host path"),
    ("pipe:cat 'unclosed", "not a shell command"),
])
def test_bad_remote_specs_are_one_line(spec, why):
    with pytest.raises(ManifestError, match=why) as err:
        parse_remote_spec(spec)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text,shown", [
    ("https://user:pw@h.example/d/x.tar?X-Amz-Signature=abc&t=1", "https://***@h.example/d/x.tar?***"),
    ("pipe:curl -s -H 'Authorization: Bearer tok' https://h/x-{0..3}.tar", "pipe:curl -s -H *** https://h/x-{0..3}.tar"),
    ("pipe:curl --user me:pw https://h/x.tar", "pipe:curl --user *** https://h/x.tar"),
    ("pipe:env AWS_SECRET_ACCESS_KEY=abc HF_TOKEN=def aws s3 cp s3://b/x.tar -",
     "pipe:env AWS_SECRET_ACCESS_KEY=*** HF_TOKEN=*** aws s3 cp s3://b/x.tar -"),
    ("s3://bucket/p/train-000001.tar", "s3://bucket/p/train-000001.tar"),
])
def test_redaction_hides_credentials_and_keeps_the_rest(text, shown):
    assert redact(text) == shown


def test_local_tools_refuse_remote_specs_with_one_line():
    with pytest.raises(ManifestError, match=r"^https://\*\*\*@h/d\?\*\*\*: remote shards are read by the training "
                                            r"stream only"):
        load_spec("https://u:secret@h/d?token=abc")


def test_bad_remote_settings_are_refused_before_any_request():
    for bad in (dict(timeout=0), dict(retries=-1), dict(retry_backoff=float("nan")), dict(cache_max_gb=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            build_stream("http://127.0.0.1:9/none", batch_size=2, **bad)


def test_failure_tracker_needs_distinct_shards_failing_with_none_succeeding():
    t = FailureTracker("http://h/d", limit=3)
    for name in ("a", "a", "b", "a"):  # the same bad shards drawn again never add up
        t.failure(name, f"{name} failed")
    t.success()
    t.failure("c", "c failed")
    t.failure("d", "d failed")
    with pytest.raises(RemoteShardError, match=r"^http://h/d: 3 shard downloads failed in a row with none succeeding "
                                               r"\(first error: c failed\)") as err:
        t.failure("e", "e failed")
    assert err.value.shards == ["c", "d", "e"]


def test_backoff_doubles_up_to_a_cap():
    o = RemoteOptions(retry_backoff=1.0)
    assert [o.backoff(k) for k in (1, 2, 3, 7)] == [1.0, 2.0, 4.0, 30.0]


# ------------------------------------------------------------------------------------------------ streaming tar
def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_streamed_samples_equal_the_indexed_ones(tmp_path):
    write_image_shards(tmp_path, [7])
    path = tmp_path / "train-000000.tar"
    idx = index_tar(str(path))
    raw = path.read_bytes()
    streamed = list(iter_tar_samples(io.BytesIO(raw)))
    assert [k for k, _ in streamed] == idx.keys
    for (_, sample), members in zip(streamed, idx.samples):
        assert {e: raw[o:o + n] for e, (o, n) in members.items()} == sample


def test_streamed_pax_and_long_names_fall_back_to_webdataset(tmp_path):
    buf = io.BytesIO()
    long_key = "k" * 120
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        _member(tf, "000.npy", b"a" * 700)
        _member(tf, "000.cls", b"1")
        _member(tf, f"{long_key}.npy", b"b" * 10)  # a GNU long-name header: tarfile reads from here on
        _member(tf, f"{long_key}.cls", b"2")
    assert list(iter_tar_samples(io.BytesIO(buf.getvalue()))) == [
        ("000", {"npy": b"a" * 700, "cls": b"1"}), (long_key, {"npy": b"b" * 10, "cls": b"2"})]


@pytest.mark.parametrize("damage,why", [
    (lambda raw: raw[:700], "tar ends inside member 000.npy"),
    (lambda raw: raw[:300], "tar ends inside a header at byte 300"),
    (lambda raw: raw[:5] + b"X" + raw[6:], "bad tar header checksum at byte 0"),  # a name byte changed
])
def test_a_damaged_stream_is_an_error_not_fewer_samples(damage, why):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        _member(tf, "000.npy", b"a" * 700)
        _member(tf, "000.cls", b"1")
    with pytest.raises(ValueError, match=why):
        list(iter_tar_samples(io.BytesIO(damage(buf.getvalue()))))


def test_basic_auth_comes_from_the_url_or_netrc(tmp_path, monkeypatch):
    import base64
    import urllib.parse

    from data_pipeline.remote import _http_auth

    def decoded(url):
        header = _http_auth(urllib.parse.urlsplit(url))
        return header and base64.b64decode(header.split()[1]).decode()

    (tmp_path / ".netrc").write_text("machine data.example login me password s3cret\n")
    (tmp_path / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert decoded("https://u:p%40ss@other.example/x.tar") == "u:p@ss"
    assert decoded("https://data.example/x.tar") == "me:s3cret"
    assert decoded("https://nobody.example/x.tar") is None


def test_cache_removes_partial_downloads_of_dead_processes_only(tmp_path):
    import os
    import socket

    from data_pipeline.remote import RemoteOptions
    from data_pipeline.shard_cache import ShardCache, dataset_key

    manifest = {"shards": [{"name": "a.tar", "num_samples": 1, "bytes": 1024}]}
    d = tmp_path / dataset_key("http://h/d/manifest.json", manifest)
    d.mkdir()
    host = socket.gethostname()
    dead, live = d / f".a.tar.part-{host}-999999999", d / f".a.tar.part-{host}-{os.getpid()}"
    other = d / ".a.tar.part-elsewhere-999999999"  # another host's download in progress (shared filesystem)
    for p in (dead, live, other):
        p.write_bytes(b"x")
    cache = ShardCache("http://h/d", "http://h/d/manifest.json", ["http://h/d/a.tar"], manifest,
                       RemoteOptions(cache_dir=str(tmp_path)))
    assert cache.dir == d and not dead.exists() and live.exists() and other.exists()
    assert not cache.present(0)


def test_cache_evicts_to_keep_the_disk_from_filling(tmp_path, monkeypatch):
    manifest = {"shards": [{"name": f"{k}.tar", "num_samples": 1, "bytes": 10} for k in range(3)]}
    cache = shard_cache.ShardCache("h", "h/manifest.json", ["h/0.tar", "h/1.tar", "h/2.tar"], manifest,
                                   RemoteOptions(cache_dir=str(tmp_path)))
    for k in range(2):
        (cache.dir / f"{k}.tar").write_bytes(b"x" * 10)
        os.utime(cache.dir / f"{k}.tar", (1000 + k, 1000 + k))  # 0.tar used least recently
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shard_cache.shutil, "disk_usage", lambda p: usage(100 << 30, 0, 50 << 30))
    cache._make_room(10, keep="2.tar")  # room to spare: nothing evicted
    assert sorted(p.name for p in cache.dir.glob("*.tar")) == ["0.tar", "1.tar"]
    monkeypatch.setattr(shard_cache.shutil, "disk_usage", lambda p: usage(100 << 30, 0, (5 << 30) - 5))
    cache._make_room(10, keep="2.tar")  # 5 bytes short of 5% free: the least recently used shard goes
    assert [p.name for p in cache.dir.glob("*.tar")] == ["1.tar"]


def test_remote_config_keys_reach_the_training_stream():
    """`data.remote.*` in a config become the stream's remote options; out-of-range values name the key."""
    import torch

    from data_pipeline.dist_env import DistInfo
    from eval.config import ConfigError, load_config
    from launch.trainer_base import stream_options

    cfg = load_config(None, ["data.shards=http://h/d", "data.remote.timeout=7.5", "data.remote.retries=0",
                             "data.remote.retry_backoff=0.25", "data.remote.cache_dir=/scratch/c",
                             "data.remote.cache_max_gb=2"])
    cpu = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    opts = stream_options(cfg, cpu, 4)
    assert {k: opts[k] for k in ("timeout", "retries", "retry_backoff", "cache_dir", "cache_max_gb")} == dict(
        timeout=7.5, retries=0, retry_backoff=0.25, cache_dir="/scratch/c", cache_max_gb=2.0)
    with pytest.raises(ConfigError, match="data.remote.timeout"):
        load_config(None, ["data.remote.timeout=0"])
