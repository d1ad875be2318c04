"""Load a training checkpoint into a fresh trainer (any number of ranks, any ZeRO stage) and write the optimizer
state it then holds, without training a step.

    torchrun --nproc_per_node M tests/support/resave_optimizer_state.py OUT_DIR -- <launch/train.py arguments>

OUT_DIR/optim/ is written by `launch.optimizer_state.save` from the loaded engine, OUT_DIR/describe.json holds its
JSON record: the tests compare both with the checkpoint's own (a resume on another number of ranks must hold the
very same state).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> int:
    out = Path(sys.argv[1])
    from data_pipeline.dist_env import barrier, cleanup
    from launch import optimizer_state
    from tests.support.trainer_harness import build_trainer

    trainer = build_trainer(sys.argv[sys.argv.index("--") + 1:])
    info = trainer.info
    optimizer_state.save(trainer.engine, out, info.rank)
    record = optimizer_state.describe(trainer.engine)
    if info.is_main:
        (out / "describe.json").write_text(json.dumps(record))
    barrier()
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
