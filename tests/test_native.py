"""The fused CPU kernels (dit/native.py): values and gradients against float64 references and the torch fallback."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dit import native
from tests.conftest import ROOT, entry_env

needs_kernels = pytest.mark.skipif(not native.available(), reason="no C compiler on this machine")
DTYPES = [torch.bfloat16, torch.float32]


def _all_bf16() -> torch.Tensor:
    """Every finite bf16 value."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return bits[torch.isfinite(bits)]


@needs_kernels
def test_gelu_every_bf16_value_as_accurate_as_aten():
    u = _all_bf16().requires_grad_()
    ours = native.gelu_tanh(u)
    assert ours.grad_fn is not None and "GeluTanh" in type(ours.grad_fn).__name__
    ref = F.gelu(u.detach().double(), approximate="tanh")
    aten = F.gelu(u.detach(), approximate="tanh")
    # Never worse than ATen's own bf16 kernel, and equal to it for all but a sliver of values (last-bit rounding
    # of a differently ordered fp32 evaluation).
    assert (ours.detach().double() - ref).abs().max() <= (aten.double() - ref).abs().max()
    assert (ours.detach() != aten).float().mean() < 0.005
    # Gradient: finite everywhere (ATen's is NaN where u^3 overflows), within bf16 rounding of float64.
    g = torch.ones_like(u)
    (grad,) = torch.autograd.grad(ours, u, g)
    u64 = u.detach().double().requires_grad_()
    (grad64,) = torch.autograd.grad(F.gelu(u64, approximate="tanh"), u64, g.double())
    assert torch.isfinite(grad).all()
    assert ((grad.double() - grad64).abs() <= 2 ** -8 * grad64.abs().clamp_min(1.0)).all()


@needs_kernels
def test_gelu_fp32_matches_float64():
    u = (torch.randn(7, 333) * 3).requires_grad_()  # 2331 values: a vector body and a scalar tail
    ours = native.gelu_tanh(u)
    u64 = u.detach().double().requires_grad_()
    ref = F.gelu(u64, approximate="tanh")
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-7)
    g = torch.randn_like(u)
    (grad,) = torch.autograd.grad(ours, u, g)
    (grad64,) = torch.autograd.grad(ref, u64, g.double())
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-5, atol=1e-6)


def _check_against_float64(fn, ref, shapes, dtype):
    torch.manual_seed(0)
    inputs = [torch.randn(*s).to(dtype).requires_grad_() for s in shapes]
    out = fn(*inputs)
    grad = torch.randn(out.shape).to(dtype)
    grads = torch.autograd.grad(out, inputs, grad)
    inputs64 = [i.detach().double().requires_grad_() for i in inputs]
    out64 = ref(*inputs64)
    grads64 = torch.autograd.grad(out64, inputs64, grad.double())
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), out64, rtol=tol, atol=tol * out64.abs().max().item())
    for got, want in zip(grads, grads64):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    return out


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [48, 37])  # a multiple of the vector width, and one with a scalar tail
def test_modulate_and_gated_residual_match_float64(dtype, dim):
    shapes = [(3, 5, dim), (3, dim), (3, dim)]
    out = _check_against_float64(native.modulate, lambda x, shift, scale: x * (1 + scale[:, None]) + shift[:, None],
                                 shapes, dtype)
    assert "Modulate" in type(out.grad_fn).__name__
    out = _check_against_float64(native.gated_residual, lambda x, gate, y: x + gate[:, None] * y,
                                 [(3, 5, dim), (3, dim), (3, 5, dim)], dtype)
    assert "GatedResidual" in type(out.grad_fn).__name__


@needs_kernels
def test_results_do_not_depend_on_the_thread_count():
    torch.manual_seed(1)
    x, y = torch.randn(5, 64, 96).bfloat16().requires_grad_(), torch.randn(5, 64, 96).bfloat16().requires_grad_()
    gate = torch.randn(5, 96).bfloat16().requires_grad_()
    g = torch.randn(5, 64, 96).bfloat16()
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = native.gated_residual(x, gate, native.gelu_tanh(y))
            results.append([out, *torch.autograd.grad(out, [x, gate, y], g)])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_fallbacks_outside_cpu_training():
    x = torch.randn(2, 3, 8)
    shift, scale = torch.randn(2, 8), torch.randn(2, 8)
    # No autograd: the plain expression (and no custom node).
    with torch.no_grad():
        torch.testing.assert_close(native.modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None])
    # Mixed dtypes: the plain expression too.
    out = native.gated_residual(x.double().requires_grad_(), shift, x)
    assert "GatedResidual" not in type(out.grad_fn).__name__


@pytest.mark.parametrize("env, expect", [({"DIT_NATIVE_KERNELS": "0"}, "False"), ({"CC": "/bin/false"}, "False")])
def test_disabled_or_failing_build_falls_back(tmp_path, env, expect):
    code = ("import logging, torch; logging.basicConfig(level=logging.INFO); from dit import native; "
            "u = torch.randn(4, 8, requires_grad=True); out = native.gelu_tanh(u); "
            "torch.testing.assert_close(out, torch.nn.functional.gelu(u, approximate='tanh')); "
            "print(native.available())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=entry_env(DIT_NATIVE_CACHE=str(tmp_path / "cache"), **env))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == expect
    if env.get("CC"):
        assert "building the fused CPU kernels failed" in proc.stderr


@needs_kernels
def test_fresh_cache_builds_once(tmp_path):
    code = "from dit import native; print(native.available(), native.simd_width())"
    env = entry_env(DIT_NATIVE_CACHE=str(tmp_path))
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=env)
        assert proc.returncode == 0 and proc.stdout.split()[0] == "True", proc.stderr[-2000:]
    assert len(list(tmp_path.glob("dit_native_*.so"))) == 1
    assert not list(tmp_path.glob("*.tmp*")) and len(list(tmp_path.iterdir())) == 1


@needs_kernels
def test_model_gradients_with_kernels_match_the_torch_path(monkeypatch):
    """A bf16-autocast training step gives the same gradients (to bf16 noise) with and without the kernels."""
    from dit.models import DiT

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    x, t, y = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))

    def grads(bf16: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(1)  # the same label dropout in every run
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t, y)
        out.float().square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    fp32 = grads(False)
    fused = grads(True)
    monkeypatch.setattr(native, "available", lambda: False)
    plain = grads(True)

    def err(g: dict) -> float:
        return max(((g[n] - fp32[n]).norm() / fp32[n].norm().clamp_min(1e-12)).item() for n in fp32)

    # Both bf16 paths are equally far from fp32 (bf16 rounding), and close to each other.
    assert err(fused) <= 1.25 * err(plain) + 1e-3
    assert max(((fused[n] - plain[n]).norm() / plain[n].norm().clamp_min(1e-12)).item() for n in fp32) < 0.02
