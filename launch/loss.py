"""The training loss of one batch, shared by the trainer and the LR finder (and anything else that trains a DiT),
and REPA's alignment term added to it (`with_alignment`).

Everything random in it (the timesteps, the noise, the label dropout to the null class) is drawn from the
caller's generator, in that order, so a resumed run that restores the generator replays the same draws.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from dit.processes import Process
from dit.repa import alignment_loss


def training_loss(model_fn: Callable[..., torch.Tensor], diffusion: Process, x: torch.Tensor,
                  y: torch.Tensor, *, num_classes: int, class_dropout_prob: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Mean per-sample loss of the batch (x, y) under the process (DDPM or flow matching): its training
    timesteps, Gaussian noise, and label dropout with `class_dropout_prob` (classifier-free guidance's null class
    is part of the task). `model_fn(x_t, t, y=..., force_drop_ids=...)` runs the model."""
    device = x.device
    t = diffusion.sample_timesteps(x.shape[0], device, generator)
    noise = torch.randn(x.shape, device=device, generator=generator)
    kwargs: dict[str, Any] = {"y": y if num_classes else None}
    if num_classes and class_dropout_prob > 0:
        drop = torch.rand(x.shape[0], device=device, generator=generator)
        kwargs["force_drop_ids"] = (drop < class_dropout_prob).long()
    return diffusion.training_losses(model_fn, x, t, model_kwargs=kwargs, noise=noise)["loss"].mean()


def with_alignment(loss: torch.Tensor, projected: Optional[torch.Tensor], features: Optional[torch.Tensor],
                   weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the loss to minimise, the terms to log): without REPA (`features` None) the diffusion/flow loss alone,
    {"loss"}; with REPA, loss + weight * `dit.repa.alignment_loss(projected, features)` and {"loss",
    "repa_loss"} (the logged "loss" stays the diffusion/flow loss, comparable with runs without REPA)."""
    if features is None:
        return loss, {"loss": loss}
    if projected is None:
        raise RuntimeError("REPA: the model forward returned no projected tokens")
    align = alignment_loss(projected, features)
    return loss + weight * align, {"loss": loss, "repa_loss": align}
