"""Fused CPU kernels for training (tanh GELU, adaLN modulation, gated residual, attention softmax and QKV layout),
with torch fallbacks.

On the CPU, ATen runs the tanh GELU and the backward of the per-sample products of a DiT block (modulation and
gates) as several passes over [tokens, channels] tensors each; in bf16 training they cost as much as the block's
matmuls (benchmarks/RESULTS.md). `dit/native_kernels.c` does each in one pass. It is compiled on first use with
the system C compiler (AVX-512 code where the CPU has it, portable C otherwise) into a per-user cache, and loaded
with ctypes: no torch headers, so the build takes about a second.

The fused versions are used only where they apply: CPU, bf16 or fp32, autograd recording. Everything else (CUDA,
inference) and any machine without a C compiler takes the plain torch expressions, which are the reference the
tests compare against. `DIT_NATIVE_KERNELS=0` turns the kernels off; `DIT_NATIVE_CACHE` moves the build cache;
`unavailable_reason()` says why they are off; `DIT_NATIVE_PORTABLE=1` forces the portable C build (for tests).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("native_kernels.c")
_AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "fma")
_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}  # storage types the kernels exist for


def _cpu_flags() -> set[str]:
    """The CPU feature flags of this machine (empty where /proc/cpuinfo does not exist)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compile_flags() -> list[str]:
    """Compiler flags for this CPU (without OpenMP)."""
    # Explicit ISA flags rather than -march=native: the cache key then says exactly which instructions the
    # library uses, so a home directory shared by cluster nodes with different CPUs never loads a wrong build.
    flags = set() if os.environ.get("DIT_NATIVE_PORTABLE") == "1" else _cpu_flags()  # 1: the plain-C build
    isa = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"] if set(_AVX512_FLAGS) <= flags else []
    if isa and "avx512_bf16" in flags:
        isa.append("-mavx512bf16")  # one-instruction fp32 -> bf16 rounding
    return ["-O3", "-fPIC", "-shared", "-pthread", "-fno-math-errno", "-fno-trapping-math", *isa]


def _cache_dir() -> Path:
    """Where built kernels are kept (one file per source, compiler, flags and CPU architecture)."""
    if os.environ.get("DIT_NATIVE_CACHE"):
        return Path(os.environ["DIT_NATIVE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dit" / "native"


def _build(compiler: str, flags: list[str], target: Path) -> None:
    """Compile the kernel source into the shared library `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: concurrent ranks building at once each produce a complete file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(_SOURCE), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Optional[ctypes.CDLL], str]:
    """(the compiled kernels, built if needed, "") or (None, why not)."""
    if os.environ.get("DIT_NATIVE_KERNELS", "1") == "0":
        return None, "turned off by DIT_NATIVE_KERNELS=0"
    if platform.system() != "Linux":
        return None, f"built only on Linux, this is {platform.system()}"
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: fused CPU kernels off (plain torch ops)")
        return None, f"no C compiler ({os.environ.get('CC', 'cc')} or gcc) on PATH"
    lib, detail = None, ""
    # With -fopenmp the kernels share torch's OpenMP thread pool; without (no libgomp to link), POSIX threads.
    for flags in (_compile_flags() + ["-fopenmp"], _compile_flags()):
        key = hashlib.sha256(_SOURCE.read_bytes() + " ".join([compiler, *flags, platform.machine()]).encode())
        target = _cache_dir() / f"dit_native_{key.hexdigest()[:16]}.so"
        try:
            if not target.exists():
                _build(compiler, flags, target)
            lib = ctypes.CDLL(str(target))
            break
        except (OSError, subprocess.SubprocessError) as err:
            detail = (getattr(err, "stderr", "") or str(err)).strip()[:500]
    if lib is None:
        log.warning("building the fused CPU kernels failed, using plain torch ops: %s", detail)
        return None, f"building with {compiler} failed: {detail}"
    i64, i32, f32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    for sfx in _SUFFIX.values():
        getattr(lib, f"dit_gelu_fwd_{sfx}").argtypes = [ptr, ptr, i64, i32]
        getattr(lib, f"dit_gelu_bwd_{sfx}").argtypes = [ptr, ptr, ptr, i64, i32]
        getattr(lib, f"dit_rowscale_bwd_{sfx}").argtypes = [ptr, ptr, ptr, f32, ptr, ptr, ptr, i64, i64, i64, i32]
        for name in ("gelu_fwd", "gelu_bwd", "rowscale_bwd"):
            getattr(lib, f"dit_{name}_{sfx}").restype = None
    lib.dit_softmax_fwd_bf16.argtypes = [ptr, ptr, i64, i64, i32]
    lib.dit_softmax_bwd_bf16.argtypes = [ptr, ptr, ptr, i64, i64, i32]
    lib.dit_softmax_fwd_bf16.restype = lib.dit_softmax_bwd_bf16.restype = None
    lib.dit_qkv_permute_u16.argtypes = [ptr, ptr, i64, i64, i64, i64, i32, i32]
    lib.dit_qkv_permute_u16.restype = None
    # fp32 block kernels (dit/fused_block.py)
    lib.dit_norm_modulate_fwd_f32.argtypes = [ptr, ptr, ptr, f32, ptr, ptr, ptr, i64, i64, i64, i32]
    lib.dit_norm_modulate_bwd_f32.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i32]
    lib.dit_gelu_bias_fwd_f32.argtypes = [ptr, ptr, ptr, i64, i64, i32]
    lib.dit_gelu_bias_bwd_f32.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i32]
    lib.dit_gated_bias_fwd_f32.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i32]
    lib.dit_qkv_grad_f32.argtypes = [ptr, ptr, ptr, ctypes.POINTER(i64), ctypes.POINTER(i64), ptr, ptr, i64, i64,
                                     i64, i32]
    for name in ("norm_modulate_fwd", "norm_modulate_bwd", "gelu_bias_fwd", "gelu_bias_bwd", "gated_bias_fwd",
                 "qkv_grad"):
        getattr(lib, f"dit_{name}_f32").restype = None
    lib.dit_native_simd.restype = ctypes.c_int
    return lib, ""


def _library() -> Optional[ctypes.CDLL]:
    return _load()[0]


def available() -> bool:
    """Whether the fused CPU kernels are built and loaded on this machine."""
    return _library() is not None


def unavailable_reason() -> str:
    """Why the kernels are not in use here ("" when they are)."""
    return _load()[1]


def simd_width() -> int:
    """Vector width in bits of the loaded build (512 for AVX-512, 0 for portable C or no build)."""
    lib = _library()
    return int(lib.dit_native_simd()) if lib is not None else 0


def _applies(*tensors: torch.Tensor) -> bool:
    """Fused path: autograd recording on CPU bf16 or fp32 tensors of one dtype, with the kernels available."""
    dtype = tensors[0].dtype
    # Under torch.compile the plain expressions are traced instead (inductor fuses them; ctypes calls would break
    # the graph).
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(t.requires_grad for t in tensors) and dtype in _SUFFIX
            and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors) and available())


def _kernel(name: str, dtype: torch.dtype) -> Any:
    return getattr(_library(), f"dit_{name}_{_SUFFIX[dtype]}")


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _threads() -> int:
    return max(1, torch.get_num_threads())


# --------------------------------------------------------------------------------------------- tanh GELU
class _GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        u = u.contiguous()
        out = torch.empty_like(u, memory_format=torch.contiguous_format)
        _kernel("gelu_fwd", u.dtype)(_ptr(u), _ptr(out), u.numel(), _threads())
        ctx.save_for_backward(u)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (u,) = ctx.saved_tensors
        grad = grad.to(u.dtype).contiguous()
        out = torch.empty_like(u, memory_format=torch.contiguous_format)
        _kernel("gelu_bwd", u.dtype)(_ptr(grad), _ptr(u), _ptr(out), u.numel(), _threads())
        return out


def gelu_tanh(u: torch.Tensor) -> torch.Tensor:
    """The tanh-approximated GELU, `F.gelu(u, approximate="tanh")`; one-pass kernels for CPU training."""
    if _applies(u):
        return _GeluTanh.apply(u)
    return F.gelu(u, approximate="tanh")


# --------------------------------------------------------------------------------------------- per-sample products
def _rowscale_backward(grad: torch.Tensor, x: torch.Tensor, m: torch.Tensor, offset: float, with_sum: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(grad * (m + offset), sum_t grad * x, sum_t grad) for grad, x [N, T, D] and m [N, D] (see the C source)."""
    n, t, d = x.shape
    x = x.contiguous()
    grad = grad.to(x.dtype).contiguous()
    m32 = m.float().contiguous()
    gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    gm = torch.empty(n, d, dtype=torch.float32)
    gsum = torch.empty(n, d, dtype=torch.float32) if with_sum else None
    _kernel("rowscale_bwd", x.dtype)(_ptr(grad), _ptr(x), _ptr(m32), offset, _ptr(gx), _ptr(gm),
                                     _ptr(gsum) if gsum is not None else None, n, t, d, _threads())
    return gx, gm, gsum


class _Modulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: torch.Tensor,  # type: ignore[override]
                scale: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x, scale)
        return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, scale = ctx.saved_tensors
        gx, gscale, gshift = _rowscale_backward(grad, x, scale, 1.0, with_sum=True)
        return gx, gshift.to(scale.dtype), gscale.to(scale.dtype)


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = y.contiguous()
        ctx.save_for_backward(gate, y)
        return torch.addcmul(x, gate.unsqueeze(1), y)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        gate, y = ctx.saved_tensors
        gy, ggate, _ = _rowscale_backward(grad, y, gate, 0.0, with_sum=False)
        return grad, ggate.to(gate.dtype), gy


def _per_sample(x: torch.Tensor, *rows: torch.Tensor) -> bool:
    return x.dim() == 3 and all(r.shape == (x.shape[0], x.shape[2]) for r in rows)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x * (1 + scale) + shift` with per-sample `shift`, `scale` of shape [N, D] broadcast over tokens."""
    if _per_sample(x, shift, scale) and _applies(x, shift, scale):
        return _Modulate.apply(x, shift, scale)
    # One fused kernel instead of a mul and an add over the whole token tensor.
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`x + gate * y` with a per-sample gate of shape [N, D] (adaLN-Zero's alpha)."""
    if _per_sample(y, gate) and x.shape == y.shape and _applies(x, gate, y):
        return _GatedResidual.apply(x, gate, y)
    return torch.addcmul(x, gate.unsqueeze(1), y)


# --------------------------------------------------------------------------------------------- attention
class _PackedAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v from the fused QKV projection's output [N, T, 3, H, d] (bf16), returned as
    [N, H, T, d]; its gradient comes back in the projection's layout, with no stack of three gradients (the
    backward of `unbind`) and no general strided copies (the permutation to heads and back is a C kernel)."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        tokens = tokens.contiguous()
        n, t, _, h, d = tokens.shape
        qkv = tokens.new_empty(3, n, h, t, d)
        _library().dit_qkv_permute_u16(_ptr(tokens), _ptr(qkv), n, t, h, d, 1, _threads())
        q, k, v = (z.view(n * h, t, d) for z in qkv.unbind(0))
        scale = d ** -0.5
        scores = torch.baddbmm(q.new_zeros(()).expand(1, 1, 1), q, k.transpose(1, 2), beta=0.0, alpha=scale)
        probs = torch.empty_like(scores, memory_format=torch.contiguous_format)
        _library().dit_softmax_fwd_bf16(_ptr(scores), _ptr(probs), n * h * t, t, _threads())
        ctx.save_for_backward(qkv, probs)
        ctx.scale = scale
        return torch.bmm(probs, v).view(n, h, t, d)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        qkv, probs = ctx.saved_tensors
        _, n, h, t, d = qkv.shape
        q, k, v = (z.view(n * h, t, d) for z in qkv.unbind(0))
        grad = grad.to(torch.bfloat16).reshape(n * h, t, d).contiguous()
        heads = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        dq, dk, dv = (z.view(n * h, t, d) for z in heads.unbind(0))
        torch.bmm(probs.transpose(1, 2), grad, out=dv)
        dprobs = torch.bmm(grad, v.transpose(1, 2))
        dscores = torch.empty_like(dprobs, memory_format=torch.contiguous_format)
        _library().dit_softmax_bwd_bf16(_ptr(probs), _ptr(dprobs), _ptr(dscores), n * h * t, t, _threads())
        zero = dscores.new_zeros(()).expand(1, 1, 1)
        torch.baddbmm(zero, dscores, k, beta=0.0, alpha=ctx.scale, out=dq)
        torch.baddbmm(zero, dscores.transpose(1, 2), q, beta=0.0, alpha=ctx.scale, out=dk)
        out = qkv.new_empty(n, t, 3, h, d)
        _library().dit_qkv_permute_u16(_ptr(heads), _ptr(out), n, t, h, d, 0, _threads())
        return out


def packed_attention_applies(tokens: torch.Tensor) -> bool:
    """Whether `packed_attention` runs the fused kernels (bf16 CPU training) for this [N, T, 3, H, d] tensor."""
    return tokens.dim() == 5 and tokens.shape[2] == 3 and tokens.dtype == torch.bfloat16 and _applies(tokens)


def packed_attention(tokens: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, each of q, k, v [N, H, T, d], from the fused QKV projection's output
    `tokens` [N, T, 3, H, d] (q, k, v = tokens.permute(2, 0, 3, 1, 4).unbind(0)); bf16 CPU training only (see
    `packed_attention_applies`). The scores are rounded to bf16 as in any non-fused attention under autocast."""
    return _PackedAttention.apply(tokens)
