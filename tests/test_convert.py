"""Weight interop: facebookresearch/DiT and diffusers checkpoints → our DiT (and back), library and CLI."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dit.convert import (ConversionError, diffusers_config, diffusers_kwargs, diffusers_to_ours, official_kwargs,
                         official_to_ours, ours_to_diffusers)
from dit.models import DiT

diffusers = pytest.importorskip("diffusers")

HEADS, HIDDEN, DEPTH, PATCH, SIZE, CH, CLASSES = 2, 32, 3, 2, 8, 4, 10



def tiny_diffusers(seed: int = 0, tie: bool = True):
    """A randomly initialised diffusers DiT; with tie=True every block shares block 0's embedder values."""
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HIDDEN // HEADS,
                                            in_channels=CH, out_channels=2 * CH, num_layers=DEPTH,
                                            sample_size=SIZE, patch_size=PATCH, num_embeds_ada_norm=CLASSES).eval()
    if tie:
        sd = model.state_dict()
        for key in [k for k in sd if k.startswith("transformer_blocks.0.norm1.emb.")]:
            for i in range(1, DEPTH):
                sd[key.replace("blocks.0.", f"blocks.{i}.")] = sd[key]
        model.load_state_dict(sd)
    return model


def inputs(n: int = 5, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(n, CH, SIZE, SIZE, generator=g, dtype=dtype), torch.tensor([0, 1, 250, 999, 42])[:n],
            torch.tensor([0, 3, 9, CLASSES, 5])[:n])  # includes the null class


# --------------------------------------------------------------------------------------------- diffusers
def test_diffusers_to_ours_same_outputs_and_exact_round_trip():
    theirs = tiny_diffusers()
    sd = theirs.state_dict()
    kwargs = diffusers_kwargs(theirs.config, sd)
    ours = DiT(**kwargs).eval()
    ours.load_state_dict(diffusers_to_ours(sd, kwargs["input_size"]))
    x, t, y = inputs()
    with torch.no_grad():
        want, got = theirs(x, t, y).sample, ours(x, t, y)
    assert got.shape == want.shape == (5, 2 * CH, SIZE, SIZE)
    assert want.abs().mean() > 0.1  # a real signal, not zeros
    assert (got - want).abs().max() <= 1e-5
    back = ours_to_diffusers(ours.state_dict())
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    again = diffusers_to_ours(back, kwargs["input_size"])
    assert all(torch.equal(again[k], v) for k, v in ours.state_dict().items())


def test_ours_to_diffusers_loads_strictly_and_matches():
    torch.manual_seed(1)
    kwargs = dict(input_size=SIZE, patch_size=PATCH, in_channels=CH, hidden_size=HIDDEN, depth=DEPTH,
                  num_heads=HEADS, num_classes=CLASSES, timestep_freq_shift=1.0, mlp_norm_eps=1e-5)
    ours = DiT(**kwargs).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    theirs = diffusers.DiTTransformer2DModel(**diffusers_config(kwargs)).eval()
    theirs.load_state_dict(ours_to_diffusers(ours.state_dict()), strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        assert (theirs(x, t, y).sample - ours(x, t, y)).abs().max() <= 1e-5


def test_diffusers_numerics_knobs_matter():
    """diffusers' DiT differs from the official one (timestep frequencies, MLP LayerNorm eps)."""
    theirs = tiny_diffusers()
    sd = theirs.state_dict()
    official = DiT(**diffusers_kwargs(theirs.config, sd, numerics="official")).eval()
    official.load_state_dict(diffusers_to_ours(sd, SIZE))
    x, t, y = inputs()
    with torch.no_grad():
        assert (official(x, t, y) - theirs(x, t, y).sample).abs().max() > 1e-4


def test_untied_diffusers_embedders_are_refused():
    sd = tiny_diffusers(tie=False).state_dict()
    with pytest.raises(ConversionError, match="embedder"):
        diffusers_to_ours(sd, SIZE)


def test_ours_to_diffusers_refuses_what_diffusers_cannot_hold():
    for kw in ({"num_classes": 0, "class_dropout_prob": 0.0}, {"qk_norm": True}):
        model = DiT(input_size=SIZE, patch_size=PATCH, in_channels=CH, hidden_size=HIDDEN, depth=1, num_heads=2,
                    **kw)
        with pytest.raises(ConversionError):
            ours_to_diffusers(model.state_dict())


# --------------------------------------------------------------------------------------------- official
def official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with facebookresearch/DiT's key names and shapes (written out independently)."""
    g = torch.Generator().manual_seed(seed)
    d, p, hidden = HIDDEN, PATCH, 4 * HIDDEN

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    grid = SIZE // p
    sd = {"x_embedder.proj.weight": r(d, CH, p, p), "x_embedder.proj.bias": r(d),
          "pos_embed": torch.from_numpy(_official_pos_embed(d, grid)).float()[None],
          "t_embedder.mlp.0.weight": r(d, 256), "t_embedder.mlp.0.bias": r(d),
          "t_embedder.mlp.2.weight": r(d, d), "t_embedder.mlp.2.bias": r(d),
          "y_embedder.embedding_table.weight": r(CLASSES + 1, d),
          "final_layer.linear.weight": r(p * p * 2 * CH, d), "final_layer.linear.bias": r(p * p * 2 * CH),
          "final_layer.adaLN_modulation.1.weight": r(2 * d, d), "final_layer.adaLN_modulation.1.bias": r(2 * d)}
    for i in range(DEPTH):
        for name, (o, n) in {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (hidden, d),
                             "mlp.fc2": (d, hidden), "adaLN_modulation.1": (6 * d, d)}.items():
            sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"] = r(o, n), r(o)
    return sd


def _official_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE/DiT 2D sin-cos table, written from the official formulas."""
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    return np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], axis=1)


def reference_forward(sd, x, t, y):
    """The official DiT forward pass written directly on the state dict (float64)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    n, d, p = x.shape[0], HIDDEN, PATCH
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    # the official code builds the frequency features in float32, whatever the model's dtype
    freqs = torch.exp(-math.log(10000) * torch.arange(start=0, end=128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).double()
    t_emb = F.linear(F.silu(F.linear(t_freq, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                     sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = F.silu(t_emb + sd["y_embedder.embedding_table.weight"][y])

    def ln(v):
        return F.layer_norm(v, (d,), eps=1e-6)

    for i in range(DEPTH):
        b = f"blocks.{i}."
        mods = F.linear(c, sd[b + "adaLN_modulation.1.weight"], sd[b + "adaLN_modulation.1.bias"]).chunk(6, dim=1)
        sh1, sc1, g1, sh2, sc2, g2 = (m[:, None] for m in mods)
        a = ln(h) * (1 + sc1) + sh1
        qkv = F.linear(a, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(n, -1, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        w = torch.softmax(q @ k.transpose(-1, -2) * (d // HEADS) ** -0.5, dim=-1)
        a = (w @ v).transpose(1, 2).reshape(n, -1, d)
        h = h + g1 * F.linear(a, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        m = ln(h) * (1 + sc2) + sh2
        m = F.gelu(F.linear(m, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]), approximate="tanh")
        h = h + g2 * F.linear(m, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    shift, scale = F.linear(c, sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    h = ln(h) * (1 + scale[:, None]) + shift[:, None]
    h = F.linear(h, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    g = SIZE // p
    h = h.reshape(n, g, g, p, p, 2 * CH)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(n, 2 * CH, g * p, g * p)


def test_official_state_dict_gives_the_official_outputs():
    sd = official_state_dict()
    kwargs = official_kwargs(sd, num_heads=HEADS)
    assert kwargs == {"input_size": SIZE, "patch_size": PATCH, "in_channels": CH, "hidden_size": HIDDEN,
                      "depth": DEPTH, "num_heads": HEADS, "mlp_ratio": 4.0, "class_dropout_prob": 0.1,
                      "num_classes": CLASSES, "learn_sigma": True}
    ours = DiT(**kwargs).double().eval()
    ours.load_state_dict(official_to_ours({f"module.{k}": v for k, v in sd.items()}))  # DDP prefix stripped
    x, t, y = inputs(dtype=torch.float64)
    torch.testing.assert_close(ours(x, t, y), reference_forward(sd, x, t, y), rtol=1e-9, atol=1e-10)
    # our own initial pos_embed equals the official table
    torch.testing.assert_close(DiT(**kwargs).pos_embed, sd["pos_embed"])


def test_official_key_checks():
    sd = official_state_dict()
    del sd["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match="fc2"):
        official_to_ours(sd)
    with pytest.raises(ConversionError, match="unexpected"):
        official_to_ours({**official_state_dict(), "extra.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="num_heads"):
        official_kwargs({**official_state_dict()})  # hidden 32 is no preset: heads unknown


# --------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_converts_official_and_diffusers_files(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tests.conftest import run_entry

    sd = official_state_dict()
    ckpt = tmp_path / "0001000.pt"
    # as facebookresearch/DiT's train.py saves it: its argparse Namespace too (read with weights_only=True)
    torch.save({"model": {k: v * 0 for k, v in sd.items()}, "ema": sd, "args": argparse.Namespace(lr=1e-4)}, ckpt)
    theirs = tiny_diffusers()
    theirs.save_pretrained(tmp_path / "pipe" / "transformer")
    x, t, y = inputs()

    out = tmp_path / "official.safetensors"
    proc = run_entry(["launch/convert.py", "--from", "official", str(ckpt), "--out", str(out), "--num-heads", "2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    with safe_open(str(out), "pt") as fh:
        meta = json.loads(fh.metadata()["ditstack"])
    model = DiT(**meta["model"]).eval()
    model.load_state_dict(load_file(str(out)))  # the EMA weights were taken
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y).double(), reference_forward(sd, x, t, y), rtol=1e-4, atol=1e-4)
    assert meta["diffusion"]["learn_sigma"] is True and meta["step"] is None

    # diffusers directory and the error paths: the same entry function, in-process (starting Python is slow here)
    from launch.convert import main

    out = tmp_path / "diffusers.safetensors"
    assert main(["--from", "diffusers", str(tmp_path / "pipe"), "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as fh:
        meta = json.loads(fh.metadata()["ditstack"])
    model = DiT(**meta["model"]).eval()
    model.load_state_dict(load_file(str(out)))
    with torch.no_grad():
        assert (model(x, t, y) - theirs(x, t, y).sample).abs().max() <= 1e-5

    # bad inputs: one line on stderr, exit status 2, nothing written
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for args in (["--from", "official", str(bad)], ["--from", "official", str(tmp_path / "missing.pt")],
                 ["--from", "diffusers", str(tmp_path)], ["--from", "official", str(ckpt), "--model", "DiT-S/2"]):
        capsys.readouterr()
        assert main([*args, "--out", str(tmp_path / "x.safetensors")]) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "error" in err, err
    assert not (tmp_path / "x.safetensors").exists()
