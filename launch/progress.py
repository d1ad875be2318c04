"""Training progress for a terminal and for a log file.

On a terminal (the stream is a TTY) `StepProgress` shows a tqdm bar updated every step. Elsewhere (a SLURM log
file, a pipe) a bar is thousands of carriage-return redraws in the file, so it writes nothing per step and one
plain `logging` line per logging step instead:

    step 1200/400000 (0.3%) loss 0.1432 lr 0.0001 2105 img/s eta 3d 4h
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, Mapping, Optional, TextIO

log = logging.getLogger(__name__)

# Record keys shown (when present), in this order; `samples_per_s` is shown as img/s.
SHOWN_KEYS = ("loss", "rec", "lpips", "d_loss", "grad_norm", "lr")


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def format_duration(seconds: float) -> str:
    """A short duration for humans: `3d 4h`, `4h 12m`, `12m 5s`, `45s`."""
    s = max(int(round(seconds)), 0)
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _value(key: str, value: float) -> str:
    return f"{value:.3g}" if key == "lr" else f"{value:.4g}"


class StepProgress:
    """Progress of a run from step `initial` to `total`: a tqdm bar on a TTY, else one log line per `log` call.

    `enabled=False` (other ranks, `train.progress: false`) makes every method a no-op. `stream` is where a bar
    would go (default: sys.stderr); only whether it is a TTY matters otherwise, the lines go through `logging`
    (logger `launch.progress`, or `logger`). `clock` measures the ETA (seconds, monotonic).
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True,
                 stream: Optional[TextIO] = None, logger: Optional[logging.Logger] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.initial, self.desc, self.enabled = int(total), int(initial), desc, bool(enabled)
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.enabled and _is_tty(self.stream)
        self._log = logger or log
        self._clock = clock
        self._start = (clock(), self.initial)
        self._first_log: Optional[tuple[float, int]] = None  # the ETA rate skips start-up (model build, compile)
        self._bar: Any = None
        if self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.initial, desc=desc, dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1) -> None:
        """`n` more steps done (advances the bar; nothing in a log file)."""
        if self._bar is not None:
            self._bar.update(n)

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        """At a logging step: the bar's postfix on a TTY, else one log line (step, %, metrics, img/s, ETA)."""
        if not self.enabled:
            return
        if self._bar is not None:
            shown = {k: _value(k, float(record[k])) for k in SHOWN_KEYS if k in record}
            if "samples_per_s" in record:
                shown["img/s"] = f"{float(record['samples_per_s']):.4g}"
            self._bar.set_postfix(shown)
            return
        self._log.info("%s", self._line(step, record))

    def _line(self, step: int, record: Mapping[str, Any]) -> str:
        # the first call also fixes the ETA's reference point
        now = self._clock()
        parts = [f"step {step}/{self.total}"]
        if self.total > 0:
            parts.append(f"({100.0 * step / self.total:.1f}%)")
        parts += [f"{k} {_value(k, float(record[k]))}" for k in SHOWN_KEYS if k in record]
        if "samples_per_s" in record:
            rate = float(record["samples_per_s"])
            parts.append(f"{rate:.0f} img/s" if rate >= 100 else f"{rate:.3g} img/s")
        for key, label in (("nonfinite_steps", "nonfinite"), ("corrupt_samples", "corrupt"),
                           ("bad_shards", "bad shards")):
            if int(record.get(key, 0) or 0) > 0:
                parts.append(f"{label} {int(record[key])}")
        eta = self._eta(now, step)
        if eta is not None:
            parts.append(f"eta {format_duration(eta)}")
        if self._first_log is None:
            self._first_log = (now, step)
        return " ".join(parts)

    def _eta(self, now: float, step: int) -> Optional[float]:
        t0, s0 = self._first_log if self._first_log is not None and step > self._first_log[1] else self._start
        if step <= s0 or now <= t0 or step >= self.total:
            return None
        return max(self.total - step, 0) * (now - t0) / (step - s0)

    def close(self) -> None:
        """Finish the bar (nothing to do for a log file)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
