"""EMA of a DeepSpeed-wrapped model's weights, correct for every ZeRO stage.

Stages 0-2 keep full parameters on every rank, so each rank keeps the same full fp32 EMA. Under ZeRO-3 a rank
only holds its partition (`param.ds_tensor`): each rank averages its own partition, which costs no communication
per step, and the full EMA is gathered only when it is saved or sampled from.

`every=k` (config `train.ema_every`) folds the weights in every k-th optimizer step with decay**n, n being the
applied steps since the last update: ema <- d^n ema + (1 - d^n) w_now instead of the per-step recursion
ema <- d^n ema + (1 - d) sum_i d^(n-i) w_i. Both put the same total weight 1 - d^n on the last n steps; the
approximation puts it all on the newest weights, an error of order n (1 - d) times the weight change over those n
steps (for d = 0.9999 and n = 4, a 4e-4 share of a few steps of drift). k = 1 is the exact recursion (DiT recipe).
The not yet folded-in count `pending` is part of the training state (saved in checkpoints), so a resumed run
continues exactly; exports and samples use the average brought up to date (`state_dict_on_main`, `copy_to`).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from dit.ema import update_ema


def _is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor") and hasattr(p, "ds_numel")


class EngineEMA:
    """fp32 exponential moving average of `module`'s named parameters (ZeRO-3 aware), updated every `every` steps.

    Whether a step was applied may be a device tensor: the count of pending steps and the decay live on the
    device, so an update never waits for the host.
    """

    def __init__(self, module: nn.Module, decay: float, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"EMA update interval must be >= 1, got {every}")
        self.decay, self.every = decay, every
        self.names = [n for n, _ in module.named_parameters()]
        self.params = [p for _, p in module.named_parameters()]
        self.partitioned = any(_is_zero3_param(p) for p in self.params)
        # persistent buffers (e.g. the fixed sin-cos pos_embed) are copied into exports, not averaged
        state_keys = set(module.state_dict().keys())
        self.buffers = {n: b for n, b in module.named_buffers() if n in state_keys}
        with torch.no_grad():
            self.shadow = [self._local(p).detach().float().clone() for p in self.params]
        # applied optimizer steps not yet folded into the average (a device counter: see `after_step`)
        self._pending = torch.zeros((), dtype=torch.long, device=self.shadow[0].device)

    @property
    def pending(self) -> int:
        """Applied optimizer steps not yet folded into the average (reads the device)."""
        return int(self._pending)

    def _local(self, p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor if self.partitioned else p

    @torch.no_grad()
    def update(self, decay: Optional[float] = None) -> None:
        """Fold the current weights into the average now, with `decay` (default: the configured one)."""
        update_ema(self.shadow, [self._local(p).detach() for p in self.params],
                   self.decay if decay is None else decay)

    @torch.no_grad()
    def _fold_pending(self, shadow: list[torch.Tensor]) -> None:
        """ema <- d^n ema + (1 - d^n) w for the n pending steps, with n read on the device (n = 0: unchanged)."""
        decay = torch.pow(torch.full((), self.decay, dtype=torch.float64, device=self._pending.device),
                          self._pending)
        weight = (1.0 - decay).to(shadow[0].dtype)
        src = [self._local(p).detach() for p in self.params]
        src = [p.to(e.dtype) if p.dtype != e.dtype else p for e, p in zip(shadow, src)]
        torch._foreach_lerp_(shadow, src, [weight] * len(shadow))

    def after_step(self, step: int, applied: Union[bool, torch.Tensor]) -> bool:
        """Account for optimizer step `step` (1-based; `applied`: a bool or a bool tensor on the device); fold the
        pending steps in when `step` is a multiple of `every`. Returns whether `step` was such an update step.
        Every rank calls it with the same arguments."""
        if isinstance(applied, torch.Tensor):
            self._pending += applied.to(device=self._pending.device, dtype=torch.long)
        elif applied:
            self._pending += 1
        if step % self.every:
            return False
        self._fold_pending(self.shadow)
        self._pending.zero_()
        return True

    @torch.no_grad()
    def _current_shadow(self) -> list[torch.Tensor]:
        """The local average brought up to date with the pending steps (new tensors; the state is unchanged)."""
        if self.pending == 0:
            return self.shadow
        out = [s.clone() for s in self.shadow]
        self._fold_pending(out)
        return out

    @torch.no_grad()
    def state_dict_on_main(self, up_to_date: bool = True) -> Optional[dict[str, torch.Tensor]]:
        """The full EMA weights in host memory on rank 0, None on the other ranks (collective under ZeRO-3: the
        partitions are gathered to rank 0 alone, one tensor at a time).

        `up_to_date=True` folds in the pending steps (for sampling and exports); False gives the stored average
        itself, which together with `pending` is the exact training state (for checkpoints)."""
        shadow = self._current_shadow() if up_to_date else self.shadow
        is_main = not dist.is_initialized() or dist.get_rank() == 0
        out = {n: b.detach().float().cpu().clone() for n, b in self.buffers.items()} if is_main else None
        if not self.partitioned:
            if out is not None:
                out.update({n: s.detach().cpu().clone() for n, s in zip(self.names, shadow)})
            return out
        for name, p, part in zip(self.names, self.params, shadow):
            full = self._gather_full(p, part, to_all=False)
            if out is not None:
                out[name] = full.cpu()
        return out

    @torch.no_grad()
    def copy_to(self, module: Optional[nn.Module], everywhere: bool = True) -> None:
        """Write the up-to-date EMA weights into `module` (same architecture), on the module's device: no host
        copy. `everywhere=False`: only rank 0 passes a module (others pass None; under ZeRO-3 the partitions are
        gathered to rank 0 alone). Collective under ZeRO-3."""
        shadow = self._current_shadow()
        targets = dict(module.named_parameters()) if module is not None else {}
        buffers = dict(module.named_buffers()) if module is not None else {}
        for name, p, part in zip(self.names, self.params, shadow):
            full = self._gather_full(p, part, to_all=everywhere) if self.partitioned else part
            if module is not None:
                targets[name].copy_(full.view_as(targets[name]))
        for name, b in self.buffers.items():
            if name in buffers:
                buffers[name].copy_(b)

    def _gather_full(self, p: torch.Tensor, part: torch.Tensor, to_all: bool) -> torch.Tensor:
        """The full tensor of ZeRO-3 parameter `p` from every rank's EMA partition `part` (on every rank when
        `to_all`, else on rank 0 only; other ranks get an empty tensor)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        part = part.contiguous()
        if to_all:
            pieces = [torch.empty_like(part) for _ in range(world)]
            dist.all_gather(pieces, part)
        else:
            pieces = [torch.empty_like(part) for _ in range(world)] if rank == 0 else None
            dist.gather(part, pieces, dst=0)
            if rank != 0:
                return part.new_empty(0)
        assert pieces is not None
        return torch.cat(pieces)[: p.ds_numel].view(p.ds_shape)

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor], pending: int = 0) -> None:
        """Set the average from full weights (each ZeRO-3 rank keeps its own slice) and the pending step count."""
        self._pending.fill_(int(pending))
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]}")
        rank = dist.get_rank() if self.partitioned else 0
        for name, p, shadow in zip(self.names, self.params, self.shadow):
            full = state[name].to(device=shadow.device, dtype=torch.float32)
            if self.partitioned:
                flat = full.flatten()
                size = shadow.numel()
                lo = rank * size
                chunk = flat[lo: lo + size]
                shadow.zero_()
                shadow[: chunk.numel()].copy_(chunk)
            else:
                if full.shape != shadow.shape:
                    raise ValueError(f"EMA tensor {name}: shape {tuple(full.shape)} != {tuple(shadow.shape)}")
                shadow.copy_(full)

    @torch.no_grad()
    def all_finite(self) -> bool:
        """True when every EMA value is finite on every rank (collective)."""
        ok = torch.stack([torch.isfinite(s).all() for s in self.shadow]).all().float().reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() > 0)
