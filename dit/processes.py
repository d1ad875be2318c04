"""The generative process a DiT is trained and sampled with, chosen by one key: DDPM (`dit.diffusion`, the DiT
paper's Gaussian diffusion) or flow matching (`dit.transport`, SiT / LightningDiT's interpolants).

A checkpoint stores the process as one dict (`create_process` kwargs: `"objective"` plus that process's own
kwargs); a dict without `"objective"` is DDPM (checkpoints written before flow matching existed).
"""
from __future__ import annotations

from typing import Any, Mapping, Union

from dit.diffusion import GaussianDiffusion, create_diffusion
from dit.flow_samplers import FLOW_SAMPLERS
from dit.samplers import SAMPLERS as DDPM_SAMPLERS
from dit.transport import Transport, create_transport

OBJECTIVES = ("ddpm", "flow")
SAMPLERS = {"ddpm": tuple(DDPM_SAMPLERS), "flow": tuple(FLOW_SAMPLERS)}
Process = Union[GaussianDiffusion, Transport]


def objective_of(process_kwargs: Mapping[str, Any]) -> str:
    """The objective ("ddpm" or "flow") of a stored process dict."""
    objective = process_kwargs.get("objective", "ddpm")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    return objective


def create_process(**process_kwargs: Any) -> Process:
    """The process of a stored process dict: a `GaussianDiffusion` or a `Transport`."""
    kwargs = {k: v for k, v in process_kwargs.items() if k != "objective"}
    if objective_of(process_kwargs) == "flow":
        return create_transport(**kwargs)
    return create_diffusion(**kwargs)


def sampler_objective(sampler: str) -> str:
    """The objective whose samplers include `sampler`."""
    for objective, names in SAMPLERS.items():
        if sampler in names:
            return objective
    raise ValueError(f"unknown sampler {sampler!r}: expected one of "
                     f"{', '.join(n for names in SAMPLERS.values() for n in names)}")
