"""Run launch/train.py with faults injected from the outside (the trainer has no test hooks of its own).

    python tests/support/faults.py FAULT:STEP[,FAULT:STEP...] -- <launch/train.py arguments>
    torchrun ... tests/support/faults.py kill_in_save:6 -- <launch/train.py arguments>

Faults (STEP counts optimizer steps from 1, as the log does):
- nan_loss_from:N  every training forward from step N on returns NaN (the loss is non-finite on every rank);
- inf_grad_at:N    one gradient value is set to inf before step N's optimizer step (ZeRO-0: the trainer's check);
- nan_weight_at:N  a weight is set to NaN right after step N (the checkpoint must refuse it);
- kill_in_save:N   rank 0 kills itself (SIGKILL) half-way through writing the checkpoint of step N.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def parse(spec: str) -> dict[str, int]:
    faults = {}
    for item in spec.split(","):
        name, _, step = item.partition(":")
        if name not in ("nan_loss_from", "inf_grad_at", "nan_weight_at", "kill_in_save") or not step.isdigit():
            raise SystemExit(f"faults.py: bad fault {item!r}")
        faults[name] = int(step)
    return faults


def install(faults: dict[str, int]) -> None:
    """Wrap the trainer's methods so that the faults happen at their steps."""
    import torch

    from launch import train

    trainer_cls = train.Trainer
    if "nan_loss_from" in faults:
        model_fn = trainer_cls._model_fn

        def nan_model_fn(self, *args, **kwargs):
            out = model_fn(self, *args, **kwargs)
            return out * float("nan") if self.step + 1 >= faults["nan_loss_from"] else out

        trainer_cls._model_fn = nan_model_fn
    if "inf_grad_at" in faults:
        check = trainer_cls._check_and_clip

        def inf_grad_check(self):
            if self.step + 1 == faults["inf_grad_at"] and self.engine.is_gradient_accumulation_boundary():
                with torch.no_grad():  # every rank: the gradients are all-reduced by now
                    self.params[0].grad.view(-1)[0] = float("inf")
            return check(self)

        trainer_cls._check_and_clip = inf_grad_check
    if "nan_weight_at" in faults:
        step_fn = trainer_cls.train_step

        def nan_weight_step(self):
            metrics = step_fn(self)
            if self.step == faults["nan_weight_at"]:
                with torch.no_grad():
                    self.params[0].view(-1)[0] = float("nan")
            return metrics

        trainer_cls.train_step = nan_weight_step
    if "kill_in_save" in faults:
        save_state = trainer_cls.save_state

        def dying_save_state(self, tmp):
            save_state(self, tmp)
            if self.step == faults["kill_in_save"] and self.info.is_main:
                os.kill(os.getpid(), 9)  # half-way: the optimizer state is written, meta.json is not

        trainer_cls.save_state = dying_save_state


def main() -> int:
    faults = parse(sys.argv[1])
    install(faults)
    from launch import train

    return train.main(sys.argv[sys.argv.index("--") + 1:])


if __name__ == "__main__":
    from launch.trainer_base import exit_now

    exit_now(main())
