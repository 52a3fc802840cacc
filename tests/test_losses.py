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


# -- train.loss_average through `preference_loss` on the tiny model ------------------------------------------

ROWS = {  # responses of different lengths, so per-token means and sums rank pairs differently
    "prompt": ["Sort: 3 1 2", "Sort: 9 7 8 1"],
    "chosen": ["1 2 3", "1 7 8 9"],
    "rejected": ["3 2 1 1 1 2", "9"],
}


@pytest.fixture(scope="module")
def policy_and_reference(tiny):
    import copy

    model, tok = tiny
    reference = copy.deepcopy(model)  # a perturbed copy: the tiny model itself is shared and must not change
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model, reference, tok


def _by_hand(model, batch):
    """Summed response log-probs and token counts, one token at a time (independent of selfplay.logprobs)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits.double()
    logp = logits.log_softmax(-1)
    sums, counts = [], []
    for i in range(batch["input_ids"].shape[0]):
        pos = [j for j in range(1, batch["input_ids"].shape[1]) if batch["response_mask"][i, j]]
        sums.append(sum(logp[i, j - 1, batch["input_ids"][i, j]].item() for j in pos))
        counts.append(len(pos))
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)


def _spec(loss, average):
    from selfplay.config import load_config
    from selfplay.objectives import loss_spec

    algorithm = "sapo" if loss in ("dpo", "ipo", "orpo") else loss
    return loss_spec(load_config(None, [f"algorithm={algorithm}", f"train.loss={loss}",
                                        f"train.loss_average={average}"]))


def _loss(policy, reference, tok, spec):
    from selfplay.objectives import encode_rows, preference_loss

    batches = encode_rows(tok, ROWS, spec)
    with torch.no_grad():
        values, _ = preference_loss(policy, reference, batches, spec)
    return values.double(), batches


def test_token_mean_ipo_is_ipo_of_per_token_means(policy_and_reference):
    policy, reference, tok = policy_and_reference
    spec = _spec("ipo", "token_mean")
    assert spec.average == "token_mean" and spec.beta == pytest.approx(0.1)
    got, batches = _loss(policy, reference, tok, spec)
    (pol, n), (ref, n_ref) = _by_hand(policy, batches["pairs"]), _by_hand(reference, batches["pairs"])
    assert torch.equal(n, n_ref) and (n[:2] != n[2:]).all()  # chosen and rejected lengths differ
    pol, ref = pol / n, ref / n
    expected = ipo_loss(pol[:2], pol[2:], ref[:2], ref[2:], spec.beta)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert got.tolist() == pytest.approx([23.938076, 25.434919], rel=1e-4)  # check value (tiny model, seed 0)


def test_sum_ipo_is_unchanged_and_differs_from_token_mean(policy_and_reference):
    policy, reference, tok = policy_and_reference
    spec = _spec("ipo", "sum")
    assert spec.average == "sum"
    got, batches = _loss(policy, reference, tok, spec)
    pol, ref = _by_hand(policy, batches["pairs"])[0], _by_hand(reference, batches["pairs"])[0]
    assert torch.allclose(got, ipo_loss(pol[:2], pol[2:], ref[:2], ref[2:], spec.beta), rtol=1e-4, atol=1e-5)
    mean, _ = _loss(policy, reference, tok, _spec("ipo", "token_mean"))
    assert not torch.allclose(got, mean, rtol=1e-3)


def test_token_mean_srpo_averages_revisions_too(policy_and_reference):
    policy, reference, tok = policy_and_reference
    spec = _spec("srpo", "token_mean")
    got, batches = _loss(policy, reference, tok, spec)
    h = {}
    for key in ("pairs", "revisions"):
        (pol, n), (ref, _) = _by_hand(policy, batches[key]), _by_hand(reference, batches[key])
        h[key] = pol / n - ref / n
    w_l, l_l, w_w, l_w = h["revisions"].split(2)
    expected = srpo_loss(w_l, l_l, w_w, l_w, h["pairs"][:2], h["pairs"][2:], spec.beta, spec.alpha)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_loss_average_does_not_apply_to_orpo_and_bad_values_are_refused(policy_and_reference):
    import dataclasses

    policy, reference, tok = policy_and_reference
    summed, _ = _loss(policy, reference, tok, _spec("orpo", "sum"))
    mean, _ = _loss(policy, reference, tok, _spec("orpo", "token_mean"))
    assert torch.equal(summed, mean)  # ORPO takes per-token means already
    with pytest.raises(ValueError, match="unknown loss average 'mean'"):
        _loss(policy, reference, tok, dataclasses.replace(_spec("ipo", "sum"), average="mean"))
