import copy

import pytest
import torch

from selfplay.logprobs import (
    build_batch,
    build_shared_batch,
    masked_sum_logprobs,
    response_logprobs,
    token_logprobs,
)

PROMPTS = [[1, 40, 41, 42], [1, 50], [1, 60, 61, 62, 63, 64]]
RESPONSES = [[70, 71, 2], [72, 2], [73, 74, 75, 76, 2]]


def _reference(model, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(logits[len(prompt) + i - 1, tok].item() for i, tok in enumerate(response))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_unpadded_reference(tiny, side):
    model, tok = tiny
    batch = build_batch(PROMPTS, RESPONSES, tok.pad_token_id, padding_side=side)
    with torch.no_grad():
        logp, ntok = response_logprobs(model, batch)
    assert ntok.tolist() == [len(r) for r in RESPONSES]
    for i in range(3):
        assert logp[i].item() == pytest.approx(_reference(model, PROMPTS[i], RESPONSES[i]), abs=1e-4)


def test_padding_layout(tiny):
    _, tok = tiny
    left = build_batch(PROMPTS, RESPONSES, tok.pad_token_id, padding_side="left")
    right = build_batch(PROMPTS, RESPONSES, tok.pad_token_id, padding_side="right")
    assert left["attention_mask"][:, -1].eq(1).all() and right["attention_mask"][:, 0].eq(1).all()
    assert left["response_mask"].sum().item() == right["response_mask"].sum().item() == 10
    assert left["position_ids"][1].tolist()[-4:] == [0, 1, 2, 3]  # positions restart after left padding
    with pytest.raises(ValueError):
        build_batch(PROMPTS, RESPONSES[:2], 0)


def test_prompt_tokens_are_masked():
    # logits that make every prompt token impossible but response tokens certain: the sum must be ~0
    ids = torch.tensor([[0, 1, 2, 3]])
    logits = torch.full((1, 4, 5), -1e4)
    logits[0, 1, 2] = 1e4  # predicts ids[2] (response) with certainty
    logits[0, 2, 3] = 1e4
    mask = torch.tensor([[0, 0, 1, 1]])
    total, count = masked_sum_logprobs(logits, ids, mask)
    assert total.item() == pytest.approx(0.0, abs=1e-3) and count.item() == 2
    assert token_logprobs(logits, ids).shape == (1, 3)
    with pytest.raises(ValueError, match="shape mismatch"):
        masked_sum_logprobs(logits, ids, mask[:, :3])


@pytest.mark.parametrize("chunk", [1, 3, 7, 1024])
def test_chunked_logprobs_equal_the_plain_ones_with_gradients(chunk):
    """Response positions scored a chunk at a time in float32 (recomputed in backward) give the same sums and
    the same gradients as float32 log-softmax over every position and the whole vocabulary."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 9), generator=gen)
    mask = torch.zeros(3, 9, dtype=torch.long)
    mask[0, 4:], mask[1, 2:6], mask[2, 8:] = 1, 1, 1  # responses of 5, 4 and 1 tokens (row 1 right-padded)
    plain_logits = (torch.randn(3, 9, 50, generator=gen) * 3).requires_grad_()
    chunked_logits = plain_logits.detach().clone().requires_grad_()
    plain = (token_logprobs(plain_logits, ids) * mask[:, 1:]).sum(-1)
    chunked, count = masked_sum_logprobs(chunked_logits, ids, mask, chunk_tokens=chunk)
    assert count.tolist() == [5.0, 4.0, 1.0]
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-5)
    weights = torch.tensor([0.3, -1.0, 2.0])
    (plain * weights).sum().backward()
    (chunked * weights).sum().backward()
    torch.testing.assert_close(chunked_logits.grad, plain_logits.grad, rtol=1e-6, atol=1e-6)
    assert chunked_logits.grad[0, :3].abs().sum() == 0  # positions that predict prompt tokens get no gradient
    assert chunked_logits.grad[0, 3:8].abs().sum() > 0


def test_chunked_logprobs_in_bf16_are_computed_in_float32():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (2, 6), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    logits = torch.randn(2, 6, 40, generator=gen).to(torch.bfloat16)
    total, _ = masked_sum_logprobs(logits, ids, mask, chunk_tokens=2)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, (token_logprobs(logits, ids) * mask[:, 1:]).sum(-1), rtol=1e-6, atol=1e-5)


def test_shared_prompts_give_the_plain_rows_log_probs_and_gradients(tiny):
    """`build_shared_batch`: rows with one prompt (a pair's two responses; SRPO's revisions, not next to each other)
    run it once — one forward over the 3 distinct prompts, then the 7 responses over their prompts' keys and values —
    and give the log-probs, token counts and gradients of the plain rows, to float32 rounding."""
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    with torch.no_grad():  # weights far from the tiny model's near-uniform start: gradients that differ by row
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    order = [0, 1, 2, 0, 1, 2, 1]
    prompts, responses = [PROMPTS[i] for i in order], [RESPONSES[i] for i in (0, 1, 2, 1, 2, 0, 0)]
    weights = torch.linspace(-1.0, 1.0, len(order))

    def run(batch):
        model.zero_grad()
        logp, ntok = response_logprobs(model, batch)
        (weights * logp).sum().backward()
        return logp.detach(), ntok, [p.grad.clone() for p in model.parameters()]

    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        shared = run(build_shared_batch(prompts, responses, tok.pad_token_id))
    finally:
        hook.remove()
    plain = run(build_batch(prompts, responses, tok.pad_token_id))
    assert shapes == [(3, max(map(len, PROMPTS))), (7, max(map(len, RESPONSES)))]
    assert torch.equal(shared[1], plain[1]) and shared[1].tolist() == [len(r) for r in responses]
    torch.testing.assert_close(shared[0], plain[0], rtol=1e-5, atol=1e-4)
    assert max(g.abs().max().item() for g in plain[2]) > 1e-3  # gradients to compare
    for got, want in zip(shared[2], plain[2]):  # to float32 rounding of each tensor's scale (sums reordered)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max() + 1e-7
