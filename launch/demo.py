"""The whole pipeline on the embedded MNIST digits, on the CPU: shards → VAE → latents → DiT → samples → metric.

    python launch/demo.py [--out runs/demo]          (make demo; full mode, budget ~10 min on 2 CPU cores)
    python launch/demo.py --quick                    (CI: a few minutes, metric above chance; out runs/demo_quick)
    python launch/demo.py --pixels                   (the same DiT recipe trained on the 32x32 pixels, no VAE)

Every stage runs the project's REAL entry point as a subprocess, exactly as a user would type it (the commands are
printed): data_pipeline/make_shards.py, launch/train_vae.py, data_pipeline/encode_latents.py, launch/train.py
(DeepSpeed), launch/sample.py (a 10-class grid with classifier-free guidance, single images in ImageFolder layout)
and eval/fid.py with the offline digit classifier (accuracy of the generated digits against their conditioning
class, and a Fréchet distance in the classifier's feature space). A stage whose outputs exist and are complete is
skipped, so a rerun (or a rerun after Ctrl-C) continues where it stopped; the trainers resume with --resume auto.
Each stage records the command it ran under ``<out>/.demo/``; finding complete outputs made by another command
(e.g. --quick into a full-mode directory) is an error instead of a silent mix. The DiT recipe lives in
configs/runs/mnist_demo*.yaml (with the reasons for every choice); the demo-size VAE overrides are below.

Exit status: 0 done (and, in full mode, prints whether the ≥ 95 % target was met), 1 a stage failed, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # `python launch/demo.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from data_pipeline.checks import OneLineParser
from data_pipeline.files import atomic_write_json
from eval.config import ConfigError, load_config

TARGET_ACCURACY = 0.95
SAMPLES_PER_CLASS = 8  # the grid: 10 columns (one per digit) x 8 rows

# The demo VAE: configs/vae/mnist_tiny.yaml made cheaper for a 10-minute CPU budget. MNIST digits are simple enough
# that an L1 + KL autoencoder reconstructs them legibly. The LPIPS term (sharper textures on real photos) roughly
# doubled the cost per image here, the PatchGAN would add its own passes, and 16 base channels instead of 32 cut the
# convolutions' FLOPs ~4x (measured time per step ~2x: small convolutions are overhead-bound on a CPU).
VAE_OVERRIDES = ["vae.base_channels=16", "vae.perceptual.weight=0", "vae.disc_start=1000000000",
                 "train.global_batch_size=32", "train.lr=2.0e-3", "train.warmup_steps=20"]
VAE_STEPS = {"full": 200, "quick": 60}  # 60 steps already give PSNR 18 dB (legible digits); the VAE is the
# costliest stage on a CPU (~3 CPU-s per batch of 32 measured under load: 2/3 of it in the convolutions)

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


class DemoError(RuntimeError):
    """A stage cannot run or its outputs conflict with this run's settings; one line."""


@dataclass
class Stage:
    """One pipeline step: the command, the files that prove it complete, the files to report."""

    name: str
    title: str
    argv: list[str]
    done: Callable[[], bool]
    outputs: dict[str, Path] = field(default_factory=dict)
    status: str = "pending"
    seconds: float = 0.0


def _complete_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


def _python(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / script), *args]


def build_stages(out: Path, quick: bool, pixels: bool, config: Path) -> list[Stage]:
    """The demo's stages for output directory ``out`` (latent pipeline, or pixel space with ``pixels``)."""
    cfg = load_config(config)
    s, e = cfg.sample, cfg.eval
    shards, val, vae_dir, latents = out / "shards" / "train", out / "shards" / "val", out / "vae", out / "latents"
    # Each DiT config trains into its own directories (dit_ddpm/, samples_ddpm/, ... for mnist_demo_ddpm.yaml),
    # so demos of several configs share the shards, the VAE and the latents without resuming each other's runs.
    variant = config.stem.replace("mnist_demo", "").replace("_quick", "").replace("_pixels", "").lstrip("_")
    tag = ("_pixels" if pixels else "") + (f"_{variant}" if variant else "")
    dit, samples, evald = out / f"dit{tag}", out / f"samples{tag}", out / f"eval{tag}"
    stages = [
        Stage("shards", "image shards of the embedded MNIST (train split)",
              _python("data_pipeline/make_shards.py", "--source", "mnist", "--split", "train", "--out", str(shards)),
              lambda: _complete_json(shards / "manifest.json"), {"train shards": shards}),
        Stage("shards_val", "image shards (held-out split, for the VAE's reconstruction check)",
              _python("data_pipeline/make_shards.py", "--source", "mnist", "--split", "val", "--out", str(val)),
              lambda: _complete_json(val / "manifest.json"), {"val shards": val}),
    ]
    if not pixels:
        steps = VAE_STEPS["quick" if quick else "full"]
        vae_sets = [*VAE_OVERRIDES, f"train.max_steps={steps}", f"train.ckpt_every={steps}",
                    f"vae.grid_every={steps}", f"data.shards={shards}", f"data.val_shards={val}",
                    "train.progress=true", "train.wandb=false"]
        stages += [
            Stage("vae", f"VAE ({steps} steps, 32x32x1 -> 8x8x4)",
                  _python("launch/train_vae.py", "--config", str(ROOT / "configs/vae/mnist_tiny.yaml"),
                          *[a for kv in vae_sets for a in ("--set", kv)], "--run-dir", str(vae_dir),
                          "--resume", "auto"),
                  lambda: (vae_dir / "vae.safetensors").is_file(), {"VAE": vae_dir / "vae.safetensors"}),
            Stage("latents", "latent shards (VAE posterior, normalised per channel)",
                  _python("data_pipeline/encode_latents.py", "--vae", str(vae_dir / "vae.safetensors"),
                          "--shards", str(shards), "--out", str(latents)),
                  lambda: _complete_json(latents / "manifest.json"), {"latent shards": latents}),
        ]
    data = shards if pixels else latents
    weights = dit / "model_ema.safetensors"
    stages.append(Stage(
        f"train{tag}", f"DiT ({cfg.train.max_steps} steps, DeepSpeed ZeRO-{cfg.train.deepspeed.zero_stage}, "
                 f"{'pixels' if pixels else 'latents'})",
        _python("launch/train.py", "--config", str(config), "--set", f"data.shards={data}", "--set",
                "train.progress=true", "--run-dir", str(dit), "--resume", "auto"),
        lambda: weights.is_file(),
        {"EMA weights": weights, "loss curve": dit / "loss_curve.png", "training grids GIF": dit / "samples.gif",
         "log": dit / "log.jsonl"}))
    labels = [str(c) for _ in range(SAMPLES_PER_CLASS) for c in range(10)]  # row-major: one digit per column
    grid = samples / "grid.png"
    stages.append(Stage(
        f"sample{tag}", f"samples: 10 digits x {SAMPLES_PER_CLASS}, {s.sampler} {s.steps} steps, cfg {s.cfg_scale:g}",
        _python("launch/sample.py", "--ckpt", str(weights), "--config", str(config), "--labels", *labels,
                "--nrow", "10", "--out", str(grid)),  # the settings: the config's `sample` section
        lambda: grid.is_file() and _complete_json(grid.with_suffix(".json")),
        {"sample grid": grid, "single samples (ImageFolder)": samples}))
    stages.append(Stage(
        f"eval{tag}", f"digit-classifier metric on {e.num_samples} samples ({e.sampler} {e.steps} steps, "
                f"cfg {e.cfg_scale:g})",
        _python("eval/fid.py", "--ckpt", str(weights), "--config", str(config), "--metrics", "none",
                "--classifier", "mnist", "--classifier-data", str(shards), "--grid", "100", "--out", str(evald)),
        lambda: _complete_json(evald / "metrics.json"), {"metrics": evald / "metrics.json"}))
    return stages


def _stamp_path(out: Path, stage: Stage) -> Path:
    return out / ".demo" / f"{stage.name}.json"


def _check_stamp(out: Path, stage: Stage) -> None:
    """Complete outputs must come from the same command; otherwise they belong to another demo configuration."""
    p = _stamp_path(out, stage)
    if p.is_file():
        old = json.loads(p.read_text()).get("argv")
        if old != stage.argv[1:]:
            raise DemoError(f"{out}: stage '{stage.name}' was made by another command ({p}); use another --out "
                            f"or delete {out}")


def _write_stamp(out: Path, stage: Stage) -> None:
    atomic_write_json(_stamp_path(out, stage), {"argv": stage.argv[1:], "seconds": stage.seconds})


def stage_env() -> dict[str, str]:
    """The environment of the stage processes: the Makefile's CPU settings unless the caller set them."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_MAX_", "0")  # see DESIGN.md: glibc page faults cost ~1/5 of a CPU step
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "68719476736")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("WANDB_SILENT", "true")
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # the demo is one process per stage, never a rank of a job
        env.pop(key, None)
    return env


def run_stages(stages: Sequence[Stage], out: Path, log: Callable[[str], None] = print) -> None:
    """Run (or skip) every stage in order; raises DemoError naming the failed stage."""
    env = stage_env()
    ran: Optional[str] = None  # the first stage that had to run: everything after it must be made afresh
    for i, st in enumerate(stages, 1):
        head = f"[{i}/{len(stages)}] {st.name}: {st.title}"
        if st.done():
            _check_stamp(out, st)
            if ran is not None:
                raise DemoError(f"{out}: the outputs of stage '{st.name}' predate the rerun of stage '{ran}' and "
                                f"would not match it; delete them (see {_stamp_path(out, st).parent}) or use "
                                "another --out")
            st.status = "skipped (complete)"
            log(f"{head} -- already complete, skipped")
            continue
        log(f"{head}\n    $ {shlex.join([Path(st.argv[0]).name, *[os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a for a in st.argv[1:]]])}")
        ran = ran or st.name
        t0 = time.perf_counter()
        proc = subprocess.run(st.argv, cwd=ROOT, env=env)
        st.seconds = time.perf_counter() - t0
        if proc.returncode != 0 or not st.done():
            st.status = f"FAILED (exit {proc.returncode})"
            raise DemoError(f"stage '{st.name}' failed with exit status {proc.returncode} after {st.seconds:.0f} s "
                            f"(its output is above); fix it and rerun: finished stages are skipped")
        st.status = "done"
        _write_stamp(out, st)
        log(f"    done in {st.seconds:.0f} s")


def summarize(stages: Sequence[Stage], out: Path, quick: bool, wall: float) -> dict:
    """The summary record (also written to ``<out>/summary.json``): files, timings and the metric."""
    metrics_file = stages[-1].outputs["metrics"]
    metrics = json.loads(metrics_file.read_text()).get("metrics", {}) if metrics_file.is_file() else {}
    record = {
        "out": str(out), "mode": "quick" if quick else "full", "wall_seconds": wall,
        "stages": {st.name: {"status": st.status, "seconds": round(st.seconds, 1)} for st in stages},
        "files": {k: str(v) for st in stages for k, v in st.outputs.items() if v.exists()},
        "digits_accuracy": metrics.get("digits_accuracy"), "digits_fd": metrics.get("digits_fd"),
        "classifier_heldout_accuracy": metrics.get("digits_classifier_heldout_accuracy"),
        "target_accuracy": TARGET_ACCURACY,
    }
    atomic_write_json(out / "summary.json", record)
    return record


def print_summary(record: dict) -> None:
    """The human-readable end of the demo: where every file is, how long each stage took, the metric."""
    print("\n" + "=" * 78)
    print(f"demo ({record['mode']} mode) finished in {record['wall_seconds'] / 60:.1f} min; everything is under "
          f"{record['out']}/")
    for name, st in record["stages"].items():
        print(f"  {name:<11} {st['status']:<20} {st['seconds']:>7.0f} s")
    print("files:")
    for k, v in record["files"].items():
        print(f"  {k:<30} {v}")
    acc = record["digits_accuracy"]
    if acc is not None:
        verdict = "meets" if acc >= TARGET_ACCURACY else "is BELOW"
        print(f"metric: {100 * acc:.1f} % of the generated digits are classified as the requested digit "
              f"({verdict} the {100 * TARGET_ACCURACY:.0f} % target; chance is 10 %); FD-digits "
              f"{record['digits_fd']:.2f}; the classifier's own held-out accuracy "
              f"{100 * record['classifier_heldout_accuracy']:.1f} %")
    print(f"summary: {record['out']}/summary.json")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments of the demo."""
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="output directory (default runs/demo, runs/demo_quick with --quick)")
    ap.add_argument("--quick", action="store_true", help="a reduced run for CI (a few minutes; metric above chance)")
    ap.add_argument("--pixels", action="store_true", help="train the DiT on pixels instead (no VAE, no latents)")
    ap.add_argument("--config", default=None, help="DiT run config (default configs/runs/mnist_demo[_quick|"
                                                   "_pixels].yaml)")
    return ap.parse_args(argv)


def default_config(quick: bool, pixels: bool) -> Path:
    """The DiT config of a demo mode."""
    if pixels:
        return ROOT / "configs/runs/mnist_demo_pixels.yaml"
    return ROOT / ("configs/runs/mnist_demo_quick.yaml" if quick else "configs/runs/mnist_demo.yaml")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo; returns the exit status."""
    args = parse_args(argv)

    out = Path(args.out or ("runs/demo_quick" if args.quick else "runs/demo")).resolve()
    config = Path(args.config).resolve() if args.config else default_config(args.quick, args.pixels)
    t0 = time.perf_counter()
    try:
        stages = build_stages(out, args.quick, args.pixels, config)
        out.mkdir(parents=True, exist_ok=True)
        run_stages(stages, out)
    except ConfigError as err:
        print(f"error: config error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to continue (finished stages are skipped, training resumes)",
              file=sys.stderr)
        return 130
    record = summarize(stages, out, args.quick, time.perf_counter() - t0)
    print_summary(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
