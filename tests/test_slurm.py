"""The sbatch scripts in slurm/ against a real one-machine SLURM cluster (tests/slurm/cluster.sh: nodes n1, n2).

Skipped when SLURM is not installed or the cluster cannot be started here (not root), unless DIT_REQUIRE_SLURM=1
(CI), which turns the skip into a failure. Jobs are watched with `scontrol show job -o` every 0.5 s.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from data_pipeline.dist_env import slurm_master_port

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
TRAIN_SH = REPO / "slurm" / "train.sh"
XL_SH = REPO / "slurm" / "train_dit_xl.sh"
EVAL_SH = REPO / "slurm" / "eval_fid.sh"
TINY_CONFIG = "configs/runs/tiny_test.yaml"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}
JOB_TIMEOUT = 240.0  # a safety net against a hung job, not a speed check
# The preemption test's run: long enough that USR1 (sent once the first checkpoint exists) lands before the end.
PREEMPT_MAX_STEPS = 60
PREEMPT_CKPT_EVERY = 10

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _unavailable(reason: str) -> None:
    if os.environ.get("DIT_REQUIRE_SLURM") == "1":
        pytest.fail(f"DIT_REQUIRE_SLURM=1 but SLURM is unavailable: {reason}")
    pytest.skip(f"no SLURM cluster: {reason} (set DIT_REQUIRE_SLURM=1 to make this a failure)")


@dataclass
class Cluster:
    """A running test cluster: its directory and the environment client commands and jobs need."""

    dir: Path
    env: dict

    def run(self, *cmd: str, check: bool = True, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        proc = subprocess.run(list(cmd), env=self.env, cwd=cwd, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sbatch(self, script: Path, *args: str, opts: tuple = (), env: Optional[dict] = None) -> int:
        """Submit `script args` from the repo root; returns the job id."""
        full_env = dict(self.env, **(env or {}))
        proc = subprocess.run(["sbatch", "--parsable", *opts, str(script), *args], env=full_env, cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr.strip()}"
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, log: Path, until=lambda info: info.get("JobState") in FINAL_STATES,
             timeout: float = JOB_TIMEOUT) -> dict:
        """Poll the job every 0.5 s until `until(info)`; on timeout cancel it and fail with its log."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            if info.get("JobState") in FINAL_STATES:
                raise AssertionError(f"job {job_id} ended {info.get('JobState')} early\n{_tail(log)}")
            if time.monotonic() > deadline:
                self.run("scancel", str(job_id), check=False)
                raise AssertionError(f"job {job_id} still {info.get('JobState')} (reason {info.get('Reason')}) after "
                                     f"{timeout:.0f} s\n{_tail(log)}\n{_tail(self.dir / 'slurmctld.log', 20)}")
            time.sleep(0.5)


def _tail(log: Path, lines: int = 60) -> str:
    if not log.exists():
        return f"(no log at {log})"
    return f"--- {log.name} (tail) ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Cluster:
    """Bring up the 2-node test cluster once per session; stop its daemons at the end."""
    if shutil.which("sbatch") is None or not (shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists()):
        _unavailable("slurm-wlm is not installed (no sbatch or slurmctld; .ci/install_slurm.sh installs it)")
    if os.geteuid() != 0:
        _unavailable("the one-machine test cluster must be started as root (slurmd launches the jobs)")
    cdir = tmp_path_factory.mktemp("slurm_cluster")
    proc = subprocess.run(["bash", str(CLUSTER_SH), "up", str(cdir)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        subprocess.run(["bash", str(CLUSTER_SH), "down", str(cdir)], capture_output=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        _unavailable(f"tests/slurm/cluster.sh up failed: {lines[-1] if lines else proc.returncode}")
    # Jobs inherit this environment (sbatch --export=ALL): no launcher or outer-allocation variables, no GPUs.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                        "MASTER_PORT", "VENV")}
    env.update(SLURM_CONF=str(cdir / "slurm.conf"), CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu",
               WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    if (Path(sys.prefix) / "bin" / "python").exists():  # the scripts run the interpreter running these tests
        env["VENV"] = sys.prefix
    try:
        yield Cluster(cdir, env)
    finally:
        subprocess.run(["bash", str(CLUSTER_SH), "down", str(cdir)], capture_output=True, timeout=120)


# --- the requeue plumbing, with a stand-in for launch/train.py ------------------------------------------------
# The stand-in keeps launch/train.py's contract (--config/--set/--resume auto/--run-dir, ranks from SLURM_*,
# MASTER_ADDR/PORT from the environment, SIGUSR1/SIGTERM → finish the step, checkpoint, exit 3, checkpoints as
# RUN/checkpoints/step_%07d/meta.json + `latest`) and records every start, so the real slurm/train.sh's signal
# forwarding, double wait and requeue are checked in seconds, independently of the trainer.
STAND_IN = textwrap.dedent('''
    import argparse, json, os, signal, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--resume")
    p.add_argument("--run-dir", required=True)
    a = p.parse_args()
    sets = dict(s.split("=", 1) for s in a.set)
    max_steps, every = int(sets["train.max_steps"]), int(sets["train.ckpt_every"])
    rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    ckdir = os.path.join(a.run_dir, "checkpoints")
    stop = []
    signal.signal(signal.SIGUSR1, lambda *_: stop.append("USR1"))
    signal.signal(signal.SIGTERM, lambda *_: stop.append("TERM"))
    step = 0
    if a.resume == "auto" and os.path.exists(os.path.join(ckdir, "latest")):
        name = open(os.path.join(ckdir, "latest")).read().strip()
        step = json.load(open(os.path.join(ckdir, name, "meta.json")))["step"]
    def record(**kw):
        with open(os.path.join(a.run_dir, "events-rank%d.jsonl" % rank), "a") as f:
            f.write(json.dumps(dict(kw, rank=rank, world=world, node=os.environ["SLURM_NODEID"],
                                    master=os.environ["MASTER_ADDR"] + ":" + os.environ["MASTER_PORT"],
                                    restart=os.environ.get("SLURM_RESTART_COUNT", "0"))) + "\\n")
    def all_reduce_max(tag, value):  # through files: every rank writes its value, then reads all of them
        path = os.path.join(a.run_dir, "sync-%s-%s-%%d" % (os.environ.get("SLURM_RESTART_COUNT", "0"), tag))
        with open(path % rank + ".tmp", "w") as f:
            f.write(str(value))
        os.replace(path % rank + ".tmp", path % rank)
        while not all(os.path.exists(path % r) for r in range(world)):
            time.sleep(0.02)
        return max(int(open(path % r).read()) for r in range(world))
    def save(step):
        name = "step_%07d" % step
        if rank == 0:
            os.makedirs(os.path.join(ckdir, name), exist_ok=True)
            with open(os.path.join(ckdir, name, "meta.tmp"), "w") as f:
                json.dump({"step": step}, f)
            os.replace(os.path.join(ckdir, name, "meta.tmp"), os.path.join(ckdir, name, "meta.json"))
            with open(os.path.join(ckdir, "latest.tmp"), "w") as f:
                f.write(name)
            os.replace(os.path.join(ckdir, "latest.tmp"), os.path.join(ckdir, "latest"))
        all_reduce_max("saved-%d" % step, 1)  # like the trainer's barrier: nobody leaves before it is complete
    os.makedirs(ckdir, exist_ok=True)
    record(event="start", step=step, sets=sets)
    while step < max_steps:
        time.sleep(0.25)
        step += 1
        stopping = all_reduce_max("stop-%d" % step, int(bool(stop)))  # all ranks stop at the same step
        if step % every == 0 or step == max_steps or stopping:
            save(step)
        if stopping:
            record(event="preempted", step=step, signal=stop[0] if stop else "peer")
            sys.exit(3)
    record(event="done", step=step)
''')


@pytest.fixture()
def stand_in_repo(tmp_path) -> Path:
    """A repo whose launch/train.py is the stand-in and whose slurm/ is the real one."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    (repo / "launch" / "train.py").write_text(STAND_IN)
    (repo / "slurm").symlink_to(REPO / "slurm")
    return repo


def _events(run_dir: Path) -> list[dict]:
    out = []
    for path in sorted(run_dir.glob("events-rank*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines()]
    return out


def _latest_step(run_dir: Path) -> Optional[int]:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.exists():
        return None
    return json.loads((run_dir / "checkpoints" / latest.read_text().strip() / "meta.json").read_text())["step"]


def _preempt_after_first_checkpoint(cluster: Cluster, job_id: int, run_dir: Path, log: Path) -> None:
    """Wait for the first checkpoint of a running job, then send USR1 to its batch shell only."""
    cluster.wait(job_id, log, until=lambda info: _latest_step(run_dir) is not None)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))


def test_requeue_plumbing_with_stand_in(slurm_cluster, stand_in_repo, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    run_dir.mkdir()
    job = slurm_cluster.sbatch(
        TRAIN_SH, "--set", "train.ckpt_every=4",
        opts=("--nodes=2", "--ntasks-per-node=1", f"--output={log}"),
        env={"DIT_REPO": str(stand_in_repo), "CONFIG": "unused.yaml", "RUN_DIR": str(run_dir),
             "OVERRIDES": "train.max_steps=40  data.shards=/*/x-{0..3}.tar"})
    _preempt_after_first_checkpoint(slurm_cluster, job, run_dir, log)
    info = slurm_cluster.wait(job, log)
    assert info["JobState"] == "COMPLETED", _tail(log)
    assert info["Restarts"] == "1", _tail(log)
    events = _events(run_dir)
    starts = [e for e in events if e["event"] == "start"]
    preempted = [e for e in events if e["event"] == "preempted"]
    done = [e for e in events if e["event"] == "done"]
    # Two ranks on two nodes, both started twice; master = n1's address; the port from the job id.
    assert sorted((e["rank"], e["node"], e["restart"]) for e in starts) == [
        (0, "0", "0"), (0, "0", "1"), (1, "1", "0"), (1, "1", "1")], events
    assert {e["master"] for e in starts} == {f"127.0.0.1:{slurm_master_port(job)}"}
    # $OVERRIDES split on whitespace, nothing globbed or brace-expanded; script arguments come after it.
    assert all(e["sets"] == {"train.max_steps": "40", "data.shards": "/*/x-{0..3}.tar", "train.ckpt_every": "4"}
               for e in starts), starts
    # The batch shell's USR1 reached the ranks through srun ("peer": a rank that learnt it from the other first);
    # they stopped at the same step and checkpointed it.
    signals = [e["signal"] for e in preempted]
    assert len(preempted) == 2 and "USR1" in signals and set(signals) <= {"USR1", "peer"}, events
    stop_step = preempted[0]["step"]
    assert 0 < stop_step < 40 and {e["step"] for e in preempted} == {stop_step}
    # The second start resumed from that checkpoint, not from step 0, and ran to the end.
    assert {e["step"] for e in starts if e["restart"] == "1"} == {stop_step}
    assert {e["step"] for e in done} == {40} and _latest_step(run_dir) == 40
    text = log.read_text()
    assert "batch shell got SIGUSR1" in text and f"requeueing job {job}" in text and "restart 1" in text


def test_cancel_is_not_requeued(slurm_cluster, stand_in_repo, tmp_path):
    """scancel (TERM) must end the job: the run checkpoints and exits 3, but the script does not requeue it."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    run_dir.mkdir()
    job = slurm_cluster.sbatch(
        TRAIN_SH, "--config", "unused.yaml", "--set", "train.max_steps=400", "--set", "train.ckpt_every=2",
        "--run-dir", str(run_dir),
        opts=("--ntasks=2", "--nodes=1", f"--output={log}"), env={"DIT_REPO": str(stand_in_repo)})
    slurm_cluster.wait(job, log, until=lambda info: _latest_step(run_dir) is not None)
    slurm_cluster.run("scancel", str(job))
    info = slurm_cluster.wait(job, log)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    assert "requeueing" not in log.read_text()


def test_missing_config_fails_with_message(slurm_cluster, stand_in_repo, tmp_path):
    log = tmp_path / "job.out"
    job = slurm_cluster.sbatch(TRAIN_SH, opts=(f"--output={log}",), env={"DIT_REPO": str(stand_in_repo)})
    info = slurm_cluster.wait(job, log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert "no config: pass --config FILE" in log.read_text()


# --- the real slurm/train.sh running the real launch/train.py on the tiny config -----------------------------
def _checkpoint_meta(run_dir: Path) -> dict:
    latest = run_dir / "checkpoints" / "latest"
    assert latest.exists(), f"no {latest}"
    return json.loads((run_dir / "checkpoints" / latest.read_text().strip() / "meta.json").read_text())


def _assert_finished(info: dict, run_dir: Path, log: Path, steps: int, world: int) -> None:
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_tail(log)}"
    meta = _checkpoint_meta(run_dir)
    assert meta["step"] == steps, meta
    # The tasks formed one process group (not independent single-process runs).
    assert meta["world_size"] == world, meta
    assert (run_dir / "model_ema.safetensors").exists()


def test_train_two_tasks_one_node_then_eval_fid(slurm_cluster, mnist_shards, tmp_path):
    """slurm/train.sh with 2 tasks on one node; then slurm/eval_fid.sh (queued behind it with afterok) samples from
    its checkpoint on 2 tasks, each rank generating its own share (sample i on rank i mod 2)."""
    import numpy as np

    run_dir, log, eval_dir, eval_log = tmp_path / "run", tmp_path / "job.out", tmp_path / "eval", tmp_path / "eval.out"
    job = slurm_cluster.sbatch(
        TRAIN_SH, "--config", TINY_CONFIG, "--set", f"data.shards={mnist_shards}", "--run-dir", str(run_dir),
        opts=("--nodes=1", "--ntasks-per-node=2", f"--output={log}"))
    eval_job = slurm_cluster.sbatch(
        EVAL_SH, "--num-samples", "8", "--batch-size", "4", "--steps", "5", "--metrics", "none", "--grid", "8",
        opts=(f"--dependency=afterok:{job}", "--ntasks=2", f"--output={eval_log}"),
        env={"CKPT": str(run_dir), "OUT": str(eval_dir)})
    info = slurm_cluster.wait(job, log)
    _assert_finished(info, run_dir, log, steps=6, world=2)
    assert info["NodeList"] in ("n1", "n2") and info["NumTasks"] == "2", info

    info = slurm_cluster.wait(eval_job, eval_log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_tail(eval_log)}"
    parts = sorted((eval_dir / "parts").glob("part_*.npz"))
    indices = [np.load(p)["index"].tolist() for p in parts]
    assert sorted(indices) == [[0, 2, 4, 6], [1, 3, 5, 7]], indices
    record = json.loads((eval_dir / "metrics.json").read_text())
    assert record["checkpoint"]["step"] == 6, record["checkpoint"]
    assert (eval_dir / "grid.png").exists()


def test_train_dit_xl_script_two_nodes_via_export(slurm_cluster, mnist_shards, tmp_path):
    """The DiT-XL/2 script with its resources scaled down to one task on each of two nodes (no GPUs) and the tiny
    config given through the environment (`sbatch --export` style)."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = slurm_cluster.sbatch(
        XL_SH, opts=("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
                     f"--output={log}"),
        env={"CONFIG": TINY_CONFIG, "OVERRIDES": f"data.shards={mnist_shards} train.max_steps=4",
             "RUN_DIR": str(run_dir)})
    info = slurm_cluster.wait(job, log)
    _assert_finished(info, run_dir, log, steps=4, world=2)
    assert info["NodeList"] == "n[1-2]", info


def test_train_preempted_requeued_and_resumed(slurm_cluster, mnist_shards, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    max_steps = PREEMPT_MAX_STEPS
    job = slurm_cluster.sbatch(
        TRAIN_SH, "--config", TINY_CONFIG, "--set", f"data.shards={mnist_shards}",
        "--set", f"train.max_steps={max_steps}", "--set", f"train.ckpt_every={PREEMPT_CKPT_EVERY}",
        "--run-dir", str(run_dir), opts=("--nodes=1", "--ntasks-per-node=2", f"--output={log}"))
    _preempt_after_first_checkpoint(slurm_cluster, job, run_dir, log)
    info = slurm_cluster.wait(job, log)
    _assert_finished(info, run_dir, log, steps=max_steps, world=2)
    assert info["Restarts"] == "1", f"{info}\n{_tail(log)}"
    text = log.read_text()
    first, _, second = text.partition("restart 1 ")
    assert second, f"the job did not start a second time\n{_tail(log)}"
    # First run: the batch shell's USR1 reached the ranks, they checkpointed at step k < max_steps and exited 3.
    assert "batch shell got SIGUSR1" in first and f"requeueing job {job}" in first, _tail(log)
    stopped = re.search(r"stopped by signal at step (\d+) after checkpointing", first)
    assert stopped, _tail(log)
    k = int(stopped.group(1))
    assert PREEMPT_CKPT_EVERY <= k < max_steps and "done:" not in first
    # Second run: resumed from that checkpoint (not from step 0) and trained to the end.
    resumed = re.search(r"resumed from \S*step_(\d+) at step (\d+)", second)
    assert resumed and int(resumed.group(1)) == k and int(resumed.group(2)) == k, _tail(log)
