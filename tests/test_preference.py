import pytest
import torch

from selfplay.preference import (
    comparison_scores,
    probs_to_logits,
    sppo_targets,
    sppo_targets_from_scores,
    win_probabilities,
)

CHECK_S = [0.8, -0.3, 1.6, 0.1, -1.2]


def test_sppo_targets_check_values():
    out = sppo_targets_from_scores(torch.tensor(CHECK_S, dtype=torch.float64))
    assert out.winner.tolist() == [2] and out.loser.tolist() == [4]
    assert out.p_winner.item() == pytest.approx(0.764023, abs=1e-5)
    assert out.p_loser.item() == pytest.approx(0.235949, abs=1e-5)
    assert out.valid.tolist() == [True]


def test_sppo_targets_from_comparison_logits_match_scores():
    s = torch.tensor(CHECK_S, dtype=torch.float64)
    # C[i,j] = (s_i − s_j)/2 gives comparison scores s − mean(s): the same probabilities (shift invariance)
    logits = (s[:, None] - s[None, :]) / 2
    assert torch.allclose(comparison_scores(logits), s - s.mean())
    out = sppo_targets(logits)
    assert out.winner.item() == 2 and out.loser.item() == 4
    assert out.p_winner.item() == pytest.approx(0.764023, abs=1e-5)
    assert out.p_loser.item() == pytest.approx(0.235949, abs=1e-5)


def test_win_probabilities_are_consistent():
    s = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    p = win_probabilities(s)
    assert p.shape == (3, 6, 6)
    assert torch.allclose(p + p.transpose(-1, -2), torch.ones_like(p))
    assert torch.allclose(torch.diagonal(p, dim1=-2, dim2=-1), torch.full((3, 6), 0.5))


def test_batched_targets_equal_per_prompt():
    logits = torch.randn(4, 5, 5, generator=torch.Generator().manual_seed(1))
    batched = sppo_targets(logits)
    for b in range(4):
        one = sppo_targets(logits[b])
        assert one.winner.item() == batched.winner[b].item()
        assert one.p_winner.item() == pytest.approx(batched.p_winner[b].item())
        assert one.p_loser.item() == pytest.approx(batched.p_loser[b].item())


def test_ties_are_marked_invalid():
    out = sppo_targets_from_scores(torch.tensor([[0.3, 0.3, 0.3], [0.1, 0.2, 0.3]]))
    assert out.valid.tolist() == [False, True]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        sppo_targets_from_scores(torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="K >= 2"):
        sppo_targets_from_scores(torch.tensor([[0.1]]))
    with pytest.raises(ValueError, match="K, K"):
        sppo_targets(torch.zeros(2, 3, 4))


def test_probs_to_logits_roundtrip_and_clamps():
    p = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    logits = probs_to_logits(p)
    assert torch.isfinite(logits).all()
    assert torch.allclose(torch.sigmoid(logits[1:4]), p[1:4])
