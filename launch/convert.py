"""Convert a facebookresearch/DiT or diffusers DiT checkpoint into a ditstack safetensors file.

    python launch/convert.py --from official DiT-XL-2-256x256.pt --out dit_xl2.safetensors
    python launch/convert.py --from diffusers path/to/DiT-XL-2-256/transformer --out dit_xl2.safetensors

IN is a .pt/.pth (loaded with weights_only=True; an official training checkpoint's "ema" weights are preferred
over "model"), a .safetensors file, or (diffusers) a model directory with config.json (a pipeline directory with a
transformer/ subfolder works too). The output loads with `DiT(**kwargs).load_state_dict(...)`, where kwargs is
stored in the safetensors metadata under "ditstack" as {"model": kwargs, "diffusion": ..., ...}. Errors print one
line and exit with status 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as `python launch/convert.py` without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from data_pipeline.checks import OneLineParser, Range, number_arg, output_dir_problem
from data_pipeline.files import atomic_save_safetensors
from dit.convert import (ConversionError, diffusers_kwargs, diffusers_to_ours, official_kwargs, official_to_ours,
                         strip_prefixes)
from dit.models import DiT, preset_kwargs

METADATA_KEY = "ditstack"
# The diffusion every official and diffusers DiT checkpoint was trained with (dit.diffusion.create_diffusion kwargs).
OFFICIAL_DIFFUSION = {"noise_schedule": "linear", "diffusion_steps": 1000, "timestep_respacing": "",
                      "prediction": "eps", "loss": "mse"}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pt/.pth/.bin or .safetensors file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several types for bad files
            raise CLIError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CLIError(f"{path}: cannot load with torch.load(weights_only=True) ({str(exc).splitlines()[0]})") from exc
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict", "module"):  # training checkpoints wrap the weights
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CLIError(f"{path}: does not hold a state dict of tensors")
    return dict(obj)


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
            return config, _load_tensors(path / name)
    raise CLIError(f"{path}: no diffusion_pytorch_model.safetensors or .bin")


def convert(source: str, in_path: Path, *, model: Optional[str], num_heads: Optional[int], input_size: Optional[int],
            numerics: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(our state dict, DiT kwargs) for the input checkpoint."""
    if not in_path.exists():
        raise CLIError(f"{in_path}: no such file or directory")
    if model is not None:
        try:
            preset = preset_kwargs(model)
        except KeyError as exc:
            raise CLIError(str(exc.args[0])) from exc
        num_heads = num_heads or preset["num_heads"]
    if source == "official":
        if in_path.is_dir():
            raise CLIError(f"{in_path}: is a directory; --from official expects a .pt/.pth/.safetensors file")
        sd = strip_prefixes(_load_tensors(in_path))
        kwargs = official_kwargs(sd, num_heads=num_heads)
        sd = official_to_ours(sd)
    else:
        if in_path.is_dir():
            config, sd = _diffusers_dir(in_path)
        else:
            sd = _load_tensors(in_path)
            config = _config_from_diffusers_weights(sd, num_heads, input_size)
        if input_size is not None:
            config["sample_size"] = input_size
        kwargs = diffusers_kwargs(config, sd, numerics=numerics)
        sd = diffusers_to_ours(sd, kwargs["input_size"])
    if model is not None:
        mismatch = {k: (v, kwargs[k]) for k, v in preset_kwargs(model).items() if kwargs[k] != v}
        if mismatch:
            raise CLIError(f"--model {model} does not match the checkpoint: {mismatch} (preset, checkpoint)")
    return sd, kwargs


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


def main(argv: Optional[list[str]] = None) -> int:
    ap = OneLineParser(description="Convert an official or diffusers DiT checkpoint to ditstack safetensors.")
    ap.add_argument("--from", dest="source", required=True, choices=["official", "diffusers"])
    ap.add_argument("input", help="checkpoint file (.pt/.pth/.safetensors) or diffusers model directory")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--model", default=None, help="preset name (e.g. DiT-XL/2): checked against the weights; "
                                                  "gives num_heads")
    ap.add_argument("--num-heads", type=number_arg(int, Range(1, 1024)), default=None,
                    help="attention heads (not stored in the weights; must divide the hidden size)")
    ap.add_argument("--input-size", type=number_arg(int, Range(1, 4096)), default=None,
                    help="latent side (diffusers bare weights only)")
    ap.add_argument("--numerics", choices=["diffusers", "official"], default="diffusers",
                    help="--from diffusers: reproduce diffusers' outputs exactly (default) or use the official "
                         "DiT's timestep frequencies and LayerNorm eps")
    ap.add_argument("--vae", default=None, help="VAE the model's latents come from (recorded in the metadata)")
    ap.add_argument("--latent-scale", type=number_arg(float, Range(0.0, 1000.0, lo_open=True)), default=0.18215,
                    help="latent scale factor recorded with --vae")
    args = ap.parse_args(argv)
    try:
        out = Path(args.out)
        if out.suffix != ".safetensors":
            raise CLIError(f"--out {out}: must end in .safetensors")
        if out.is_dir():
            raise CLIError(f"--out {out}: is a directory; give the .safetensors path")
        if output_dir_problem(out.parent):
            raise CLIError(f"--out {out}: {output_dir_problem(out.parent)}")
        sd, kwargs = convert(args.source, Path(args.input), model=args.model, num_heads=args.num_heads,
                             input_size=args.input_size, numerics=args.numerics)
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
            latent = {"shape": [c, s, s], "vae": args.vae, "shift": [0.0] * c, "scale": [args.latent_scale] * c,
                      "mean": None, "std": None, "stored": "converted"}
            data = {"kind": "latent", "class_names": [], "image_size": None, "channels": None}
        meta = {"model": kwargs, "diffusion": {**OFFICIAL_DIFFUSION, "learn_sigma": kwargs["learn_sigma"]},
                "data": data, "latent": latent, "step": None,
                "source": {"format": args.source, "path": str(Path(args.input).resolve()),
                           "numerics": args.numerics if args.source == "diffusers" else "official"}}
        try:
            write_safetensors(sd, out, meta)
        except OSError as exc:  # a full disk, a read-only directory: the temporary file is removed, --out untouched
            raise CLIError(f"--out {out}: cannot write ({exc.strerror or exc})") from exc
    except (CLIError, ConversionError, ValueError) as exc:
        print(f"convert.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    n = sum(v.numel() for k, v in sd.items() if k != "pos_embed")
    print(f"wrote {out} ({n / 1e6:.2f}M parameters; DiT kwargs {json.dumps(kwargs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
