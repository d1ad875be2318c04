"""Valid ranges of numbers, and one-line errors for bad command-line input.

Every numeric config key (eval/config.py) and every numeric flag of the entry points declares a `Range`; a value
outside it, NaN or an infinity is refused with one line naming the key or flag, the range and, where a bound is a
judgement rather than a law, why. `OneLineParser` makes argparse's own usage errors one line too (exit status 2).
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Union

Number = Union[int, float]

__all__ = ["Range", "number_arg", "guide_channels_arg", "device_arg", "device_problem", "output_dir_problem",
           "OneLineParser", "EXIT_BAD_INPUT"]

EXIT_BAD_INPUT = 2


def _fmt(v: Number) -> str:
    """A bound as people read it: 10^12 and 2^32-1 rather than 1000000000000 and 4294967295."""
    if isinstance(v, int) and abs(v) >= 10**5:
        sign, a = ("-" if v < 0 else ""), abs(v)
        for k in range(5, 40):
            if a == 10**k:
                return f"{sign}10^{k}"
        for k in range(16, 128):
            if a == 2**k:
                return f"{sign}2^{k}"
            if a == 2**k - 1:
                return f"{sign}2^{k}-1"
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


@dataclass(frozen=True)
class Range:
    """The valid values of a number: ``lo..hi``, each end closed unless marked open.

    ``why`` says why the upper bound is where it is when that is a judgement (e.g. a bound that catches a typo, or
    one that keeps memory finite); it is part of the message for a value above the range.
    """

    lo: Number
    hi: Number
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""

    def __str__(self) -> str:
        return f"{'(' if self.lo_open else '['}{_fmt(self.lo)}, {_fmt(self.hi)}{')' if self.hi_open else ']'}"

    def __contains__(self, value: Number) -> bool:
        return self.problem(value) is None

    def problem(self, value: Number) -> Optional[str]:
        """None when ``value`` lies in the range, else what is wrong with it, in a few words (no key or flag)."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"{value} is not a finite number; valid range {self}"
        if value < self.lo or (self.lo_open and value == self.lo):
            return f"{value} is out of range {self}"
        if value > self.hi or (self.hi_open and value == self.hi):
            return f"{value} is out of range {self}" + (f" ({self.why})" if self.why else "")
        return None


def number_arg(kind: type, rng: Range) -> Callable[[str], Number]:
    """An argparse ``type=``: parse an int or float and check it against ``rng`` (NaN and infinities refused)."""
    def parse(text: str) -> Number:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        problem = rng.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__
    return parse


MAX_CHANNELS = 1024  # the config's bound on model.in_channels


def guide_channels_arg(text: str) -> str:
    """An argparse ``type=`` for ``--guide-channels``: 'all' or a channel count in [1, MAX_CHANNELS] (as a string,
    the form the samplers and the recorded settings use)."""
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or a number of channels, got {text!r}") from None
    problem = Range(1, MAX_CHANNELS).problem(value)
    if problem:
        raise argparse.ArgumentTypeError(f"expected 'all' or a number of channels; {problem}")
    return str(value)


def device_problem(text: str) -> Optional[str]:
    """None when ``text`` names a device this machine has, else why not (one line, without the flag)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        return f"{text!r} is not a device (cpu, cuda, cuda:N, mps)"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"{text}: CUDA is not available on this machine (torch.cuda.is_available() is False)"
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            return f"{text}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        return f"{text}: MPS is not available on this machine"
    return None


def device_arg(text: str) -> str:
    """An argparse ``type=`` for ``--device``: a device string this machine has."""
    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def output_dir_problem(path: Union[str, os.PathLike]) -> Optional[str]:
    """None when ``path`` is a directory or can be created as one, else why not (no flag; names the blocking path)."""
    p = Path(path)
    if p.exists():
        return None if p.is_dir() else f"{p} exists and is not a directory"
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is not a directory"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{parent} is not writable"
            return None
    return None


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr and exit status 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE`` as one line and exit with status 2."""
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def check_all(checks: list[tuple[str, Any, Range]]) -> Optional[str]:
    """The first problem among (name, value, range) triples as ``NAME: problem`` (None values skipped), else None."""
    for name, value, rng in checks:
        if value is None:
            continue
        problem = rng.problem(value)
        if problem:
            return f"{name}: {problem}"
    return None
