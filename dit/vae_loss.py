"""VAE training losses: reconstruction + beta*KL + lambda*perceptual + adaptive-weighted adversarial (LDM-style).

Reductions. LDM sums the per-pixel reconstruction loss and the KL over each sample and averages over the batch. Here
every term is that same quantity divided by the number of image elements per sample (C*H*W), i.e. reconstruction is
a per-pixel mean and KL is the per-sample KL sum / (C*H*W). The ratios between terms are therefore exactly LDM's, so
its hyper-parameters (kl_weight 1e-6, perceptual_weight 1.0, disc_weight 0.5) carry over unchanged; only the overall
loss scale differs, which the adaptive GAN weight ignores and Adam largely ignores.

The perceptual metric (LPIPS) is passed in as a callable so this module stays pure torch with no file I/O.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["kl_divergence", "reconstruction_loss", "adaptive_weight", "discriminator_loss", "generator_adv_loss",
           "VAELoss"]

Perceptual = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all non-batch dims: shape [B]."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1)


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Element-wise L1 or L2 (squared error) between x and recon, same shape as x."""
    if kind == "l1":
        return (x - recon).abs()
    if kind == "l2":
        return (x - recon).pow(2)
    raise ValueError(f"reconstruction loss must be 'l1' or 'l2', got {kind!r}")


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float = 1.0, max_weight: float = 1e4) -> torch.Tensor:
    """LDM adaptive GAN weight: disc_weight * ||dL_rec/dW|| / (||dL_G/dW|| + 1e-4), clamped to [0, max], detached.

    W is the decoder's last layer; both losses must still have their graphs (they are retained).
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return (w.clamp(0.0, max_weight) * disc_weight).detach()


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Discriminator loss: hinge 0.5*(E[relu(1-D(x))] + E[relu(1+D(G))]) or LSGAN 0.5*(E[(D(x)-1)^2] + E[D(G)^2])."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    if kind == "lsgan":
        return 0.5 * ((logits_real - 1.0).pow(2).mean() + logits_fake.pow(2).mean())
    raise ValueError(f"adversarial loss must be 'hinge' or 'lsgan', got {kind!r}")


def generator_adv_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Generator's adversarial loss: hinge -E[D(G)] or LSGAN E[(D(G)-1)^2]."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "lsgan":
        return (logits_fake - 1.0).pow(2).mean()
    raise ValueError(f"adversarial loss must be 'hinge' or 'lsgan', got {kind!r}")


class VAELoss(nn.Module):
    """The full generator and discriminator objectives.

    Args:
        perceptual: callable (x, recon) -> per-sample distance [B] or [B,1,1,1] (e.g. an ``lpips.LPIPS``), or None.
        rec_loss: "l1" or "l2".
        kl_weight: beta.
        perceptual_weight: lambda for the perceptual term.
        disc_weight: scale on the adaptive adversarial weight.
        disc_start: first step (0-based) at which the adversarial terms are used.
        disc_loss: "hinge" or "lsgan".
        adaptive: use the LDM adaptive weight (else the weight is just disc_weight).
    """

    def __init__(self, perceptual: Optional[Perceptual] = None, rec_loss: str = "l1", kl_weight: float = 1e-6,
                 perceptual_weight: float = 1.0, disc_weight: float = 0.5, disc_start: int = 0,
                 disc_loss: str = "hinge", adaptive: bool = True):
        super().__init__()
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        if disc_loss not in ("hinge", "lsgan"):
            raise ValueError(f"disc_loss must be 'hinge' or 'lsgan', got {disc_loss!r}")
        # stored as a plain attribute-less callable so its (frozen) weights are not part of our state dict
        self._perceptual = [perceptual] if perceptual is not None else []
        self.rec_loss, self.kl_weight, self.perceptual_weight = rec_loss, kl_weight, perceptual_weight
        self.disc_weight, self.disc_start, self.disc_loss, self.adaptive = disc_weight, disc_start, disc_loss, adaptive

    def disc_active(self, step: int) -> bool:
        """Whether the adversarial terms are on at this (0-based) step."""
        return self.disc_weight > 0 and step >= self.disc_start

    def generator_loss(self, x: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
                       step: int, logits_fake: Optional[torch.Tensor] = None,
                       last_layer: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Autoencoder objective; returns (loss, detached components).

        ``logits_fake`` (discriminator logits on ``recon``) is needed only when ``disc_active(step)``; ``last_layer``
        only when the adaptive weight is on and the model is training.
        """
        per_elem = reconstruction_loss(x, recon, self.rec_loss)
        rec = per_elem.mean()
        nll = rec
        logs: Dict[str, torch.Tensor] = {"rec": rec.detach()}
        if self._perceptual and self.perceptual_weight > 0:
            p = self._perceptual[0](x.contiguous(), recon.contiguous()).mean()
            nll = nll + self.perceptual_weight * p
            logs["lpips"] = p.detach()
        elems = x[0].numel()
        kl = kl_divergence(mean.float(), logvar.float()).mean() / elems
        loss = nll + self.kl_weight * kl
        logs["kl"] = kl.detach() * elems  # reported as the per-sample KL sum (nats), the readable quantity
        logs["nll"] = nll.detach()
        if self.disc_active(step):
            if logits_fake is None:
                raise ValueError("generator_loss needs logits_fake once the discriminator is active")
            g = generator_adv_loss(logits_fake, self.disc_loss)
            if self.adaptive and torch.is_grad_enabled() and last_layer is not None:
                w = adaptive_weight(nll, g, last_layer, self.disc_weight)
            else:
                w = torch.tensor(self.disc_weight, device=g.device)
            loss = loss + w * g
            logs["g_adv"] = g.detach()
            logs["d_weight"] = w.detach()
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_objective(self, logits_real: torch.Tensor, logits_fake: torch.Tensor
                                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Discriminator objective on real and (detached) reconstructed logits; returns (loss, components)."""
        d = discriminator_loss(logits_real, logits_fake, self.disc_loss)
        return d, {"d_loss": d.detach(), "logits_real": logits_real.detach().mean(),
                   "logits_fake": logits_fake.detach().mean()}
