"""SAPO segment rollouts: where to cut a chosen response and how to splice the EMA policy's segment in.

Rejected = chosen[:t] + segment + chosen[t+g:], with the segment g tokens sampled from the EMA policy given
x ⊕ chosen[:t]; when the segment ended with EOS the chosen suffix is dropped (the response is over).

The cut rule is the official SAPO code's (docs/architecture.md, SAPO; yinyueqin/SAPO
sapo/alignment/utils.py, SAPODataCollatorWithPadding.tokenize_batch_element, lines 170-180):
L counts the chosen response's tokens *including* its final EOS, g = min(segment_len, L), and
t ~ U{0, …, L − 3 − g} (both ends inclusive, as random.randint), or t = 0 when L − 3 − g ≤ 0. So when
L ≥ g + 3 the segment never overwrites the last 3 tokens (the final EOS among them), and t + g ≤ L always.
(The official collator also caps t by the room left under max_length; ours has no such cap here.)
"""

from __future__ import annotations

import torch
from torch import Tensor

# The official rule keeps this many tokens at the end of the chosen response out of the cut range.
KEEP_LAST = 3


def sample_cut_points(
    lengths: Tensor, segment_len: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Per example: segment length g = min(segment_len, L) and cut t ~ U{0, …, max(0, L − 3 − g)}. Returns (t, g).

    L is the chosen response's token count including its final EOS (as the official SAPO code measures it).
    """
    if segment_len < 1:
        raise ValueError(f"segment_len must be >= 1, got {segment_len}")
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    if (lengths < 0).any():
        raise ValueError("response lengths must be non-negative")
    g = lengths.clamp(max=segment_len)
    bound = (lengths - KEEP_LAST - g).clamp(min=0)  # largest cut point; 0 when L − 3 − g ≤ 0
    # floor(u * (bound + 1)) is uniform over the bound + 1 admissible cut points {0, …, bound}.
    u = torch.rand(lengths.shape, generator=generator)
    t = torch.minimum((u * (bound + 1)).long(), bound)
    return t, g


def splice_segment(chosen: Tensor, cut: int, seg_len: int, segment: Tensor, eos_id: int | None) -> Tensor:
    """chosen[:cut] + segment + chosen[cut+seg_len:], or without the suffix if the segment ended with EOS."""
    chosen = torch.as_tensor(chosen, dtype=torch.long)
    segment = torch.as_tensor(segment, dtype=torch.long)
    if not 0 <= cut <= cut + seg_len <= chosen.numel():
        raise ValueError(f"cut {cut} + segment {seg_len} out of range for a response of {chosen.numel()} tokens")
    ended = eos_id is not None and segment.numel() > 0 and int(segment[-1]) == eos_id
    suffix = chosen[:0] if ended else chosen[cut + seg_len :]
    return torch.cat([chosen[:cut], segment, suffix])


def splice_segments(
    chosen: list[Tensor], cuts: Tensor, seg_lens: Tensor, segments: list[Tensor], eos_id: int | None
) -> list[Tensor]:
    """Batched `splice_segment` over ragged responses."""
    if not len(chosen) == len(cuts) == len(seg_lens) == len(segments):
        raise ValueError("chosen, cuts, seg_lens and segments must have the same batch size")
    return [
        splice_segment(c, int(t), int(g), s, eos_id)
        for c, t, g, s in zip(chosen, cuts, seg_lens, segments)
    ]
