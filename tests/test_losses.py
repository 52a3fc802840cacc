import pytest
import torch

from selfplay.losses import dpo_loss, ipo_loss, orpo_loss, reward_margin, sppo_loss, srpo_loss, srpo_terms


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_dpo_check_value():
    loss = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.5), beta=0.1)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(0.620957, abs=1e-6)


def test_dpo_gradient_sign_raises_chosen_lowers_rejected():
    pw, pl = t(-10.0).requires_grad_(), t(-12.0).requires_grad_()
    dpo_loss(pw, pl, t(-11.0), t(-11.5), beta=0.1).sum().backward()
    assert pw.grad.item() < 0  # descending the loss increases log π(chosen)
    assert pl.grad.item() > 0  # … and decreases log π(rejected)


def test_dpo_is_per_example_and_batched():
    pw, pl, rw, rl = t(-10, -5, -3), t(-12, -5, -1), t(-11, -5, -3), t(-11.5, -5, -1)
    batched = dpo_loss(pw, pl, rw, rl, beta=0.1)
    assert batched.shape == (3,)
    for i in range(3):
        one = dpo_loss(pw[i : i + 1], pl[i : i + 1], rw[i : i + 1], rl[i : i + 1], beta=0.1)
        assert batched[i].item() == pytest.approx(one.item())
    assert batched[1].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())  # equal log-ratios → log 2


def test_ipo_zero_at_target_margin_and_quadratic():
    tau = 0.25  # target margin 1/(2τ) = 2
    assert ipo_loss(t(0.0), t(-2.0), t(0.0), t(0.0), tau).item() == pytest.approx(0.0)
    assert ipo_loss(t(0.0), t(0.0), t(0.0), t(0.0), tau).item() == pytest.approx(4.0)


def test_sppo_zero_at_target_and_check_values():
    beta = 0.001
    p_w, p_l = t(0.764023), t(0.235949)
    ref_w, ref_l = t(-20.0), t(-25.0)
    h_w, h_l = (p_w - 0.5) / beta, (p_l - 0.5) / beta
    assert sppo_loss(ref_w + h_w, ref_l + h_l, ref_w, ref_l, p_w, p_l, beta).item() == pytest.approx(0.0, abs=1e-9)
    # at the reference (h = 0) the loss is η²((p_w − ½)² + (p_l − ½)²)
    expected = (1 / beta) ** 2 * ((0.764023 - 0.5) ** 2 + (0.235949 - 0.5) ** 2)
    assert sppo_loss(ref_w, ref_l, ref_w, ref_l, p_w, p_l, beta).item() == pytest.approx(expected)


def test_sppo_gradient_pushes_toward_targets():
    pw = t(-20.0).requires_grad_()
    pl = t(-25.0).requires_grad_()
    sppo_loss(pw, pl, t(-20.0), t(-25.0), t(0.8), t(0.2), beta=0.1).sum().backward()
    assert pw.grad.item() < 0 and pl.grad.item() > 0


def test_srpo_check_values():
    args = (t(2.0), t(1.0), t(3.0), t(0.5), t(1.5), t(-1.0))
    l_self, l_gen = srpo_terms(*args, beta=0.1)
    assert l_self.item() == pytest.approx(0.2225)
    assert l_gen.item() == pytest.approx(0.36)
    assert srpo_loss(*args, beta=0.1, alpha=0.5).item() == pytest.approx(0.29125)
    assert srpo_loss(*args, beta=0.1, alpha=1.0).item() == pytest.approx(0.2225)
    assert srpo_loss(*args, beta=0.1, alpha=0.0).item() == pytest.approx(0.36)


def test_orpo_prefers_likelier_chosen_and_is_finite():
    tokens = t(5.0, 5.0)
    better = orpo_loss(t(-2.0, -2.0), t(-8.0, -8.0), tokens, tokens, lam=0.1)
    worse = orpo_loss(t(-8.0, -8.0), t(-2.0, -2.0), tokens, tokens, lam=0.1)
    assert torch.isfinite(better).all() and (better < worse).all()
    # λ = 0 leaves the chosen response's mean NLL
    assert orpo_loss(t(-5.0), t(-1.0), t(5.0), t(2.0), lam=0.0).item() == pytest.approx(1.0)
    # near-certain responses (log p → 0) must not produce inf/NaN
    assert torch.isfinite(orpo_loss(t(0.0), t(-1e-9), t(3.0), t(3.0), lam=1.0)).all()


def test_reward_margin():
    assert reward_margin(t(-10.0), t(-12.0), t(-11.0), t(-11.5), 0.1).item() == pytest.approx(0.15)
