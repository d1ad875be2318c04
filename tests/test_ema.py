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
