"""PairRM: the pairwise reward model of LLM-Blender (DeBERTa-v3-large encoder + a small head).

Input layout, as the HF-format checkpoint `llm-blender/PairRM-hf` was trained with:
    <|source|> prompt (≤ source_max_length tokens) · <|candidate1|> a · <|candidate2|> b
with the two candidates sharing what is left of source_max_length + 2·candidate_max_length. The head reads
the final hidden states at the three prefix tokens: f(a, b) = head([h_src; h_a]) − head([h_src; h_b]).
We score both orders and use (f(a, b) − f(b, a)) / 2, so P(a ≻ b) = 1 − P(b ≻ a) exactly.

Parameter names (`pretrained_model.*`, `head_layer.{1,4}.*`) match the checkpoint so its safetensors load as
they are. On a cluster: `judge: {kind: pairrm, path: llm-blender/PairRM-hf}` (or a local copy of it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import DebertaV2Model, DebertaV2PreTrainedModel

from selfplay.judges.base import Judge

SOURCE, CAND1, CAND2 = "<|source|>", "<|candidate1|>", "<|candidate2|>"
SOURCE_MAX_LENGTH, CANDIDATE_MAX_LENGTH = 1224, 412


class PairRMModel(DebertaV2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        hidden, dropout = config.hidden_size, getattr(config, "drop_out", 0.05)
        self.pretrained_model = DebertaV2Model(config)
        self.head_layer = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(2 * hidden, hidden),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(hidden, getattr(config, "n_tasks", 1)),
        )
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, prefix_ids: tuple[int, int, int]) -> Tensor:
        """Logit that candidate 1 beats candidate 2, one per row → [N]."""
        states = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        src, c1, c2 = (states[rows, _first(input_ids, t)] for t in prefix_ids)
        left = self.head_layer(torch.cat([src, c1], dim=-1))
        right = self.head_layer(torch.cat([src, c2], dim=-1))
        return (left - right).mean(dim=-1)


def _first(input_ids: Tensor, token_id: int) -> Tensor:
    hit = input_ids == token_id
    if not hit.any(dim=-1).all():
        raise ValueError(f"prefix token id {token_id} missing from a PairRM input row")
    return hit.int().argmax(dim=-1)


class PairRMJudge(Judge):
    name = "pairrm"

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        source_max_length: int = SOURCE_MAX_LENGTH,
        candidate_max_length: int = CANDIDATE_MAX_LENGTH,
    ):
        from transformers import AutoTokenizer

        from selfplay.models import quiet_transformers

        quiet_transformers()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = PairRMModel.from_pretrained(str(path), dtype=dtype, use_safetensors=True).to(self.device).eval()
        config = self.model.config
        self.prefix_ids = tuple(
            getattr(config, attr, None) or self.tokenizer.convert_tokens_to_ids(tok)
            for attr, tok in (("source_prefix_id", SOURCE), ("cand1_prefix_id", CAND1), ("cand2_prefix_id", CAND2))
        )
        unknown = self.tokenizer.unk_token_id
        if any(i is None or (unknown is not None and i == unknown) for i in self.prefix_ids):
            raise ValueError(f"{path}: tokenizer lacks the PairRM prefix tokens {SOURCE}, {CAND1}, {CAND2}")
        self.batch_size = batch_size
        self.source_max_length, self.candidate_max_length = source_max_length, candidate_max_length

    def encode(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[list[int]]:
        """Token ids per (prompt, a, b) in PairRM's layout and truncation budget."""
        total = self.source_max_length + 2 * self.candidate_max_length
        enc = self.tokenizer.encode
        out = []
        for p, x, y in zip(prompts, a, b):
            src = enc(SOURCE + p, max_length=self.source_max_length, truncation=True)
            budget = (total - len(src)) // 2
            out.append(src + enc(CAND1 + x, max_length=budget, truncation=True)
                       + enc(CAND2 + y, max_length=budget, truncation=True))
        return out

    @torch.no_grad()
    def pair_logits(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> Tensor:
        """(f(a, b) − f(b, a)) / 2 per triple → [N]."""
        forward = self._logits(self.encode(prompts, a, b))
        backward = self._logits(self.encode(prompts, b, a))
        return (forward - backward) / 2

    def compare(self, prompts, a, b) -> Tensor:
        return torch.sigmoid(self.pair_logits(prompts, a, b))

    def _logits(self, ids: list[list[int]]) -> Tensor:
        pad = self.tokenizer.pad_token_id or 0
        out = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            width = max(len(r) for r in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, row in enumerate(chunk):
                input_ids[r, : len(row)] = torch.tensor(row)
                mask[r, : len(row)] = 1
            out.append(self.model(input_ids.to(self.device), mask.to(self.device), self.prefix_ids).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


def save_random_pairrm(out_dir: str | Path, tokenizer, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Path:
    """A randomly initialised PairRM of the real architecture (DeBERTa-v3 attention settings, small sizes),
    saved like the real checkpoint: for tests and offline smoke runs, since no hub is reachable there."""
    from transformers import DebertaV2Config

    tokenizer.add_special_tokens({"additional_special_tokens": [SOURCE, CAND1, CAND2]})
    ids = tokenizer.convert_tokens_to_ids([SOURCE, CAND1, CAND2])
    config = DebertaV2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden_size, max_position_embeddings=512, relative_attention=True,
        position_biased_input=False, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True,
        position_buckets=64, max_relative_positions=-1, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.5,  # the default 0.02 gives a random model with no visible preferences (|logit| ~ 1e-7)
        n_tasks=1, drop_out=0.05, source_prefix_id=ids[0], cand1_prefix_id=ids[1], cand2_prefix_id=ids[2],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PairRMModel(config)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
