import pytest
import torch

from selfplay.ema import ema_update
from selfplay.segments import sample_cut_points, splice_segment, splice_segments


def _linear(seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def test_ema_alpha_one_is_identity_and_zero_copies():
    ema, online = _linear(0), _linear(1)
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, online, alpha=1.0)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), before))
    ema_update(ema, online, alpha=0.0)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), online.parameters()))


def test_ema_half_averages():
    ema, online = _linear(0), _linear(1)
    expected = [(a + b) / 2 for a, b in zip(ema.parameters(), online.parameters())]
    ema_update(ema, online, alpha=0.5)
    assert all(torch.allclose(a, b) for a, b in zip(ema.parameters(), expected))


def test_ema_does_not_track_gradients_and_refuses_mismatch():
    ema, online = _linear(0), _linear(1)
    ema_update(ema, online, alpha=0.5)
    assert all(p.grad is None for p in ema.parameters())
    with pytest.raises(ValueError, match="different parameters"):
        ema_update(ema, torch.nn.Sequential(torch.nn.Linear(4, 3)), alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        ema_update(ema, online, alpha=1.5)
    with pytest.raises(ValueError, match="tensors"):
        ema_update([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)], alpha=0.5)


def test_splice_keeps_suffix_unless_segment_ends_with_eos():
    chosen = torch.tensor([10, 11, 12, 13, 14, 15])
    assert splice_segment(chosen, 2, 2, torch.tensor([7, 8]), eos_id=0).tolist() == [10, 11, 7, 8, 14, 15]
    assert splice_segment(chosen, 2, 2, torch.tensor([7, 0]), eos_id=0).tolist() == [10, 11, 7, 0]
    assert splice_segment(chosen, 0, 6, torch.tensor([1, 2, 3]), eos_id=0).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="out of range"):
        splice_segment(chosen, 5, 3, torch.tensor([1]), eos_id=0)


def test_splice_segments_batched_matches_single():
    chosen = [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 7])]
    segs = [torch.tensor([9]), torch.tensor([8, 0])]
    out = splice_segments(chosen, torch.tensor([1, 0]), torch.tensor([1, 2]), segs, eos_id=0)
    assert [o.tolist() for o in out] == [[1, 9, 3], [8, 0]]


def test_cut_points_support_is_exactly_zero_to_official_bound_and_uniform():
    # official SAPO (yinyueqin/SAPO sapo/alignment/utils.py:173-180): g = min(segment_len, L),
    # t = randint(0, L − 3 − g) (inclusive) when L − 3 − g > 0, else 0
    gen = torch.Generator().manual_seed(0)
    n = 20000
    lengths = torch.tensor([12] * n)
    t, g = sample_cut_points(lengths, segment_len=4, generator=gen)
    assert g.eq(4).all()
    bound = 12 - 3 - 4
    assert t.min().item() == 0 and t.max().item() == bound
    assert set(t.tolist()) == set(range(bound + 1))  # every admissible cut point is hit, and nothing else
    counts = torch.bincount(t, minlength=bound + 1).float()
    expected = n / (bound + 1)
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5  # 5 degrees of freedom, p ≈ 0.001


@pytest.mark.parametrize("segment_len", [1, 4, 256])
def test_cut_points_never_touch_the_last_three_tokens(segment_len):
    gen = torch.Generator().manual_seed(1)
    lengths = torch.arange(0, 300).repeat_interleave(20)
    t, g = sample_cut_points(lengths, segment_len=segment_len, generator=gen)
    assert torch.equal(g, lengths.clamp(max=segment_len))
    assert (t >= 0).all() and (t + g <= lengths).all()  # splice_segment's precondition, for every L
    room = lengths >= g + 3
    assert (t + g <= lengths - 3)[room].all()  # [t, t+g) stays clear of the last 3 tokens (the EOS among them)
    assert t[~room].eq(0).all()  # L − 3 − g ≤ 0 → t = 0
    assert (t <= (lengths - 3 - g).clamp(min=0)).all()


def test_cut_point_is_zero_when_bound_is_not_positive():
    lengths = torch.tensor([0, 1, 3, 5, 6, 7, 8])  # segment_len 4: L − 3 − g = −3, −3, −3, −2, −1, 0, 1
    for seed in range(50):
        t, g = sample_cut_points(lengths, segment_len=4, generator=torch.Generator().manual_seed(seed))
        assert g.tolist() == [0, 1, 3, 4, 4, 4, 4]
        assert t[:6].tolist() == [0] * 6 and t[6].item() in (0, 1)


def test_cut_points_fixed_seed_check_value():
    gen = torch.Generator().manual_seed(1234)
    t, g = sample_cut_points(torch.tensor([20, 10, 7, 6, 5, 3, 0, 300]), segment_len=4, generator=gen)
    assert t.tolist() == [0, 1, 0, 0, 0, 0, 0, 137]
    assert g.tolist() == [4, 4, 4, 4, 4, 3, 0, 4]


def test_cut_points_reject_bad_segment_len():
    with pytest.raises(ValueError):
        sample_cut_points(torch.tensor([5]), segment_len=0)
