"""REPA (representation alignment): the loss maths, the feature grid, the block hook, the frozen encoder, the config,
and launch/train.py with REPA end to end (2 ranks, exact resume, ZeRO-3, exports without the projector)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dit.models import DiT
from dit.repa import BlockCapture, Projector, REPAModel, alignment_loss, resize_token_grid
from eval.config import ConfigError, REPAConfig, load_config
from tests.conftest import run_entry

TINY = "configs/runs/tiny_test.yaml"
ENCODER = "test_vit"  # timm's 6-block, 64-wide test ViT (patch 16): random weights saved to a file stand in for DINOv2


def save_encoder(path: Path, name: str = ENCODER, seed: int = 0, **kwargs) -> Path:
    """Random weights of timm model `name` (its default image size) written as the "pretrained" encoder file."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    return save_encoder(tmp_path_factory.mktemp("repa_encoder") / "test_vit.safetensors")


# ----------------------------------------------------------------------------------------------------- maths
def test_alignment_loss_is_the_mean_negative_cosine_in_float64():
    """REPA's loss.py: per sample, the mean over tokens of -<z/|z|, p/|p|>; then the mean over the batch."""
    g = torch.Generator().manual_seed(0)
    projected = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    features = torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 4.0
    ref = 0.0
    for b in range(3):
        per_token = [-(projected[b, i] @ features[b, i]) / (projected[b, i].norm() * features[b, i].norm())
                     for i in range(5)]
        ref += sum(per_token) / 5
    ref /= 3
    got = alignment_loss(projected.float(), features.float())
    assert got.dtype == torch.float32 and got.dim() == 0
    assert float(got) == pytest.approx(float(ref), abs=1e-6)
    # perfect alignment (any positive scale) is -1, opposite directions +1
    assert float(alignment_loss(features.float() * 0.3, features.float())) == pytest.approx(-1.0, abs=1e-6)
    assert float(alignment_loss(-features.float(), features.float())) == pytest.approx(1.0, abs=1e-6)


def test_alignment_loss_trains_the_projection_only():
    p = torch.randn(2, 4, 3, requires_grad=True)
    z = torch.randn(2, 4, 3, requires_grad=True)
    alignment_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0 and z.grad is None
    with pytest.raises(ValueError, match="differ in shape"):
        alignment_loss(torch.randn(2, 4, 3), torch.randn(2, 16, 3))


def test_resize_token_grid_keeps_row_major_layout_and_means():
    b, c = 2, 3
    rows = torch.arange(4.0).view(4, 1, 1).expand(4, 4, c)  # [row, column, channel]: the row index everywhere
    feats = rows.reshape(1, 16, c).repeat(b, 1, 1)  # [B, 16 tokens (row-major), C]
    assert resize_token_grid(feats, 4) is feats  # same grid: untouched
    small = resize_token_grid(feats, 2).view(b, 2, 2, c)
    assert torch.allclose(small[:, :, 0], small[:, :, 1])  # constant along a row
    assert (small[:, 1] > small[:, 0]).all()  # increasing down the rows
    assert float(small.mean()) == pytest.approx(float(feats.mean()), abs=1e-5)
    big = resize_token_grid(feats, 8).view(b, 8, 8, c)
    assert torch.allclose(big[:, :, 0], big[:, :, 7]) and (big[:, 7] > big[:, 0]).all()
    # against the same resampling done by hand on the [B, C, H, W] image
    img = feats.transpose(1, 2).reshape(b, c, 4, 4)
    ref = F.interpolate(img, size=(8, 8), mode="bilinear", align_corners=False).reshape(b, c, 64).transpose(1, 2)
    torch.testing.assert_close(resize_token_grid(feats, 8), ref)
    with pytest.raises(ValueError, match="square"):
        resize_token_grid(torch.randn(1, 6, 2), 2)


def test_projector_is_three_linears_with_silu():
    proj = Projector(16, 32, 8)
    kinds = [type(m).__name__ for m in proj]
    assert kinds == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert [(m.in_features, m.out_features) for m in proj if isinstance(m, torch.nn.Linear)] == \
        [(16, 32), (32, 32), (32, 8)]
    assert all(float(m.bias.detach().abs().sum()) == 0 for m in proj if isinstance(m, torch.nn.Linear))
    assert proj.flops_per_token() == 2 * (16 * 32 + 32 * 32 + 32 * 8)


def _tiny_dit(**kw) -> DiT:
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=5, **kw)
    for p in model.parameters():  # adaLN-Zero starts every block as the identity: make the blocks do something
        p.data.add_(0.02 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("conditioning", ["adaln_zero", "in_context"])
def test_hook_sees_block_k_output_and_leaves_the_prediction_alone(conditioning):
    dit = _tiny_dit(conditioning=conditioning)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 500.0]), torch.tensor([1, 4])
    plain = dit(x, t, y)
    model = REPAModel(dit, depth=2, projector_dim=16, z_dim=6)
    out, projected = model(x, t, y)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    # block 2's output, by hand
    h = dit.x_embedder(x) + dit.pos_embed
    t_emb, y_emb = dit._conditioning(t, y, None)
    if conditioning == "adaln_zero":
        cond = F.silu(t_emb + y_emb)
    else:
        h = torch.cat([torch.stack([t_emb, y_emb], dim=1), h], dim=1)
        cond = None
    for block in dit.blocks[:2]:
        h = block(h, cond)
    tokens = h[:, -16:]
    assert projected.shape == (2, 16, 6)
    torch.testing.assert_close(projected, model.projector(tokens))
    assert model.grid == 4
    # the hook is armed only inside REPAModel's forward: the DiT called alone (sampling) captures nothing
    dit(x, t, y)
    assert model.capture.tokens is None
    with pytest.raises(ValueError, match="outside the DiT's blocks"):
        REPAModel(_tiny_dit(), depth=4, projector_dim=4, z_dim=4)


def test_hook_with_gradient_checkpointing_trains_and_keeps_nothing():
    """The recomputation of a checkpointed block in the backward runs its hooks again: nothing is kept then."""
    dit = _tiny_dit(grad_checkpointing=True)
    model = REPAModel(dit, depth=1, projector_dim=8, z_dim=4)
    out, projected = model(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))
    (out.square().mean() + alignment_loss(projected, torch.randn(2, 16, 4))).backward()
    assert model.capture.tokens is None
    assert dit.blocks[0].attn.qkv.weight.grad is not None and model.projector[0].weight.grad is not None
    # the projector's gradient reaches block 1 only through the tokens: a loss on it alone moves block 1
    dit.zero_grad()
    _, projected = model(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))
    alignment_loss(projected, torch.randn(2, 16, 4)).backward()
    assert dit.blocks[0].mlp.fc2.weight.grad.abs().sum() > 0 and dit.blocks[2].mlp.fc2.weight.grad is None


def test_block_capture_take_without_a_forward_is_an_error():
    cap = BlockCapture(torch.nn.Identity(), 4)
    with pytest.raises(RuntimeError, match="captured nothing"):
        cap.take()
    cap.remove()


# ----------------------------------------------------------------------------------------------------- encoder
def test_encoder_features_are_the_patch_tokens_of_the_normalised_resized_image(encoder_file):
    import timm

    from launch.repa import load_encoder

    enc = load_encoder(REPAConfig(enabled=True, encoder=ENCODER, encoder_weights=str(encoder_file),
                                  encoder_resolution=64), torch.device("cpu"), bf16=False)
    assert (enc.grid, enc.embed_dim, enc.prefix) == (4, 64, 1)
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training
    # by hand: the saved model (160 px), its position embedding resampled to 4x4 by timm's filter
    ref_model = timm.create_model(ENCODER, pretrained=False, img_size=64, num_classes=0)
    from timm.models.vision_transformer import checkpoint_filter_fn
    from safetensors.torch import load_file

    ref_model.load_state_dict(checkpoint_filter_fn(load_file(str(encoder_file)), ref_model), strict=False)
    ref_model.eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 1, 32, 32), generator=g, dtype=torch.uint8)
    x = F.interpolate(images.float().div(255).expand(-1, 3, -1, -1), size=(64, 64), mode="bicubic",
                      align_corners=False)
    x = (x - 0.5) / 0.5  # test_vit's mean and std
    with torch.no_grad():
        ref = ref_model.forward_features(x)[:, 1:]
    got = enc.features(images, 4)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the same images as the trainer's [-1, 1] pixels give the same features; another grid is resampled
    torch.testing.assert_close(enc.features(images.float() / 127.5 - 1.0, 4), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(enc.features(images, 2), resize_token_grid(ref, 2), rtol=1e-5, atol=1e-5)
    assert enc.flops_per_image() > 0


def test_encoder_loads_a_torch_state_dict_and_refuses_unfitting_or_missing_files(tmp_path, encoder_file):
    from launch.repa import EncoderWeightsMissing, load_encoder

    pt = save_encoder(tmp_path / "enc.pt")
    cfg = REPAConfig(enabled=True, encoder=ENCODER, encoder_weights=str(pt), encoder_resolution=32)
    assert load_encoder(cfg, torch.device("cpu"), bf16=False).grid == 2
    other = save_encoder(tmp_path / "other.safetensors", name="test_vit3")
    with pytest.raises(EncoderWeightsMissing, match="does not fit test_vit"):
        load_encoder(REPAConfig(enabled=True, encoder=ENCODER, encoder_weights=str(other)), torch.device("cpu"),
                     False)
    missing = REPAConfig(enabled=True, encoder_weights=str(tmp_path / "dinov2.safetensors"))
    with pytest.raises(EncoderWeightsMissing) as err:
        load_encoder(missing, torch.device("cpu"), False)
    message = str(err.value)
    assert "\n" not in message and message.startswith("repa.encoder_weights:")
    assert "timm/vit_base_patch14_dinov2.lvd142m" in message and "dinov2.safetensors" in message
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderWeightsMissing, match="not a readable weights file"):
        load_encoder(REPAConfig(enabled=True, encoder=ENCODER, encoder_weights=str(tmp_path / "junk.pt")),
                     torch.device("cpu"), False)
    with pytest.raises(ConfigError, match="repa.encoder_resolution: 40 is not a multiple"):
        load_encoder(REPAConfig(enabled=True, encoder=ENCODER, encoder_weights=str(encoder_file),
                                encoder_resolution=40), torch.device("cpu"), False)
    with pytest.raises(ConfigError, match="repa.encoder: 'no_such_vit' is not a timm model"):
        load_encoder(REPAConfig(enabled=True, encoder="no_such_vit", encoder_weights=str(encoder_file)),
                     torch.device("cpu"), False)


# ----------------------------------------------------------------------------------------------------- config
def test_repa_config_checks(tmp_path):
    cfg = load_config(TINY)
    assert cfg.repa.enabled is False and cfg.repa.depth == 8 and cfg.repa.weight == 0.5
    assert cfg.repa.encoder == "vit_base_patch14_dinov2.lvd142m" and cfg.repa.projector_dim == 2048
    assert cfg.repa.encoder_resolution == 224
    ok = load_config(TINY, ["repa.enabled=true", "repa.depth=2", "repa.encoder_weights=w.safetensors"])
    assert ok.repa.enabled and ok.repa.depth == 2
    cases = {
        "repa.depth: 3 exceeds the model's 2 blocks": ["repa.enabled=true", "repa.depth=3",
                                                       "repa.encoder_weights=w.safetensors"],
        "repa.encoder_weights: required when repa.enabled": ["repa.enabled=true", "repa.depth=1"],
        "repa.weight": ["repa.weight=-1"],
        "repa.projector_dim": ["repa.projector_dim=0"],
        "repa.encoder_resolution": ["repa.encoder_resolution=0"],
        "unknown config key 'repa.lambda'": ["repa.lambda=0.5"],
    }
    for needle, sets in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(TINY, sets)
        assert needle in str(err.value) and "\n" not in str(err.value)
    # a preset's depth bounds it too (DiT-S/2: 12 blocks); disabled, nothing is checked
    with pytest.raises(ConfigError, match="repa.depth: 13 exceeds the model's 12 blocks"):
        load_config(None, ["model.name=DiT-S/2", "repa.enabled=true", "repa.depth=13", "repa.encoder_weights=w"])
    assert load_config(None, ["model.name=DiT-S/2", "repa.depth=13"]).repa.depth == 13


# ----------------------------------------------------------------------------------------------------- trainer
def repa_sets(encoder_file: Path, depth: int = 1) -> list[str]:
    """Flow matching with REPA on the tiny pixel-space config (4x4 DiT tokens; the encoder's 2x2 grid at 32 px is
    resampled to them)."""
    return ["diffusion.objective=flow", "model.learn_sigma=false", "repa.enabled=true", f"repa.depth={depth}",
            f"repa.encoder={ENCODER}", f"repa.encoder_weights={encoder_file}", "repa.encoder_resolution=32",
            "repa.projector_dim=32", "repa.weight=0.5"]


def log_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_flow_with_repa_on_two_ranks_resumes_exactly_and_exports_the_dit_alone(small_shards, encoder_file, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tests.test_train import assert_same_weights, run_train

    common = [*repa_sets(encoder_file), "train.max_steps=8", "train.ckpt_every=4", "train.log_every=1",
              "train.ema_decay=0.5", "train.deepspeed.zero_stage=2", "data.num_workers=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(straight, small_shards, *common)
    run_train(split, small_shards, *common, "train.max_steps=4")
    run_train(split, small_shards, *common, resume="auto")
    assert_same_weights(straight / "model_ema.safetensors", split / "model_ema.safetensors")
    a, b = log_records(straight), log_records(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        for key in ("loss", "repa_loss", "grad_norm"):
            assert abs(a[step][key] - b[step][key]) <= 1e-6, (step, key, a[step][key], b[step][key])
    assert all(-1.0 <= r["repa_loss"] <= 1.0 for r in a.values())
    assert a[8]["repa_loss"] < a[1]["repa_loss"]  # the projector (and block 1) learn to align
    # the projector trains with the DiT: its weights and AdamW moments are in the optimizer state ...
    ckpt = straight / "checkpoints" / "step_0000008"
    names = set()
    for f in (ckpt / "optim").glob("rank_*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            names |= {k.split("|")[0] for k in fh.keys()}
    assert any(n.startswith("projector.") for n in names) and any(n.startswith("dit.") for n in names)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["repa"] == {"depth": 1, "weight": 0.5, "encoder": ENCODER, "projector_dim": 32,
                            "encoder_resolution": 32}
    # ... but the EMA and the export are the DiT alone, under its own parameter names
    exported = load_file(str(straight / "model_ema.safetensors"))
    with safe_open(str(straight / "model_ema.safetensors"), "pt") as fh:
        header = json.loads(fh.metadata()["ditstack"])
    dit = DiT(**header["model"])
    assert set(exported) == set(dit.state_dict())
    dit.load_state_dict(exported)
    assert set(load_file(str(ckpt / "ema.safetensors"))) == set(exported)
    # and it samples
    proc = run_entry(["launch/sample.py", "--ckpt", str(straight), "--labels", "1", "7", "--steps", "3",
                      "--out", str(tmp_path / "grid.png"), "--no-progress"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "grid.png").is_file()
    # a resume with other REPA settings (or without REPA) is refused in one line, exit 2 (torchrun reports the
    # workers' status and exits 1)
    for other, why in (([*common, "repa.depth=2", "train.max_steps=12"], "repa.depth: checkpoint 1, config 2"),
                       ([*[s for s in common if not s.startswith("repa.")], "train.max_steps=12"],
                        "repa: checkpoint {")):
        out = run_train(split, small_shards, *other, resume="auto", expect=1)
        assert "exitcode  : 2" in out, out[-3000:]
        refused = [line for line in out.splitlines() if "differs from this config" in line]
        assert refused and why in refused[-1], out[-3000:]


@pytest.mark.slow
def test_zero3_with_repa_trains_like_zero0(small_shards, encoder_file, tmp_path):
    """ZeRO-3 partitions the DiT's and the projector's parameters: the hooked block's tokens and the projector
    (gathered by the engine's hooks as a submodule) must compute what plain data parallelism computes."""
    from tests.test_train import assert_same_weights, run_train

    common = [*repa_sets(encoder_file, depth=2), "train.max_steps=3", "train.ckpt_every=3", "train.log_every=1",
              "train.ema_decay=0.5", "train.micro_batch_size=2"]
    plain, sharded = tmp_path / "zero0", tmp_path / "zero3"
    run_train(plain, small_shards, *common, "train.deepspeed.zero_stage=0")
    run_train(sharded, small_shards, *common, "train.deepspeed.zero_stage=3")
    a, b = log_records(plain), log_records(sharded)
    for step in (1, 2, 3):
        assert a[step]["repa_loss"] == pytest.approx(b[step]["repa_loss"], rel=1e-5, abs=1e-6)
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5, abs=1e-6)
    assert_same_weights(plain / "model_ema.safetensors", sharded / "model_ema.safetensors", tol=1e-5)


@pytest.mark.slow
def test_missing_encoder_weights_stop_the_trainer_with_one_line(small_shards, tmp_path):
    absent = tmp_path / "dinov2_vitb14.safetensors"
    sets = [f"data.shards={small_shards}", "train.deepspeed.zero_stage=0", "repa.enabled=true", "repa.depth=1",
            f"repa.encoder_weights={absent}"]
    proc = run_entry(["launch/train.py", "--config", TINY, "--run-dir", str(tmp_path / "run"),
                      *sum((["--set", s] for s in sets), [])], timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "repa.encoder_weights" in last and str(absent) in last and "timm/vit_base_patch14_dinov2" in last
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_repa_step_never_reads_a_device_value_on_the_host(precision, small_shards, encoder_file, tmp_path):
    """The encoder's forward, the feature resampling, the hook, the projector and the alignment loss add no host
    read to the ZeRO-0 step (each would wait for the GPU): recorded as in tests/test_gpu_semantics.py."""
    out = tmp_path / "reads.json"
    sets = [*repa_sets(encoder_file), f"data.shards={small_shards}", "train.deepspeed.zero_stage=0",
            f"train.precision={precision}", "train.grad_clip=0.01", "train.micro_batch_size=4"]
    proc = run_entry(["tests/support/repa_host_reads.py", str(out), "3", "--", "--config", TINY,
                      "--run-dir", str(tmp_path / "run"), *sum((["--set", s] for s in sets), [])])
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads(out.read_text())
    assert record["reads"] == [] and record["terms"] == ["grad_norm", "loss", "repa_loss"]


def test_mfu_counts_the_projector_with_the_dit():
    from launch.train import _trained_flops_per_sample

    dit = _tiny_dit()
    model = REPAModel(dit, depth=1, projector_dim=8, z_dim=4)
    assert _trained_flops_per_sample(dit) == dit.model_flops_per_sample()
    assert _trained_flops_per_sample(model) == dit.model_flops_per_sample() + 16 * 2 * (32 * 8 + 8 * 8 + 8 * 4)


# ----------------------------------------------------------------------------------------- latents with images
def _id_flip_encoder(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A "VAE" whose latent says which synthetic id image it saw and whether it was flipped: channel 0 = the id,
    channel 1 = +1 (as stored) or -1 (mirrored); a tiny posterior std."""
    u8 = torch.round((x.double() + 1.0) * 127.5)
    ids = u8[:, 0, 0, 0] + 256 * u8[:, 0, 1, 0]
    sign = torch.where(x[:, 0, 2, 0] > 0, 1.0, -1.0).double()
    mean = torch.stack([ids, sign], dim=1).view(-1, 2, 1, 1).expand(-1, 2, 2, 2).float()
    return mean, torch.full_like(mean, 1e-4)


@pytest.fixture(scope="module")
def latents_with_images(tmp_path_factory) -> tuple[Path, Path]:
    from data_pipeline.encode_latents import encode_shards
    from data_pipeline.synthetic import write_image_shards

    base = tmp_path_factory.mktemp("lat_img")
    write_image_shards(base / "img", [20, 20, 13], image_size=8)
    encode_shards(_id_flip_encoder, base / "img", base / "lat", batch_size=8, vae_name="id-flip",
                  scale_factor=1.0, keep_images=True)
    return base / "img", base / "lat"


def test_encode_latents_keeps_the_source_images(latents_with_images):
    from data_pipeline.encode_latents import build_parser
    from data_pipeline.tario import ShardReader

    img, lat = latents_with_images
    m = json.loads((lat / "manifest.json").read_text())
    assert m["images"] == {"format": "png"} and m["total"] == 53 and m["kind"] == "latent"
    for entry in m["shards"]:  # byte for byte the input members, beside each latent
        src, out = ShardReader([str(img / entry["name"])]), ShardReader([str(lat / entry["name"])])
        si, oi = src.index(0), out.index(0)
        assert si.keys == oi.keys and len(oi.keys) == entry["num_samples"]
        for a, b in zip(si.samples, oi.samples):
            assert set(b) == {"npy", "png", "cls"}
            assert src.read(0, *a["png"]) == out.read(0, *b["png"])
        src.close()
        out.close()
    args = ["--vae", "v", "--shards", "s", "--out", "o"]
    assert build_parser().parse_args(args + ["--keep-images"]).keep_images
    assert not build_parser().parse_args(args).keep_images


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_yields_each_latents_image_flipped_with_its_twin(latents_with_images, workers):
    from data_pipeline.loader import build_stream
    from data_pipeline.synthetic import flipped_from_images, ids_from_images

    _, lat = latents_with_images
    kw = dict(batch_size=5, seed=3, num_workers=workers)
    with_images, plain = build_stream(lat, with_images=True, **kw), build_stream(lat, **kw)
    it, ref = iter(with_images), iter(plain)
    flips, seen = [], set()
    for _ in range(15):  # 10 batches per epoch: into the second epoch
        x, y, images = next(it)
        x0, y0 = next(ref)
        assert torch.equal(x, x0) and torch.equal(y, y0)  # the batches of the stream without images
        assert images.dtype == torch.uint8 and images.shape == (5, 1, 8, 8)
        pixels = images.float() / 127.5 - 1.0
        ids, flipped = ids_from_images(pixels), flipped_from_images(pixels)
        assert np.array_equal(ids, torch.round(x[:, 0, 0, 0]).long().numpy())
        assert np.array_equal(flipped, (x[:, 1, 0, 0] < 0).numpy())  # the image mirrored with its twin
        assert np.array_equal(ids % 10, y.numpy())
        flips += flipped.tolist()
        seen |= set(ids.tolist())
    assert any(flips) and not all(flips) and len(seen) > 40
    # exact resume: the position continues the images too
    position = json.loads(json.dumps(with_images.position()))
    resumed = build_stream(lat, with_images=True, position=position, **kw)
    a, b = next(it), next(iter(resumed))
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and len(b) == 3
    for s in (with_images, plain, resumed):
        s.close()


def test_corrupt_latent_rows_are_replaced_with_their_images():
    from data_pipeline.decoders import LatentImageDecoder, replace_corrupt

    manifest = {"kind": "latent", "class_names": [], "image_size": 4, "channels": 1, "images": {"format": "png"},
                "latent": {"shape": [1, 2, 2], "stored": "sample", "shift": [0.0], "scale": [1.0]}}
    dec = LatentImageDecoder(manifest)
    batch = dec.new_batch(3)
    batch["lat"][:] = np.arange(3, dtype=np.float16).reshape(3, 1, 1, 1)
    batch["img"][:] = np.arange(3, dtype=np.uint8).reshape(3, 1, 1, 1)
    batch["lat"][1, 0, 0, 0] = np.nan
    assert dec.invalid_rows(batch).tolist() == [False, True, False]
    labels = np.zeros(3, dtype=np.int64)
    replace_corrupt(batch, labels, [0, 2])
    x, images = dec.finish(batch, 0)
    assert x[:, 0, 0, 0].tolist() == [0.0, 0.0, 2.0] and images[:, 0, 0, 0].tolist() == [0, 0, 2]
    from data_pipeline.manifest import ManifestError

    with pytest.raises(ManifestError, match="--keep-images"):
        LatentImageDecoder({**manifest, "images": None})


def test_with_images_needs_latent_shards_that_carry_them(latents_with_images, tmp_path):
    from data_pipeline.loader import build_stream
    from data_pipeline.manifest import ManifestError
    from data_pipeline.synthetic import write_latent_shards

    img, _ = latents_with_images
    with pytest.raises(ManifestError, match="image shards' x is the image itself"):
        build_stream(img, batch_size=4, with_images=True)
    write_latent_shards(tmp_path, [8], shape=(1, 2, 2))
    with pytest.raises(ManifestError, match="encode_latents.py --keep-images"):
        build_stream(tmp_path, batch_size=4, with_images=True)


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_remote_latents_with_images(latents_with_images, tmp_path, monkeypatch, mode):
    """Over HTTP: exact mode (through the local cache) and resampled mode (webdataset streams the samples, the
    image members with them) give each latent its image, flipped with its twin."""
    import shutil

    from data_pipeline.loader import build_stream
    from data_pipeline.synthetic import flipped_from_images, ids_from_images
    from tests.support.servers import HttpServer

    for key in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(key, "127.0.0.1,localhost")
    _, lat = latents_with_images
    shutil.copytree(lat, tmp_path / "www" / "lat")
    server = HttpServer(tmp_path / "www", tmp_path / "server").start()
    try:
        stream = build_stream(f"{server.url}/lat", batch_size=5, seed=1, mode=mode, with_images=True,
                              cache_dir=str(tmp_path / "cache"), shuffle_buffer=8)
        it = iter(stream)
        flips = []
        for _ in range(6):
            x, y, images = next(it)
            pixels = images.float() / 127.5 - 1.0
            assert np.array_equal(ids_from_images(pixels), torch.round(x[:, 0, 0, 0]).long().numpy())
            assert np.array_equal(flipped_from_images(pixels), (x[:, 1, 0, 0] < 0).numpy())
            flips += flipped_from_images(pixels).tolist()
        assert any(flips) and not all(flips)
        stream.close()
    finally:
        server.stop()


def _pool_encoder(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in VAE: 4x4 average pooling into 4 channels (32x32x1 → 4x8x8), posterior std 0.1."""
    mean = F.avg_pool2d(x, 4).repeat(1, 4, 1, 1) * torch.tensor([1.0, -1.0, 0.5, 2.0]).view(1, 4, 1, 1)
    return mean, torch.full_like(mean, 0.1)


@pytest.mark.slow
def test_flow_with_repa_on_latents_reads_their_images_and_resumes_exactly(small_shards, encoder_file, tmp_path):
    from data_pipeline.encode_latents import encode_shards
    from tests.test_train import assert_same_weights, run_train

    for keep in (True, False):
        encode_shards(_pool_encoder, small_shards, tmp_path / f"lat_{keep}", batch_size=16, vae_name="pool",
                      keep_images=keep)
    lat = tmp_path / "lat_True"
    common = [*repa_sets(encoder_file), "model.patch_size=2", "train.max_steps=6", "train.ckpt_every=3",
              "train.log_every=1", "train.ema_decay=0.5", "train.deepspeed.zero_stage=0", "data.num_workers=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(straight, lat, *common)
    run_train(split, lat, *common, "train.max_steps=3")
    run_train(split, lat, *common, resume="auto")
    assert_same_weights(straight / "model_ema.safetensors", split / "model_ema.safetensors")
    a, b = log_records(straight), log_records(split)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(abs(a[s][k] - b[s][k]) <= 1e-6 for s in a for k in ("loss", "repa_loss"))
    meta = json.loads((straight / "checkpoints" / "step_0000006" / "meta.json").read_text())
    assert meta["latent"]["shape"] == [4, 8, 8] and meta["repa"]["encoder"] == ENCODER
    # latent shards without their images: one line naming the fix, exit 2 on every rank
    out = run_train(tmp_path / "noimg", tmp_path / "lat_False", *common, expect=1)
    assert "exitcode  : 2" in out and "encode_latents.py --keep-images" in out, out[-3000:]


def test_images_come_in_pinned_memory_for_a_gpu(latents_with_images, monkeypatch):
    """The trainer copies the images to the GPU with non_blocking=True: they must be pinned like x and y."""
    from data_pipeline.loader import build_stream

    _, lat = latents_with_images
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(self.dtype) or self)
    stream = build_stream(lat, batch_size=4, with_images=True, pin_memory=True)
    next(iter(stream))
    assert pinned == [torch.float32, torch.int64, torch.uint8]
    stream.close()


@pytest.mark.slow
def test_ddpm_with_learned_sigma_trains_with_repa(small_shards, encoder_file, tmp_path):
    """REPA on the DDPM objective (the hybrid loss with learned sigma): one forward per step, both terms logged."""
    sets = [f"data.shards={small_shards}", "train.deepspeed.zero_stage=0", "train.max_steps=2", "train.log_every=1",
            *[s for s in repa_sets(encoder_file) if not s.startswith(("diffusion.", "model."))]]
    run = tmp_path / "ddpm"
    proc = run_entry(["launch/train.py", "--config", TINY, "--run-dir", str(run),
                      *sum((["--set", s] for s in sets), [])], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = log_records(run)
    assert sorted(records) == [1, 2] and all(-1 <= r["repa_loss"] <= 1 and r["loss"] > 0 for r in records.values())
    meta = json.loads((run / "checkpoints" / "step_0000002" / "meta.json").read_text())
    assert "objective" not in meta["diffusion"] and meta["model"]["learn_sigma"] is True
