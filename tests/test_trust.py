"""Issue 14, trainer side: nothing loaded from a checkpoint runs code, one trainer per run directory, and a run
directory that is missing, unwritable or full stops with one line."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, entry_env, run_entry, torchrun_cmd

TINY = "configs/runs/tiny_test.yaml"


def train_args(run: Path, shards: Path, *sets: str) -> list[str]:
    args = ["launch/train.py", "--config", TINY, "--run-dir", str(run), "--set", f"data.shards={shards}",
            "--set", "train.sample_every=0"]
    for s in sets:
        args += ["--set", s]
    return args


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------- payloads
class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def one_checkpoint(small_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ckpt") / "run"
    proc = run_entry(train_args(run, small_shards, "train.max_steps=2", "train.ckpt_every=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _plant(path: Path, marker: Path) -> None:
    if path.suffix == ".pt":  # an extra key in the real file: the rest stays loadable
        state = torch.load(path, weights_only=True)
        state["extra"] = Payload(marker)
        torch.save(state, path)
    else:  # JSON and safetensors files replaced by a pickle (raw, and in torch.save's zip container)
        path.write_bytes(pickle.dumps(Payload(marker)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["meta.json", "ema.safetensors", "optim/rank_00000.safetensors",
                                  "rank/rank_00000.pt"])
def test_a_payload_planted_in_any_checkpoint_file_never_runs(name, one_checkpoint, small_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_checkpoint, run)
    marker = tmp_path / "PAYLOAD_RAN"
    target = run / "checkpoints" / "step_0000002" / name
    _plant(target, marker)
    resume = "auto" if name != "meta.json" else str(target.parent)  # auto skips a checkpoint without valid meta
    proc = run_entry(train_args(run, small_shards, "train.max_steps=3") + ["--resume", resume])
    assert not marker.exists(), "the payload ran"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert name.split("/")[-1] in last_line(proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_tampered_files_are_one_line_errors(one_checkpoint, small_shards, tmp_path):
    for name, mangle in [("rank/rank_00000.pt", lambda b: b[: len(b) // 2]),
                         ("ema.safetensors", lambda b: b[:100] + b"\0" * 64 + b[164:]),
                         ("optim/rank_00000.safetensors", lambda b: b[:50])]:
        run = tmp_path / name.replace("/", "_")
        shutil.copytree(one_checkpoint, run)
        target = run / "checkpoints" / "step_0000002" / name
        target.write_bytes(mangle(target.read_bytes()))
        proc = run_entry(train_args(run, small_shards, "train.max_steps=3") + ["--resume", "auto"])
        assert proc.returncode == 2, (name, proc.stderr[-3000:])
        assert name.split("/")[-1] in last_line(proc.stderr) and "Traceback" not in proc.stderr, name


# ---------------------------------------------------------------------------------------------- the lock
def test_lock_refuses_a_live_holder_and_takes_over_dead_ones(tmp_path, monkeypatch):
    from launch.run_lock import LOCK_NAME, RunLock, RunLockBusy

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    first = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    with pytest.raises(RunLockBusy, match=rf"host {socket.gethostname()} pid {os.getpid()}.*since"):
        RunLock(tmp_path).acquire()
    time.sleep(0.2)
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    lock = tmp_path / LOCK_NAME
    # a dead pid on this host (kill -9)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "x"}))
    RunLock(tmp_path).acquire().release()
    # another host: refused while its heartbeat is fresh, taken over once it is stale (by the server's clock)
    lock.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "since": "x"}))
    with pytest.raises(RunLockBusy, match="node-elsewhere"):
        RunLock(tmp_path, stale_s=60).acquire()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    RunLock(tmp_path, stale_s=60).acquire().release()
    # a requeued SLURM job (same job id, another restart) takes over its earlier incarnation at once
    lock.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "job": "777", "restart": "0", "since": "x"}))
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    RunLock(tmp_path, stale_s=60).acquire().release()


def test_lock_heartbeat_keeps_the_lock_fresh(tmp_path):
    from launch.run_lock import LOCK_NAME, RunLock

    held = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))
    time.sleep(0.3)
    assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 5
    held.release()


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=entry_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_log(run: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run / "log.jsonl").is_file() and (run / "log.jsonl").read_text().strip():
            return
        time.sleep(0.2)
    raise AssertionError(f"the first trainer never logged (exit {proc.poll()})")


@pytest.mark.slow
def test_second_trainer_on_a_busy_run_directory_stops_and_a_killed_holder_does_not_block(small_shards, tmp_path):
    run = tmp_path / "run"
    holder = _start(train_args(run, small_shards, "train.max_steps=100000", "train.log_every=1",
                               "train.ckpt_every=100000"))
    try:
        _wait_for_log(run, holder)
        proc = run_entry(train_args(run, small_shards, "train.max_steps=2") + ["--resume", "auto"])
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = last_line(proc.stderr)
        assert f"pid {holder.pid}" in line and "in use by another trainer" in line and "since" in line, line
        assert holder.poll() is None  # the holder is undisturbed
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        proc = run_entry(train_args(run, small_shards, "train.max_steps=2") + ["--resume", "auto"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "taking over the lock" in proc.stderr
    finally:
        if holder.poll() is None:
            holder.kill()


# ---------------------------------------------------------------------------------------------- the run dir
@pytest.mark.slow
def test_run_dir_that_is_a_file_is_one_line(small_shards, tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    proc = run_entry(train_args(target, small_shards, "train.max_steps=1"))
    assert proc.returncode == 2 and "exists and is not a directory" in last_line(proc.stderr), proc.stderr[-2000:]
    assert target.read_text() == "x"


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                                                capture_output=True).returncode == 0


@pytest.mark.slow
def test_read_only_run_dir_is_one_line(small_shards, tmp_path):
    ro = tmp_path / "ro"
    mounted = _mount_tmpfs(ro, "ro,size=1m")
    if not mounted:  # not root: a mode-555 directory is read-only for this user
        ro.mkdir(exist_ok=True)
        ro.chmod(0o555)
    try:
        proc = run_entry(train_args(ro / "run", small_shards, "train.max_steps=1"))
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert str(ro / "run") in last_line(proc.stderr) and "Traceback" not in proc.stderr
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)])


@pytest.mark.slow
def test_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(small_shards, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=24m"):
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    try:
        run = disk / "run"
        proc = run_entry(train_args(run, small_shards, "train.max_steps=2", "train.ckpt_every=2"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * max(0, free - 200_000))  # room for logs, not for a checkpoint
        proc = run_entry(train_args(run, small_shards, "train.max_steps=4", "train.ckpt_every=2")
                         + ["--resume", "auto"])
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "no space left on device" in last_line(proc.stderr) and "Traceback" not in proc.stderr
        ckpts = run / "checkpoints"
        assert (ckpts / "latest").read_text().strip() == "step_0000002" and not list(ckpts.glob(".tmp-*"))
        (disk / "filler").unlink()
        proc = run_entry(train_args(run, small_shards, "train.max_steps=4", "train.ckpt_every=2")
                         + ["--resume", "auto"])
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.slow
def test_run_dir_deleted_mid_run_is_one_line(small_shards, tmp_path):
    run = tmp_path / "run"
    proc = _start(train_args(run, small_shards, "train.max_steps=100000", "train.log_every=1",
                             "train.ckpt_every=100000"))
    try:
        _wait_for_log(run, proc)
        gone = run.with_name("deleted")
        os.rename(run, gone)  # the directory vanishes at once (a recursive delete races with the trainer's writes)
        shutil.rmtree(gone, ignore_errors=True)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-3000:]
        assert "disappeared while training" in last_line(err) and "Traceback" not in err, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_safetensors_files_get_the_same_mode_as_other_files(tmp_path):
    """safetensors creates 0600 files; ours (EMA, optimizer state, VAE, converted weights) follow the umask."""
    from data_pipeline.files import atomic_save_safetensors, atomic_write_text

    umask = os.umask(0o022)
    try:
        atomic_save_safetensors({"w": torch.zeros(2)}, tmp_path / "a.safetensors", metadata={"k": "v"})
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------- one rank's data
def _corrupt_payloads(shard: Path) -> int:
    """Overwrite every image payload of a tar shard with junk of the same length (headers stay valid)."""
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(m.offset_data, m.size) for m in tar.getmembers() if m.name.endswith((".png", ".jpg", ".npy"))]
    data = bytearray(shard.read_bytes())
    for offset, size in members:
        data[offset: offset + size] = bytes((i * 37 + 11) % 256 for i in range(size))
    shard.write_bytes(bytes(data))
    return len(members)


@pytest.mark.slow
def test_a_rank_without_readable_data_stops_every_rank_with_one_line(tmp_path):
    shards = tmp_path / "shards"
    proc = run_entry(["data_pipeline/make_shards.py", "--source", "mnist", "--out", str(shards), "--shard-size", "16",
                      "--max-samples", "32"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    bad = sorted(shards.glob("*.tar"))[1]
    assert _corrupt_payloads(bad) == 16
    args = train_args(tmp_path / "run", shards, "train.max_steps=4", "train.global_batch_size=4",
                      "data.shuffle_buffer=4")
    done = subprocess.run(torchrun_cmd(args[0], args[1:], 2), cwd=ROOT, env=entry_env(), capture_output=True, text=True, timeout=600)
    err = done.stdout + done.stderr
    assert done.returncode != 0
    lines = [line for line in err.splitlines() if "training stopped" in line]
    assert {"r0", "r1"} == {line.split("]")[0].split()[-1] for line in lines}, err[-3000:]  # both ranks, one line
    assert all(bad.name in line and "rank" in line for line in lines), lines
    assert "Connection closed" not in err and "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err


@pytest.mark.slow
def test_a_short_shard_seen_by_one_rank_at_start_stops_every_rank(tmp_path):
    """Each rank checks the sizes of the shards it reads: the rank that finds a short one and every other rank
    stop at start-up with one line naming it (exit 2), instead of the others waiting in a collective."""
    shards = tmp_path / "shards"
    proc = run_entry(["data_pipeline/make_shards.py", "--source", "mnist", "--out", str(shards), "--shard-size", "16",
                      "--max-samples", "32"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    short = sorted(shards.glob("*.tar"))[0]
    short.write_bytes(short.read_bytes()[:-2048])
    args = train_args(tmp_path / "run", shards, "train.max_steps=2", "train.global_batch_size=4")
    done = subprocess.run(torchrun_cmd(args[0], args[1:], 2), cwd=ROOT, env=entry_env(), capture_output=True,
                          text=True, timeout=600)
    err = done.stdout + done.stderr
    lines = [line for line in err.splitlines() if "ERROR launch.trainer_base" in line]
    assert {"r0", "r1"} == {line.split("]")[0].split()[-1] for line in lines}, err[-3000:]
    assert all(short.name in line for line in lines), lines
    assert "exitcode  : 2" in err and "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err
