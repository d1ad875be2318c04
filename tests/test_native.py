"""The fused CPU kernels (dit/native.py): values and gradients against float64 references and the torch fallback."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dit import native
from dit.bf16_linear import onednn_bf16
from tests.conftest import ROOT, entry_env, native_kernels_marker

needs_kernels = native_kernels_marker()
DTYPES = [torch.bfloat16, torch.float32]


def _all_bf16() -> torch.Tensor:
    """Every finite bf16 value."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return bits[torch.isfinite(bits)]


def _gelu64(u: torch.Tensor) -> torch.Tensor:
    """The tanh GELU in float64 as u * sigmoid(2z) (= 0.5 u (1 + tanh z)), free of the cancellation of 1 + tanh z
    for z << 0 that makes even float64's 0.5 u (1 + tanh z) exactly 0 where the value is ~1e-16."""
    z = (2 / torch.pi) ** 0.5 * (u + 0.044715 * u ** 3)
    return u * torch.sigmoid(2 * z)


@needs_kernels
def test_gelu_every_bf16_value_as_accurate_as_aten():
    u = _all_bf16().requires_grad_()
    ours = native.gelu_tanh(u)
    assert ours.grad_fn is not None and "GeluTanh" in type(ours.grad_fn).__name__
    ref = _gelu64(u.detach().double())
    aten = F.gelu(u.detach(), approximate="tanh")
    # Never worse than ATen's own bf16 kernel.
    assert (ours.detach().double() - ref).abs().max() <= (aten.double() - ref).abs().max()
    # Subnormal results may be flushed to zero (AVX512-BF16 conversion, as in oneDNN's matmuls); the rest agree
    # with ATen for all but a sliver of values (last-bit rounding of a differently ordered fp32 evaluation).
    tiny = torch.finfo(torch.bfloat16).tiny
    normal = ref.abs() >= tiny
    assert ((ours.detach()[~normal].double() - ref[~normal]).abs() <= tiny).all()
    assert (ours.detach()[normal] != aten[normal]).float().mean() < 0.005
    # Gradient: finite everywhere (ATen's is NaN where u^3 overflows), within bf16 rounding of float64.
    g = torch.ones_like(u)
    (grad,) = torch.autograd.grad(ours, u, g)
    u64 = u.detach().double().requires_grad_()
    (grad64,) = torch.autograd.grad(_gelu64(u64), u64, g.double())
    assert torch.isfinite(grad).all()
    assert ((grad.double() - grad64).abs() <= 2 ** -8 * grad64.abs().clamp_min(1.0)).all()
    assert (grad.double() - grad64).abs().max() <= (torch.ops.aten.gelu_backward(g, u.detach(), approximate="tanh")
                                                    .double() - grad64).nan_to_num(0.0).abs().max()


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


@pytest.mark.parametrize("env", [{"DIT_NATIVE_KERNELS": "0"}, {"CC": "/bin/false", "DIT_NATIVE_KERNELS": "1"}])
def test_disabled_or_failing_build_falls_back(tmp_path, env):
    code = ("import logging, torch; logging.basicConfig(level=logging.INFO); from dit import native; "
            "u = torch.randn(4, 8, requires_grad=True); out = native.gelu_tanh(u); "
            "torch.testing.assert_close(out, torch.nn.functional.gelu(u, approximate='tanh')); "
            "print(native.unavailable_reason()); print(native.available())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=entry_env(DIT_NATIVE_CACHE=str(tmp_path / "cache"), **env))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"
    if env.get("CC"):
        assert "building the fused CPU kernels failed" in proc.stderr
        assert "building with /bin/false failed" in proc.stdout
    else:
        assert "DIT_NATIVE_KERNELS=0" in proc.stdout


@needs_kernels
def test_fresh_cache_builds_once(tmp_path):
    code = "from dit import native; print(native.available(), native.simd_width())"
    env = entry_env(DIT_NATIVE_CACHE=str(tmp_path))
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=env)
        assert proc.returncode == 0 and proc.stdout.split()[0] == "True", proc.stderr[-2000:]
    # an AVX-512 CPU gets the AVX-512 build, not the portable one
    avx512 = {"avx512f", "avx512bw", "avx512vl", "fma"} <= native._cpu_flags()
    assert proc.stdout.split()[1] == ("512" if avx512 else "0")
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


# --------------------------------------------------------------------------------------------- dit.bf16_linear
needs_onednn_bf16 = pytest.mark.skipif(not onednn_bf16(),
                                       reason="oneDNN has no native bf16 on this CPU, so dit.bf16_linear never "
                                              "applies here (layers use the plain module)")


@needs_onednn_bf16
@pytest.mark.parametrize("rows, k_in, n_out, bias", [(2048, 48, 160, True),   # transposed copy of x
                                                     (2048, 160, 48, True),   # transposed copy of the gradient
                                                     (2048, 64, 64, False),   # square: ATen's layout
                                                     (100, 48, 160, True)])   # few rows: ATen's layout
def test_bf16_linear_matches_float64(rows, k_in, n_out, bias):
    from dit import bf16_linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(k_in, n_out, bias=bias)
    x = torch.randn(2, rows // 2, k_in).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bf16_linear.applies(layer, x)
        out = bf16_linear.linear_bf16(layer, x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, rows // 2, n_out)
    grad = torch.randn(out.shape).bfloat16()
    params = [x, layer.weight] + ([layer.bias] if bias else [])
    grads = torch.autograd.grad(out, params, grad)
    # float64 reference on the same bf16-rounded operands
    x64 = x.detach().double().requires_grad_()
    w64 = layer.weight.detach().bfloat16().double().requires_grad_()
    b64 = layer.bias.detach().bfloat16().double().requires_grad_() if bias else None
    out64 = F.linear(x64, w64, b64)
    refs = torch.autograd.grad(out64, [x64, w64] + ([b64] if bias else []), grad.double())
    torch.testing.assert_close(out.double(), out64, rtol=1e-2, atol=1e-2 * out64.abs().max().item())
    for got, want, p in zip(grads, refs, params):
        assert got.dtype == p.dtype and got.shape == p.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_bf16_linear_applies_only_to_cpu_bf16_training():
    from dit import bf16_linear

    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    assert not bf16_linear.applies(layer, x)  # fp32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            assert not bf16_linear.applies(layer, x.bfloat16())  # inference
        layer.weight.ds_id = 0  # a ZeRO-3 parameter: gathered by the module's own hooks
        assert not bf16_linear.applies(layer, x.bfloat16())


# --------------------------------------------------------------------------------------------- attention
@needs_kernels
@pytest.mark.parametrize("n, h, t, d", [(2, 3, 32, 16), (2, 2, 37, 8)])  # vector-width rows, and a scalar tail
def test_packed_attention_matches_float64(n, h, t, d):
    torch.manual_seed(0)
    tokens = torch.randn(n, t, 3, h, d).bfloat16().requires_grad_()  # the fused QKV projection's layout
    assert native.packed_attention_applies(tokens)
    out = native.packed_attention(tokens)
    assert out.shape == (n, h, t, d)
    grad = torch.randn(out.shape).bfloat16()
    (got,) = torch.autograd.grad(out, tokens, grad)
    tokens64 = tokens.detach().double().requires_grad_()
    q, k, v = tokens64.permute(2, 0, 3, 1, 4).unbind(0)
    ref = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1) @ v
    (want,) = torch.autograd.grad(ref, tokens64, grad.double())
    assert got.shape == tokens.shape and got.is_contiguous()
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=1e-2 * ref.abs().max().item())
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=1e-2 * want.abs().max().item())


@needs_kernels
def test_softmax_kernel_rows_of_minus_inf_and_large_values():
    lib = native._library()
    rows = torch.tensor([[0.0, 1.0, 2.0, 3.0] * 5, [-1e30] * 19 + [5.0], [300.0, -300.0] * 10]).bfloat16()
    out = torch.empty_like(rows)
    lib.dit_softmax_fwd_bf16(native._ptr(rows), native._ptr(out), rows.shape[0], rows.shape[1], 2)
    torch.testing.assert_close(out.double(), torch.softmax(rows.double(), dim=-1), rtol=1e-2, atol=4e-3)


def test_attention_module_uses_the_packed_kernel_only_without_qk_norm():
    from dit.layers import Attention

    torch.manual_seed(0)
    x = torch.randn(2, 16, 32).bfloat16()
    for qk_norm in (False, True):
        attn = Attention(32, 4, qk_norm=qk_norm).bfloat16()
        out = attn(x)
        names, seen, stack = set(), set(), [out.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and id(node) not in seen:
                seen.add(id(node))
                names.add(type(node).__name__)
                stack.extend(n for n, _ in node.next_functions)
        assert ("_PackedAttentionBackward" in names) == (not qk_norm and native.available())


@pytest.mark.slow
def test_torch_compile_traces_the_plain_ops():
    """`train.compile`: under torch.compile the kernels step aside (inductor fuses the plain ops; oneDNN's linear
    cannot be lowered with trainable weights), and the compiled step gives the eager gradients."""
    from dit.models import DiT

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10,
                class_dropout_prob=0.0)
    x, t, y = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))

    def grads(m: torch.nn.Module) -> dict[str, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, t, y)
        out.float().square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    eager = grads(model)
    compiled = grads(torch.compile(model))
    for name, g in eager.items():
        assert torch.isfinite(compiled[name]).all()
        assert ((compiled[name] - g).norm() / g.norm().clamp_min(1e-12)) < 0.05, name


@needs_kernels
def test_non_contiguous_inputs():
    torch.manual_seed(0)
    base = torch.randn(3, 40, 7).bfloat16().requires_grad_()
    x = base.transpose(1, 2)  # [3, 7, 40], strided
    shift, scale = torch.randn(3, 40).bfloat16(), torch.randn(3, 40).bfloat16()
    out = native.gated_residual(x, scale, native.gelu_tanh(native.modulate(x, shift, scale)))
    grad = torch.randn(out.shape).bfloat16()
    (got,) = torch.autograd.grad(out, base, grad)
    b64 = base.detach().double().requires_grad_()
    x64 = b64.transpose(1, 2)
    ref = x64 + scale.double()[:, None] * _gelu64(x64 * (1 + scale.double()[:, None]) + shift.double()[:, None])
    (want,) = torch.autograd.grad(ref, b64, grad.double())
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


_PORTABLE_CHECK = """
import torch, torch.nn.functional as F
from dit import native
assert native.available() and native.simd_width() == 0, native.unavailable_reason()
torch.manual_seed(0)
for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
    u = (torch.randn(5, 37) * 3).to(dtype).requires_grad_()
    x, shift, scale = torch.randn(3, 5, 37).to(dtype).requires_grad_(), torch.randn(3, 37).to(dtype), \\
        torch.randn(3, 37).to(dtype).requires_grad_()
    outs = [native.gelu_tanh(u), native.gated_residual(x, scale, native.modulate(x, shift, scale))]
    refs = [F.gelu(u.double(), approximate="tanh"),
            x.double() + scale.double()[:, None]
            * (x.double() * (1 + scale.double()[:, None]) + shift.double()[:, None])]
    for out, ref, inputs in zip(outs, refs, ([u], [x, scale])):
        g = torch.randn(out.shape).to(dtype)
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
        for got, want in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g.double())):
            torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * want.abs().max().item())
tokens = torch.randn(2, 19, 3, 2, 8).bfloat16().requires_grad_()
q, k, v = tokens.double().permute(2, 0, 3, 1, 4).unbind(0)
ref = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v
torch.testing.assert_close(native.packed_attention(tokens).double(), ref, rtol=2e-2, atol=2e-2)
print("portable ok")
"""


@needs_kernels
def test_portable_c_build_matches_float64(tmp_path):
    """The build a CPU without AVX-512 gets (plain C loops), checked on this machine."""
    proc = subprocess.run([sys.executable, "-c", _PORTABLE_CHECK], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=entry_env(DIT_NATIVE_CACHE=str(tmp_path), DIT_NATIVE_PORTABLE="1"))
    assert proc.returncode == 0 and "portable ok" in proc.stdout, proc.stderr[-3000:]
