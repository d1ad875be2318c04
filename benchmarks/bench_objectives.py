"""DDPM against flow matching on the MNIST demo: digit accuracy and Fréchet distance along training.

    python benchmarks/bench_objectives.py --latents runs/demo/latents --shards runs/demo/shards/train \
        --out /tmp/bench_objectives [--max-steps 5000] [--every 500]

Trains the DDPM demo DiT (configs/runs/mnist_demo_ddpm.yaml) and its flow twin (configs/runs/mnist_demo.yaml, the
`make demo` default: the same data, model, optimizer, batch and seed; only the process and the samplers differ; run
here with DDPM's budget and Heun 25 steps, as measured in benchmarks/RESULTS.md) with a checkpoint every
`--every` steps, then scores every checkpoint with the demo's metric (`eval/fid.py --classifier mnist`: the share of
digits the classifier reads as the requested class, and the Fréchet distance of its features to the real digits)
using each config's own `eval` sampler, and, at the last checkpoint, the flow model with Heun at several step
counts. Steps are optimizer steps; the machine's load does not change them (the wall times printed do).
Prints a Markdown table and writes `--out/results.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"ddpm": "configs/runs/mnist_demo_ddpm.yaml", "flow": "configs/runs/mnist_demo.yaml"}
EVAL_SETS = {"ddpm": [], "flow": ["eval.steps=25"]}  # the measured setting (the demo samples with 10)
ENV = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="68719476736", PYTHONPATH=str(ROOT))


def run(cmd: list[str]) -> None:
    """Run a repository entry point; stop with its output on failure."""
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=ENV, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def train(name: str, args: argparse.Namespace) -> tuple[Path, float]:
    """Train one config with a checkpoint every `args.every` steps (all kept); (run dir, seconds)."""
    run_dir = args.out / name
    keep = args.max_steps // args.every + 1
    t0 = time.perf_counter()
    run(["launch/train.py", "--config", CONFIGS[name], "--run-dir", str(run_dir), "--resume", "auto",
         "--set", f"data.shards={args.latents}", "--set", f"train.max_steps={args.max_steps}",
         "--set", f"train.ckpt_every={args.every}", "--set", f"train.keep_last={keep}",
         "--set", "train.sample_every=0"])
    return run_dir, time.perf_counter() - t0


def score(ckpt: Path, out: Path, args: argparse.Namespace, config: str, *sets: str) -> dict:
    """The demo metric of one checkpoint (the config's `eval` section under `--set`s)."""
    if not (out / "metrics.json").is_file():
        cmd = ["eval/fid.py", "--ckpt", str(ckpt), "--config", config, "--metrics", "none", "--classifier", "mnist",
               "--classifier-data", str(args.shards), "--grid", "0", "--num-samples", str(args.samples),
               "--out", str(out)]
        for s in sets:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        run(cmd)
        record = json.loads((out / "metrics.json").read_text())
        record["seconds"] = time.perf_counter() - t0
        (out / "metrics.json").write_text(json.dumps(record))
    record = json.loads((out / "metrics.json").read_text())
    m = record["metrics"]
    return {"accuracy": m["digits_accuracy"], "fd": m["digits_fd"], "seconds": record.get("seconds")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latents", type=Path, required=True, help="the demo's latent shards")
    ap.add_argument("--shards", type=Path, required=True, help="the demo's image shards (the classifier's data)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_objectives"))
    ap.add_argument("--max-steps", type=int, default=5000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--samples", type=int, default=500, help="samples per evaluation (the demo's 500)")
    ap.add_argument("--heun-steps", default="5,10,15,25", help="flow sampling steps tried at the last checkpoint")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"curves": {}, "train_seconds": {}, "heun": {}}
    for name in CONFIGS:
        run_dir, seconds = train(name, args)
        results["train_seconds"][name] = seconds
        curve = {}
        for step in range(args.every, args.max_steps + 1, args.every):
            ckpt = run_dir / "checkpoints" / f"step_{step:07d}"
            curve[step] = score(ckpt, args.out / f"eval_{name}_{step}", args, CONFIGS[name], *EVAL_SETS[name])
            print(f"{name} step {step}: {curve[step]}", flush=True)
        results["curves"][name] = curve
    last = args.out / "flow" / "checkpoints" / f"step_{args.max_steps:07d}"
    for n in (int(v) for v in args.heun_steps.split(",")):
        results["heun"][n] = score(last, args.out / f"eval_flow_heun{n}", args, CONFIGS["flow"], f"eval.steps={n}")
        print(f"flow heun {n} steps: {results['heun'][n]}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| step | DDPM accuracy | DDPM FD | flow accuracy | flow FD |\n|---|---|---|---|---|")
    for step in results["curves"]["ddpm"]:
        d, f = results["curves"]["ddpm"][step], results["curves"]["flow"][step]
        print(f"| {step} | {d['accuracy']:.3f} | {d['fd']:.2f} | {f['accuracy']:.3f} | {f['fd']:.2f} |")
    print("\n| flow, Heun steps | accuracy | FD |\n|---|---|---|")
    for n, r in results["heun"].items():
        print(f"| {n} | {r['accuracy']:.3f} | {r['fd']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
