"""The trainer skeleton shared by launch/train.py (DiT) and launch/train_vae.py (VAE).

It owns what every run does the same way: resolving `--resume`, building the resumable data stream at the saved
position, per-rank RNG states, checkpoint directories (temp name → rename, `latest`, pruning), refusing to save
non-finite weights, the non-finite step counter, the run loop (all-reduced logging, periodic checkpoints, SIGUSR1/
SIGTERM → checkpoint → exit 3) and the entry point's error handling. A subclass builds its models and says how to
take one optimizer step, what to save, and what to do at the end.
"""
from __future__ import annotations

import abc
import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from data_pipeline.checks import OneLineParser
from data_pipeline.devices import DeviceLayoutError
from data_pipeline.dist_env import DistInfo, all_ranks_true, barrier, cleanup, init_distributed
from data_pipeline.files import atomic_write_text
from data_pipeline.loader import NoReadableSamplesError, build_stream
from data_pipeline.manifest import ManifestError
from eval.checkpoints import CheckpointError
from eval.config import Config, ConfigError, add_config_args, config_from_args, config_to_dict
from launch.builders import batch_layout, data_record
from launch.checkpoint import CheckpointStore
from launch.progress import StepProgress
from launch.run_lock import RunLock, RunLockBusy
from launch.run_utils import (EXIT_FAILED, EXIT_PREEMPTED, MetricsSink, PreemptionFlag, rng_state, seed_everything,
                              set_rng_state, setup_logging, truncate_jsonl)

log = logging.getLogger(__name__)

EXIT_CONFIG = 2


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite steps); the message says why."""


def versions() -> dict[str, str]:
    """Library versions recorded in checkpoints."""
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import deepspeed

        out["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    return out


def stream_options(cfg: Config, info: DistInfo, micro_batch: int) -> dict[str, Any]:
    """`build_stream` keyword arguments of this rank's training stream.

    On a GPU the batches come in page-locked (pinned) host memory, so the trainer's `non_blocking` copies to the
    device are asynchronous (from pageable memory a copy waits for the device to reach it)."""
    return dict(batch_size=micro_batch, rank=info.rank, world_size=info.world_size, num_workers=cfg.data.num_workers,
                seed=cfg.train.seed, mode=cfg.data.mode, shuffle_buffer=cfg.data.shuffle_buffer, flip=cfg.data.flip,
                pin_memory=info.device.type == "cuda", **dataclasses.asdict(cfg.data.remote))


class TrainerBase(abc.ABC):
    """Resume, data stream, RNG, checkpoints and the run loop; subclasses add models and the optimizer step.

    Subclass protocol (the abstract methods below say what each does): set `CHECKPOINT_FORMAT` and `NAME`; in
    `__init__` call `super().__init__`, build the models from `self.stream.manifest`, then `self.finish_setup()`.
    Implement `train_step`, `weights_finite`, `model_meta` and the checkpoint parts `save_state` (every rank's share),
    `write_files` (rank 0's files) and `load_state`; optionally `on_step`, `on_finish`, `current_lr`, and, to
    decide a step's fate on the device, `step_end` / `flush_step_flags` / `sync_counters`. The trainer is the
    `launch.checkpoint.Checkpointable` its `CheckpointStore` (`self.checkpoints`) saves and loads.
    """

    CHECKPOINT_FORMAT = "ditstack-train-1"
    NAME = "train"
    FORMAT_HINTS: dict[str, str] = {}  # earlier formats -> what to do with them (appended to the error)

    def __init__(self, cfg: Config, info: DistInfo, run_dir: Path, resume: Optional[str]) -> None:
        self.cfg, self.info, self.run_dir = cfg, info, Path(run_dir)
        self.checkpoints = CheckpointStore(self.run_dir / "checkpoints", info, self.CHECKPOINT_FORMAT,
                                           cfg.train.keep_last, self.FORMAT_HINTS)
        self.resume_from, self.meta = self.checkpoints.resolve(resume)
        self.micro, self.accum = batch_layout(cfg, info.world_size)
        if not cfg.data.shards:
            raise ConfigError("data.shards is empty: set it to a shard directory (with manifest.json)")
        positions = None
        if self.meta is not None:
            if self.meta.get("world_size") == info.world_size:
                positions = self.meta.get("positions")
            else:
                log.warning("checkpoint was written by %s ranks, this run has %s: the data stream restarts at the "
                            "beginning of epoch %s (the rest resumes exactly)", self.meta.get("world_size"),
                            info.world_size, self.meta.get("epoch"))
        stream_kwargs = stream_options(cfg, info, self.micro)
        failure: Optional[ValueError] = None
        try:
            self.stream = build_stream(cfg.data.shards, position=positions[info.rank] if positions else None,
                                       **stream_kwargs)
            if self.meta is not None and positions is None:  # new world size: restart the checkpoint's epoch
                epoch = int(self.meta.get("epoch", 0))
                position = dict(self.stream.position(), batches=epoch * self.stream.batches_per_epoch)
                self.stream = build_stream(cfg.data.shards, position=position, **stream_kwargs)
        except ValueError as err:
            if isinstance(err, (ManifestError, ConfigError)) or positions is None:
                failure = err
            else:
                failure = CheckpointError(f"{self.resume_from}: {err}")
        # A rank checks the shards it reads (a short one on rank 3 only): every rank stops with its reason
        reasons = [None] * info.world_size
        if info.world_size > 1 and dist.is_initialized():
            dist.all_gather_object(reasons, None if failure is None else (type(failure).__name__, str(failure)))
        if failure is not None:
            raise failure
        bad = next(((r, why) for r, why in enumerate(reasons) if why), None)
        if bad is not None:
            rank, (kind, message) = bad
            raise (ConfigError if kind == "ConfigError" else ManifestError)(f"rank {rank}: {message}")
        self.data_info = data_record(self.stream.manifest)
        self.step, self.nonfinite_total, self.bad_in_a_row = 0, 0, 0
        # A private RNG for everything random in a step (timesteps, noise, label dropout, posterior samples),
        # saved per rank: neither data-loader workers nor sampling grids can shift what an exact resume replays.
        self.gen = torch.Generator(device=info.device)
        self.gen.manual_seed(cfg.train.seed * 1_000_003 + info.rank)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        self.sink: Optional[MetricsSink] = None
        self.preempt: Optional[PreemptionFlag] = None  # set while `run` trains
        self._stop_agreed: Optional[bool] = None  # the step's preemption verdict, when `agree_finite` carried it
        self._runtime_logged = False
        self.window: Optional[MetricWindow] = None  # metrics since the last log line (restored on resume)

    # ----------------------------------------------------------------------------------------- subclass API
    @abc.abstractmethod
    def model_meta(self) -> dict[str, Any]:
        """What the checkpoint's meta.json records about the models (compared on resume)."""

    @abc.abstractmethod
    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns scalar metrics to log (averaged over the window and the ranks)."""

    @abc.abstractmethod
    def weights_finite(self) -> bool:
        """True when this rank's weights (and averages) are finite."""

    def save_state(self, tmp: Path) -> None:
        """The collective part of a checkpoint (every rank calls it), e.g. a DeepSpeed engine save."""

    def write_files(self, tmp: Path) -> None:
        """Rank 0's files of a checkpoint (called before meta.json is written and the directory renamed)."""

    @abc.abstractmethod
    def load_state(self, path: Path, meta: dict) -> None:
        """Restore models and optimizers from a checkpoint directory."""

    def on_step(self) -> None:
        """Called after every step (sample grids, reconstructions…)."""

    def on_finish(self) -> None:
        """Called once at the end of a completed run, on every rank (exports, final pictures)."""

    def current_lr(self) -> Optional[float]:
        """The learning rate to log."""
        return None

    def run_record(self) -> dict[str, Any]:
        """How this process computes (device, TF32, ...), recorded in checkpoints and the log."""
        return {"device": str(self.info.device)}

    def step_end(self, signal_received: bool) -> bool:
        """After every step (collective): True when any rank received a preemption signal, so every rank stops.

        Uses the verdict `agree_finite` carried in the step's own all-reduce when it did, else one all-reduce.
        A subclass may decide on the device instead (launch/train.py); it may raise `TrainingStopped`."""
        assert self.preempt is not None
        return self._stop_agreed if self._stop_agreed is not None else self.preempt.should_stop(self.info.device)

    def flush_step_flags(self) -> bool:
        """At the end of the run: settle what `step_end` had not decided yet (True: a signal arrived)."""
        return False

    def sync_counters(self) -> None:
        """Bring step counters kept on the device to `bad_in_a_row` / `nonfinite_total` (before they are read)."""

    flops_per_sample: Optional[float] = None
    peak_flops: Optional[float] = None

    # ---------------------------------------------------------------------------------------------- setup
    def finish_setup(self) -> None:
        """Load the checkpoint (or seed every rank differently), open the metric sinks (call after building)."""
        if self.meta is not None:
            recorded, wanted = {k: self.meta.get(k) for k in self.model_meta()}, self.model_meta()
            if recorded != wanted:
                raise CheckpointError(f"{self.resume_from}: the checkpoint's model differs from this "
                                      f"config's: {_first_difference(recorded, wanted)}")
            self.step = int(self.meta["step"])
            self.nonfinite_total = int(self.meta.get("nonfinite_steps", 0))
            if not self.checkpoints.load(self.resume_from, self.meta, self):
                reseed = self.cfg.train.seed + self.info.rank + 7919 * self.step
                seed_everything(reseed)
                self.gen.manual_seed(self.cfg.train.seed * 1_000_003 + reseed)
            log.info("resumed from %s at step %d (epoch %s)", self.resume_from, self.step, self.meta.get("epoch"))
        else:
            seed_everything(self.cfg.train.seed + self.info.rank)
        self.iterator = iter(self.stream)
        t = self.cfg.train
        self.sink = MetricsSink(self.run_dir, self.info.is_main, config_to_dict(self.cfg), t.wandb, t.wandb_project)
        if self.info.is_main:
            truncate_jsonl(self.sink.path, self.step)  # a resumed run rewrites what came after its checkpoint

    # ---------------------------------------------------------------------------------------- checkpoints
    def checkpoint_meta(self) -> dict[str, Any]:
        """meta.json of a checkpoint of the current step (collective: gathers every rank's data position)."""
        positions: list[Any] = [None] * self.info.world_size
        position = self.stream.position()
        if dist.is_initialized() and self.info.world_size > 1:
            dist.all_gather_object(positions, position)
        else:
            positions = [position]
        return {"format": self.CHECKPOINT_FORMAT, "step": self.step, "epoch": position.get("epoch", 0),
                "world_size": self.info.world_size, "positions": positions, "config": config_to_dict(self.cfg),
                "data": self.data_info, "nonfinite_steps": self.nonfinite_total,
                "corrupt_samples": sum(int(p.get("corrupt_count", 0)) for p in positions), "versions": versions(),
                "runtime": self.run_record(), **self.model_meta()}

    def rank_state(self) -> dict[str, Any]:
        """This rank's private state for a checkpoint: RNG states, data position, the run of non-finite steps, and
        the metrics since the last log line (so a resumed run logs the same means an uninterrupted one does)."""
        return {"rng": rng_state(), "gen": self.gen.get_state(), "position": json.dumps(self.stream.position()),
                "step": self.step, "bad_in_a_row": self.bad_in_a_row,
                "window": json.dumps(self.window.state() if self.window is not None else None)}

    def restore_rank_state(self, state: dict[str, Any]) -> None:
        """Restore what `rank_state` saved."""
        set_rng_state(state["rng"])
        self.gen.set_state(state["gen"])
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
        window = json.loads(state.get("window") or "null")
        if window is not None:
            self.window = MetricWindow.from_state(window, self.info.device)

    def save(self) -> Path:
        """Write a complete checkpoint of the current step (collective); refuses non-finite weights (see
        `CheckpointStore.save` for what happens when a write fails)."""
        self.sync_counters()
        if not all_ranks_true(self.weights_finite(), self.info.device):
            raise TrainingStopped(f"non-finite weights at step {self.step}: refusing to write a checkpoint")
        return self.checkpoints.save(self.step, self)

    # ------------------------------------------------------------------------------------------- training
    def bad_step(self, what: str) -> None:
        """Count a non-finite step; stop the run after `train.max_bad_steps` in a row."""
        self.nonfinite_total += 1
        self.bad_in_a_row += 1
        log.warning("step %d: %s (%d in a row)", self.step + 1, what, self.bad_in_a_row)
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            raise TrainingStopped(f"{self.bad_in_a_row} non-finite steps in a row (train.max_bad_steps="
                                  f"{self.cfg.train.max_bad_steps}): lower train.lr, enable train.grad_clip or "
                                  f"model.qk_norm, or resume from an earlier checkpoint")

    def agree_finite(self, flag: bool) -> bool:
        """`all_ranks_true(flag)` that also carries the preemption flag in the same all-reduce (collective).

        The step's last call decides whether the run stops after this step (every rank makes the same calls, so
        they agree); `run` then needs no all-reduce of its own. A signal that arrives later in the step is seen
        at the next step.
        """
        received = self.preempt is not None and self.preempt.received is not None
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            self._stop_agreed = received if self.preempt is not None else None
            return bool(flag)
        votes = torch.tensor([1.0 if flag else 0.0, 0.0 if received else 1.0], device=self.info.device)
        dist.all_reduce(votes, op=dist.ReduceOp.MIN)
        ok, no_signal = votes.tolist()
        self._stop_agreed = (no_signal == 0.0) if self.preempt is not None else None
        return ok > 0

    def good_step(self) -> None:
        """Reset the count of consecutive non-finite steps."""
        self.bad_in_a_row = 0

    def run(self) -> int:
        """Train to `train.max_steps`; returns the process exit status."""
        cfg, info = self.cfg, self.info
        preempt = self.preempt = PreemptionFlag()
        progress = StepProgress(total=cfg.train.max_steps, initial=self.step, desc=self.NAME,
                                enabled=info.is_main and cfg.train.progress)
        if self.window is None:
            self.window = MetricWindow(info.device)
        window_start, timed_steps = time.perf_counter(), 0
        last_saved = self.step if self.resume_from else -1
        status = 0
        try:
            while self.step < cfg.train.max_steps:
                self._stop_agreed = None
                self.window.add(self.train_step())
                timed_steps += 1
                progress.update(1)
                if self.step % cfg.train.log_every == 0:
                    self._log(self.window, timed_steps, time.perf_counter() - window_start, progress)
                    self.window, window_start, timed_steps = MetricWindow(info.device), time.perf_counter(), 0
                elif self.step == cfg.train.max_steps:
                    # the last, partial window is shown but kept (and checkpointed): a run extended from here
                    # logs the same full window at the next multiple of log_every as an uninterrupted run, and
                    # drops this record when it resumes
                    self._log(self.window, timed_steps, time.perf_counter() - window_start, progress, partial=True)
                self.on_step()
                stop = self.step_end(preempt.received is not None)
                if self.step == cfg.train.max_steps:
                    stop = self.flush_step_flags() or stop
                if self.step % cfg.train.ckpt_every == 0 or stop:
                    self.save()
                    last_saved = self.step
                if stop:
                    log.warning("stopped by signal at step %d after checkpointing; exit %d (requeue)", self.step,
                                EXIT_PREEMPTED)
                    status = EXIT_PREEMPTED
                    break
            if status == 0:
                if last_saved != self.step:
                    self.save()
                self.on_finish()
                barrier()
        finally:
            preempt.restore()
            self.preempt = None
            progress.close()
            if self.sink is not None:
                self.sink.close()
            self.stream.close()
        return status

    def _data_faults(self) -> tuple[int, int]:
        """(corrupt samples summed over the ranks, shards skipped for being missing or short: the most any rank saw)
        (collective)."""
        local = torch.tensor([float(getattr(self.stream, "corrupt_count", 0)),
                              float(getattr(self.stream, "bad_shard_count", 0))], dtype=torch.float64)
        if self.info.world_size > 1 and dist.is_initialized():
            local = local.to(self.info.device)
            parts = [torch.empty_like(local) for _ in range(self.info.world_size)]
            dist.all_gather(parts, local)
            every = torch.stack(parts)
            local = torch.stack([every[:, 0].sum(), every[:, 1].max()])
        corrupt, bad_shards = (int(v) for v in local.tolist())
        return corrupt, bad_shards

    def _log(self, window: "MetricWindow", steps: int, seconds: float, progress: StepProgress,
             partial: bool = False) -> None:
        # Every rank logs the same keys at the same steps: one all-reduce sums them over the ranks. This is the
        # step's only read of the metrics by the host.
        self.sync_counters()
        record: dict[str, Any] = window.reduce(self.info.world_size > 1 and dist.is_initialized())
        # throughput from the steps this process timed (a resumed window holds steps from before the restart)
        samples_per_s = steps * self.cfg.train.global_batch_size / max(seconds, 1e-9)
        corrupt, bad_shards = self._data_faults()
        record.update({"samples_per_s": samples_per_s, "step_time": seconds / max(steps, 1),
                       "epoch": self.stream.position().get("epoch", 0), "nonfinite_steps": self.nonfinite_total,
                       "corrupt_samples": corrupt, "bad_shards": bad_shards})
        lr = self.current_lr()
        if lr is not None:
            record["lr"] = lr
        if self.flops_per_sample and self.peak_flops:
            record["mfu"] = samples_per_s * self.flops_per_sample / (self.peak_flops * self.info.world_size)
        record.update(device_memory_record(self.info.device))
        if partial:
            record["partial_window"] = True
        if not self._runtime_logged:  # the first record of each process says how it computes
            record["runtime"] = self.run_record()
            self._runtime_logged = True
        assert self.sink is not None
        self.sink.log(self.step, record)
        progress.log(self.step, record)


def device_memory_record(device: torch.device) -> dict[str, float]:
    """Peak GPU memory of this process so far, in GiB (allocated tensors and what the caching allocator holds);
    empty on the CPU. The allocator's own counters: no device sync."""
    if device.type != "cuda":
        return {}
    return {"gpu_mem_peak_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "gpu_mem_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}


def _first_difference(saved: Any, wanted: Any, path: str = "") -> str:
    """`key: checkpoint X, config Y` for the first place where two JSON-like values differ."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        for key in sorted(set(saved) | set(wanted), key=str):
            if saved.get(key) != wanted.get(key):
                return _first_difference(saved.get(key), wanted.get(key), f"{path}.{key}" if path else str(key))
    return f"{path or 'value'}: checkpoint {saved!r}, config {wanted!r}"


class MetricWindow:
    """The metrics of the steps since the last log line: per key, the sum and count of its finite values.

    Tensor values are summed where they are (on the GPU: no host sync per step), Python numbers on the host; a
    non-finite value is left out (a skipped step has no grad norm). `reduce` sums every rank's sums and counts in
    one all-reduce and returns the means.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps = 0
        self._sums: dict[str, Any] = {}
        self._counts: dict[str, Any] = {}

    def add(self, metrics: dict[str, Any]) -> None:
        """Fold one step's metrics (floats or 0-dim tensors) in."""
        self.steps += 1
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().to(torch.float64)
                finite = torch.isfinite(value)
                self._sums[key] = self._sums.get(key, 0.0) + torch.where(finite, value, torch.zeros_like(value))
                self._counts[key] = self._counts.get(key, 0.0) + finite.to(torch.float64)
            else:
                ok = math.isfinite(float(value))
                self._sums[key] = self._sums.get(key, 0.0) + (float(value) if ok else 0.0)
                self._counts[key] = self._counts.get(key, 0.0) + (1.0 if ok else 0.0)

    def state(self) -> dict[str, Any]:
        """The window as JSON-able numbers (reads the device; for checkpoints)."""
        return {"steps": self.steps, "sums": {k: float(v) for k, v in self._sums.items()},
                "counts": {k: float(v) for k, v in self._counts.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> "MetricWindow":
        """A window continuing from `state()`."""
        window = cls(device)
        window.steps = int(state["steps"])
        window._sums = {k: float(v) for k, v in state["sums"].items()}
        window._counts = {k: float(v) for k, v in state["counts"].items()}
        return window

    def reduce(self, all_ranks: bool) -> dict[str, float]:
        """Means over the window (and over every rank when `all_ranks`; collective then); keys without a
        finite value are left out."""
        keys = sorted(self._sums)
        if not keys:
            return {}
        parts = [torch.as_tensor(v, dtype=torch.float64).to(self.device).reshape(1)
                 for k in keys for v in (self._sums[k], self._counts[k])]
        packed = torch.cat(parts)
        if all_ranks:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        values = packed.tolist()
        return {k: values[2 * i] / values[2 * i + 1] for i, k in enumerate(keys) if values[2 * i + 1] > 0}


# ------------------------------------------------------------------------------------------------ entry point
def parse_args(description: str, argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line arguments shared by the trainers."""
    parser = OneLineParser(description=description)
    add_config_args(parser)
    parser.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint of the run, if any) "
                                                       "or a checkpoint directory")
    parser.add_argument("--run-dir", default=None, help="run directory (default: train.run_dir)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_main(make_trainer: Callable[[Config, DistInfo, Path, Optional[str]], TrainerBase], description: str,
             argv: Optional[list[str]] = None, use_deepspeed: bool = True,
             input_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Parse args, set up ranks and logging, train, and map failures to exit codes with one-line messages.

    Exit status: 0 done, 2 bad config or input (`ConfigError`, `CheckpointError`, a manifest problem and
    `input_errors`), 3 checkpointed after a signal, 1 other failures (`TrainingStopped`, no readable data).
    """
    args = parse_args(description, argv)
    cfg = config_from_args(args)
    run_dir = Path(args.run_dir or cfg.train.run_dir)
    try:
        info = init_distributed(use_deepspeed=use_deepspeed, timeout=cfg.train.dist_timeout_minutes)
    except DeviceLayoutError as err:
        sys.stderr.write(f"error: {err}\n")
        return EXIT_CONFIG
    setup_logging(info.rank)
    status = EXIT_FAILED
    lock: Optional[RunLock] = None
    try:
        problem = None
        if info.is_main:
            try:
                lock = prepare_run_dir(run_dir, cfg)
            except (RunDirError, RunLockBusy) as err:
                problem = str(err)
        if not all_ranks_true(problem is None, info.device):  # every rank stops, rank 0 says why
            if problem is not None:
                log.error("%s", problem)
            return EXIT_CONFIG
        trainer = make_trainer(cfg, info, run_dir, args.resume)
        status = trainer.run()
        if status == 0:
            log.info("done: %d steps; run directory %s", trainer.step, run_dir)
    except ConfigError as err:
        log.error("config error: %s", err)
        status = EXIT_CONFIG
    except (CheckpointError, ManifestError, *input_errors) as err:
        log.error("%s", err)
        status = EXIT_CONFIG
    except (TrainingStopped, NoReadableSamplesError) as err:
        log.error("training stopped: %s", err)
        status = EXIT_FAILED
    except OSError as err:  # the run directory removed, unwritable or full while training
        log.error("%s", describe_os_error(err, run_dir))
        status = EXIT_CONFIG
    finally:
        if lock is not None:
            lock.release()
        cleanup()
    return status


class RunDirError(ValueError):
    """A run directory that cannot be used, in one line naming it."""


def prepare_run_dir(run_dir: Path, cfg: Config) -> RunLock:
    """Rank 0 before training: create the run directory, take its lock (one trainer per directory, see
    launch/run_lock.py) and write the resolved config.yaml. Raises `RunDirError` / `RunLockBusy` (one line)."""
    import yaml

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir}: exists and is not a directory (--run-dir / train.run_dir)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"run directory {run_dir}: cannot create it ({err.strerror or err})") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RunDirError(f"run directory {run_dir}: not writable by this user")
    try:
        lock = RunLock(run_dir).acquire()
    except OSError as err:
        raise RunDirError(f"run directory {run_dir}: cannot create its lock file ({err.strerror or err})") from None
    try:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    except OSError as err:
        lock.release()
        raise RunDirError(f"run directory {run_dir}: cannot write config.yaml ({err.strerror or err})") from None
    return lock


def describe_os_error(err: OSError, run_dir: Path) -> str:
    """One line for a file-system failure during training: which file, and the cause in words."""
    import errno

    where = err.filename or run_dir
    if not Path(run_dir).is_dir():
        return f"run directory {run_dir} disappeared while training ({err.strerror or err}: {where})"
    if err.errno == errno.ENOSPC:
        free = shutil.disk_usage(run_dir).free / 2**20
        return (f"{where}: no space left on device ({free:.0f} MB free under {run_dir}); the last complete "
                f"checkpoint is intact: free space, then --resume auto")
    return f"{where}: {err.strerror or err}"


def exit_now(status: int) -> None:
    """Exit without the interpreter's slow teardown (everything is written and closed by now).

    Garbage-collecting the engine and the process group at shutdown takes 10-20 s for nothing, multiplied by
    every rank and every requeue.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
