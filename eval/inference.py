"""Checkpoint → images: the DiT (EMA weights), its diffusion, the VAE decoder and the latent de-normalisation.

``load_checkpoint(path)`` accepts a training checkpoint directory (``ema.safetensors`` inside), a run or
``checkpoints`` directory (its newest complete checkpoint), or a consolidated ``.safetensors`` file; everything needed
to rebuild the generator comes from the file's ``ditstack`` metadata (see docs/ARCHITECTURE.md "Checkpoints").
``Generator.sample_batch`` turns class labels and per-sample seeds into uint8 images; a sample depends only on its
seed and label, never on the batch it was drawn in.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from data_pipeline.devices import autocast
from data_pipeline.vae_io import load_vae
from dit.cpu import accelerate
from dit.flow_samplers import flow_sample
from dit.models import DiT
from dit.processes import SAMPLERS, create_process, objective_of, sampler_objective
from dit.samplers import make_cfg_model_fn, sample
from eval.checkpoints import EMA_FILE, find_latest

log = logging.getLogger(__name__)

META_KEY = "ditstack"
REQUIRED_META = ("model", "diffusion", "data", "latent", "step")

__all__ = ["InferenceError", "resolve_checkpoint", "read_checkpoint_meta", "load_checkpoint", "Generator",
           "sample_seed", "settings_problem", "default_sampler", "flow_options", "to_uint8"]

# (objective, purpose) -> the sampler used when none is set
DEFAULT_SAMPLERS = {("ddpm", "sample"): "ddim", ("ddpm", "eval"): "ddpm", ("flow", "sample"): "heun",
                    ("flow", "eval"): "sde"}
OBJECTIVE_NAMES = {"ddpm": "DDPM", "flow": "flow matching"}


class InferenceError(ValueError):
    """A checkpoint that cannot be turned into a generator, described in one line naming the file and key."""


def resolve_checkpoint(path: Union[str, os.PathLike]) -> Path:
    """The weights file behind ``path``: a ``.safetensors`` file, a checkpoint dir, or a run/checkpoints dir."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise InferenceError(f"{p}: no such checkpoint file or directory")
    if (p / EMA_FILE).is_file():
        return p / EMA_FILE
    for root in (p / "checkpoints", p):
        latest = find_latest(root) if root.is_dir() else None
        if latest is not None and (latest / EMA_FILE).is_file():
            return latest / EMA_FILE
    raise InferenceError(f"{p}: holds no {EMA_FILE} (not a checkpoint directory, and no complete checkpoint under it)")


def read_checkpoint_meta(path: Union[str, os.PathLike]) -> Tuple[Path, Dict[str, Any]]:
    """(weights file, its ``ditstack`` metadata), validated; no weights are read."""
    from safetensors import safe_open

    f = resolve_checkpoint(path)
    try:
        with safe_open(str(f), framework="pt") as sf:
            raw = (sf.metadata() or {}).get(META_KEY)
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a bad header
        raise InferenceError(f"{f}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    if raw is None:
        raise InferenceError(f"{f}: no '{META_KEY}' metadata; not a ditstack checkpoint (consolidate it with the "
                             "trainer's export)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise InferenceError(f"{f}: '{META_KEY}' metadata is not JSON ({err})") from None
    for key in REQUIRED_META:
        if key not in meta:
            raise InferenceError(f"{f}: '{META_KEY}' metadata lacks key '{key}'")
    if not isinstance(meta["model"], dict) or not isinstance(meta["diffusion"], dict):
        raise InferenceError(f"{f}: '{META_KEY}.model' and '.diffusion' must be objects of constructor kwargs")
    try:
        objective_of(meta["diffusion"])
    except ValueError as err:
        raise InferenceError(f"{f}: '{META_KEY}.diffusion': {err}") from None
    lat = meta["latent"]
    if lat is not None:
        for key in ("shift", "scale", "vae"):
            if key not in lat:
                raise InferenceError(f"{f}: '{META_KEY}.latent' lacks key '{key}'")
    return f, meta


def default_sampler(objective: str, purpose: str) -> str:
    """The sampler used when none is set: for "sample" (grids, launch/sample.py) DDIM or Heun, for "eval" the
    samplers of the published FID-50K numbers (DiT: DDPM, SiT: the SDE)."""
    return DEFAULT_SAMPLERS[(objective, purpose)]


def flow_options(settings: Any) -> Dict[str, Any]:
    """The flow solver settings (`shift`, `atol`, `rtol`, `last_step`) of a config section or parsed arguments;
    {} when its sampler is a DDPM sampler (they read none of them)."""
    if settings.sampler is not None and sampler_objective(settings.sampler) == "ddpm":
        return {}
    return {k: getattr(settings, k) for k in ("shift", "atol", "rtol", "last_step")}


def settings_problem(meta: Dict[str, Any], steps: int, guide_channels: Union[str, int],
                     sampler: Optional[str] = None) -> Optional[str]:
    """What is wrong with sampling settings given a checkpoint's metadata (its process and channels), as one line
    naming the flag; None if they fit."""
    process = meta.get("diffusion") or {}
    objective = objective_of(process)
    if sampler is not None and sampler_objective(sampler) != objective:
        return (f"--sampler {sampler}: the checkpoint was trained with {OBJECTIVE_NAMES[objective]} "
                f"(diffusion.objective: {objective}); pass one of {', '.join(SAMPLERS[objective])}")
    trained = int(process.get("diffusion_steps", 1000))
    if objective == "ddpm" and steps > trained:
        return f"--steps {steps}: the checkpoint's diffusion has {trained} steps; pass 1..{trained}"
    channels = int(meta["model"].get("in_channels", 4))
    if guide_channels != "all" and int(guide_channels) > channels:
        return (f"--guide-channels {guide_channels}: the model has {channels} input channel(s); pass 'all' "
                f"or 1..{channels}")
    return None


def sample_seed(seed: int, index: int) -> int:
    """The seed of global sample ``index`` in a run with base ``seed`` (independent streams, any world size)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) | (int(state[1]) >> 1)  # 63 bits: fits torch.Generator.manual_seed


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] → uint8 the way the official DiT/ADM sampling scripts do (clamp(127.5 x + 128), truncate)."""
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8)


class Generator:
    """A DiT with its diffusion, (optional) VAE and latent normalisation, on one device.

    Args:
        model: the DiT (eval mode, weights loaded).
        diffusion_kwargs: the process (`dit.processes.create_process` kwargs: DDPM or flow matching).
        data_info: the checkpoint's ``data`` block (``image_size``, ``channels``, ``class_names``).
        latent: the checkpoint's ``latent`` block (None for pixel space).
        device: where sampling runs.
        vae: a loaded VAE handle (``data_pipeline.vae_io``); loaded from ``latent["vae"]`` when None and needed.
    """

    def __init__(self, model: torch.nn.Module, diffusion_kwargs: Dict[str, Any], data_info: Dict[str, Any],
                 latent: Optional[Dict[str, Any]], device: Union[str, torch.device], vae: Any = None):

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.diffusion_kwargs = dict(diffusion_kwargs)
        self.objective = objective_of(diffusion_kwargs)
        self.diffusion = create_process(**diffusion_kwargs)
        self.data_info = dict(data_info or {})
        self.latent = latent
        self.num_classes = int(getattr(model, "num_classes", 0))
        y_emb = getattr(model, "y_embedder", None)
        self.has_null_class = bool(y_emb is not None and y_emb.embedding_table.num_embeddings > self.num_classes)
        side = int(model.input_size)
        self.sample_shape = (int(model.in_channels), side, side)
        self.vae = None
        self._lowp: Dict[torch.dtype, Tuple[Tuple[int, ...], torch.nn.Module]] = {}
        if latent is not None:
            if vae is None:
                try:
                    vae = load_vae(latent["vae"], device=self.device)
                except (OSError, ValueError) as err:
                    raise InferenceError(f"VAE {latent['vae']!r} named by the checkpoint cannot be loaded ({err}); "
                                         "pass the VAE path explicitly (--vae)") from None
            self.vae = vae
            c = self.sample_shape[0]
            shift, scale = (torch.as_tensor(latent[k], dtype=torch.float32).reshape(-1) for k in ("shift", "scale"))
            if shift.numel() not in (1, c) or scale.numel() not in (1, c):
                raise InferenceError(f"latent shift/scale have {shift.numel()}/{scale.numel()} values for {c} channels")
            self.shift = shift.expand(c).reshape(1, c, 1, 1).to(self.device)
            self.scale = scale.expand(c).reshape(1, c, 1, 1).to(self.device)
            if getattr(vae, "latent_channels", c) != c:
                raise InferenceError(f"the VAE has {vae.latent_channels} latent channels, the DiT expects {c}")

    # ------------------------------------------------------------------------------------------------------------
    def model_fn(self, cfg_scale: float = 1.0, guide_channels: Union[str, int] = "all",
                 guidance_interval: Optional[Sequence[float]] = None, dtype: Optional[torch.dtype] = None):
        """``model_fn(x, t, y)`` for the sampler: the DiT (with CFG when ``cfg_scale != 1``) under ``dtype`` autocast."""
        model = self.model_for(dtype)
        if cfg_scale != 1.0:
            if self.num_classes == 0:
                raise InferenceError("classifier-free guidance needs a class-conditional model (num_classes = 0)")
            if not self.has_null_class:
                raise InferenceError("classifier-free guidance needs a null class (model trained with "
                                     "class_dropout_prob = 0)")
            gc = guide_channels if guide_channels == "all" else int(guide_channels)
            inner = make_cfg_model_fn(model, cfg_scale, self.num_classes, gc,
                                      tuple(guidance_interval) if guidance_interval else None)
        else:
            inner = model

        def fn(x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
            with autocast(self.device, dtype):
                return inner(x, t, y).float()

        return fn

    def model_for(self, dtype: Optional[torch.dtype]) -> torch.nn.Module:
        """The model to run under ``dtype`` autocast: for bf16/fp16 a copy whose Linear/Conv weights are stored in
        that dtype. Autocast would cast exactly those tensors to exactly those values on every call; storing them
        once saves the casts (and half the weight memory traffic) at every step, and on the CPU lets the linears use
        oneDNN's fused linear(+GELU) kernels (`dit.cpu.accelerate`; same function, bf16 rounding differs)."""
        if dtype is None or dtype == torch.float32:
            return self.model
        # The copy is remade whenever `self.model`'s weights changed since it was made (the trainer loads new EMA
        # weights into the same module for every grid): every in-place write to a tensor (load_state_dict,
        # copy_) bumps its version counter, so the versions identify the weights the copy was made from.
        versions = tuple(t._version for t in self.model.state_dict(keep_vars=True).values())
        cached = self._lowp.get(dtype)
        if cached is None or cached[0] != versions:
            model = copy.deepcopy(self.model).eval().requires_grad_(False)
            for mod in model.modules():
                if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                    mod.to(dtype)
            if torch.device(self.device).type == "cpu":
                accelerate(model)
            cached = (versions, model)
            self._lowp = {dtype: cached}  # one low-precision copy at a time
        return cached[1]

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Sampler output (normalised latents or pixels) → uint8 images [B, C, H, W] on CPU."""
        if self.vae is not None:
            z = x0.float() / self.scale + self.shift
            x0 = self.vae.decode(z)
        return to_uint8(x0).cpu()

    @torch.no_grad()
    def sample_batch(self, labels: Optional[torch.Tensor], seeds: Sequence[int], *, sampler: Optional[str] = None,
                     steps: Union[None, int, str] = 250, eta: float = 0.0, cfg_scale: float = 1.0,
                     guide_channels: Union[str, int] = "all", guidance_interval: Optional[Sequence[float]] = None,
                     dtype: Optional[torch.dtype] = None, progress: bool = False, shift: float = 1.0,
                     atol: float = 1e-6, rtol: float = 1e-3, last_step: str = "mean") -> torch.Tensor:
        """uint8 images [B, C, H, W] (CPU) for ``labels`` [B] (None if unconditional) and one seed per sample.

        ``sampler`` None is the process's evaluation default (`default_sampler(..., "eval")`: DDPM or the SDE, with
        250 steps); a sampler of the other process raises InferenceError. ``eta``: DDIM only; ``shift``, ``atol``/``rtol`` (dopri5), ``last_step`` (sde): flow
        only. ``steps`` respaces DDPM; for flow it is the number of solver steps (ignored by dopri5)."""
        sampler = sampler or default_sampler(self.objective, "eval")
        if sampler_objective(sampler) != self.objective:
            raise InferenceError(f"sampler {sampler!r} does not sample a {OBJECTIVE_NAMES[self.objective]} "
                                 f"checkpoint; use one of {', '.join(SAMPLERS[self.objective])}")
        gens = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        b = len(gens)
        y = None
        if self.num_classes > 0:
            if labels is None or len(labels) != b:
                raise InferenceError(f"need {b} class labels for a class-conditional model")
            y = torch.as_tensor(labels, dtype=torch.long, device=self.device)
            if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
                raise InferenceError(f"class labels must lie in [0, {self.num_classes})")
        fn = self.model_fn(cfg_scale, guide_channels, guidance_interval, dtype)
        shape = (b, *self.sample_shape)
        if self.objective == "flow":
            x0 = flow_sample(fn, self.diffusion, shape, sampler=sampler, steps=int(steps or 50), shift=shift,
                             atol=atol, rtol=rtol, last_step=last_step, generator=gens, device=self.device,
                             progress=progress, model_kwargs={"y": y})
        else:
            x0 = sample(fn, self.diffusion, shape, sampler=sampler, steps=steps, eta=eta, generator=gens,
                        device=self.device, progress=progress, model_kwargs={"y": y})
        return self.decode(x0)

    def generate(self, labels: Optional[Sequence[int]], seeds: Sequence[int], batch_size: int = 64,
                 **kwargs: Any) -> np.ndarray:
        """uint8 images [N, H, W, C] (numpy) for ``labels`` and ``seeds``, in batches; kwargs as ``sample_batch``."""
        out = []
        for i in range(0, len(seeds), batch_size):
            lab = None if labels is None or self.num_classes == 0 else torch.as_tensor(list(labels[i:i + batch_size]))
            out.append(self.sample_batch(lab, seeds[i:i + batch_size], **kwargs).permute(0, 2, 3, 1).numpy())
        return np.concatenate(out) if out else np.zeros((0, *self.image_shape_hwc), np.uint8)

    @property
    def image_shape_hwc(self) -> Tuple[int, int, int]:
        """(H, W, C) of the decoded images."""
        if self.vae is None:
            c, h, w = self.sample_shape
            return h, w, c
        down = int(getattr(self.vae, "downsample", 8))
        return self.sample_shape[1] * down, self.sample_shape[2] * down, int(getattr(self.vae, "image_channels", 3))


def load_checkpoint(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                    vae: Union[None, str, os.PathLike, Any] = None) -> Tuple[Generator, Dict[str, Any]]:
    """(Generator, metadata + ``"weights_file"``) from a checkpoint (see module doc); ``vae`` overrides its VAE."""
    from safetensors.torch import load_file

    f, meta = read_checkpoint_meta(path)
    try:
        model = DiT(**meta["model"])
    except (TypeError, ValueError) as err:
        raise InferenceError(f"{f}: '{META_KEY}.model' is not valid DiT kwargs ({err})") from None
    state = load_file(str(f))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        raise InferenceError(f"{f}: weights do not match the DiT in its metadata: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}, wrong shape {bad_shape[:3]}")
    model.load_state_dict(state)
    if meta["latent"] is not None:
        shape = meta["latent"].get("shape")
        if shape is not None and list(shape) != [model.in_channels, model.input_size, model.input_size]:
            raise InferenceError(f"{f}: latent shape {shape} does not match the DiT's input "
                                 f"{[model.in_channels, model.input_size, model.input_size]}")
    handle = None
    if vae is not None and meta["latent"] is not None:
        if isinstance(vae, (str, os.PathLike)):
            handle = load_vae(vae, device=device)
        else:
            handle = vae
    gen = Generator(model, meta["diffusion"], meta["data"], meta["latent"], device, vae=handle)
    return gen, dict(meta, weights_file=str(f.resolve()))
