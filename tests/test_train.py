"""launch/train.py end to end: 2 ranks with gloo in subprocesses, ZeRO stages, exact resume, kill -9, preemption."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, entry_env, run_entry, torchrun_cmd

TINY = "configs/runs/tiny_test.yaml"


def torchrun(args: list[str], nproc: int = 2, fault: str | None = None, **env: str) -> subprocess.Popen:
    """launch/train.py on `nproc` ranks (with `fault`: through tests/support/faults.py, which injects it)."""
    cmd = torchrun_cmd("launch/train.py", args, nproc) if fault is None else \
        torchrun_cmd("tests/support/faults.py", [fault, "--", *args], nproc)
    return subprocess.Popen(cmd, cwd=ROOT, env=entry_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def run_train(run_dir: Path, shards: Path, *sets: str, nproc: int = 2, resume: str | None = None,
              timeout: float = 900, expect: int = 0, **env: str) -> str:
    args = ["--config", TINY, "--run-dir", str(run_dir), "--set", f"data.shards={shards}"]
    for s in sets:
        args += ["--set", s]
    if resume:
        args += ["--resume", resume]
    proc = torchrun(args, nproc=nproc, **env)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{out[-6000:]}"
    return out


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_weights(a: Path, b: Path, tol: float = 1e-6) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= tol, f"max abs weight difference {worst}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_ranks_train_save_and_export(stage, small_shards, tmp_path):
    run = tmp_path / f"zero{stage}"
    run_train(run, small_shards, f"train.deepspeed.zero_stage={stage}", "train.max_steps=4", "train.ckpt_every=2",
              "train.sample_every=4", "train.precision=bf16")
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_0000002", "step_0000004"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    meta = json.loads((run / "checkpoints" / "step_0000004" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["world_size"] == 2 and len(meta["positions"]) == 2
    assert meta["model"]["num_classes"] == 10 and meta["latent"] is None
    exported = weights(run / "model_ema.safetensors")
    assert all(torch.isfinite(v).all() for v in exported.values())
    assert_same_weights(run / "model_ema.safetensors", run / "checkpoints" / "step_0000004" / "ema.safetensors", 0)
    # the consolidated file loads into a fresh DiT built from its own metadata
    from safetensors import safe_open

    from dit.models import DiT
    with safe_open(str(run / "model_ema.safetensors"), "pt") as fh:
        header = json.loads(fh.metadata()["ditstack"])
    DiT(**header["model"]).load_state_dict(exported)
    log = losses(run)
    assert set(log) == {2, 4} and all(v == v for v in log.values())
    assert (run / "samples" / "step_0000004.png").is_file() and (run / "loss_curve.png").is_file()
    assert (run / "samples.gif").is_file()


@pytest.mark.slow
def test_resume_is_exact_across_an_epoch_boundary(small_shards, tmp_path):
    common = ("train.max_steps=12", "train.ckpt_every=6", "train.log_every=1", "train.ema_decay=0.5",
              "data.num_workers=1", "train.ema_every=4")  # the checkpoint at 6 holds 2 steps not yet in the EMA
    straight = tmp_path / "straight"
    run_train(straight, small_shards, *common)
    split = tmp_path / "split"
    run_train(split, small_shards, *common[1:], "train.max_steps=6")
    meta = json.loads((split / "checkpoints" / "step_0000006" / "meta.json").read_text())
    assert meta["epoch"] == 0
    run_train(split, small_shards, *common, resume="auto")
    meta = json.loads((split / "checkpoints" / "step_0000012" / "meta.json").read_text())
    assert meta["epoch"] >= 1  # 8 steps per epoch: the resumed half crossed the boundary
    assert_same_weights(straight / "model_ema.safetensors", split / "model_ema.safetensors")
    a, b = losses(straight), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in a), (a, b)


@pytest.mark.slow
def test_kill9_during_checkpoint_write_then_resume_auto(small_shards, tmp_path):
    common = ("train.max_steps=9", "train.ckpt_every=3", "train.log_every=1", "train.ema_decay=0.5")
    straight = tmp_path / "straight"
    run_train(straight, small_shards, *common)
    crashed = tmp_path / "crashed"
    proc = torchrun(["--config", TINY, "--run-dir", str(crashed), "--set", f"data.shards={small_shards}",
                     *sum((["--set", s] for s in common), [])], fault="kill_in_save:6")
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode != 0, out[-3000:]
    root = crashed / "checkpoints"
    assert (root / "step_0000003" / "meta.json").is_file()
    assert not (root / "step_0000006").exists() and list(root.glob(".tmp-step_0000006"))
    assert (root / "latest").read_text().strip() == "step_0000003"
    run_train(crashed, small_shards, *common, resume="auto")
    assert_same_weights(straight / "model_ema.safetensors", crashed / "model_ema.safetensors")
    assert not list(root.glob(".tmp-*"))


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_3_and_resumes(small_shards, tmp_path):
    run = tmp_path / "preempted"
    sets = ["--set", f"data.shards={small_shards}", "--set", "train.max_steps=400", "--set", "train.ckpt_every=1000",
            "--set", "train.log_every=1"]
    proc = torchrun(["--config", TINY, "--run-dir", str(run), *sets])
    log = run / "log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    assert log.is_file(), "training never logged a step"
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(max(workers, key=int)), signal.SIGUSR1)  # one rank gets the signal: every rank must stop with it
    out, _ = proc.communicate(timeout=600)
    # torchrun reports a worker's own status ("exitcode : 3") and exits 1; srun passes 3 through (see slurm/)
    assert "exitcode  : 3" in out, out[-4000:]
    assert "stopped by signal" in out
    ckpts = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert len(ckpts) == 1
    stopped_at = json.loads((ckpts[0] / "meta.json").read_text())["step"]
    assert 3 <= stopped_at < 400
    out = run_train(run, small_shards, "train.max_steps=%d" % (stopped_at + 2), "train.log_every=1", resume="auto")
    steps = sorted(losses(run))
    assert steps == list(range(1, stopped_at + 3))


@pytest.mark.slow
def test_sigterm_on_one_process_checkpoints_and_exits_3(small_shards, tmp_path):
    """One process (no all-reduce: the step's guard reads the flag directly): SIGTERM → checkpoint → exit 3."""
    run = tmp_path / "single"
    sets = [f"data.shards={small_shards}", "train.max_steps=400", "train.ckpt_every=1000", "train.log_every=1",
            "train.deepspeed.zero_stage=0"]
    proc = subprocess.Popen([sys.executable, "launch/train.py", "--config", TINY, "--run-dir", str(run),
                             *sum((["--set", s] for s in sets), [])], cwd=ROOT, env=entry_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = run / "log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 3, out[-4000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((run / "checkpoints" / latest / "meta.json").read_text())
    assert 2 <= meta["step"] < 400


@pytest.mark.slow
def test_bad_inputs_fail_with_one_line(small_shards, tmp_path):
    proc = run_entry(["launch/train.py", "--config", TINY, "--run-dir", str(tmp_path / "r"),
                      "--set", f"data.shards={tmp_path / 'missing'}"], timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert str(tmp_path / "missing") in proc.stderr.strip().splitlines()[-1]
    proc = run_entry(["launch/train.py", "--config", TINY, "--run-dir", str(tmp_path / "r2"),
                      "--set", f"data.shards={small_shards}", "--set", "train.global_batch_size=7",
                      "--set", "train.micro_batch_size=2"], timeout=600)
    assert proc.returncode == 2
    assert "train.global_batch_size=7" in proc.stderr.strip().splitlines()[-1]
    proc = run_entry(["launch/train.py", "--config", TINY, "--run-dir", str(tmp_path / "r3"),
                      "--set", f"data.shards={small_shards}", "--resume", str(tmp_path / "nope")], timeout=600)
    assert proc.returncode == 2
    assert "no such checkpoint directory" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_the_run_stops(small_shards, tmp_path):
    run = tmp_path / "nan"
    proc = run_entry(["tests/support/faults.py", "nan_loss_from:3", "--", "--config", TINY, "--run-dir", str(run),
                      "--set", f"data.shards={small_shards}", "--set", "train.max_steps=20",
                      "--set", "train.max_bad_steps=3", "--set", "train.ckpt_every=2"], timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 non-finite steps in a row" in proc.stderr
    metas = [json.loads((p / "meta.json").read_text()) for p in (run / "checkpoints").glob("step_*")]
    assert metas and all(torch.isfinite(t).all() for p in (run / "checkpoints").glob("step_*")
                         for t in weights(p / "ema.safetensors").values())


@pytest.mark.slow
def test_nonfinite_weights_are_never_saved(small_shards, tmp_path):
    run = tmp_path / "nanw"
    proc = run_entry(["tests/support/faults.py", "nan_weight_at:3", "--", "--config", TINY, "--run-dir", str(run),
                      "--set", f"data.shards={small_shards}", "--set", "train.max_steps=8",
                      "--set", "train.ckpt_every=3"], timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "non-finite weights at step 3: refusing to write a checkpoint" in proc.stderr
    assert not list((run / "checkpoints").glob("step_*"))


@pytest.mark.slow
def test_in_training_eval_logs_metrics_and_missing_inception_fails_early(small_shards, tmp_path):
    from eval.inception import write_random_weights

    weights_file = write_random_weights(tmp_path / "inception_random.pth")
    ref = tmp_path / "ref.npz"
    proc = run_entry(["eval/reference.py", "--shards", str(small_shards), "--out", str(ref),
                      "--inception-weights", str(weights_file), "--max-images", "16"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "evalrun"
    proc = run_entry(["launch/train.py", "--config", TINY, "--run-dir", str(run), "--set", f"data.shards={small_shards}",
                      "--set", "train.max_steps=2", "--set", "train.eval_every=2", "--set", "train.eval_num_samples=4",
                      "--set", "eval.sampler=ddim", "--set", "eval.steps=2", "--set", "eval.metrics=[fid]",
                      "--set", f"eval.inception_weights={weights_file}", "--set", f"eval.ref={ref}"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "eval" / "step_0000002" / "metrics.json").read_text())
    assert metrics["settings"]["num_samples"] == 4 and metrics["checkpoint"]["step"] == 2
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    fid = [r["eval_fid"] for r in logged if "eval_fid" in r]
    assert len(fid) == 1 and fid[0] == pytest.approx(metrics["metrics"]["fid"])

    proc = run_entry(["launch/train.py", "--config", TINY, "--run-dir", str(tmp_path / "noinc"),
                      "--set", f"data.shards={small_shards}", "--set", "train.eval_every=2", "--set", f"eval.ref={ref}",
                      "--set", f"eval.inception_weights={tmp_path / 'absent.pth'}"], timeout=600)
    assert proc.returncode == 2
    assert "absent.pth" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "noinc" / "checkpoints").exists()


@pytest.mark.slow
def test_zero3_partitioned_ema_with_accumulation_equals_plain_data_parallel(small_shards, tmp_path):
    """The same fp32 run, 2 accumulation steps of micro batch 2 per rank, under ZeRO-0 and ZeRO-3: the EMA that
    ZeRO-3 keeps per partition, gathered at save time, must equal the one averaged over full parameters. Gradient
    clipping is on and active: ZeRO-3 clips inside DeepSpeed, ZeRO-0 in the trainer's fused norm pass."""
    common = ("train.max_steps=4", "train.ckpt_every=4", "train.ema_decay=0.5", "train.micro_batch_size=2",
              "train.grad_clip=0.05", "train.log_every=1")
    plain, sharded = tmp_path / "zero0", tmp_path / "zero3"
    run_train(plain, small_shards, *common, "train.deepspeed.zero_stage=0")
    run_train(sharded, small_shards, *common, "train.deepspeed.zero_stage=3")
    for run in (plain, sharded):
        meta = json.loads((run / "checkpoints" / "step_0000004" / "meta.json").read_text())
        assert meta["config"]["train"]["micro_batch_size"] == 2 and meta["step"] == 4
    norms = [[json.loads(line)["grad_norm"] for line in (run / "log.jsonl").read_text().splitlines()]
             for run in (plain, sharded)]
    assert len(norms[0]) == 4 and min(norms[0]) > 0.05  # the clipping acted on every step
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)  # the norm before clipping, as DeepSpeed computes it
    # the engines reduce gradients in different orders: equal up to float rounding
    assert_same_weights(plain / "model_ema.safetensors", sharded / "model_ema.safetensors", tol=1e-5)


def test_fused_grad_norm_clips_like_deepspeed_and_flags_nonfinite():
    """`clip_and_check_grads`: DeepSpeed's stage-0 norm and coefficient min(1, max / (norm + 1e-6)) (the same
    formula as torch's clip_grad_norm_), no change below the threshold, and an inf gradient is reported, untouched."""
    from launch.train import clip_and_check_grads

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, 5, generator=g), torch.randn(11, generator=g), torch.randn(3, 2, 2, generator=g)]
    ref = [t.clone().requires_grad_() for t in grads]
    for r, t in zip(ref, grads):
        r.grad = t.clone()
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref, max_norm=1.0))
    norm, finite = clip_and_check_grads(grads, 1.0)
    assert bool(finite) and float(norm) == pytest.approx(ref_norm, rel=1e-6)
    for r, t in zip(ref, grads):
        torch.testing.assert_close(t, r.grad, rtol=1e-6, atol=0)
    kept = [t.clone() for t in grads]
    assert clip_and_check_grads(grads, 10.0)[1] and all(torch.equal(a, b) for a, b in zip(grads, kept))
    norm, finite = clip_and_check_grads(grads, 0.0)  # 0: norm only, no clip
    assert bool(finite) and float(norm) == pytest.approx(1.0, rel=1e-5)
    grads[1][3] = float("inf")
    kept = [t.clone() for t in grads]
    norm, finite = clip_and_check_grads(grads, 1.0)
    assert not bool(finite) and all(torch.equal(a, b) for a, b in zip(grads, kept))
    grads[1][3] = float("nan")
    assert not bool(clip_and_check_grads(grads, 0.0)[1])


@pytest.mark.slow
def test_one_rank_zero0_skips_an_inf_gradient_step_and_keeps_training(small_shards, tmp_path):
    """One process at ZeRO-0 (no gradient all-reduce, fused norm/non-finite check, trainer-side clipping): an inf
    gradient at step 2 skips that optimizer step, is counted, and the run goes on to finish with finite weights.
    With train.ema_every=2 the EMA is folded in every other step and the export is up to date."""
    run = tmp_path / "infgrad"
    sets = [f"data.shards={small_shards}", "train.deepspeed.zero_stage=0", "train.max_steps=5", "train.log_every=1",
            "train.grad_clip=0.5", "train.ema_every=2", "train.ckpt_every=3"]
    proc = run_entry(["tests/support/faults.py", "inf_grad_at:2", "--", "--config", TINY, "--run-dir", str(run),
                      *sum((["--set", s] for s in sets), [])], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2: non-finite loss or gradient, optimizer step skipped (1 in a row)" in proc.stderr
    records = {r["step"]: r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}
    assert sorted(records) == [1, 2, 3, 4, 5]
    assert records[1]["nonfinite_steps"] == 0 and records[5]["nonfinite_steps"] == 1
    assert "grad_norm" not in records[2] and all(records[s]["grad_norm"] > 0 for s in (1, 3, 4, 5))
    meta = json.loads((run / "checkpoints" / "step_0000003" / "meta.json").read_text())
    assert meta["ema_pending"] == 1  # steps 1 and 3 applied, step 2 skipped; folded in at step 2, pending since
    exported = weights(run / "model_ema.safetensors")
    assert all(torch.isfinite(v).all() for v in exported.values())


@pytest.mark.slow
def test_logged_loss_curve_is_the_same_after_a_resume_between_log_steps(small_shards, tmp_path):
    """The checkpoint (step 6) falls between log steps (every 4): the resumed run must log the same window means
    at 8 and 12 as an uninterrupted run (the window since step 4 is part of the checkpoint), and the partial
    window logged at the end of the first half is replaced."""
    common = ("train.ckpt_every=6", "train.log_every=4", "train.ema_decay=0.5")
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(straight, small_shards, "train.max_steps=12", *common)
    run_train(split, small_shards, "train.max_steps=6", *common)
    assert sorted(losses(split)) == [4, 6]  # the partial window [5, 6] is shown at the end of the first run
    run_train(split, small_shards, "train.max_steps=12", *common, resume="auto")
    a, b = losses(straight), losses(split)
    assert sorted(a) == sorted(b) == [4, 8, 12]
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in a), (a, b)


@pytest.mark.slow
def test_deepspeed_launcher_passes_the_requeue_status_through(small_shards, tmp_path):
    """torchrun turns a worker's exit 3 into its own exit 1 (with its ChildFailedError report); the `deepspeed`
    launcher (like srun) passes it through, so a requeue that depends on 3 works under it (README)."""
    run = tmp_path / "ds_launcher"
    port = str(21000 + os.getpid() % 9000)
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", port,
           "launch/train.py", "--config", TINY, "--run-dir", str(run), "--set", f"data.shards={small_shards}",
           "--set", "train.max_steps=400", "--set", "train.ckpt_every=1000", "--set", "train.log_every=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=entry_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    log = run / "log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (log.is_file() and log.read_text().count("\n") >= 2):
        time.sleep(0.2)
    assert log.is_file(), "training never logged a step"
    workers = subprocess.run(["pgrep", "-f", f"launch/train.py.*{run}"], capture_output=True, text=True).stdout.split()
    workers = [int(w) for w in workers if int(w) != proc.pid]
    assert workers
    os.kill(max(workers), signal.SIGUSR1)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 3, out[-4000:]
    assert "stopped by signal" in out
