"""launch/progress.py: a tqdm bar on a terminal, one plain log line per logging step in a log file."""
from __future__ import annotations

import io
import logging
import re

import pytest

from launch.progress import StepProgress, format_duration


class TTYStream(io.StringIO):
    """A terminal as far as isatty() is concerned."""

    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def log_to(request):
    """Send launch.progress's records to a stream (as setup_logging's stderr handler would); yields a setter."""
    logger = logging.getLogger("launch.progress")
    handlers: list[logging.Handler] = []

    def attach(stream: io.StringIO) -> None:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        handlers.append(handler)

    level = logger.level
    logger.setLevel(logging.INFO)
    yield attach
    for handler in handlers:
        logger.removeHandler(handler)
    logger.setLevel(level)


RECORD = {"loss": 0.14321, "lr": 1e-4, "samples_per_s": 2105.3, "step_time": 0.12, "epoch": 0,
          "nonfinite_steps": 0, "corrupt_samples": 0, "grad_norm": 0.5}


def test_log_file_gets_one_line_per_log_call_and_no_carriage_returns(log_to):
    stream = io.StringIO()  # not a TTY: a SLURM log file
    log_to(stream)
    clock = FakeClock()
    progress = StepProgress(total=400, initial=100, desc="dit", stream=stream, clock=clock)
    log_steps = 0
    for step in range(101, 301):
        clock.now += 0.5
        progress.update(1)
        if step % 50 == 0:
            progress.log(step, RECORD)
            log_steps += 1
    progress.close()
    text = stream.getvalue()
    assert "\r" not in text and "it/s" not in text
    lines = text.splitlines()
    assert len(lines) == log_steps == 4
    assert lines[0] == ("INFO launch.progress: step 150/400 (37.5%) loss 0.1432 grad_norm 0.5 lr 0.0001 2105 img/s "
                        "eta 2m 5s")
    # later lines measure the rate from the first logging step: 0.5 s per step, 100 steps left at step 300
    assert lines[-1].endswith("step 300/400 (75.0%) loss 0.1432 grad_norm 0.5 lr 0.0001 2105 img/s eta 50s")


def test_log_line_format_long_run(log_to):
    stream = io.StringIO()
    log_to(stream)
    clock = FakeClock()
    progress = StepProgress(total=400000, initial=0, stream=stream, clock=clock)
    clock.now += 1200 * 0.75
    progress.log(1200, {"loss": 0.1432, "lr": 1e-4, "samples_per_s": 2105, "nonfinite_steps": 3})
    line = stream.getvalue().strip()
    assert line.endswith("step 1200/400000 (0.3%) loss 0.1432 lr 0.0001 2105 img/s nonfinite 3 eta 3d 11h")


def test_terminal_gets_a_tqdm_bar(log_to):
    stream = TTYStream()
    logs = io.StringIO()
    log_to(logs)
    progress = StepProgress(total=20, initial=5, desc="dit", stream=stream)
    assert progress.tty
    for step in range(6, 21):
        progress.update(1)
        if step % 5 == 0:
            progress.log(step, RECORD)
    progress.close()
    text = stream.getvalue()
    assert "\r" in text and "dit" in text and "20/20" in text
    assert re.search(r"loss=0\.1432.*lr=0\.0001.*img/s=2105", text), text
    assert logs.getvalue() == ""  # the bar shows the metrics; no log lines on a terminal


def test_disabled_is_silent(log_to):
    stream = TTYStream()
    logs = io.StringIO()
    log_to(logs)
    with StepProgress(total=10, enabled=False, stream=stream) as progress:
        progress.update(1)
        progress.log(1, RECORD)
    assert stream.getvalue() == "" and logs.getvalue() == ""


def test_stream_without_isatty_is_a_log_file():
    class Sink:
        def write(self, text: str) -> None:
            raise AssertionError("nothing is written to the stream of a log file")

    progress = StepProgress(total=10, stream=Sink())  # type: ignore[arg-type]
    assert not progress.tty
    progress.update(3)
    progress.close()


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (45.4, "45s"), (725, "12m 5s"), (4 * 3600 + 720, "4h 12m"),
                                          (3 * 86400 + 4 * 3600 + 59, "3d 4h")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_last_step_has_no_eta(log_to):
    stream = io.StringIO()
    log_to(stream)
    clock = FakeClock()
    progress = StepProgress(total=10, stream=stream, clock=clock)
    clock.now += 5
    progress.log(10, {"loss": 1.0})
    assert stream.getvalue().strip().endswith("step 10/10 (100.0%) loss 1")


def test_log_line_shows_data_faults_when_there_are_any():
    import io
    import logging

    from launch.progress import StepProgress

    stream = io.StringIO()
    logger = logging.getLogger("test.progress.faults")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        bar = StepProgress(total=10, enabled=True, stream=stream, logger=logger)
        bar.update(5)
        bar.log(5, {"loss": 0.5, "corrupt_samples": 37, "bad_shards": 1, "nonfinite_steps": 0})
        bar.close()
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue().strip().splitlines()[-1]
    assert "corrupt 37" in line and "bad shards 1" in line and "nonfinite" not in line
