"""The fused fp32 block path (dit/fused_block.py): each op against float64, thread-count independence, where it
applies, and whole-model gradients against the plain path."""
from __future__ import annotations

import ctypes
import subprocess
import sys
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dit import fused_block, native
from tests.conftest import ROOT, entry_env, native_kernels_marker

needs_kernels = native_kernels_marker()


# --------------------------------------------------------------------------------------------- float64 references
def _norm_modulate_ref(x, shift, scale, eps):
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


def _linear_gelu_ref(x, w, b):
    return F.gelu(F.linear(x, w, b), approximate="tanh")


def _gated_ref(res, gate, h, w, b):
    return res + gate[:, None] * F.linear(h, w, b)


def _qkv_attention_ref(x, w, b, heads):
    n, t, _ = x.shape
    d = w.shape[0] // 3
    q, k, v = F.linear(x, w, b).view(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
    att = torch.softmax(q @ k.transpose(-1, -2) * (d // heads) ** -0.5, dim=-1) @ v
    return att.transpose(1, 2).reshape(n, t, d)


def _cases(n: int, t: int, d: int, heads: int) -> list[tuple[str, Callable, Callable, list[torch.Tensor]]]:
    """(name, fused op, float64 reference, fp32 inputs) for every op of the fused block."""
    g = torch.Generator().manual_seed(d * 1000 + t)

    def r(*shape, s=1.0):
        return torch.randn(*shape, generator=g) * s

    eps = 1e-6
    return [
        ("norm_modulate", lambda x, sh, sc: fused_block.norm_modulate(x, sh, sc, eps),
         lambda x, sh, sc: _norm_modulate_ref(x, sh, sc, eps), [r(n, t, d, s=3) + 1, r(n, d), r(n, d, s=0.5)]),
        ("linear_gelu", lambda x, w, b: fused_block._LinearGelu.apply(x, w, b), _linear_gelu_ref,
         [r(n, t, d), r(4 * d, d, s=0.3), r(4 * d)]),
        ("linear_gated_residual", lambda res, gate, h, w, b: fused_block._LinearGatedResidual.apply(res, gate, h, w, b),
         _gated_ref, [r(n, t, d), r(n, d), r(n, t, 4 * d), r(d, 4 * d, s=0.1), r(d)]),
        ("qkv_attention", lambda x, w, b: fused_block._QKVAttention.apply(x, w, b, heads),
         lambda x, w, b: _qkv_attention_ref(x, w, b, heads), [r(n, t, d), r(3 * d, d, s=0.2), r(3 * d)]),
    ]


def _max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def check_ops_against_float64(n: int = 3, t: int = 33, d: int = 40, heads: int = 2) -> list[str]:
    """Every fused op's value and gradients against float64, no further from it than the plain fp32 ops (ATen)
    are, up to a factor 4 or 2e-6 relative; returns the names checked. Also run in the portable build's test."""
    checked = []
    for name, fused, ref, inputs in _cases(n, t, d, heads):
        x32 = [v.clone().requires_grad_() for v in inputs]
        x64 = [v.double().requires_grad_() for v in inputs]
        plain = [v.clone().requires_grad_() for v in inputs]
        out, want, base = fused(*x32), ref(*x64), ref(*plain)
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
        got_g = torch.autograd.grad(out, x32, gout)
        want_g = torch.autograd.grad(want, x64, gout.double())
        base_g = torch.autograd.grad(base, plain, gout)
        for i, (a, w, b) in enumerate(zip((out, *got_g), (want, *want_g), (base, *base_g))):
            assert a.dtype == torch.float32 and a.shape == w.shape, (name, i)
            err, aten = _max_rel_err(a, w), _max_rel_err(b, w)
            assert err <= max(4 * aten, 2e-6), f"{name}: {'output' if i == 0 else f'grad {i - 1}'} " \
                                               f"error {err:.2e} vs plain fp32 {aten:.2e}"
        checked.append(name)
    return checked


@needs_kernels
@pytest.mark.parametrize("t, d, heads", [(33, 40, 2),    # channels with a scalar tail (40 = 2 x 16 + 8)
                                         (16, 64, 4),    # a multiple of the vector width
                                         (1, 24, 3)])    # one token, 8-channel heads
def test_ops_match_float64(t, d, heads):
    assert check_ops_against_float64(3, t, d, heads) == ["norm_modulate", "linear_gelu", "linear_gated_residual",
                                                         "qkv_attention"]


@needs_kernels
def test_norm_modulate_large_mean_and_constant_rows():
    """Two-pass variance: rows with a mean far above their spread normalise like float64; a constant row gives
    the shift (0 * rstd) and finite gradients."""
    x = torch.randn(2, 3, 64) + 300.0  # a one-pass E[x^2] - E[x]^2 in fp32 would be ~1 % off here
    x[1, 2] = 5.0
    shift, scale = torch.randn(2, 64), torch.randn(2, 64)
    out = fused_block.norm_modulate(x.requires_grad_(), shift, scale, 1e-6)
    want = _norm_modulate_ref(x.double(), shift.double(), scale.double(), 1e-6)
    aten = _norm_modulate_ref(x.detach(), shift, scale, 1e-6)
    assert _max_rel_err(out, want) <= max(4 * _max_rel_err(aten, want), 1e-5)
    torch.testing.assert_close(out[1, 2], shift[1])
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.isfinite(gx).all()


@needs_kernels
def test_bad_operands_are_rejected_before_the_kernels():
    """The kernels index raw memory: a wrong shape or dtype is a ValueError naming the operand, not a crash."""
    x, lin = torch.randn(2, 5, 8, requires_grad=True), nn.Linear(8, 24)
    with pytest.raises(ValueError, match="shift must be a float32 CPU tensor of shape \\[2, 8\\]"):
        fused_block.norm_modulate(x, torch.randn(2, 1, 8), torch.randn(2, 8), 1e-6)
    with pytest.raises(ValueError, match="x must be"):
        fused_block.linear_gelu(x.detach().bfloat16(), lin)
    with pytest.raises(ValueError, match="weight must be"):
        fused_block.linear_gelu(torch.randn(2, 5, 9), lin)
    with pytest.raises(ValueError, match="gate must be"):
        fused_block.linear_gated_residual(torch.randn(2, 5, 24), torch.randn(3, 24), x, lin)
    with pytest.raises(ValueError, match="needs a bias"):
        fused_block.qkv_attention(x, nn.Linear(8, 24, bias=False), 2)
    with pytest.raises(ValueError, match="not 3 x a multiple of 5 heads"):
        fused_block.qkv_attention(x, lin, 5)


# --------------------------------------------------------------------------------------------- determinism
@needs_kernels
def test_kernels_do_not_depend_on_the_thread_count():
    """Per-sample sums run on one thread each in a fixed order: bit-identical results for 1, 2 and 3 threads."""
    lib, p = native._library(), native._ptr
    torch.manual_seed(0)
    n, t, d = 5, 64, 96
    x, g = torch.randn(n, t, d), torch.randn(n, t, d)
    shift, scale, bias = torch.randn(n, d), torch.randn(n, d), torch.randn(d)
    q, k, v = (torch.randn(n, t, d).transpose(0, 1).contiguous().transpose(0, 1) for _ in range(3))  # strided
    results = []
    for threads in (1, 2, 3):
        out, gx, mean, rstd = torch.empty_like(x), torch.empty_like(x), torch.empty(n * t), torch.empty(n * t)
        gsc, gsh, gb, gq = torch.empty(n, d), torch.empty(n, d), torch.empty(n, d), torch.empty(n, 3 * d)
        gelu_out, gelu_g, res, tokens = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x), \
            torch.empty(n, t, 3 * d)
        lib.dit_norm_modulate_fwd_f32(p(x), p(shift), p(scale), 1e-6, p(out), p(mean), p(rstd), n, t, d, threads)
        lib.dit_norm_modulate_bwd_f32(p(g), p(x), p(mean), p(rstd), p(scale), p(gx), p(gsc), p(gsh), n, t, d,
                                      threads)
        lib.dit_gelu_bias_fwd_f32(p(x), p(bias), p(gelu_out), n * t, d, threads)
        lib.dit_gelu_bias_bwd_f32(p(g), p(x), p(bias), p(gelu_g), p(gb), n, t, d, threads)
        lib.dit_gated_bias_fwd_f32(p(x), p(scale), p(g), p(bias), p(res), n, t, d, threads)
        sn = (ctypes.c_int64 * 3)(*(z.stride(0) for z in (q, k, v)))
        st = (ctypes.c_int64 * 3)(*(z.stride(1) for z in (q, k, v)))
        lib.dit_qkv_grad_f32(p(q), p(k), p(v), sn, st, p(tokens), p(gq), n, t, d, threads)
        results.append([out, mean, rstd, gx, gsc, gsh, gelu_out, gelu_g, gb, res, tokens, gq])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    # and the strided q/k/v gradients landed in the QKV layout, with their per-sample sums
    tokens, gq = results[0][-2], results[0][-1]
    torch.testing.assert_close(tokens, torch.cat([q, k, v], dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(gq, torch.cat([q, k, v], dim=-1).sum(1), rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------- where it applies
def _block():
    from dit.layers import DiTBlock
    torch.manual_seed(0)
    return DiTBlock(32, 4)


@needs_kernels
def test_applies_only_to_fp32_cpu_training():
    block = _block()
    x = torch.randn(2, 5, 32, requires_grad=True)
    layers = (block.attn, block.mlp)
    assert fused_block.applies(x, *layers)
    with torch.no_grad():
        assert not fused_block.applies(x, *layers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_block.applies(x, *layers)
    assert not fused_block.applies(x.detach().bfloat16(), *layers)
    assert not fused_block.applies(x.detach(), *[m.requires_grad_(False) for m in layers])
    block.requires_grad_(True)
    block.attn.qkv.weight.ds_id = 3  # a ZeRO-3-partitioned parameter
    assert not fused_block.applies(x, *layers)


def test_without_kernels_the_block_runs_the_plain_modules(monkeypatch):
    """No compiler / DIT_NATIVE_KERNELS=0: `applies` is False and the block's graph is the plain torch one."""
    monkeypatch.setattr(native, "available", lambda: False)
    block = _block()
    x, c = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 32)
    assert not fused_block.applies(x, block.attn, block.mlp)
    names = _graph_names(block(x, c))
    assert not {"_NormModulateBackward", "_QKVAttentionBackward", "_LinearGeluBackward",
                "_LinearGatedResidualBackward"} & names
    assert "NativeLayerNormBackward0" in names


def _graph_names(out: torch.Tensor) -> set[str]:
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            stack += [nxt for nxt, _ in fn.next_functions]
    return {type(fn).__name__ for fn in seen}


@needs_kernels
def test_block_takes_the_fused_path_only_as_built():
    from dit.layers import DiTBlock, FinalLayer
    x, c = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 32)
    assert "_NormModulateBackward" in _graph_names(FinalLayer(32, 2, 8)(x, c))
    assert "_NormModulateBackward" not in _graph_names(FinalLayer(32, 2, 8, adaptive=False)(x, None))
    names = _graph_names(_block()(x, c))
    assert {"_NormModulateBackward", "_QKVAttentionBackward", "_LinearGeluBackward",
            "_LinearGatedResidualBackward"} <= names
    assert "AddmmBackward0" in names  # the adaLN modulation's own linear stays plain
    assert "_QKVAttentionBackward" not in _graph_names(DiTBlock(32, 4, qk_norm=True)(x, c))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "_NormModulateBackward" not in _graph_names(_block()(x, c))


@needs_kernels
@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_gradients_match_the_plain_path(monkeypatch, checkpointing):
    """An fp32 training step of a DiT through the fused blocks is as close to float64 as the plain modules are,
    with and without (selective) activation checkpointing, and checkpointing changes no bit."""
    from dit.models import DiT

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=3, num_heads=3, num_classes=10,
                class_dropout_prob=0.0, grad_checkpointing=checkpointing)
    with torch.no_grad():
        for prm in model.parameters():
            if not prm.abs().sum():
                prm.normal_(0, 0.05)
    x, t, y = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))

    def grads(m: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        m.zero_grad(set_to_none=True)
        m(x.to(dtype), t, y).square().mean().backward()
        return {n: prm.grad.double().clone() for n, prm in m.named_parameters()}

    fused = grads(model, torch.float32)
    model.set_grad_checkpointing(not checkpointing)
    other = grads(model, torch.float32)
    model.set_grad_checkpointing(checkpointing)
    ref = grads(model.double(), torch.float64)
    model.float()
    monkeypatch.setattr(fused_block, "applies", lambda *a: False)
    plain = grads(model, torch.float32)
    for name in ref:
        scale = ref[name].abs().max().clamp_min(1e-30)
        err, base = ((fused[name] - ref[name]).abs().max() / scale).item(), \
            ((plain[name] - ref[name]).abs().max() / scale).item()
        assert err <= max(4 * base, 1e-5), f"{name}: {err:.2e} vs plain {base:.2e}"
        assert torch.equal(fused[name], other[name]), name  # checkpointed == not checkpointed


# --------------------------------------------------------------------------------------------- portable build
@needs_kernels
def test_portable_c_build_matches_float64(tmp_path):
    """The plain-C loops (what a CPU without AVX-512 runs), checked on this machine."""
    code = ("from dit import native; assert native.simd_width() == 0 and native.available(); "
            "from tests.test_fused_block import check_ops_against_float64 as c; "
            "print(c(3, 33, 40, 2) + c(2, 16, 64, 4))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=entry_env(DIT_NATIVE_CACHE=str(tmp_path), DIT_NATIVE_PORTABLE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("qkv_attention") == 2, proc.stdout
