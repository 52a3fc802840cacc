import pytest
import torch

from selfplay.judges import RuleJudge, judge_groups
from selfplay.judges.pairrm import PairRMJudge
from selfplay.preference import sppo_targets_from_scores
from selfplay.tasks import SortTask

PROMPT = "Sort ascending: 7 3 9 1"


@pytest.fixture(scope="module")
def pairrm(pairrm_dir):
    return PairRMJudge(pairrm_dir, batch_size=4)


def test_rule_judge_bradley_terry_and_ties():
    judge = RuleJudge(SortTask(), temperature=0.1)
    p = judge.compare([PROMPT] * 3, ["1 3 7 9", "1 3 9 7", "x"], ["1 3 9 7", "1 3 9 7", "y"])
    assert p[0].item() == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item())  # (1 − 0.5)/0.1
    assert p[1].item() == 0.5 and p[2].item() == 0.5  # equal scores are ties
    m = judge.matrix([PROMPT], [["1 3 7 9", "9 7 3 1", "1 3 9 7"]])
    assert m.shape == (1, 3, 3)
    assert torch.allclose(m + m.transpose(-1, -2), torch.ones_like(m))
    assert m[0, 0, 1] > 0.99 and m[0, 1, 0] < 0.01


def test_rule_judge_sppo_targets_equal_design_check_values():
    # candidates whose task scores are the docs/architecture.md check scores. Its comparison score counts both orders,
    # s_i = mean_j (C[i,j] − C[j,i]), so temperature 2 (C[i,j] = (s_i − s_j)/2) gives back s − mean(s), and
    # the shift leaves P = σ(s_i − s_j) unchanged.
    s = [0.8, -0.3, 1.6, 0.1, -1.2]

    class Fixed:
        def score(self, prompt, response):
            return s[int(response)]

    out = judge_groups(RuleJudge(Fixed(), temperature=2.0),
                       [{"prompt_id": "x", "prompt": "p", "candidates": ["0", "1", "2", "3", "4"]}])
    assert out.targets.winner.item() == 2 and out.targets.loser.item() == 4
    assert out.targets.p_winner.item() == pytest.approx(0.764023, abs=1e-5)
    assert out.targets.p_loser.item() == pytest.approx(0.235949, abs=1e-5)
    row = out.rows[0]
    assert (row["chosen"], row["rejected"]) == ("2", "4")
    assert row["score_chosen"] == pytest.approx(1.6) and row["p_rejected"] == pytest.approx(0.235949, abs=1e-5)
    assert torch.allclose(out.targets.p_winner, sppo_targets_from_scores(torch.tensor(s)).p_winner)


def test_judge_groups_skips_ties_and_builds_valid_rows():
    from selfplay.buffer import to_table

    judge = RuleJudge(SortTask())
    groups = [
        {"prompt_id": "a", "prompt": PROMPT, "candidates": ["1 3 7 9", "9", "1 3"], "policy_version": 4},
        {"prompt_id": "b", "prompt": PROMPT, "candidates": ["zz", "zz", "qq"], "policy_version": 4},
    ]
    out = judge_groups(judge, groups)
    assert out.skipped_ties == 1 and out.rows[1] is None
    assert out.rows[0]["chosen"] == "1 3 7 9" and out.rows[0]["score_chosen"] == 1.0
    assert out.rows[0]["policy_version"] == 4
    assert to_table([out.rows[0]]).num_rows == 1  # rows match the replay schema
    assert out.verdict(1)["valid"] is False and out.verdict(0)["winner"] == 0


def test_judge_refuses_mixed_k_and_nan():
    judge = RuleJudge(SortTask())
    with pytest.raises(ValueError, match="same number of candidates"):
        judge.matrix([PROMPT, PROMPT], [["1", "2"], ["1", "2", "3"]])

    class NaNJudge(RuleJudge):
        def compare(self, prompts, a, b):
            return torch.full((len(prompts),), float("nan"))

        comparison_logits = RuleJudge.__mro__[1].comparison_logits  # the generic pairwise path

    with pytest.raises(ValueError, match="NaN"):
        NaNJudge(SortTask()).matrix([PROMPT], [["1", "2"]])


def test_pairrm_loads_from_saved_checkpoint_with_layout(pairrm, pairrm_dir):
    assert any(pairrm_dir.glob("*.safetensors"))
    ids = pairrm.encode(["hello"], ["a"], ["b"])[0]
    src, c1, c2 = pairrm.prefix_ids
    assert ids.index(src) < ids.index(c1) < ids.index(c2)
    assert ids.count(src) == ids.count(c1) == ids.count(c2) == 1


def test_pairrm_order_symmetry_and_matrix(pairrm):
    prompts = ["Sort ascending: 3 1 2", "Why is the sky blue?"]
    a, b = ["1 2 3", "Rayleigh scattering."], ["3 2 1", "Because."]
    p_ab, p_ba = pairrm.compare(prompts, a, b), pairrm.compare(prompts, b, a)
    assert torch.allclose(p_ab, 1 - p_ba, atol=1e-6)
    assert not torch.allclose(p_ab, torch.full_like(p_ab, 0.5))  # a random model still has opinions
    m = pairrm.matrix(prompts[:1], [["1 2 3", "3 2 1", "2 1 3"]])
    assert torch.allclose(m + m.transpose(-1, -2), torch.ones_like(m), atol=1e-6)
    assert torch.allclose(torch.diagonal(m[0]), torch.full((3,), 0.5))


def test_pairrm_batch_equals_unbatched(pairrm):
    prompts = ["short", "a much longer prompt with many more words in it than the first one"]
    a, b = ["x", "a long candidate answer " * 3], ["y y y", "no"]
    batched = pairrm.pair_logits(prompts, a, b)
    single = torch.cat([pairrm.pair_logits([p], [x], [y]) for p, x, y in zip(prompts, a, b)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_pairrm_truncation_lengths(pairrm_dir):
    judge = PairRMJudge(pairrm_dir, source_max_length=8, candidate_max_length=6)
    long = "word " * 200
    ids = judge.encode([long], [long], [long])[0]
    src, c1, c2 = judge.prefix_ids
    source_len, cand1_len = ids.index(c1), ids.index(c2) - ids.index(c1)
    assert source_len == 8  # truncated to source_max_length
    assert cand1_len == len(ids) - ids.index(c2) == (8 + 2 * 6 - 8) // 2  # candidates share the rest equally
    short = judge.encode(["hi"], [long], [long])[0]
    assert len(short) <= 8 + 2 * 6 and short.index(c2) - short.index(c1) > 6  # unused source budget goes to candidates
    assert torch.isfinite(judge.pair_logits([long], [long], ["ok"])).all()
