"""Count the training step's host reads of tensor values: on a GPU each one waits for the device's queue.

    python tests/support/host_reads.py OUT.json STEPS -- <launch/train.py arguments>

Builds the DiT trainer, runs one warm-up step, then STEPS steps as the run loop does (`train_step` and
`step_end`; not the logging, checkpoint or sampling steps, which read their values on purpose) under a function
mode that records every `item`, `tolist`, `__bool__`, `__float__`, `__int__`, `__index__` or `numpy` of a tensor,
with the file and line that asked. On this CPU the reads cost nothing, but the same calls wait on a GPU. Reads by
`launch/deferred.py` (of a host copy made one step earlier: its purpose) and by data_pipeline/ (host data, before
it is copied to the device) are not counted. The trainer's `host_reads` is switched off, as on a GPU.
OUT.json: {"reads": [[function, "file:line"], ...]}.
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"}


class HostReads(TorchFunctionMode):
    """Records host reads of tensor values with their caller."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[list[str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            frames = [f for f in traceback.extract_stack()[:-1] if "torch/overrides" not in f.filename]
            caller = frames[-1]
            if not caller.filename.endswith("launch/deferred.py") and "/data_pipeline/" not in caller.filename:
                where = f"{Path(caller.filename).name}:{caller.lineno}"
                self.reads.append([name, where])
        return func(*args, **(kwargs or {}))


def main() -> int:
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    from data_pipeline.dist_env import cleanup
    from tests.support.trainer_harness import build_trainer

    trainer = build_trainer(sys.argv[sys.argv.index("--") + 1:])
    trainer.host_reads = False
    trainer.iterator = iter(trainer.stream)
    trainer.train_step()
    trainer.step_end(False)
    mode = HostReads()
    with mode:
        for _ in range(steps):
            trainer.train_step()
            trainer.step_end(False)
    if trainer.info.is_main:
        out.write_text(json.dumps({"reads": mode.reads,
                                    "blocks": sorted({type(b).__name__ for b in trainer.engine.module.blocks})}))
    trainer.stream.close()
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
