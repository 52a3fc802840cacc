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


def test_cut_points_range_and_uniformity():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([10] * 20000 + [3, 0])
    t, g = sample_cut_points(lengths, segment_len=4, generator=gen)
    assert g[:20000].eq(4).all() and g[-2:].tolist() == [3, 0]  # g = min(segment_len, L)
    assert (t >= 0).all() and (t + g <= lengths).all()
    assert t[-2:].tolist() == [0, 0]
    counts = torch.bincount(t[:20000], minlength=7).float()
    assert counts.numel() == 7  # t ∈ {0, …, L − g}
    expected = 20000 / 7
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 22.5  # 6 degrees of freedom, p ≈ 0.001


def test_cut_points_reject_bad_segment_len():
    with pytest.raises(ValueError):
        sample_cut_points(torch.tensor([5]), segment_len=0)
