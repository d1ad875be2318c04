"""The optimizer's training state in a form any number of ranks can load: resume on another number of GPUs.

DeepSpeed's own checkpoints of ZeRO 1-3 store each rank's flat partition of the fp32 master weights and the Adam
moments; they only load on the same number of ranks (a different one raises ZeRORuntimeException), and they are
pickles. Here every rank writes what it owns, per parameter, as safetensors slices tagged with their offset in the
flattened parameter:

    optim/rank_00003.safetensors   "blocks.0.attn.qkv.weight|exp_avg|1048576" -> fp32 [numel], ...

with keys `weight` (the fp32 master weights), `exp_avg` and `exp_avg_sq` (AdamW's moments). ZeRO-0 keeps full
copies on every rank: rank 0 alone writes them. The optimizer's scalars (Adam's step count, the hyper-parameters,
the LR scheduler, the engine's counters) are JSON in the checkpoint's meta.json (`describe`).

Loading on M ranks at any ZeRO stage: each rank reads, from every file, the ranges of the parameters it owns (the
files are opened lazily, slices read on demand) and writes them into its own partition. On the same number of ranks
and stage this restores the identical state (bitwise resume); elsewhere the same values partitioned anew.
The parameter names, shapes and coverage are checked; a mismatch is a `StateError` naming the file.
"""
from __future__ import annotations

import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from data_pipeline.files import atomic_save_safetensors

KEYS = ("weight", "exp_avg", "exp_avg_sq")
STATE_DIR = "optim"
FILE_RE = re.compile(r"^rank_(\d{5})\.safetensors$")


class StateError(ValueError):
    """An optimizer state that does not fit this run, in one line naming the file or parameter."""


@dataclass
class Fragment:
    """The part [start, start + numel) of a flattened parameter that this rank's optimizer owns, as 1-D views."""

    name: str
    start: int
    numel: int
    views: dict[str, torch.Tensor]  # KEYS -> 1-D tensors of `numel` values (writable views into the live state)
    module_param: Optional[torch.Tensor] = None  # ZeRO-0/3: the module's storage of the same values, kept in sync


def _stage(engine: Any) -> int:
    return int(engine.zero_optimization_stage())


def _base_optimizer(engine: Any) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return opt.optimizer if _stage(engine) > 0 else opt


def _ensure_adam_state(opt: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """AdamW's state of `param`, created (zero moments, step 0) when the optimizer has not stepped yet."""
    state = opt.state[param]
    if "exp_avg" not in state:
        # (ZeRO-3 puts its flat partitions into the param groups only while it steps them: read the defaults)
        on_device = opt.defaults.get("fused") or opt.defaults.get("capturable")
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


def _names(engine: Any) -> dict[int, str]:
    return {id(p): n for n, p in engine.module.named_parameters()}


def local_fragments(engine: Any) -> Iterator[Fragment]:
    """The parameter fragments whose optimizer state this rank owns (ZeRO-0: every parameter, on every rank)."""
    stage, names = _stage(engine), _names(engine)
    if stage == 0:
        opt = _base_optimizer(engine)
        for name, p in engine.module.named_parameters():
            if not p.requires_grad:
                continue
            st = _ensure_adam_state(opt, p)
            yield Fragment(name, 0, p.numel(), {"weight": p.data.view(-1), "exp_avg": st["exp_avg"].view(-1),
                                                "exp_avg_sq": st["exp_avg_sq"].view(-1)}, module_param=p.data)
    elif stage in (1, 2):
        zero = engine.optimizer
        for i, flat in enumerate(zero.single_partition_of_fp32_groups):
            st = _ensure_adam_state(zero.optimizer, flat)
            for p in zero.bit16_groups[i]:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:
                    continue
                hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
                views = {"weight": flat.narrow(0, hp.start, hp.numel),
                         "exp_avg": st["exp_avg"].narrow(0, hp.start, hp.numel),
                         "exp_avg_sq": st["exp_avg_sq"].narrow(0, hp.start, hp.numel)}
                yield Fragment(names[id(p)], lp.start, lp.numel, views)
    else:
        zero = engine.optimizer
        for flat in zero.fp32_partitioned_groups_flat:
            _ensure_adam_state(zero.optimizer, flat)
        rank = dist.get_rank(group=getattr(zero, "dp_process_group", None))
        for p in engine.module.parameters():
            if not p.requires_grad:
                continue
            part = p.ds_tensor.numel()
            start = rank * part
            valid = max(0, min(part, p.ds_numel - start))
            if valid == 0:
                continue
            views = {}
            for key in KEYS:
                full, _ = zero._get_fp32_opt_state_partition(p, release_swap_buffers=False,
                                                             optim_state_key=None if key == "weight" else key)
                views[key] = full.narrow(0, 0, valid)
            yield Fragment(names[id(p)], start, valid, views, module_param=p.ds_tensor.data.narrow(0, 0, valid))


def _adam_states(engine: Any) -> list[dict[str, Any]]:
    opt = _base_optimizer(engine)
    return [s for s in opt.state.values() if "exp_avg" in s]


def describe(engine: Any) -> dict[str, Any]:
    """The JSON part of the optimizer state: Adam's step, hyper-parameters, the LR scheduler, engine counters."""
    steps = {float(s["step"]) for s in _adam_states(engine)}
    if len(steps) > 1:
        raise StateError(f"AdamW step counts differ between parameters ({sorted(steps)}): not a trainer state")
    opt = _base_optimizer(engine)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    return {"adam_step": steps.pop() if steps else 0.0, "param_groups": _jsonable(groups), "lr_scheduler": _jsonable(sched),
            "global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples),
            "skipped_steps": int(engine.skipped_steps), "zero_stage": _stage(engine),
            "shapes": {n: list(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
                       for n, p in engine.module.named_parameters() if p.requires_grad}}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return None  # callables (e.g. LambdaLR's lambdas, which its state_dict stores as None anyway)


def save(engine: Any, ckpt_dir: Path, rank: int) -> None:
    """Write this rank's fragments into `ckpt_dir/optim/` (every rank calls it; ZeRO-0: rank 0 writes)."""
    if _stage(engine) == 0 and rank != 0:
        return
    out = Path(ckpt_dir) / STATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{f.name}|{key}|{f.start}": f.views[key].detach().to("cpu", torch.float32).contiguous()
               for f in local_fragments(engine) for key in KEYS}
    atomic_save_safetensors(tensors, out / f"rank_{rank:05d}.safetensors", metadata={"format": "ditstack-optim-1"})


class _Index:
    """Where each (parameter, key) range lives in a checkpoint's optim/ files (opened lazily, read by slice)."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        from safetensors import safe_open

        files = sorted(p for p in Path(folder).iterdir() if FILE_RE.match(p.name)) if Path(folder).is_dir() else []
        if not files:
            raise StateError(f"{folder}: no optimizer state files (rank_*.safetensors)")
        self.pieces: dict[tuple[str, str], list[tuple[int, int, Any, str, Path]]] = {}
        for path in files:
            try:
                handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except Exception as err:  # noqa: BLE001 - safetensors raises several types for a bad file
                raise StateError(f"{path}: unreadable optimizer state ({type(err).__name__}: {err})") from None
            for tname in handle.keys():
                name, _, rest = tname.partition("|")
                key, _, start = rest.partition("|")
                if key not in KEYS or not start.isdigit():
                    raise StateError(f"{path}: unexpected tensor {tname!r}")
                numel = handle.get_slice(tname).get_shape()
                if len(numel) != 1:
                    raise StateError(f"{path}: tensor {tname!r} is not 1-D")
                self.pieces.setdefault((name, key), []).append((int(start), int(numel[0]), handle, tname, path))

    def read(self, name: str, key: str, lo: int, n: int, folder: Path) -> torch.Tensor:
        """Values [lo, lo + n) of flattened parameter `name`'s `key`, assembled from every file that holds some."""
        out = torch.empty(n, dtype=torch.float32)
        covered = 0
        for start, numel, handle, tname, _ in self.pieces.get((name, key), []):
            a, b = max(lo, start), min(lo + n, start + numel)
            if a < b:
                out[a - lo: b - lo] = handle.get_slice(tname)[a - start: b - start].to(torch.float32)
                covered += b - a
        if covered != n:
            raise StateError(f"{folder}: {name} ({key}) covers {covered} of the {n} values this rank needs")
        return out


@torch.no_grad()
def load(engine: Any, ckpt_dir: Path, record: dict[str, Any]) -> None:
    """Restore the optimizer state written by `save` (any number of ranks, any ZeRO stage) into `engine`,
    with `record` the `describe` output stored in meta.json."""
    folder = Path(ckpt_dir) / STATE_DIR
    shapes = {n: list(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
              for n, p in engine.module.named_parameters() if p.requires_grad}
    if record.get("shapes") != shapes:
        saved = record.get("shapes") or {}
        diff = sorted(set(saved) ^ set(shapes)) or sorted(k for k in shapes if saved.get(k) != shapes[k])
        raise StateError(f"{folder}: the optimizer state's parameters do not match this model (first: {diff[:1]})")
    with ExitStack() as stack:
        index = _Index(folder, stack)
        for frag in local_fragments(engine):
            for key in KEYS:
                frag.views[key].copy_(index.read(frag.name, key, frag.start, frag.numel, folder))
            if frag.module_param is not None:
                frag.module_param.view(-1).copy_(frag.views["weight"])
    if _stage(engine) in (1, 2):
        _refresh_module_weights(engine, index_folder=folder, record=record)
    step = float(record.get("adam_step", 0.0))
    for st in _adam_states(engine):
        st["step"].fill_(step)
    opt = _base_optimizer(engine)
    for group, saved in zip(opt.param_groups, record.get("param_groups") or []):
        for k in ("lr", "initial_lr"):
            if k in saved:
                group[k] = saved[k]
    if engine.lr_scheduler is not None and record.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(record["lr_scheduler"])
    engine.global_steps = int(record.get("global_steps", 0))
    engine.global_samples = int(record.get("global_samples", 0))
    engine.skipped_steps = int(record.get("skipped_steps", 0))


def _refresh_module_weights(engine: Any, index_folder: Path, record: dict[str, Any]) -> None:
    """ZeRO 1/2 keep full module weights on every rank beside the partitioned fp32 masters: fill them from the
    files too (each rank reads whole parameters)."""
    with ExitStack() as stack:
        index = _Index(index_folder, stack)
        for name, p in engine.module.named_parameters():
            if p.requires_grad:
                p.data.view(-1).copy_(index.read(name, "weight", 0, p.numel(), index_folder).to(p.dtype))
