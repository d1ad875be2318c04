"""The GPU check: one command that measures and checks ditstack on one CUDA GPU in about 8 minutes, setup included.

What it does, each part in its own process with a time limit (the results file is rewritten after every part, so a
run cut short still reports what it measured). Order: sync_zero2, train_bf16, official, sampling, train_bf16_ckpt,
tests, sync_zero0, train_bf16_compile, train_bf16_zero0 (the measurements first, the slow compilation late).

- ``sync_zero2`` / ``sync_zero0``: builds ``launch.train.Trainer`` in-process (as ``run_main`` does) for the bench
  config and runs non-logging ``train_step()`` calls under ``torch.cuda.set_sync_debug_mode("warn")``: every call
  that makes the host wait for the GPU is reported with its stack (ZeRO-2, then ZeRO-0).
- ``train_bf16``, ``train_bf16_ckpt``, ``train_bf16_compile`` (and ``train_bf16_zero0`` when time is left):
  DiT-XL/2 at 256 px (latents 4x32x32, 1000 classes) through the real trainer (``launch/train.py``'s ``run_main``
  with the ``Trainer`` class, on synthetic latent shards written with ``data_pipeline.synthetic``), bf16, ZeRO-2 on
  one rank, batch 64, 50 steps; img/s, step time and MFU from the run's log.jsonl (windows of 10 steps; the first,
  with the warm-up and compilation, is left out) and peak memory from ``torch.cuda.max_memory_allocated``.
  Variants: gradient checkpointing (``model.grad_checkpointing``) and ``train.compile``. The end-of-run
  checkpoint and export are skipped (``BenchTrainer``): a DiT-XL/2 checkpoint is ~14 GB of disk and tens of
  seconds, not the step.
- ``official``: the official network (``benchmarks/official_dit.py``, our initial weights loaded, outputs checked
  equal) in the official training step: bf16 autocast forward, the diffusion loss, backward, ``torch.optim.AdamW``,
  the official per-parameter EMA update; same batch; timed with CUDA events. Our DiT in the same bare step too
  (separates the network from the trainer). Step ratio = official step time / trainer step time.
- ``sampling``: CFG sampling (scale 1.5, DDPM) of 64 images in bf16: ours (``eval.inference.Generator
  .sample_batch``, what eval/fid.py runs) against the official loop (``forward_with_cfg`` on the doubled batch with
  the same diffusion); a fixed number of steps is timed and img/s is extrapolated to the 250-step target. Also the
  profiler's attention ops and flash kernels for a bf16 forward and training step, and the top GPU kernels.
- ``tests``: ``pytest -m cuda tests/test_cuda.py`` (entry points on the GPU, exact resume, the flash kernel),
  with a time limit, in parallel workers when pytest-xdist is there.

MFU = img/s x training FLOPs per image / peak, training FLOPs = 3 x ``DiT.model_flops_per_sample()``, peak = 989
TFLOP/s (H100/H200 dense bf16; ``--peak-tflops``); the rate of a bf16 8192³ matmul is measured too (the practical
ceiling, ~790 TFLOP/s on the H200 seen here). Outputs in ``--out`` (default ``$OUT``): results.json (everything,
with the GPU, driver, torch/CUDA/DeepSpeed versions and the environment), summary.md (the tables, also printed at
the end), log.txt (the tail of every part's output) and junit.xml (the tests).

On the GPU machine (device tool; nothing can be downloaded there). First, here, in the repository root:

    bash benchmarks/gpu_wheels.sh          # fills .whl/ (~6 MB: deepspeed, pydantic..., torch-fidelity, mlxtend)

then ONE call of the device tool's ``run``:

    command:   PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT
    carry:     [".whl"]
    timeout_s: 600

It installs .whl/*.whl with ``pip install --no-index --no-deps --target /tmp/ditstack-site`` and runs everything
from the source tree (PYTHONPATH) under the machine's torch. ``--budget`` (default 460 s) bounds the whole check;
parts that no longer fit are reported as skipped. A rerun of some parts: ``--only train_bf16_compile,tests``.
Here, on the CPU (a tiny model, a few steps, the same code path; the compile run uses the aot_eager backend):

    python benchmarks/gpu_check.py --dry --out /tmp/gpu_check

Exit status: 0 every selected part ran, 1 some part failed or timed out (results are written anyway), 2 bad input
(no GPU without --dry, unknown part).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

log = logging.getLogger("gpu_check")

_THIS_FILE = os.path.abspath(__file__)
SITE = Path("/tmp/ditstack-site")  # where the carried wheels are installed on the GPU machine
SYNC_MESSAGE = "called a synchronizing CUDA operation"  # torch's sync-debug warning text
ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF", "NCCL_DEBUG", "OMP_NUM_THREADS", "DIT_PEAK_TFLOPS",
            "DS_ACCELERATOR", "TORCHINDUCTOR_CACHE_DIR", "TORCH_CUDNN_V8_API_ENABLED", "CUBLAS_WORKSPACE_CONFIG",
            "PYTHONPATH", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "WANDB_MODE")


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """Sizes of everything the check runs (`gpu()`: the real measurement; `dry()`: seconds on a CPU)."""

    model: dict[str, Any]  # the config's `model` section
    latent: tuple[int, int, int]  # (C, H, W) of the synthetic latents
    num_classes: int
    batch: int  # global batch = per GPU (one rank)
    steps: int  # trainer steps per run
    log_every: int  # trainer logging window (the first window is the warm-up)
    workers: int  # data.num_workers
    shard_counts: list[int]
    zero_stage: int
    sample_batch: int  # images per CFG sampling batch (2x rows through the network)
    sample_steps: int  # sampling steps timed per repetition (extrapolated to `sample_target_steps`)
    sample_reps: int
    sample_target_steps: int
    cfg_scale: float
    official_warmup: int
    official_steps: int  # steps per timed round
    official_rounds: int
    sync_warmup: int
    sync_steps: int
    compile_backend: Optional[str]  # None: DeepSpeed's default (inductor)
    test_workers: int
    test_timeout_s: int  # per test (pytest-timeout, when installed)
    caps: dict[str, float] = field(default_factory=dict)  # per-part time limits

    @classmethod
    def gpu(cls) -> "Settings":
        return cls(model={"name": "DiT-XL/2"}, latent=(4, 32, 32), num_classes=1000, batch=64, steps=50,
                   log_every=10, workers=4, shard_counts=[512] * 4, zero_stage=2, sample_batch=64,
                   sample_steps=20, sample_reps=2, sample_target_steps=250, cfg_scale=1.5, official_warmup=3,
                   official_steps=10, official_rounds=3, sync_warmup=3, sync_steps=4, compile_backend=None,
                   test_workers=4, test_timeout_s=300,
                   caps={"sync": 75, "train": 90, "train_compile": 210, "official": 90, "sampling": 90,
                         "tests": 200})

    @classmethod
    def dry(cls) -> "Settings":
        return cls(model={"name": "custom", "hidden_size": 64, "depth": 2, "num_heads": 2, "patch_size": 2},
                   latent=(4, 8, 8), num_classes=10, batch=4, steps=4, log_every=2, workers=0,
                   shard_counts=[16] * 4, zero_stage=2, sample_batch=2, sample_steps=2, sample_reps=1,
                   sample_target_steps=250, cfg_scale=1.5, official_warmup=1, official_steps=2, official_rounds=1,
                   sync_warmup=1, sync_steps=2, compile_backend="aot_eager", test_workers=0, test_timeout_s=120,
                   caps={"sync": 120, "train": 120, "train_compile": 180, "official": 120, "sampling": 120,
                         "tests": 180})


@dataclass(frozen=True)
class Part:
    """One step of the check: `kind` names the child function, `sets` are extra config overrides."""

    name: str
    kind: str  # sync | train | official | sampling | tests
    cap: str  # key of Settings.caps
    sets: tuple[str, ...] = ()
    min_s: float = 30.0  # not started with less time left than this


PARTS = (
    Part("sync_zero2", "sync", "sync", ("train.deepspeed.zero_stage=2",)),
    Part("train_bf16", "train", "train"),
    Part("official", "official", "official"),
    Part("sampling", "sampling", "sampling"),
    Part("train_bf16_ckpt", "train", "train", ("model.grad_checkpointing=true",)),
    Part("tests", "tests", "tests", min_s=60.0),
    Part("sync_zero0", "sync", "sync", ("train.deepspeed.zero_stage=0", "train.deepspeed.config=null")),
    Part("train_bf16_compile", "train", "train_compile", ("train.compile=true",), min_s=60.0),
    Part("train_bf16_zero0", "train", "train", ("train.deepspeed.zero_stage=0", "train.deepspeed.config=null")),
)


# ---------------------------------------------------------------------------------------------- utilities
def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp name in the same folder, then rename."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to a temp name in the same folder, then rename."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def is_cuda() -> bool:
    """True when the check measures a GPU (not a dry run on the CPU)."""
    return torch.cuda.is_available()


def sync_device() -> None:
    """Wait for the GPU (no-op on the CPU)."""
    if is_cuda():
        torch.cuda.synchronize()


def package_version(name: str) -> Optional[str]:
    """Installed version of a distribution, or None."""
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def install_wheels(wheel_dir: Path, target: Path) -> dict[str, Any]:
    """pip-install every wheel of `wheel_dir` into `target` (no index, no dependencies); returns what was done."""
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    if not wheels:
        return {"dir": str(wheel_dir), "installed": [], "note": "no wheels: packages must already be installed"}
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target", str(target),
           *map(str, wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install of {wheel_dir}/*.whl into {target} failed: {proc.stderr[-2000:]}")
    return {"dir": str(wheel_dir), "target": str(target), "installed": [w.name for w in wheels],
            "seconds": round(time.perf_counter() - t0, 2)}


def child_env(settings_peak: float, site: Optional[Path]) -> dict[str, str]:
    """Environment of every part: the source tree (and the installed wheels) on PYTHONPATH, no wandb, no forced
    CPU accelerator on a GPU, the peak FLOP/s for the trainer's own MFU log."""
    env = dict(os.environ)
    paths = ([str(site)] if site else []) + [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                           if p]
    env.update({"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "WANDB_MODE": "disabled",
                "PYTHONUNBUFFERED": "1", "DIT_PEAK_TFLOPS": f"{settings_peak:g}"})
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    if is_cuda():
        env.pop("DS_ACCELERATOR", None)
    else:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def nvidia_smi() -> Optional[str]:
    """One CSV line per GPU: name, driver, memory, clocks, power, temperature (None without nvidia-smi)."""
    query = ("name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,power.draw,"
             "power.limit,temperature.gpu,utilization.gpu,persistence_mode")
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """bf16 n x n x n matrix product rate on random data (the practical ceiling beside the datasheet peak)."""
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    for _ in range(3):
        a @ b
    sync_device()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync_device()
    return 2.0 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def environment(dry: bool, peak_tflops: float, wheels: dict[str, Any]) -> dict[str, Any]:
    """What the figures were measured on."""
    env: dict[str, Any] = {
        "mode": "dry (CPU, tiny model)" if dry else "gpu",
        "python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "versions": {n: package_version(n) for n in ("deepspeed", "triton", "timm", "numpy", "torch-fidelity",
                                                     "pydantic", "safetensors")},
        "peak_tflops": peak_tflops, "wheels": wheels,
        "env": {k: os.environ.get(k) for k in ENV_KEYS if os.environ.get(k) is not None},
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
    }
    try:
        env["git"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                    timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git"] = None
    if is_cuda():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                      "memory_gib": round(props.total_memory / 2**30, 1), "sm_count": props.multi_processor_count,
                      "count": torch.cuda.device_count()}
        env["nvidia_smi_start"] = nvidia_smi()
        env["matmul_bf16_tflops_8192"] = matmul_tflops(torch.device("cuda"))
        torch.cuda.empty_cache()
    return env


# ------------------------------------------------------------------------------------------- data, config
def write_shards(out: Path, s: Settings) -> Path:
    """Synthetic latent shards (the project's writer), scaled so the latents lie in [-1, 1]."""
    from data_pipeline.synthetic import write_latent_shards

    if (out / "manifest.json").is_file():
        return out
    total = sum(s.shard_counts)
    c = s.latent[0]
    write_latent_shards(out, s.shard_counts, shape=s.latent, num_classes=s.num_classes, latent_std=0.5,
                        scale=[1.0 / total] * c)
    return out


def write_config(path: Path, s: Settings, shards: Path, run_root: Path) -> Path:
    """The bench config: bf16, ZeRO-2 (the DiT-XL/2 recipe's JSON), no checkpoints, grids, wandb or progress bar."""
    import yaml

    cfg = {
        "model": dict(s.model, class_dropout_prob=0.1),
        "data": {"shards": str(shards), "num_workers": s.workers, "shuffle_buffer": 256, "flip": True},
        "train": {"run_dir": str(run_root / "default"), "max_steps": s.steps, "global_batch_size": s.batch,
                  "lr": 1e-4, "precision": "bf16", "ema_decay": 0.9999, "seed": 0,
                  "deepspeed": {"zero_stage": s.zero_stage, "config": str(ROOT / "configs/deepspeed/zero2.json")},
                  "log_every": s.log_every, "ckpt_every": 10**9, "sample_every": 0, "wandb": False,
                  "progress": False},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------ host-sync monitor
_EMULATED = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


class HostSyncMonitor:
    """Records every call inside the `with` block that makes the host wait for the GPU, with its Python stack.

    On a GPU: ``torch.cuda.set_sync_debug_mode("warn")``, whose warnings are caught here. On the CPU (`emulate`):
    the Tensor methods that copy a value to the host (`.item()`, `float()`, `bool()`, `.tolist()`...) are wrapped to
    warn the same way; this exercises the reporting, and over-reports (CPU-resident tensors are flagged too).
    Set `step` before each step to label the events.
    """

    def __init__(self, emulate: bool) -> None:
        self.emulate = emulate
        self.events: list[dict[str, Any]] = []
        self.step: Optional[int] = None
        self._saved: dict[str, Any] = {}
        self._catch: Optional[contextlib.AbstractContextManager] = None
        self._previous_show: Optional[Callable] = None
        self._stderr = _FdCapture(2)

    def __enter__(self) -> "HostSyncMonitor":
        # A sync inside the autograd engine's device thread is reported by c10's C++ handler on stderr, without a
        # Python stack (Python warnings are raised only on threads that run Python): capture fd 2 as well.
        self._stderr.__enter__()
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        self._previous_show = warnings.showwarning
        warnings.showwarning = self._show
        if self.emulate:
            for name in _EMULATED:
                self._saved[name] = torch.Tensor.__dict__.get(name)  # None: inherited from TensorBase
                setattr(torch.Tensor, name, _warning_wrapper(name, getattr(torch.Tensor, name)))
        else:
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.emulate:
            for name, original in self._saved.items():
                if original is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, original)
            self._saved.clear()
        else:
            torch.cuda.set_sync_debug_mode("default")
        assert self._catch is not None
        self._catch.__exit__(*exc)
        self._stderr.__exit__(*exc)
        for line in self._stderr.text.splitlines():
            if SYNC_MESSAGE in line:
                self.events.append({"step": self.step, "message": line.strip()[:200],
                                    "stack": ["<C++ thread (e.g. autograd's device thread): no Python stack>"]})
        if self._stderr.text:
            sys.stderr.write(self._stderr.text)

    def _show(self, message: Any, category: type, filename: str, lineno: int, file: Any = None,
              line: Optional[str] = None) -> None:
        text = str(message)
        if SYNC_MESSAGE not in text:
            assert self._previous_show is not None
            self._previous_show(message, category, filename, lineno, file, line)
            return
        frames = [f for f in traceback.extract_stack()[:-1]
                  if os.path.basename(f.filename) != "warnings.py" and os.path.abspath(f.filename) != _THIS_FILE]
        self.events.append({"step": self.step, "message": text.strip().splitlines()[-1][:200],
                            "stack": [_frame(f) for f in frames]})

    def report(self, steps: int) -> dict[str, Any]:
        """Summary: the number of syncs, and each distinct call site with its count, steps and stack."""
        sites: dict[tuple, dict[str, Any]] = {}
        for ev in self.events:
            key = tuple(ev["stack"][-8:])
            site = sites.setdefault(key, {"count": 0, "steps": [], "message": ev["message"],
                                          "where": _innermost_project_frame(ev["stack"]),
                                          "stack": ev["stack"][-14:]})
            site["count"] += 1
            if ev["step"] not in site["steps"]:
                site["steps"].append(ev["step"])
        return {"detector": ("emulated on the CPU (Tensor→host conversions; over-reports)" if self.emulate
                             else 'torch.cuda.set_sync_debug_mode("warn")'),
                "steps_monitored": steps, "syncs": len(self.events),
                "syncs_per_step": len(self.events) / max(steps, 1), "no_host_sync": not self.events,
                "sites": sorted(sites.values(), key=lambda s: -s["count"])}


class _FdCapture:
    """Redirect a file descriptor (stderr: 2) into a temp file inside the `with` block; `text` holds what came."""

    def __init__(self, fd: int) -> None:
        self.fd, self.text = fd, ""
        self._saved: Optional[int] = None
        self._file: Any = None

    def __enter__(self) -> "_FdCapture":
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(self.fd)
        os.dup2(self._file.fileno(), self.fd)
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.stderr.flush()
        assert self._saved is not None
        os.dup2(self._saved, self.fd)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode(errors="replace")
        self._file.close()


def _warning_wrapper(name: str, original: Callable) -> Callable:
    def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        warnings.warn(f"{SYNC_MESSAGE} (emulated: Tensor.{name})", UserWarning, stacklevel=2)
        return original(self, *args, **kwargs)
    wrapper.__name__ = name
    return wrapper


def _frame(f: traceback.FrameSummary) -> str:
    path = Path(f.filename)
    try:
        shown = str(path.resolve().relative_to(ROOT))
    except ValueError:
        parts = path.parts
        cut = max((i for i, p in enumerate(parts) if p in ("site-packages", "dist-packages", "ditstack-site")),
                  default=None)
        shown = str(Path(*parts[cut + 1:])) if cut is not None else str(path)
    return f"{shown}:{f.lineno} in {f.name}"


def _innermost_project_frame(stack: list[str]) -> Optional[str]:
    for frame in reversed(stack):
        if frame.split(":")[0].split("/")[0] in ("launch", "dit", "data_pipeline", "eval"):
            return frame
    return stack[-1] if stack else None


# ------------------------------------------------------------------------------------------------ children
def _bench_model(spec: dict[str, Any]) -> tuple[Any, dict[str, Any], Any]:
    """(config, DiT kwargs, diffusion kwargs) of the bench config, as the trainer derives them."""
    from eval.config import load_config
    from launch.builders import diffusion_kwargs, model_kwargs

    cfg = load_config(spec["config"], spec.get("sets", []))
    manifest = json.loads((Path(cfg.data.shards) / "manifest.json").read_text())
    return cfg, model_kwargs(cfg, manifest), diffusion_kwargs(cfg)


def _perturbed_dit(kw: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """Our DiT with the zero-initialised layers (adaLN, output) drawn at random, like a trained model."""
    from dit.models import DiT

    torch.manual_seed(seed)
    model = DiT(**kw)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return model


def _official_like(model: torch.nn.Module, kw: dict[str, Any]) -> torch.nn.Module:
    """The official network with `model`'s weights, checked to compute the same function (fp32)."""
    from benchmarks.official_dit import OfficialDiT

    official = OfficialDiT(input_size=kw["input_size"], patch_size=kw["patch_size"], in_channels=kw["in_channels"],
                           hidden_size=kw["hidden_size"], depth=kw["depth"], num_heads=kw["num_heads"],
                           mlp_ratio=kw.get("mlp_ratio", 4.0), num_classes=kw["num_classes"],
                           class_dropout_prob=kw["class_dropout_prob"])
    official.load_state_dict(model.state_dict())
    return official


def _max_output_diff(a: torch.nn.Module, b: torch.nn.Module, kw: dict[str, Any], device: torch.device) -> float:
    """Largest |a - b| of the two networks' eval-mode fp32 outputs on 4 random inputs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, kw["in_channels"], kw["input_size"], kw["input_size"], generator=g).to(device)
    t = torch.randint(0, 1000, (4,), generator=g).to(device)
    y = torch.tensor([1, kw["num_classes"], 2, kw["num_classes"]]).to(device)
    was = a.training, b.training
    a.eval(), b.eval()
    with torch.no_grad():
        diff = float((a(x, t, y).float() - b(x, t, y).float()).abs().max())
    a.train(was[0]), b.train(was[1])
    return diff


def _peak_memory() -> dict[str, Any]:
    if is_cuda():
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "kind": "cuda"}
    import resource

    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "kind": "host RSS of the process (dry run)"}


def _reset_peak() -> None:
    if is_cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@contextlib.contextmanager
def _compile_backend(backend: Optional[str]):
    """Force torch.compile's backend (the dry run's aot_eager: dynamo and AOTAutograd without inductor codegen)."""
    if backend is None:
        yield
        return
    original = torch.compile

    def compile_with(*args: Any, **kwargs: Any) -> Any:
        kwargs["backend"] = backend
        return original(*args, **kwargs)

    torch.compile = compile_with
    try:
        yield
    finally:
        torch.compile = original


def child_train(spec: dict[str, Any]) -> dict[str, Any]:
    """launch/train.py's run_main with the Trainer (end-of-run checkpoint/export skipped); log records + memory."""
    from launch.train import Trainer
    from launch.trainer_base import run_main

    captured: dict[str, Any] = {}

    class BenchTrainer(Trainer):
        """The trainer with its final checkpoint and export skipped (they are I/O, not the step)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            captured.update(flops_per_sample=self.flops_per_sample, model_kwargs=self.model_kwargs,
                            device=str(self.info.device), zero_stage=self.cfg.train.deepspeed.zero_stage,
                            parameters=sum(p.numel() for p in self.engine.module.parameters()),
                            trainer_peak_flops=self.peak_flops)

        def save(self) -> Path:
            log.info("benchmark: checkpoint at step %d skipped", self.step)
            return self.run_dir

        def on_finish(self) -> None:
            log.info("benchmark: export skipped")

    run_dir = Path(spec["run_dir"])
    argv = ["--config", spec["config"], "--run-dir", str(run_dir)]
    for s in spec.get("sets", []):
        argv += ["--set", s]
    _reset_peak()
    t0 = time.perf_counter()
    with _compile_backend(spec.get("compile_backend") if "train.compile=true" in spec.get("sets", []) else None):
        status = run_main(BenchTrainer, "gpu_check trainer run", argv)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()] \
        if (run_dir / "log.jsonl").is_file() else []
    if status != 0:
        raise RuntimeError(f"run_main exited with {status}")
    return {"exit_status": status, "wall_s": wall, "records": records, **captured, **_peak_memory()}


def _official_step_fn(model: torch.nn.Module, diffusion: Any, batch: tuple, lr: float = 1e-4) -> Callable[[], None]:
    """The official train.py step (latents given): bf16 autocast forward, loss, backward, AdamW, EMA update."""
    import copy

    x, y = batch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0)
    ema = copy.deepcopy(model).requires_grad_(False)
    ema_params = dict(ema.named_parameters())
    model_params = dict(model.named_parameters())
    device = x.device

    def model_fn(xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(xt, t, y)
        return out.float()

    def step() -> None:
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
        loss = diffusion.training_losses(model_fn, x, t, model_kwargs={"y": y})["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # official update_ema: one mul_/add_ pair per parameter
            for name, param in model_params.items():
                ema_params[name].mul_(0.9999).add_(param.data, alpha=1 - 0.9999)

    return step


def _time_steps(step: Callable[[], None], warmup: int, steps: int, rounds: int) -> list[float]:
    """Seconds per step of each timed round (CUDA events on a GPU, the wall clock on the CPU)."""
    for _ in range(warmup):
        step()
    sync_device()
    out = []
    for _ in range(rounds):
        if is_cuda():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1000.0 / steps)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            out.append((time.perf_counter() - t0) / steps)
    return out


def child_official(spec: dict[str, Any]) -> dict[str, Any]:
    """The official network's training step and ours, bare, same weights, batch and precision."""
    from dit.diffusion import create_diffusion

    cfg, kw, dkw = _bench_model(spec)
    device = torch.device("cuda" if is_cuda() else "cpu")
    s = spec["settings"]
    nets = {"ours_bare": _perturbed_dit(kw).to(device)}
    nets["official"] = _official_like(nets["ours_bare"], kw).to(device)
    flops = 3.0 * nets["ours_bare"].model_flops_per_sample()
    diff = _max_output_diff(nets["ours_bare"], nets["official"], kw, device)
    diffusion = create_diffusion(**dkw)
    g = torch.Generator().manual_seed(2)
    b = cfg.train.global_batch_size
    x = torch.randn(b, kw["in_channels"], kw["input_size"], kw["input_size"], generator=g).to(device)
    y = torch.randint(0, kw["num_classes"], (b,), generator=g).to(device)
    out: dict[str, Any] = {"batch": b, "flops_per_sample": flops, "reference_max_abs_diff_fp32": diff,
                           "model_kwargs": kw}
    for net in nets.values():
        net.to("cpu")
    for name in ("official", "ours_bare"):  # one at a time on the device: each peak holds one model's state
        net = nets.pop(name).to(device).train()
        _reset_peak()
        times = _time_steps(_official_step_fn(net, diffusion, (x, y)), s["official_warmup"], s["official_steps"],
                            s["official_rounds"])
        step_s = statistics.median(times)
        out[name] = {"step_s_rounds": times, "step_s": step_s, "img_per_s": b / step_s, **_peak_memory()}
        del net
    return out


def child_sampling(spec: dict[str, Any]) -> dict[str, Any]:
    """CFG sampling in bf16, ours (Generator.sample_batch) vs the official loop; attention kernels; top kernels."""
    from dit.diffusion import create_diffusion
    from dit.samplers import sample
    from eval.inference import Generator, sample_seed

    cfg, kw, dkw = _bench_model(spec)
    s = spec["settings"]
    device = torch.device("cuda" if is_cuda() else "cpu")
    model = _perturbed_dit(kw)
    official = _official_like(model, kw)
    model, official = model.to(device).eval(), official.to(device).eval()
    diff = _max_output_diff(model, official, kw, device)
    gen = Generator(model, dkw, {}, None, device)
    diffusion = create_diffusion(**dkw)
    n, k, null = s["sample_batch"], s["sample_steps"], kw["num_classes"]
    labels = torch.arange(n) % kw["num_classes"]
    seeds = [sample_seed(0, i) for i in range(n)]
    scale = s["cfg_scale"]

    def ours(steps: int) -> None:
        gen.sample_batch(labels, seeds, sampler="ddpm", steps=steps, cfg_scale=scale, dtype=torch.bfloat16)

    def official_loop(steps: int) -> None:
        """The official sample.py: sampler state [z, z], labels [y, null], forward_with_cfg on all 2B rows."""
        z = torch.randn(n, kw["in_channels"], kw["input_size"], kw["input_size"], device=device)
        z = torch.cat([z, z])
        y = torch.cat([labels, torch.full_like(labels, null)]).to(device)

        def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return official.forward_with_cfg(x, t, y, cfg_scale).float()

        sample(fn, diffusion, tuple(z.shape), sampler="ddpm", steps=steps, noise=z,
               model_kwargs={"y": y, "cfg_scale": scale})
        sync_device()

    timings: dict[str, list[float]] = {"ours": [], "official": []}
    with torch.no_grad():
        ours(2), official_loop(2)  # warm-up: kernels, the bf16 weight copy, respacing
        for _ in range(s["sample_reps"]):
            for name, fn in (("ours", ours), ("official", official_loop)):
                sync_device()
                t0 = time.perf_counter()
                fn(k)
                sync_device()
                timings[name].append((time.perf_counter() - t0) / k)
    target = s["sample_target_steps"]
    result: dict[str, Any] = {"images": n, "rows_through_network": 2 * n, "cfg_scale": scale, "sampler": "ddpm",
                              "steps_timed": k, "target_steps": target, "reference_max_abs_diff_fp32": diff,
                              "note": "latents only: the VAE decode is outside both loops"}
    for name, ts in timings.items():
        per_step = min(ts)
        result[name] = {"s_per_step": per_step, "s_per_step_reps": ts,
                        f"img_per_s_at_{target}_steps": n / (per_step * target)}
    result["speedup_vs_official"] = result["official"]["s_per_step"] / result["ours"]["s_per_step"]
    result["attention"] = attention_profile(model, kw, device)
    return result


def attention_profile(model: torch.nn.Module, kw: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Attention ops and flash kernels of a bf16 forward (no grad) and of a bf16 training step; top kernels."""
    from torch.profiler import ProfilerActivity, profile

    b = 8
    x = torch.randn(b, kw["in_channels"], kw["input_size"], kw["input_size"], device=device)
    t = torch.randint(0, 1000, (b,), device=device)
    y = torch.randint(0, kw["num_classes"], (b,), device=device)
    model.train()

    def forward() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            model(x, t, y)

    def train_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x, t, y)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda() else [])
    out: dict[str, Any] = {}
    for name, fn in (("forward_no_grad", forward), ("training_step", train_step)):
        fn()  # warm-up outside the profile
        sync_device()
        with profile(activities=activities) as prof:
            fn()
            sync_device()
        names = {e.name for e in prof.events()}
        ops = sorted(n for n in names if n.startswith(("aten::_scaled_dot_product", "aten::_flash",
                                                       "aten::_efficient_attention", "aten::_cudnn_attention")))
        kernels = sorted(n[:160] for n in names if "flash" in n.lower() and not n.startswith("aten::"))
        out[name] = {"attention_ops": ops, "flash_kernels": kernels,
                     "flash": any("flash" in o for o in ops) and (bool(kernels) or not is_cuda())}
        if name == "training_step":
            out["top_kernels"] = _top_kernels(prof)
    model.eval()
    return out


def _top_kernels(prof: Any, n: int = 12) -> list[dict[str, Any]]:
    """The most expensive ops/kernels of a profile by self device time (self CPU time on the CPU)."""
    rows = []
    for avg in prof.key_averages():
        if is_cuda():
            us = getattr(avg, "self_device_time_total", None)
            if us is None:
                us = getattr(avg, "self_cuda_time_total", 0.0)
        else:
            us = avg.self_cpu_time_total
        if us:
            rows.append({"name": avg.key[:120], "self_us": float(us), "calls": int(avg.count)})
    rows.sort(key=lambda r: -r["self_us"])
    total = sum(r["self_us"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["self_us"] / total
    return rows[:n]


def child_sync(spec: dict[str, Any]) -> dict[str, Any]:
    """The Trainer built in-process; non-logging train_step() calls under the host-sync monitor."""
    from data_pipeline.dist_env import cleanup, init_distributed
    from eval.config import load_config
    from launch.run_utils import setup_logging
    from launch.train import Trainer

    s = spec["settings"]
    cfg = load_config(spec["config"], spec.get("sets", []))
    info = init_distributed()
    setup_logging(info.rank)
    trainer = Trainer(cfg, info, Path(spec["run_dir"]), None)
    try:
        for _ in range(s["sync_warmup"]):
            trainer.train_step()
        sync_device()
        monitor = HostSyncMonitor(emulate=not is_cuda())
        with monitor:
            for i in range(s["sync_steps"]):
                monitor.step = trainer.step + 1
                trainer.train_step()
        sync_device()
        return {"zero_stage": cfg.train.deepspeed.zero_stage, "device": str(info.device),
                "model": cfg.model.name, **monitor.report(s["sync_steps"])}
    finally:
        trainer.stream.close()
        if trainer.sink is not None:
            trainer.sink.close()
        cleanup()


CHILDREN: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "train": child_train, "official": child_official, "sampling": child_sampling, "sync": child_sync}


def run_child(kind: str, spec_path: Path, result_path: Path) -> int:
    """Entry of a part's process: run the child, write its result (or the error) as JSON."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    spec = json.loads(spec_path.read_text())
    try:
        result = {"status": "ok", "result": CHILDREN[kind](spec)}
        code = 0
    except Exception as err:  # noqa: BLE001 - the parent reports any failure of a part with its traceback
        result = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        code = 1
    write_json_atomic(result_path, result)
    return code


# ---------------------------------------------------------------------------------------------------- tests
def run_tests(work: Path, env: dict[str, str], s: Settings, timeout: float, junit_copy: Path) -> dict[str, Any]:
    """pytest -m cuda on tests/test_cuda.py; per-test outcome and time from the JUnit XML."""
    import importlib.util

    junit = work / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-m", "cuda", "-q", "-p", "no:cacheprovider",
           "-o", "addopts=-ra", f"--junitxml={junit}", f"--basetemp={work / 'pytest'}"]
    if s.test_workers > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(s.test_workers)]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += [f"--timeout={s.test_timeout_s}"]
    t0 = time.perf_counter()
    proc = _run_logged(cmd, env, timeout, work / "tests.log")
    out: dict[str, Any] = {"command": " ".join(cmd[1:]), "exit_status": proc, "wall_s": time.perf_counter() - t0,
                           "tests": []}
    if junit.is_file():
        junit_copy.write_bytes(junit.read_bytes())
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = {"failure": "failed"}.get(tag, tag)
                    message = (el.get("message") or el.text or "")[:1500]
            out["tests"].append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                                 "time_s": float(case.get("time") or 0.0), "message": message})
    counts: dict[str, int] = {}
    for t in out["tests"]:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    out["counts"] = counts
    return out


def _run_logged(cmd: list[str], env: dict[str, str], timeout: float, log_path: Path) -> Any:
    """Run `cmd` from the repository root with stdout+stderr to `log_path`; its exit status, or "timeout"."""
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part's own process group (its workers included)
            proc.wait()
            return "timeout"


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------- summaries
def steady_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The logged windows after the first one (the first holds the warm-up, allocation and compilation)."""
    timed = [r for r in records if "samples_per_s" in r]
    return timed[1:] if len(timed) > 1 else timed


def train_row(name: str, res: dict[str, Any], peak_flops: float) -> dict[str, Any]:
    """One row of the training table from a train part's result."""
    steady = steady_records(res.get("records", []))
    if not steady:
        return {"run": name, "error": "no logged window"}
    img_s = statistics.median(r["samples_per_s"] for r in steady)
    step = statistics.median(r["step_time"] for r in steady)
    flops = res.get("flops_per_sample")
    row = {"run": name, "img_per_s": img_s, "step_ms": 1000 * step, "windows": len(steady),
           "mfu": img_s * flops / peak_flops if flops else None,
           "trainer_mfu": statistics.median(r["mfu"] for r in steady) if all("mfu" in r for r in steady) else None,
           "final_loss": steady[-1].get("loss"), "peak_gib": res.get("peak_allocated_gib", res.get("peak_rss_gib")),
           "memory_kind": res.get("kind"), "zero_stage": res.get("zero_stage"), "wall_s": res.get("wall_s")}
    return row


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The figures people compare, from the parts' results."""
    peak = report["settings"]["peak_tflops"] * 1e12
    parts = report["parts"]
    ok = {k: v["result"] for k, v in parts.items() if v.get("status") == "ok"}
    out: dict[str, Any] = {"train": [train_row(k, v, peak) for k, v in ok.items() if k.startswith("train_")]}
    off = ok.get("official")
    if off:
        for key in ("official", "ours_bare"):
            r = off[key]
            r["mfu"] = r["img_per_s"] * off["flops_per_sample"] / peak
        out["official"] = {k: off[k] for k in ("official", "ours_bare", "batch", "reference_max_abs_diff_fp32")}
        base = next((r for r in out["train"] if r["run"] == "train_bf16" and "step_ms" in r), None)
        if base:
            out["official"]["step_ratio_official_over_trainer"] = off["official"]["step_s"] * 1000 / base["step_ms"]
        out["official"]["step_ratio_official_over_ours_bare"] = off["official"]["step_s"] / off["ours_bare"]["step_s"]
    samp = ok.get("sampling")
    if samp:
        out["sampling"] = {k: v for k, v in samp.items() if k != "attention"}
        out["flash"] = {k: v for k, v in samp["attention"].items() if k != "top_kernels"}
        out["top_kernels_training_step"] = samp["attention"].get("top_kernels")
    out["sync"] = {k: {"syncs_per_step": v["syncs_per_step"], "no_host_sync": v["no_host_sync"],
                       "sites": [{"where": s["where"], "innermost": s["stack"][-1] if s["stack"] else None,
                                  "count": s["count"], "message": s["message"]} for s in v["sites"]],
                       "detector": v["detector"]}
                   for k, v in ok.items() if k.startswith("sync_")}
    if "tests" in ok:
        out["tests"] = {"counts": ok["tests"]["counts"], "exit_status": ok["tests"]["exit_status"],
                        "not_passed": [{"name": t["name"], "outcome": t["outcome"], "message": t["message"][:300]}
                                       for t in ok["tests"]["tests"] if t["outcome"] != "passed"]}
    out["parts"] = {k: v.get("status") for k, v in parts.items()}
    return out


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    """summary.md: the environment line and one table per section."""
    env, sm = report["env"], report["summary"]
    gpu = env.get("gpu", {}).get("name", "CPU (dry run)")
    lines = [f"# GPU check ({env['mode']})", "",
             f"{gpu}; torch {env['torch']} (CUDA {env['cuda']}), DeepSpeed {env['versions'].get('deepspeed')}, "
             f"Python {env['python']}; peak {env['peak_tflops']:g} TFLOP/s for MFU (bf16 8192³ matmul measured: "
             f"{_fmt(env.get('matmul_bf16_tflops_8192'), '.0f')} TFLOP/s); "
             f"{report['wall_s']:.0f} s of {report['budget_s']:.0f} s budget; git {env.get('git')}", ""]
    lines += ["| part | status | wall s |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {_fmt(v.get('wall_s'), '.0f')} |" for k, v in report["parts"].items()]
    s = report["settings"]
    lines += ["", f"## Training ({_fmt(s['model'].get('name'))}, latents {s['latent']}, batch {s['batch']}, bf16, "
                  f"{s['steps']} steps, log window {s['log_every']}; first window dropped)", "",
              "| run | img/s | step ms | MFU | trainer MFU | peak GiB | ZeRO | loss |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sm.get("train", []):
        lines.append(f"| {r['run']} | {_fmt(r.get('img_per_s'), '.1f')} | {_fmt(r.get('step_ms'), '.1f')} | "
                     f"{_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('trainer_mfu'), '.1%')} | "
                     f"{_fmt(r.get('peak_gib'), '.1f')} | {_fmt(r.get('zero_stage'))} | {_fmt(r.get('final_loss'))} |")
    off = sm.get("official")
    if off:
        lines += ["", "## Official network, same step (bare loop: autocast bf16, AdamW, official EMA)", "",
                  "| network | img/s | step ms | MFU | peak GiB |", "|---|---|---|---|---|"]
        for key in ("official", "ours_bare"):
            r = off[key]
            lines.append(f"| {key} | {r['img_per_s']:.1f} | {1000 * r['step_s']:.1f} | {_fmt(r.get('mfu'), '.1%')} | "
                         f"{_fmt(r.get('peak_allocated_gib', r.get('peak_rss_gib')), '.1f')} |")
        lines.append(f"\nstep time official / trainer (train_bf16): "
                     f"{_fmt(off.get('step_ratio_official_over_trainer'))}; official / ours bare: "
                     f"{_fmt(off.get('step_ratio_official_over_ours_bare'))}; fp32 output max diff "
                     f"{_fmt(off.get('reference_max_abs_diff_fp32'))}")
    smp = sm.get("sampling")
    if smp:
        t = smp["target_steps"]
        lines += ["", f"## CFG sampling ({smp['images']} images, scale {smp['cfg_scale']}, DDPM, bf16; "
                      f"{smp['steps_timed']} steps timed, extrapolated to {t})", "",
                  f"| loop | s/step | img/s at {t} steps |", "|---|---|---|"]
        for key in ("ours", "official"):
            lines.append(f"| {key} | {smp[key]['s_per_step']:.4f} | {smp[key][f'img_per_s_at_{t}_steps']:.2f} |")
        lines.append(f"\nours vs official: {smp['speedup_vs_official']:.2f}x")
    fl = sm.get("flash")
    if fl:
        lines += ["", "## Attention", ""]
        for k, v in fl.items():
            lines.append(f"- {k}: flash={v['flash']}; ops {', '.join(v['attention_ops']) or 'none'}; "
                         f"kernels {', '.join(k2[:60] for k2 in v['flash_kernels'][:3]) or 'none'}")
    if sm.get("sync"):
        lines += ["", "## Host syncs in non-logging training steps", ""]
        for k, v in sm["sync"].items():
            lines.append(f"- {k}: {v['syncs_per_step']:.2g} per step ({v['detector']})")
            for site in v["sites"][:10]:
                inner = f" → {site['innermost']}" if site["innermost"] != site["where"] else ""
                lines.append(f"  - {site['count']}x at {site['where']}{inner}")
    if sm.get("tests"):
        t = sm["tests"]
        lines += ["", f"## pytest -m cuda: {t['counts']} (exit {t['exit_status']})", ""]
        lines += [f"- {x['outcome']}: {x['name']}: {x['message'][:200]}" for x in t["not_passed"][:20]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- parent
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU, tiny model, a few steps: the same code path in ~1 min")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"),
                    help="results folder (default: $OUT, else runs/gpu_check)")
    ap.add_argument("--work", default=None, help="scratch folder for shards and runs (default: a new temp dir)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole check (default 460 on a GPU, 600 dry); parts that no longer fit "
                         "are skipped")
    ap.add_argument("--only", default=None, help="comma list of parts to run (default: all)")
    ap.add_argument("--skip", default=None, help="comma list of parts not to run")
    ap.add_argument("--wheels", default=str(ROOT / ".whl"),
                    help="wheel folder installed first on a GPU (default: .whl in the repository root)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s for MFU")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 64; dry 4)")
    ap.add_argument("--steps", type=int, default=None, help="trainer steps per run (default 30; dry 4)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def select_parts(only: Optional[str], skip: Optional[str]) -> list[Part]:
    """The parts to run, in the check's order; ValueError naming an unknown part."""
    names = [p.name for p in PARTS]
    chosen = [n.strip() for n in only.split(",") if n.strip()] if only else list(names)
    skipped = [n.strip() for n in skip.split(",") if n.strip()] if skip else []
    for n in chosen + skipped:
        if n not in names:
            raise ValueError(f"unknown part {n!r}; valid: {', '.join(names)}")
    return [p for p in PARTS if p.name in chosen and p.name not in skipped]


def run_part(part: Part, s: Settings, config: Path, work: Path, env: dict[str, str], timeout: float,
             out: Path) -> dict[str, Any]:
    """Run one part in its own process; its record (status, wall time, result or error, output tail)."""
    t0 = time.perf_counter()
    log_path = work / f"{part.name}.log"
    if part.kind == "tests":
        res = run_tests(work, env, s, timeout, out / "junit.xml")
        status = "timeout" if res["exit_status"] == "timeout" else "ok"
        return {"status": status, "wall_s": time.perf_counter() - t0, "result": res,
                "log_tail": _tail(work / "tests.log", 6000)}
    run_dir = work / "runs" / part.name
    spec = {"config": str(config), "sets": list(part.sets), "run_dir": str(run_dir),
            "settings": dataclasses.asdict(s), "compile_backend": s.compile_backend}
    spec_path, result_path = work / f"{part.name}.spec.json", work / f"{part.name}.result.json"
    write_json_atomic(spec_path, spec)
    result_path.unlink(missing_ok=True)
    code = _run_logged([sys.executable, str(Path(__file__).resolve()), "--child", part.kind, "--spec",
                        str(spec_path), "--result", str(result_path)], env, timeout, log_path)
    record: dict[str, Any] = {"wall_s": time.perf_counter() - t0, "log_tail": _tail(log_path)}
    if code == "timeout":
        record.update(status="timeout", error=f"killed after {timeout:.0f} s")
    elif result_path.is_file():
        record.update(json.loads(result_path.read_text()))
    else:
        record.update(status="failed", error=f"exit {code} without a result")
    return record


def main(argv: Optional[list[str]] = None) -> int:
    """Run the check (or, with --child, one part of it); returns the exit status."""
    args = parse_args(argv)
    if args.child:
        return run_child(args.child, Path(args.spec), Path(args.result))
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] gpu_check: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    started = time.perf_counter()
    if not args.dry and not torch.cuda.is_available():
        sys.stderr.write("gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on the GPU machine, "
                         "or with --dry here\n")
        return 2
    try:
        parts = select_parts(args.only, args.skip)
    except ValueError as err:
        sys.stderr.write(f"gpu_check: --only/--skip: {err}\n")
        return 2
    s = Settings.dry() if args.dry else Settings.gpu()
    if args.batch:
        s.batch = args.batch
    if args.steps:
        s.steps = args.steps
    budget = args.budget or (600.0 if args.dry else 460.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    site = None
    wheels: dict[str, Any] = {"note": "dry run: the local environment"}
    if not args.dry:
        import importlib.util

        try:
            wheels = install_wheels(Path(args.wheels), SITE)
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            wheels = {"error": str(err)}
        if wheels.get("installed"):
            site = SITE
            sys.path.insert(0, str(SITE))
            importlib.invalidate_caches()
        missing = [m for m in ("deepspeed", "pydantic", "torch_fidelity", "mlxtend")
                   if importlib.util.find_spec(m) is None]
        if missing:
            sys.stderr.write(f"gpu_check: {', '.join(missing)} not importable ({wheels}); run "
                             f"`bash benchmarks/gpu_wheels.sh` where pip works and carry .whl (--wheels DIR)\n")
            return 2
    report: dict[str, Any] = {"command": [sys.executable, *sys.argv], "budget_s": budget, "wall_s": 0.0,
                              "settings": dict(dataclasses.asdict(s), peak_tflops=args.peak_tflops),
                              "env": environment(args.dry, args.peak_tflops, wheels), "parts": {}, "work": str(work)}
    shards = write_shards(work / "shards", s)
    config = write_config(work / "bench.yaml", s, shards, work / "runs")
    env = child_env(args.peak_tflops, site)
    log_text: list[str] = []

    def save() -> None:
        report["wall_s"] = time.perf_counter() - started
        report["summary"] = summarize(report)
        write_json_atomic(out / "results.json", report)
        write_text_atomic(out / "summary.md", markdown(report))
        write_text_atomic(out / "log.txt", "\n".join(log_text)[-2_000_000:])

    save()
    for part in parts:
        left = budget - (time.perf_counter() - started)
        if left < part.min_s:
            report["parts"][part.name] = {"status": "skipped", "error": f"budget: {left:.0f} s left"}
            log.info("%s: skipped (%.0f s of the budget left)", part.name, left)
            save()
            continue
        timeout = min(s.caps.get(part.cap, 120.0), left)
        log.info("%s: running (limit %.0f s)", part.name, timeout)
        record = run_part(part, s, config, work, env, timeout, out)
        report["parts"][part.name] = record
        log_text.append(f"===== {part.name}: {record.get('status')} in {record.get('wall_s', 0):.1f} s\n"
                        f"{record.pop('log_tail', '')}")
        log.info("%s: %s in %.1f s%s", part.name, record.get("status"), record.get("wall_s", 0.0),
                 f" ({record.get('error')})" if record.get("error") else "")
        save()
    if is_cuda():
        report["env"]["nvidia_smi_end"] = nvidia_smi()
    save()
    print(markdown(report))
    bad = [k for k, v in report["parts"].items() if v.get("status") not in ("ok", "skipped")]
    failed_tests = report["summary"].get("tests", {}).get("counts", {})
    return 1 if bad or failed_tests.get("failed") or failed_tests.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
