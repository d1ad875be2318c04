"""dit.cpu.accelerate: the same parameters, the plain results outside bf16 on the CPU, bf16 results within rounding
of float64, and each path only where it applies."""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dit.cpu import accelerate, onednn_bf16, onednn_linear, softmax_attention
from tests.test_models import VARIANTS, tiny


class OpCounts(TorchDispatchMode):
    """Counts the ATen ops run inside it by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


FLASH = "_scaled_dot_product_flash_attention_for_cpu"
INPUTS = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([3, 600]),
          torch.tensor([1, 7]))


def pair(**kw):
    """(plain model, accelerated copy) with the same weights, no label dropout."""
    plain = tiny(class_dropout_prob=0.0, **kw)
    return plain, accelerate(copy.deepcopy(plain))


def step(model, autocast: bool):
    """Output and parameter gradients of one forward/backward (sum of squares) on INPUTS."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(*INPUTS)
    out.float().square().sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def bf16_storage(model):
    """What launch.inference.Generator samples bf16 with: an eval copy with Linear/Conv weights stored in bf16."""
    model = copy.deepcopy(model).eval().requires_grad_(False)
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            mod.to(torch.bfloat16)
    return model


@pytest.mark.parametrize("conditioning", VARIANTS)
def test_accelerate_swaps_classes_and_keeps_every_parameter(conditioning):
    plain = tiny(conditioning=conditioning)
    before = {k: v.data_ptr() for k, v in plain.state_dict().items()}
    classes = [type(m) for m in plain.modules()]
    model = accelerate(plain)
    assert model is plain
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before  # same keys, same tensors
    swapped = [(a, type(m)) for a, m in zip(classes, model.modules()) if type(m) is not a]
    assert swapped and all(issubclass(new, old) for old, new in swapped)
    assert {old.__name__ for old, _ in swapped} >= {"Linear", "Mlp", "Attention"}
    again = [type(m) for m in accelerate(model).modules()]
    assert again == [type(m) for m in model.modules()]  # idempotent
    fresh = tiny(conditioning=conditioning)
    fresh.load_state_dict(model.state_dict())  # strict: a plain model loads what the accelerated one saves
    accelerate(fresh).load_state_dict(plain.state_dict())


@pytest.mark.parametrize("conditioning", VARIANTS)
def test_fp32_results_are_exactly_the_plain_ones(conditioning):
    plain, fast = pair(conditioning=conditioning)
    (out_p, grads_p), (out_f, grads_f) = step(plain, False), step(fast, False)
    assert torch.equal(out_p, out_f)
    for name in grads_p:
        assert torch.equal(grads_p[name], grads_f[name]), name
    with torch.no_grad():
        assert torch.equal(plain.eval()(*INPUTS), fast.eval()(*INPUTS))


@pytest.mark.parametrize("conditioning", VARIANTS)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_bf16_training_matches_float64_and_uses_the_explicit_attention(conditioning, qk_norm):
    plain, fast = pair(conditioning=conditioning, qk_norm=qk_norm)
    out64, grads64 = step(copy.deepcopy(plain).double(), False)
    with OpCounts() as ops_plain:
        out_p, grads_p = step(plain, True)
    with OpCounts() as ops:
        out_f, grads_f = step(fast, True)
    # self-attention takes the explicit path; cross-attention to the 1-2 conditioning tokens keeps SDPA (one per block)
    assert ops.counts[FLASH] == (len(fast.blocks) if conditioning == "cross_attn" else 0)
    assert ops.counts["baddbmm"] == len(fast.blocks) and ops_plain.counts[FLASH] > ops.counts[FLASH]
    scale = out64.abs().max()
    # bf16 rounding of the stream and the scores: a few bf16 ulps of the output scale, like the plain model's error
    err_f, err_p = (out_f.double() - out64).abs().max(), (out_p.double() - out64).abs().max()
    assert err_f < 0.03 * scale and err_f <= 3 * err_p, (err_f, err_p, scale)
    for name, g64 in grads64.items():
        g_scale = g64.abs().max()
        err_f = (grads_f[name].double() - g64).abs().max()
        err_p = (grads_p[name].double() - g64).abs().max()
        # 5 % of the gradient's scale, or 4x the plain bf16 error where the float64 gradient is ~0 (k_norm's bias:
        # softmax ignores it, so both bf16 models only show rounding noise there)
        assert err_f <= max(0.05 * g_scale, 4 * err_p), (name, err_f, err_p, g_scale)


def test_token_stream_runs_in_the_autocast_dtype_only_under_cpu_autocast():
    _, fast = pair()
    seen = []
    for block in fast.blocks:
        block.attn.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    step(fast, False)
    assert set(seen) == {torch.float32}
    seen.clear()
    step(fast, True)
    assert set(seen) == {torch.bfloat16}


def test_checkpointed_bf16_gradients_equal_the_unchecked_ones():
    """Selective recomputation through the CPU subclasses reproduces their bf16 step bit for bit."""
    plain = tiny(class_dropout_prob=0.0, depth=3)
    fast = accelerate(copy.deepcopy(plain))
    ckpt = accelerate(copy.deepcopy(plain))
    ckpt.set_grad_checkpointing(True)
    (out_a, grads_a), (out_b, grads_b) = step(fast, True), step(ckpt, True)
    assert torch.equal(out_a, out_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_bf16_sampling_uses_onednn_and_matches_float64():
    plain, fast = pair()
    ref = copy.deepcopy(plain).double().eval()
    with torch.no_grad():
        want = ref(INPUTS[0].double(), *INPUTS[1:])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with OpCounts() as ops:
                got = bf16_storage(fast)(*INPUTS)
            plain_out = bf16_storage(plain)(*INPUTS)
    assert (ops.counts["_linear_pointwise"] > 0) == onednn_bf16()
    err, err_plain = (got.double() - want).abs().max(), (plain_out.double() - want).abs().max()
    assert err < 0.03 * want.abs().max() and err <= 3 * err_plain + 1e-3, (err, err_plain)


def test_paths_stay_off_where_they_do_not_apply(monkeypatch):
    """fp32 training and bf16 training under torch.compile keep the flash kernel; bf16 sampling with fp32-stored
    or ZeRO-3-partitioned weights and anything off the CPU (here the meta device) never call oneDNN."""
    _, fast = pair()
    with OpCounts() as ops:
        step(fast, False)
    assert ops.counts[FLASH] > 0 and ops.counts["baddbmm"] == 0
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with OpCounts() as ops:
        step(fast, True)
    assert ops.counts[FLASH] > 0 and ops.counts["baddbmm"] == 0
    monkeypatch.undo()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), OpCounts() as ops:
        fast.eval()(*INPUTS)
    assert ops.counts["_linear_pointwise"] == 0
    partitioned = bf16_storage(fast)
    for mod in partitioned.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.weight.ds_id = 0  # as DeepSpeed marks ZeRO-3 parameters (gathered only in the module's own hooks)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), OpCounts() as ops:
        partitioned(*INPUTS)
    assert ops.counts["_linear_pointwise"] == 0
    meta = bf16_storage(fast).to("meta")
    with torch.no_grad(), OpCounts() as ops:
        out = meta(*(z.to("meta") for z in INPUTS))
    assert out.device.type == "meta" and ops.counts["_linear_pointwise"] == 0


def test_softmax_attention_matches_float64():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    gout = torch.randn(2, 3, 17, 8, generator=g, dtype=torch.float64)
    want = F.scaled_dot_product_attention(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v), gout)
    torch.testing.assert_close(softmax_attention(q, k, v), want, rtol=1e-12, atol=1e-12)
    low = [z.detach().bfloat16().requires_grad_() for z in (q, k, v)]
    got = softmax_attention(*low)
    assert got.dtype == torch.bfloat16 and (got.double() - want).abs().max() < 0.05
    for gg, wg in zip(torch.autograd.grad(got, low, gout.bfloat16()), want_grads):
        assert (gg.double() - wg).abs().max() < 0.05 * wg.abs().max()


@pytest.mark.skipif(not onednn_bf16(), reason="this CPU or torch build has no native oneDNN bf16 kernels")
@pytest.mark.parametrize("gelu", [False, True])
def test_onednn_linear_matches_float64(gelu):
    """oneDNN's linear(+tanh GELU) computes the modules' function, with errors like the modules' under autocast."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    x = torch.randn(3, 17, 64, generator=g)
    ref = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    ref = F.gelu(ref, approximate="tanh") if gelu else ref
    low = copy.deepcopy(layer).bfloat16()
    with torch.no_grad():
        got = onednn_linear(low, x.bfloat16(), gelu=gelu)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = layer(x)
            plain = F.gelu(plain, approximate="tanh") if gelu else plain
    assert got.shape == (3, 17, 96) and got.dtype == torch.bfloat16
    err, err_plain = (got.double() - ref).abs().max(), (plain.double() - ref).abs().max()
    assert err <= 2 * err_plain + 1e-3, (err, err_plain)
