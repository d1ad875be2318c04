"""Build the DiT trainer in-process from launch/train.py arguments, as `run_main` does, for test harnesses."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def build_trainer(argv: list[str]) -> Any:
    """The `launch.train.Trainer` of these arguments (process group, logging and all), not yet run."""
    from data_pipeline.dist_env import init_distributed
    from eval.config import config_from_args
    from launch.run_utils import setup_logging
    from launch.train import Trainer
    from launch.trainer_base import parse_args

    args = parse_args("test harness", argv)
    cfg = config_from_args(args)
    info = init_distributed()
    setup_logging(info.rank)
    return Trainer(cfg, info, Path(args.run_dir), args.resume)
