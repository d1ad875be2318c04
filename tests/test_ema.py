"""EMA of parameters against the closed-form weighted sum."""
import pytest
import torch
from torch import nn

from dit.ema import EMA, update_ema


def test_update_ema_matches_formula_in_float64():
    g = torch.Generator().manual_seed(0)
    ema = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    params = [torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True),
              torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)]
    ref = [0.9 * e + 0.1 * p.detach() for e, p in zip(ema, params)]
    update_ema(ema, params, 0.9)
    for e, r in zip(ema, ref):
        torch.testing.assert_close(e, r, rtol=1e-14, atol=1e-15)
    assert not ema[0].requires_grad


def test_update_ema_edge_decays_and_errors():
    e, p = [torch.zeros(3)], [torch.arange(3.0)]
    update_ema(e, p, 1.0)
    assert torch.equal(e[0], torch.zeros(3))
    update_ema(e, p, 0.0)
    assert torch.equal(e[0], p[0])
    with pytest.raises(ValueError, match="2 parameters"):
        update_ema(e, p * 2, 0.5)
    with pytest.raises(ValueError, match="decay"):
        update_ema(e, p, 1.5)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_ema_class_tracks_closed_form_and_round_trips():
    model = _net()
    ema = EMA(model, decay=0.8)
    w0 = model[0].weight.detach().clone()
    values = []
    for k in range(5):
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].running_mean.fill_(float(k))
        values.append(model[0].weight.detach().clone())
        ema.update(model)
    # ema_n = d^n w0 + sum_k (1-d) d^(n-1-k) w_k
    ref = 0.8 ** 5 * w0 + sum(0.2 * 0.8 ** (4 - k) * v for k, v in enumerate(values))
    torch.testing.assert_close(ema.module[0].weight, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(ema.module[1].running_mean, torch.full((4,), 4.0))  # buffers copied, not averaged
    assert not any(p.requires_grad for p in ema.module.parameters())
    other = EMA(_net(), decay=0.8)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 5
    torch.testing.assert_close(other.module[0].weight, ema.module[0].weight, rtol=0, atol=0)
    target = _net()
    ema.copy_to(target)
    torch.testing.assert_close(target[0].weight, ema.module[0].weight, rtol=0, atol=0)


def test_ema_warmup_schedule():
    ema = EMA(_net(), decay=0.999, warmup=True)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update(ema.module)
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    ema.num_updates = 10**7
    assert ema.current_decay() == 0.999


# ------------------------------------------------------------------------------- EngineEMA (launch/engine_ema.py)
def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2).double()


def _set_weights(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_engine_ema_every_k_folds_k_steps_with_decay_power_k():
    """every=k: after k applied steps the average is d^k ema0 + (1 - d^k) w_k (the documented approximation),
    and with weights that only change at update steps it equals k per-step updates."""
    from launch.engine_ema import EngineEMA

    model, d, k = _linear(), 0.9, 4
    ema0 = [p.detach().double().clone() for p in model.parameters()]
    ema = EngineEMA(model, d, every=k)
    for step in range(1, k + 1):
        _set_weights(model, float(step))  # weights change every step
        updated = ema.after_step(step, applied=True)
        assert updated == (step == k) and ema.pending == (step % k)
    for s, e0 in zip(ema.shadow, ema0):
        torch.testing.assert_close(s, (d ** k * e0.float() + (1 - d ** k) * float(k)), rtol=1e-6, atol=1e-6)

    exact, lazy = EngineEMA(model, d, every=1), EngineEMA(model, d, every=k)
    for step in range(1, 2 * k + 1):
        exact.after_step(step, applied=True)
        lazy.after_step(step, applied=True)
        if step % k == 0:
            _set_weights(model, float(step))  # constant between the lazy updates
    for a, b in zip(exact.shadow, lazy.shadow):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_engine_ema_every_one_is_the_per_step_update_and_skipped_steps_do_not_count():
    from launch.engine_ema import EngineEMA

    model = _linear()
    a, b = EngineEMA(model, 0.8), EngineEMA(model, 0.8)
    for step, applied in enumerate([True, False, True], start=1):
        _set_weights(model, float(step))
        a.after_step(step, applied)
        if applied:
            b.update()
    for x, y in zip(a.shadow, b.shadow):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match=">= 1"):
        EngineEMA(model, 0.8, every=0)


def test_engine_ema_pending_steps_round_trip_and_exports_are_up_to_date():
    """The stored average plus `pending` restore the exact state; exports fold the pending steps in."""
    from launch.engine_ema import EngineEMA

    model, d = _linear(), 0.5
    ema = EngineEMA(model, d, every=3)
    _set_weights(model, 1.0)
    ema.after_step(1, applied=True)
    ema.after_step(2, applied=True)
    assert ema.pending == 2
    raw = ema.state_dict_on_main(up_to_date=False)
    current = ema.state_dict_on_main()
    for name, s in zip(ema.names, ema.shadow):
        assert torch.equal(raw[name], s)
        torch.testing.assert_close(current[name], d ** 2 * s + (1 - d ** 2) * 1.0)
    other = EngineEMA(model, d, every=3)  # a resumed run: same weights, state from the checkpoint
    other.load_full_state_dict(raw, pending=ema.pending)
    for step in (3, 4):
        for e in (ema, other):
            e.after_step(step, applied=True)
    assert other.pending == ema.pending == 1
    for x, y in zip(ema.shadow, other.shadow):
        assert torch.equal(x, y)


def test_engine_ema_device_flag_equals_the_host_flag():
    """`applied` as a device bool tensor (the GPU step never reads it on the host) folds exactly like a bool."""
    from launch.engine_ema import EngineEMA

    model = _linear()
    for every in (1, 3):
        a, b = EngineEMA(model, 0.8, every), EngineEMA(model, 0.8, every)
        for step, applied in enumerate([True, False, True, True, False, True, True], start=1):
            _set_weights(model, float(step))
            a.after_step(step, applied)
            b.after_step(step, torch.tensor(applied))
        assert a.pending == b.pending
        for x, y in zip(a.shadow, b.shadow):
            assert torch.equal(x, y)


def test_engine_ema_host_copies_only_on_rank_zero_and_device_copy(monkeypatch):
    """Checkpoints and exports need the full EMA in host memory on rank 0 alone (other ranks hold nothing);
    grids and evaluation copy it device to device into the sampling model."""
    import torch.distributed as dist

    from launch.engine_ema import EngineEMA

    model = _linear()
    ema = EngineEMA(model, 0.5, every=2)
    _set_weights(model, 2.0)
    ema.after_step(1, True)  # pending: the copies must be up to date
    target = _linear().float()
    ema.copy_to(target)
    expected = ema.state_dict_on_main()
    for name, p in target.named_parameters():
        assert torch.equal(p, expected[name])
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    assert ema.state_dict_on_main() is None and ema.state_dict_on_main(up_to_date=False) is None
