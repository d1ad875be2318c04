"""Count the host reads of tensor values in REPA training steps (tests/support/host_reads.py's recorder).

    python tests/support/repa_host_reads.py OUT.json STEPS -- <launch/train.py arguments with repa.enabled>

As host_reads.py: one warm-up step, then STEPS steps (`train_step`, `step_end`) recorded with the trainer's
`host_reads` switched off as on a GPU. OUT.json: {"reads": [[function, "file:line"], ...], "terms": [metric keys]}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> int:
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    from data_pipeline.dist_env import cleanup
    from tests.support.host_reads import HostReads
    from tests.support.trainer_harness import build_trainer

    trainer = build_trainer(sys.argv[sys.argv.index("--") + 1:])
    trainer.host_reads = False
    trainer.iterator = iter(trainer.stream)
    trainer.train_step()
    trainer.step_end(False)
    mode = HostReads()
    terms: list[str] = []
    with mode:
        for _ in range(steps):
            terms = sorted(trainer.train_step())
            trainer.step_end(False)
    if trainer.info.is_main:
        out.write_text(json.dumps({"reads": mode.reads, "terms": terms}))
    trainer.stream.close()
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
