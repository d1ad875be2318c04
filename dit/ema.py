"""Exponential moving average of model parameters."""
from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, List

import torch
from torch import nn


@torch.no_grad()
def update_ema(ema_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor], decay: float) -> None:
    """In place: ema <- decay * ema + (1 - decay) * param, for matching lists of tensors."""
    ema_params, params = list(ema_params), list(params)
    if len(ema_params) != len(params):
        raise ValueError(f"update_ema: {len(ema_params)} EMA tensors but {len(params)} parameters")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    if not ema_params:
        return
    src: List[torch.Tensor] = [p.detach().to(e.dtype) if p.dtype != e.dtype else p.detach()
                               for e, p in zip(ema_params, params)]
    # lerp(ema, p, w) = ema + w (p - ema): one fused foreach kernel over all tensors.
    torch._foreach_lerp_(ema_params, src, 1.0 - decay)


class EMA:
    """An EMA copy of a module: ``ema.update(model)`` after each optimizer step, ``ema.module`` to evaluate.

    ``warmup=True`` uses decay min(decay, (1 + n) / (10 + n)) at update n, so early averages are not dominated by
    the random initialisation. Floating-point buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update will use."""
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current parameters of ``model`` (same architecture) into the average."""
        update_ema([p for p in self.module.parameters()], [p for p in model.parameters()], self.current_decay())
        for eb, b in zip(self.module.buffers(), model.buffers()):
            eb.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> Dict[str, Any]:
        """Averaged weights plus the update counter and settings."""
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay,
                "warmup": self.warmup}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (decay/warmup settings are kept from the constructor)."""
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state.get("num_updates", 0))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model``."""
        model.load_state_dict(self.module.state_dict())


__all__ = ["update_ema", "EMA"]
