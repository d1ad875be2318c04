"""The DiT model family: presets, attention, conditioning variants, checkpointing, CFG, training."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dit.layers import Attention, DiTBlock, get_2d_sincos_pos_embed, timestep_embedding
from dit.models import DiT, DiT_models, preset_kwargs

VARIANTS = ["adaln_zero", "adaln", "cross_attn", "in_context"]



def tiny(**kw) -> DiT:
    """A small DiT (8x8x4 latents, patch 2) with every zero-initialised weight randomised."""
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10,
                class_dropout_prob=0.1)
    args.update(kw)
    model = DiT(**args)
    randomise_zeros(model)
    return model


def randomise_zeros(model: torch.nn.Module, std: float = 0.1) -> None:
    """Give zero-initialised parameters random values so every path influences the output."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * std)


# --------------------------------------------------------------------------------------------- presets
# The paper's Table 4 (parameters as printed by the official train.py, which counts pos_embed; Gflops = forward
# multiply-adds per 256x256 image, i.e. 4x32x32 latents).
PAPER = {"DiT-S/2": (33.0e6, 6.06), "DiT-B/2": (130e6, 23.01), "DiT-L/2": (458e6, 80.71), "DiT-XL/2": (675e6, 118.64)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_preset_parameter_counts_and_flops_match_the_paper(name):
    with torch.device("meta"):  # no memory, no init cost
        model = DiT_models[name](input_size=32, num_classes=1000)
    count = sum(p.numel() for p in model.parameters()) + model.pos_embed.numel()
    params, gflops = PAPER[name]
    assert abs(count / params - 1) < 0.005, count
    assert abs(model.model_flops_per_sample() / 2e9 / gflops - 1) < 0.01


def test_twelve_presets_with_official_names():
    names = [f"DiT-{s}/{p}" for s in ("XL", "L", "B", "S") for p in (2, 4, 8)]
    assert sorted(DiT_models) == sorted(names)
    with torch.device("meta"):
        for name in names:
            m = DiT_models[name](input_size=32, num_classes=1000)
            assert (m.patch_size, m.hidden_size) == (preset_kwargs(name)["patch_size"], preset_kwargs(name)["hidden_size"])
    with pytest.raises(KeyError, match="DiT-S/2"):
        preset_kwargs("DiT-M/2")


def test_official_positional_constructor_and_attributes():
    m = DiT(8, 2, 3, 32, 1, 4, 4.0, 0.1, 5, False)  # the official argument order
    assert (m.in_channels, m.out_channels, m.num_classes) == (3, 3, 5)
    assert DiT(8, 2, 3, 32, 1, 4).out_channels == 6
    with pytest.raises(ValueError, match="conditioning"):
        DiT(8, 2, 3, 32, 1, 4, conditioning="film")


# --------------------------------------------------------------------------------------------- layers
def test_sincos_pos_embed_matches_closed_form():
    d, g = 16, 3
    emb = get_2d_sincos_pos_embed(d, g)
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d / 4))
    for row in range(g):
        for col in range(g):
            e = torch.from_numpy(emb[row * g + col])
            want = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega),
                              torch.cos(row * omega)])
            torch.testing.assert_close(e, want)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 3.0, 999.0])
    emb = timestep_embedding(t, 8).double()
    freqs = torch.exp(-math.log(10000) * torch.arange(4, dtype=torch.float64) / 4)
    want = torch.cat([torch.cos(t.double()[:, None] * freqs), torch.sin(t.double()[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_sdpa_attention_equals_explicit_softmax_attention(qk_norm):
    torch.manual_seed(0)
    attn = Attention(24, num_heads=3, qk_norm=qk_norm).double()
    if qk_norm:
        with torch.no_grad():
            for norm in (attn.q_norm, attn.k_norm):
                norm.weight.normal_(1.0, 0.3)
                norm.bias.normal_(0.0, 0.3)
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(2, 5, 3, 3, 8).permute(2, 0, 3, 1, 4)
    if qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    want = (weights @ v).transpose(1, 2).reshape(2, 5, 24) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), want, rtol=1e-10, atol=1e-12)


def test_fresh_adaln_zero_block_is_identity():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    x, c = torch.randn(3, 16, 32), torch.randn(3, 32)
    for block in model.blocks:
        assert isinstance(block, DiTBlock)
        assert torch.equal(block(x, c), x)
    # and the whole fresh model predicts zeros (zero-initialised output layer)
    out = model(torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]))
    assert out.shape == (3, 8, 8, 8) and not out.abs().sum()


def test_dit_block_is_the_official_block_in_float64():
    """The adaLN-Zero block computes the official block's function (benchmarks/official_dit.py: the official
    module structure and ops); ours takes silu(c), which the model applies once for all blocks."""
    from benchmarks.official_dit import _Block

    torch.manual_seed(0)
    ours, official = DiTBlock(32, 4).double(), _Block(32, 4, 4.0).double()
    randomise_zeros(ours)
    assert official.load_state_dict(ours.state_dict()) is not None
    x, c = torch.randn(3, 16, 32, dtype=torch.float64), torch.randn(3, 32, dtype=torch.float64)
    torch.testing.assert_close(ours(x, F.silu(c)), official(x, c), rtol=1e-12, atol=1e-12)


def test_model_code_has_no_device_dispatch():
    """dit/models.py and dit/layers.py read like the paper: no branch on the device, the autocast state or CPU-only
    ops, nothing imported from the optional CPU speed-ups, and the DiT block (with its shared constructor) within
    40 lines."""
    import ast
    import inspect

    import dit.layers
    import dit.models

    for module in (dit.layers, dit.models):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            where = f"{module.__name__}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("is_autocast_enabled", "get_autocast_dtype", "mkldnn", "is_compiling"), where
                assert not (node.attr == "type" and isinstance(node.value, ast.Attribute)
                            and node.value.attr == "device"), f"{where}: branches on the device type"
            elif isinstance(node, ast.Constant):
                assert node.value not in ("cpu", "cuda"), f"{where}: names a device"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
                assert not any(n.startswith("dit.cpu") or n in ("native", "fused_block", "bf16_linear")
                               for n in names), f"{where}: imports CPU speed code {names}"
    lines = len(inspect.getsource(dit.layers.Block).splitlines()) + len(inspect.getsource(DiTBlock).splitlines())
    assert lines <= 40, lines


# --------------------------------------------------------------------------------------------- variants
@pytest.mark.parametrize("conditioning", VARIANTS)
@pytest.mark.parametrize("num_classes", [10, 0])
def test_variants_forward_backward_shapes(conditioning, num_classes):
    torch.manual_seed(0)
    model = tiny(conditioning=conditioning, num_classes=num_classes, class_dropout_prob=0.1 if num_classes else 0)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    y = torch.tensor([1, 2, 3]) if num_classes else None
    out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # every block receives a gradient (the conditioning reaches the blocks)
    assert all(b.mlp.fc2.weight.grad.abs().sum() > 0 for b in model.blocks)
    if num_classes:
        assert model.y_embedder.embedding_table.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("conditioning", VARIANTS)
def test_conditioning_changes_the_prediction(conditioning):
    torch.manual_seed(0)
    model = tiny(conditioning=conditioning).eval()
    x = torch.randn(2, 4, 8, 8)
    a = model(x, torch.tensor([10, 10]), torch.tensor([1, 1]))
    b = model(x, torch.tensor([10, 10]), torch.tensor([2, 2]))
    c = model(x, torch.tensor([900, 900]), torch.tensor([1, 1]))
    assert (a - b).abs().max() > 1e-4 and (a - c).abs().max() > 1e-4


def test_unconditional_ignores_labels_and_conditional_requires_them():
    torch.manual_seed(0)
    model = tiny(num_classes=0, class_dropout_prob=0.0).eval()
    assert model.y_embedder is None
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 4])
    torch.testing.assert_close(model(x, t), model(x, t, torch.tensor([5, 6])))
    with pytest.raises(ValueError, match="labels"):
        tiny()(x, t)


@pytest.mark.parametrize("shape,patch", [((1, 28, 28), 2), ((1, 28, 28), 4), ((4, 8, 8), 2), ((3, 16, 16), 8)])
def test_any_channels_and_sizes(shape, patch):
    c, h, _ = shape
    model = tiny(input_size=h, patch_size=patch, in_channels=c, learn_sigma=False)
    out = model(torch.randn(2, *shape), torch.tensor([1, 2]), torch.tensor([0, 9]))
    assert out.shape == (2, *shape) and model.out_channels == c


def test_qk_norm_has_parameters_and_trains():
    torch.manual_seed(0)
    model = tiny(qk_norm=True)
    assert model.blocks[0].attn.q_norm.weight.shape == (8,)
    model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])).square().mean().backward()
    assert model.blocks[0].attn.q_norm.weight.grad.abs().sum() > 0
    plain = tiny(qk_norm=False)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all("q_norm" in k or "k_norm" in k for k in unexpected)


# --------------------------------------------------------------------------------------------- labels
def test_label_dropout_maps_to_null_class():
    torch.manual_seed(0)
    model = tiny(class_dropout_prob=1.0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 6])
    train_out = model.train()(x, t, torch.tensor([1, 2]))  # every label dropped
    null_out = model.eval()(x, t, torch.tensor([10, 10]))
    torch.testing.assert_close(train_out, null_out)
    forced = model.eval()(x, t, torch.tensor([1, 2]), force_drop_ids=torch.tensor([1, 0]))
    torch.testing.assert_close(forced[0], null_out[0])
    torch.testing.assert_close(forced[1], model(x, t, torch.tensor([1, 2]))[1])
    no_null = tiny(class_dropout_prob=0.0)
    assert no_null.y_embedder.embedding_table.num_embeddings == 10
    with pytest.raises(ValueError, match="null class"):
        no_null(x, t, torch.tensor([1, 2]), force_drop_ids=torch.tensor([1, 0]))


# --------------------------------------------------------------------------------------------- CFG
def test_cfg_scale_one_equals_conditional_prediction():
    torch.manual_seed(0)
    model = tiny().double().eval()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t, y = torch.tensor([1, 50, 900]), torch.tensor([1, 2, 3])
    out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]), 1.0)
    cond = model(x, t, y)
    torch.testing.assert_close(out[:3, :4], cond[:, :4])
    torch.testing.assert_close(out[3:, :4], cond[:, :4])


@pytest.mark.parametrize("guide_channels", [None, 3])
def test_cfg_guides_all_eps_channels_by_default_and_official_three(guide_channels):
    torch.manual_seed(0)
    model = tiny().double().eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t, y = torch.tensor([7, 70]), torch.tensor([4, 5])
    null = torch.full_like(y, 10)
    out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 4.0, guide_channels)
    cond, uncond = model(x, t, y), model(x, t, null)
    gc = 4 if guide_channels is None else 3
    torch.testing.assert_close(out[:2, :gc], uncond[:, :gc] + 4.0 * (cond[:, :gc] - uncond[:, :gc]))
    torch.testing.assert_close(out[:2, gc:], cond[:, gc:])  # the rest passes through unguided
    torch.testing.assert_close(out[2:, gc:], uncond[:, gc:])


# --------------------------------------------------------------------------------------------- checkpointing
def test_checkpointing_under_bf16_autocast_gives_identical_gradients():
    """Selective recomputation (fc2 outputs kept, the rest recomputed) reproduces the plain bf16 step exactly."""
    torch.manual_seed(0)
    plain = tiny(class_dropout_prob=0.0, depth=3)
    ckpt = tiny(class_dropout_prob=0.0, depth=3, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 600]), torch.tensor([1, 7])
    grads = []
    for model in (plain, ckpt):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
        out.float().square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_checkpoint_policy_keeps_only_down_projections():
    from torch.utils.checkpoint import CheckpointPolicy

    from dit.models import _keep_down_projections

    aten = torch.ops.aten
    tokens, d = torch.empty(64, 32), torch.empty(64, 128)
    fc2 = _keep_down_projections(None, aten.addmm.default, torch.empty(32), d, torch.empty(128, 32))
    fc1 = _keep_down_projections(None, aten.addmm.default, torch.empty(128), tokens, torch.empty(32, 128))
    other = _keep_down_projections(None, aten.gelu.default, tokens)
    assert fc2 == CheckpointPolicy.MUST_SAVE
    assert fc1 == other == CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize("conditioning", VARIANTS)
def test_checkpointed_blocks_give_the_same_gradients(conditioning):
    torch.manual_seed(0)
    plain = tiny(conditioning=conditioning, class_dropout_prob=0.0).double()
    ckpt = tiny(conditioning=conditioning, class_dropout_prob=0.0, grad_checkpointing=True).double()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    t, y = torch.tensor([3, 600]), torch.tensor([1, 7])
    grads = []
    for model in (plain, ckpt):
        x.grad = None
        model(x, t, y).square().sum().backward()
        grads.append({"x": x.grad.clone(), **{n: p.grad for n, p in model.named_parameters()}})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-12, atol=1e-14, msg=name)


# --------------------------------------------------------------------------------------------- training
def test_tiny_dit_overfits_one_batch():
    """Loss on one fixed (x0, t, noise) batch falls 10x within a few hundred steps."""
    from dit.diffusion import create_diffusion

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=4,
                learn_sigma=False)
    diffusion = create_diffusion(learn_sigma=False)
    x0 = torch.randn(8, 1, 8, 8)
    y = torch.arange(8) % 4
    t = torch.randint(0, diffusion.num_timesteps, (8,), generator=torch.Generator().manual_seed(1))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
    losses = []
    for _ in range(300):
        loss = diffusion.training_losses(model, x0, t, model_kwargs={"y": y, "force_drop_ids": torch.zeros(8)},
                                         noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_bf16_autocast_matches_fp32_closely():
    torch.manual_seed(0)
    model = tiny().eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 600]), torch.tensor([1, 7])
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t, y)
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("autocast", [False, True])
def test_token_stream_is_contiguous(autocast):
    """Every block sees a contiguous token stream (the patch embedding's transposed layout would make every
    LayerNorm copy its input), in fp32 and under CPU autocast."""
    model = tiny()
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(torch.randn(2, 4, 8, 8), torch.tensor([3, 600]), torch.tensor([1, 7]))
    assert seen and all(seen)
