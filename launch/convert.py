"""Convert checkpoints between ditstack and facebookresearch/DiT, willisma/SiT and diffusers.

Import (into one ditstack .safetensors file):

    python launch/convert.py --from official DiT-XL-2-256x256.pt --out dit_xl2.safetensors
    python launch/convert.py --from sit SiT-XL-2-256.pt --out sit_xl2.safetensors
    python launch/convert.py --from diffusers path/to/DiT-XL-2-256/transformer --out dit_xl2.safetensors

IN is a .pt/.pth (loaded with weights_only=True; a training checkpoint's "ema" weights are preferred over "model",
its argparse `args` are read, never executed), a .safetensors file, or (diffusers) a model directory with
config.json (a pipeline directory with a transformer/ subfolder works too). The output loads with
`DiT(**kwargs).load_state_dict(...)`, where kwargs is stored in the safetensors metadata under "ditstack" as
{"model": kwargs, "diffusion": ..., ...}. A SiT checkpoint is the official DiT backbone with the same key names;
its "diffusion" holds the flow-matching kwargs of `dit.transport.create_transport` (`dit.convert.SIT_TRANSPORT`).

Export (into a diffusers DiTPipeline directory):

    python launch/convert.py --to diffusers runs/demo/dit --out dit_diffusers [--vae sd-vae-ft-ema] [--force]

CKPT is a run directory (its newest complete checkpoint), a step directory or a consolidated .safetensors file,
as for launch/sample.py. DIR gets transformer/ and scheduler/ (DDIMScheduler config of the checkpoint's process),
vae/ when the checkpoint's VAE (or --vae) is a local diffusers AutoencoderKL directory, and model_index.json with
the class names as id2label. It is built in DIR.tmp-<pid> and renamed into place; an existing non-empty DIR is
replaced only with --force. Refused: flow-matching checkpoints, unconditional models, conditionings other than
adaLN-Zero, QK-norm, mlp_ratio other than 4 (diffusers' DiTTransformer2DModel cannot hold them).

Errors print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as `python launch/convert.py` without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from data_pipeline.checks import OneLineParser, Range, number_arg, output_dir_problem
from data_pipeline.files import atomic_save_safetensors, atomic_write_json
from data_pipeline.vae_io import VAELoadError, resolve_vae_path
from dit.convert import (ConversionError, diffusers_config, diffusers_kwargs, diffusers_scheduler_config,
                         diffusers_to_ours, official_kwargs, official_to_ours, ours_to_diffusers, sit_transport_kwargs,
                         strip_prefixes)
from dit.models import DiT, preset_kwargs
from dit.processes import objective_of
from eval.checkpoints import CheckpointError, load_safetensors_file
from eval.inference import InferenceError, read_checkpoint_meta

log = logging.getLogger("launch.convert")

METADATA_KEY = "ditstack"
# The diffusion every official and diffusers DiT checkpoint was trained with (dit.diffusion.create_diffusion kwargs).
OFFICIAL_DIFFUSION = {"noise_schedule": "linear", "diffusion_steps": 1000, "timestep_respacing": "",
                      "prediction": "eps", "loss": "mse"}
DEFAULT_LATENT_SCALE = 0.18215  # the SD VAE's latent scale (official DiT and SiT latents)
# diffusers' DiTPipeline feeds this label as the null class for guidance_scale > 1, whatever the model's classes.
PIPELINE_NULL_LABEL = 1000
# Flags of the import direction (checked against --to) with their "not given" value.
IMPORT_ONLY = {"model": None, "num_heads": None, "input_size": None, "numerics": None, "latent_scale": None}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------------ import
def _torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)`, also allowing argparse.Namespace: the `args` that DiT's and SiT's train.py
    store in their checkpoints (a plain attribute bag; its values are still only weights_only types)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CLIError(f"{path}: cannot load with torch.load(weights_only=True) ({first})") from exc


def _load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, training args or {}) of a .pt/.pth/.bin or .safetensors file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path)), {}
        except Exception as exc:  # safetensors raises several types for bad files
            raise CLIError(f"{path}: not a readable safetensors file ({exc})") from exc
    obj = _torch_load(path)
    args: dict[str, Any] = {}
    if isinstance(obj, dict):
        raw = obj.get("args")
        args = vars(raw) if isinstance(raw, argparse.Namespace) else dict(raw) if isinstance(raw, dict) else {}
        for key in ("ema", "model", "state_dict", "module"):  # training checkpoints wrap the weights
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CLIError(f"{path}: does not hold a state dict of tensors")
    return dict(obj), args


def _diffusers_dir(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state dict) of a diffusers model directory (or a pipeline directory with transformer/)."""
    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer"
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CLIError(f"{path}: no config.json; expected a diffusers DiTTransformer2DModel directory")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CLIError(f"{cfg_path}: invalid JSON ({exc})") from exc
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (path / name).is_file():
            return config, _load_weights(path / name)[0]
    raise CLIError(f"{path}: no diffusion_pytorch_model.safetensors or .bin")


def convert(source: str, in_path: Path, *, model: Optional[str], num_heads: Optional[int], input_size: Optional[int],
            numerics: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(our state dict, DiT kwargs, the metadata's "diffusion" dict) for the input checkpoint."""
    if not in_path.exists():
        raise CLIError(f"{in_path}: no such file or directory")
    if model is not None:
        model = "DiT-" + model[len("SiT-"):] if model.startswith("SiT-") else model  # the same architectures
        try:
            preset = preset_kwargs(model)
        except KeyError as exc:
            raise CLIError(str(exc.args[0])) from exc
        num_heads = num_heads or preset["num_heads"]
    train_args: dict[str, Any] = {}
    if source in ("official", "sit"):
        if in_path.is_dir():
            raise CLIError(f"{in_path}: is a directory; --from {source} expects a .pt/.pth/.safetensors file")
        sd, train_args = _load_weights(in_path)
        sd = strip_prefixes(sd)
        kwargs = official_kwargs(sd, num_heads=num_heads)
        sd = official_to_ours(sd)
    else:
        if in_path.is_dir():
            config, sd = _diffusers_dir(in_path)
        else:
            sd = _load_weights(in_path)[0]
            config = _config_from_diffusers_weights(sd, num_heads, input_size)
        if input_size is not None:
            config["sample_size"] = input_size
        kwargs = diffusers_kwargs(config, sd, numerics=numerics)
        sd = diffusers_to_ours(sd, kwargs["input_size"])
    if model is not None:
        mismatch = {k: (v, kwargs[k]) for k, v in preset_kwargs(model).items() if kwargs[k] != v}
        if mismatch:
            raise CLIError(f"--model {model} does not match the checkpoint: {mismatch} (preset, checkpoint)")
    if source == "sit":  # SiT's model takes t in [0, 1] as is: the official timestep embedder, fractional t
        diffusion = sit_transport_kwargs(train_args)
    else:
        diffusion = {**OFFICIAL_DIFFUSION, "learn_sigma": kwargs["learn_sigma"]}
    return sd, kwargs, diffusion


def _config_from_diffusers_weights(sd: dict[str, torch.Tensor], num_heads: Optional[int],
                                   input_size: Optional[int]) -> dict[str, Any]:
    """A diffusers config reconstructed from bare weights (no config.json); heads and size must be known."""
    w = sd.get("pos_embed.proj.weight")
    table = sd.get("transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight")
    out = sd.get("proj_out_2.weight")
    if w is None or table is None or out is None:
        raise CLIError("not a diffusers DiT state dict (pos_embed.proj / proj_out_2 / class_embedder missing)")
    if num_heads is None or input_size is None:
        raise CLIError("bare diffusers weights: give --model (or --num-heads) and --input-size, or pass the "
                       "model directory with its config.json")
    hidden, in_ch, p = w.shape[0], w.shape[1], w.shape[2]
    depth = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    return {"num_attention_heads": num_heads, "attention_head_dim": hidden // num_heads, "in_channels": in_ch,
            "out_channels": out.shape[0] // (p * p), "num_layers": depth, "sample_size": input_size,
            "patch_size": p, "num_embeds_ada_norm": table.shape[0] - 1}


def write_safetensors(sd: dict[str, torch.Tensor], out: Path, metadata: dict[str, Any]) -> None:
    """Write atomically (temp file in the same directory, then rename)."""

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(sd, out, metadata={METADATA_KEY: json.dumps(metadata)})


def import_checkpoint(args: argparse.Namespace) -> str:
    """Convert `args.input` (--from official|sit|diffusers) into the ditstack file `args.out`; returns the report."""
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CLIError(f"--out {out}: must end in .safetensors")
    if out.is_dir():
        raise CLIError(f"--out {out}: is a directory; give the .safetensors path")
    if output_dir_problem(out.parent):
        raise CLIError(f"--out {out}: {output_dir_problem(out.parent)}")
    numerics = args.numerics or "diffusers"
    sd, kwargs, diffusion = convert(args.source, Path(args.input), model=args.model, num_heads=args.num_heads,
                                    input_size=args.input_size, numerics=numerics)
    hidden = kwargs.get("hidden_size")
    if args.num_heads is not None and hidden and hidden % args.num_heads:
        raise CLIError(f"--num-heads {args.num_heads}: does not divide the checkpoint's hidden size {hidden}")
    try:
        DiT(**kwargs).load_state_dict(sd, strict=True)  # refuse to write something that does not load
    except RuntimeError as exc:
        raise CLIError(f"converted weights do not load into DiT({kwargs}): {str(exc).splitlines()[0]}") from exc
    latent = data = None
    if args.vae:
        c, s = kwargs["in_channels"], kwargs["input_size"]
        scale = args.latent_scale if args.latent_scale is not None else DEFAULT_LATENT_SCALE
        latent = {"shape": [c, s, s], "vae": args.vae, "shift": [0.0] * c, "scale": [scale] * c,
                  "mean": None, "std": None, "stored": "converted"}
        data = {"kind": "latent", "class_names": [], "image_size": None, "channels": None}
    meta = {"model": kwargs, "diffusion": diffusion, "data": data, "latent": latent, "step": None,
            "source": {"format": args.source, "path": str(Path(args.input).resolve()),
                       "numerics": numerics if args.source == "diffusers" else "official"}}
    try:
        write_safetensors(sd, out, meta)
    except OSError as exc:  # a full disk, a read-only directory: the temporary file is removed, --out untouched
        raise CLIError(f"--out {out}: cannot write ({exc.strerror or exc})") from exc
    n = sum(v.numel() for k, v in sd.items() if k != "pos_embed")
    return f"wrote {out} ({n / 1e6:.2f}M parameters; DiT kwargs {json.dumps(kwargs)})"


# ------------------------------------------------------------------------------------------------ export
def export_problem(weights: Path, meta: dict[str, Any]) -> Optional[str]:
    """Why the checkpoint cannot become a diffusers DiTPipeline (one line naming the file), or None."""
    diffusion, kwargs = meta["diffusion"], meta["model"]
    objective = objective_of(diffusion)
    if objective == "flow":
        return (f"{weights}: a flow-matching checkpoint (diffusion.objective 'flow'); diffusers has no scheduler for "
                f"its time convention (SiT's: t = 0 noise, t = 1 data); sample it with launch/sample.py")
    conditioning = kwargs.get("conditioning", "adaln_zero")
    if conditioning != "adaln_zero":
        return (f"{weights}: model.conditioning {conditioning!r}; diffusers' DiTTransformer2DModel holds "
                f"adaLN-Zero blocks only")
    if not kwargs.get("num_classes", 1000):
        return (f"{weights}: an unconditional model (model.num_classes 0); diffusers' DiTTransformer2DModel is "
                f"always class-conditional")
    try:
        diffusers_config(kwargs)
        diffusers_scheduler_config(diffusion)
    except ConversionError as exc:
        return f"{weights}: {exc}"
    return None


def _output_problem(out: Path, weights: Path, force: bool) -> Optional[str]:
    """What stops writing the pipeline directory `out` from the checkpoint file `weights` (None if nothing)."""
    if out.resolve() in weights.resolve().parents:  # --force would delete the checkpoint being exported
        return f"--out {out}: holds the checkpoint being exported ({weights}); choose another directory"
    if out.exists() and not out.is_dir():
        return f"--out {out}: exists and is not a directory"
    if out.is_dir() and any(out.iterdir()) and not force:
        return f"--out {out}: exists and is not empty; pass --force to replace it"
    problem = output_dir_problem(out.parent)
    return f"--out {out}: {problem}" if problem else None


def _vae_source(meta: dict[str, Any], override: Optional[str]) -> tuple[Optional[Path], Optional[float], list[str]]:
    """(diffusers AutoencoderKL directory to write as vae/, the scaling_factor it needs, notes for the log)."""
    latent = meta.get("latent")
    if latent is None:
        if override:
            raise CLIError(f"--vae {override}: the checkpoint is a pixel-space model (no latents to decode)")
        return None, None, ["a pixel-space model: no vae/ (DiTPipeline always decodes with a VAE; run "
                            "transformer/ and scheduler/ in your own loop)"]
    shift = torch.as_tensor(latent["shift"], dtype=torch.float64).reshape(-1)
    scale = torch.as_tensor(latent["scale"], dtype=torch.float64).reshape(-1)
    if bool((shift != 0).any()) or bool((scale != scale[0]).any()):
        return None, None, [f"the latents are normalised per channel (shift {shift.tolist()}, scale {scale.tolist()}) "
                            f"but DiTPipeline decodes latents / vae.config.scaling_factor: no vae/; decode "
                            f"x / scale + shift yourself"]
    name = override or str(latent.get("vae"))
    try:
        kind, path = resolve_vae_path(name)
    except VAELoadError as exc:
        if override:
            raise CLIError(f"--vae {override}: {exc}") from None
        if HUB_ID.fullmatch(name) and not Path(name).is_absolute():
            return None, None, [f"the checkpoint's VAE is the hub model {name!r}: no vae/; load the pipeline with "
                                f"vae=AutoencoderKL.from_pretrained({name!r}) (scaling_factor {float(scale[0])})"]
        return None, None, [f"the checkpoint's VAE {name!r} is not on this machine: no vae/ (pass --vae DIR, a "
                            f"diffusers AutoencoderKL directory)"]
    if kind != "diffusers":
        if override:
            raise CLIError(f"--vae {override}: a ditstack VAE; diffusers loads only its own AutoencoderKL directories")
        return None, None, [f"the checkpoint's VAE {path} is a ditstack VAE, which diffusers cannot load: no vae/"]
    return path, float(scale[0]), []


def _model_notes(kwargs: dict[str, Any]) -> list[str]:
    """What differs between the model in diffusers and in ditstack (for the log)."""
    notes = []
    if float(kwargs.get("timestep_freq_shift", 0.0)) != 1.0:
        shift = kwargs.get("timestep_freq_shift", 0.0)
        notes.append(f"diffusers' DiT computes its timestep frequencies with shift 1 (exponent i/127); this model "
                     f"was trained with shift {shift} (i/128, the official DiT's), so in diffusers it sees other "
                     f"timestep features, the more so the larger t, and its samples differ from ours (as for the "
                     f"official weights in facebook/DiT-XL-2-256)")
    classes = int(kwargs.get("num_classes", 1000))
    if not kwargs.get("class_dropout_prob", 0.1):
        notes.append("trained without a null class (class_dropout_prob 0): its label table gets a zero row; "
                     "use guidance_scale=1")
    elif classes != PIPELINE_NULL_LABEL:
        notes.append(f"DiTPipeline uses label {PIPELINE_NULL_LABEL} as the null class for guidance_scale > 1; this "
                     f"model's null class is {classes}: use guidance_scale=1 or guide in your own loop")
    return notes


def _checkpoint_weights(weights: Path, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in diffusers' DiT layout, checked against the DiT its metadata describes."""
    try:
        sd = load_safetensors_file(weights)
        with torch.device("meta"):  # names and shapes only: no memory, no initialisation
            own = DiT(**kwargs).state_dict()
    except CheckpointError as exc:
        raise CLIError(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise CLIError(f"{weights}: '{METADATA_KEY}.model' is not valid DiT kwargs ({exc})") from None
    wrong = sorted(set(own) ^ set(sd)) + sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if wrong:
        raise CLIError(f"{weights}: weights do not match the DiT in its metadata ({wrong[:3]})")
    table = sd["y_embedder.embedding_table.weight"]
    if table.shape[0] == int(kwargs.get("num_classes", 1000)):  # no null class: diffusers' label table always has one
        sd["y_embedder.embedding_table.weight"] = torch.cat([table, table.new_zeros(1, table.shape[1])])
    return ours_to_diffusers(sd)


def _write_transformer(sd: dict[str, torch.Tensor], kwargs: dict[str, Any], dst: Path) -> None:
    """transformer/: DiTTransformer2DModel.save_pretrained (config.json + diffusion_pytorch_model.safetensors)."""
    from diffusers import DiTTransformer2DModel

    with torch.device("meta"):
        model = DiTTransformer2DModel(**diffusers_config(kwargs))
    model.load_state_dict(sd, strict=True, assign=True)  # every saved tensor is one of ours
    model.save_pretrained(str(dst), safe_serialization=True)


def _write_vae(src: Path, scaling: float, channels: int, dst: Path) -> None:
    """vae/: the diffusers AutoencoderKL at `src`, its scaling_factor set to the checkpoint's latent scale."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(str(src), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CLIError(f"{src}: cannot load the diffusers AutoencoderKL ({str(exc).splitlines()[0]})") from None
    if vae.config.latent_channels != channels:
        raise CLIError(f"{src}: the VAE has {vae.config.latent_channels} latent channels, the model {channels}")
    if vae.config.scaling_factor != scaling:  # DiTPipeline decodes latents / scaling_factor
        vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(str(dst), safe_serialization=True)


def _write_index(tmp: Path, weights: Path, meta: dict[str, Any], vae: Optional[Path]) -> None:
    """scheduler/scheduler_config.json and model_index.json (DiTPipeline, class names as id2label)."""
    import diffusers

    version = diffusers.__version__
    atomic_write_json(tmp / "scheduler" / "scheduler_config.json",
                      {"_class_name": "DDIMScheduler", "_diffusers_version": version,
                       **diffusers_scheduler_config(meta["diffusion"])})
    classes = int(meta["model"].get("num_classes", 1000))
    names = list((meta.get("data") or {}).get("class_names") or [])
    id2label = {str(i): str(names[i]) if i < len(names) else str(i) for i in range(classes)}
    latent = meta.get("latent") or {}
    atomic_write_json(tmp / "model_index.json", {
        "_class_name": "DiTPipeline", "_diffusers_version": version, "id2label": id2label,
        "scheduler": ["diffusers", "DDIMScheduler"], "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"] if vae is not None else [None, None],
        # diffusers ignores keys starting with "_": where the pipeline came from
        "_ditstack": {"checkpoint": str(weights.resolve()), "step": meta.get("step"), "vae": latent.get("vae"),
                      "latent_shift": latent.get("shift"), "latent_scale": latent.get("scale"),
                      "diffusion": meta["diffusion"]}})


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished directory `tmp` to `out`; an existing `out` is renamed aside first, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def export_diffusers(ckpt: str, out: Path, *, vae: Optional[str] = None, force: bool = False) -> str:
    """Write checkpoint `ckpt` (run dir, step dir or .safetensors) as the diffusers DiTPipeline directory `out`;
    returns the report line. Every refusal is checked before anything is written."""
    try:
        weights, meta = read_checkpoint_meta(ckpt)
    except InferenceError as exc:
        raise CLIError(str(exc)) from None
    problem = export_problem(weights, meta) or _output_problem(out, weights, force)
    if problem:
        raise CLIError(problem)
    vae_dir, scaling, notes = _vae_source(meta, vae)
    if importlib.util.find_spec("diffusers") is None:
        raise CLIError("--to diffusers needs the diffusers package (pip install diffusers)")
    sd = _checkpoint_weights(weights, meta["model"])
    final = Path(os.path.abspath(out))  # "." and "dir/" have a name to put the temporary directory beside
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_transformer(sd, meta["model"], tmp / "transformer")
        if vae_dir is not None:
            _write_vae(vae_dir, scaling, int(meta["model"].get("in_channels", 4)), tmp / "vae")
        _write_index(tmp, weights, meta, vae_dir)
        _publish(tmp, final)
    except OSError as exc:
        raise CLIError(f"--out {out}: cannot write ({exc.strerror or exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for note in notes + _model_notes(meta["model"]):
        log.warning("%s", note)
    parts = "transformer/, scheduler/" + (", vae/" if vae_dir is not None else "") + ", model_index.json"
    return f"wrote {out} (diffusers DiTPipeline: {parts}; from {weights}, step {meta.get('step')})"


# ------------------------------------------------------------------------------------------------ CLI
def _parser() -> OneLineParser:
    """The command line of both directions."""
    ap = OneLineParser(description="Convert official/SiT/diffusers DiT checkpoints to ditstack safetensors, or a "
                                   "ditstack checkpoint to a diffusers DiTPipeline directory.")
    way = ap.add_mutually_exclusive_group(required=True)
    way.add_argument("--from", dest="source", choices=["official", "sit", "diffusers"], help="import IN (a checkpoint of that kind)")
    way.add_argument("--to", dest="target", choices=["diffusers"], help="export the ditstack checkpoint IN")
    ap.add_argument("input", metavar="IN", help="--from: checkpoint file (.pt/.pth/.safetensors) or diffusers model directory; "
                                  "--to: run directory, checkpoint directory or consolidated .safetensors")
    ap.add_argument("--out", required=True, help="--from: output .safetensors; --to: output directory")
    ap.add_argument("--force", action="store_true", help="--to: replace an existing non-empty --out directory")
    ap.add_argument("--model", default=None, help="preset name (e.g. DiT-XL/2): checked against the weights; "
                                                  "gives num_heads")
    ap.add_argument("--num-heads", type=number_arg(int, Range(1, 1024)), default=None,
                    help="attention heads (not stored in the weights; must divide the hidden size)")
    ap.add_argument("--input-size", type=number_arg(int, Range(1, 4096)), default=None,
                    help="latent side (diffusers bare weights only)")
    ap.add_argument("--numerics", choices=["diffusers", "official"], default=None,
                    help="--from diffusers: reproduce diffusers' outputs exactly (default) or use the official "
                         "DiT's timestep frequencies and LayerNorm eps")
    ap.add_argument("--vae", default=None, help="--from: VAE the model's latents come from (recorded in the "
                                                "metadata); --to: a diffusers AutoencoderKL directory to write as "
                                                "vae/ (default: the checkpoint's own VAE)")
    ap.add_argument("--latent-scale", type=number_arg(float, Range(0.0, 1000.0, lo_open=True)), default=None,
                    help=f"latent scale factor recorded with --vae (default {DEFAULT_LATENT_SCALE})")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    """Run the converter; 0 on success, 2 on bad input (one line on stderr)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="convert.py: %(message)s", stream=sys.stderr)
    try:
        if args.target:
            given = [k for k, unset in IMPORT_ONLY.items() if getattr(args, k) != unset]
            if given:
                raise CLIError(f"--{given[0].replace('_', '-')}: only with --from (import)")
            report = export_diffusers(args.input, Path(args.out), vae=args.vae, force=args.force)
        else:
            if args.force:
                raise CLIError("--force: only with --to diffusers (an import replaces --out atomically)")
            report = import_checkpoint(args)
    except (CLIError, ConversionError, ValueError) as exc:
        print(f"convert.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
