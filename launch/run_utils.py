"""Run machinery shared by the trainers: logging, metrics sinks, preemption signals, seeds and RNG states."""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.files import atomic_write_text, read_jsonl

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 3  # "checkpointed because of a signal: requeue me" (the SLURM scripts act on it)
EXIT_FAILED = 1


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """Log to stderr: INFO and above on rank 0, warnings and errors elsewhere, prefixed with the rank."""
    fmt = f"[%(asctime)s r{rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level if rank == 0 else logging.WARNING, format=fmt, datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state of this process, in a form `torch.load(weights_only=True)` can read back."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps(_numpy_state_to_json(np.random.get_state())),
        "python": json.dumps(_python_state_to_json(random.getstate())),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_json(json.loads(state["numpy"])))
    random.setstate(_python_state_from_json(json.loads(state["python"])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_json(st: tuple) -> list:
    return [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]


def _numpy_state_from_json(st: list) -> tuple:
    return (st[0], np.array(st[1], dtype=np.uint32), st[2], st[3], st[4])


def _python_state_to_json(st: tuple) -> list:
    return [st[0], list(st[1]), st[2]]


def _python_state_from_json(st: list) -> tuple:
    return (st[0], tuple(st[1]), st[2])


class PreemptionFlag:
    """Turns SIGUSR1/SIGTERM into a flag that every rank agrees on at the next step boundary."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous = {}
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            log.warning("received %s: finishing the current step, then checkpointing", signal.Signals(signum).name)
        self.received = signum

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank when any rank received a signal (collective: call it on all ranks together)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.received is not None
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        """Put back the previous signal handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MetricsSink:
    """Rank 0's metric outputs: a JSONL file in the run directory and, when enabled, wandb."""

    def __init__(self, run_dir: Path, is_main: bool, config: dict, use_wandb: bool, project: str,
                 name: Optional[str] = None) -> None:
        self.is_main = is_main
        self.path = Path(run_dir) / "log.jsonl"
        self._wandb = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if use_wandb and os.environ.get("WANDB_MODE", "") != "disabled":
            try:
                import wandb
            except ImportError:
                log.warning("wandb is not installed: metrics go to %s only", self.path)
                return
            if "WANDB_MODE" not in os.environ and not _wandb_has_key():
                os.environ["WANDB_MODE"] = "offline"  # no API key: write the run locally, never hang on a login
            self._wandb = wandb.init(project=project, name=name or Path(run_dir).name, config=config,
                                     dir=str(run_dir), resume="allow",
                                     id=_stable_run_id(Path(run_dir)))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one record (rank 0 only; other ranks ignore the call)."""
        if not self.is_main:
            return
        record = {"step": step, "time": time.time(), **metrics}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        """Flush and close wandb."""
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _stable_run_id(run_dir: Path) -> str:
    """A wandb run id derived from the run directory, so a resumed run continues the same wandb run."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop records after `max_step` (a resumed run rewrites what came after its checkpoint), and the partial-window
    record a run that ended at `max_step` wrote (the resumed run logs that window in full)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = [r for r in read_jsonl(path)
            if r.get("step", 0) < max_step or (r.get("step", 0) == max_step and not r.get("partial_window"))]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
