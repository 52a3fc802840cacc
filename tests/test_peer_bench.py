"""benchmarks/peer.py: our rule judge as the reward function TRL 1.16's online DPO calls, and the budget callback."""

import pytest

pytest.importorskip("trl")

from transformers import TrainerControl, TrainerState, TrainingArguments  # noqa: E402

from benchmarks.peer import PairwiseJudgeReward, budget_stop  # noqa: E402
from selfplay.judges import RuleJudge  # noqa: E402
from selfplay.tasks import SortTask  # noqa: E402

PROMPTS = ["Sort ascending: 3 1 2", "Sort ascending: 9 7 8 5", "Sort ascending: 4 4 1"]
FIRST = ["1 2 3", "9 8 7 5", "1 4"]  # right, wrong order, too short
SECOND = ["3 2 1", "5 7 8 9", "1 4"]  # wrong order, right, the same answer: a tie


def trl_call(reward, prompts, first, second):
    """The arguments TRL's online DPO passes: conversational prompts twice, the two completions per prompt."""
    chats = [[{"role": "user", "content": p}] for p in prompts]
    completions = [[{"role": "assistant", "content": c}] for c in first + second]
    return reward(prompts=chats * 2, completions=completions, completion_ids=[[0]] * len(completions),
                  trainer_state=None)


def test_rewards_are_the_judges_pair_probabilities():
    judge = RuleJudge(SortTask(), temperature=0.1)
    reward = PairwiseJudgeReward(judge)
    rewards = trl_call(reward, PROMPTS, FIRST, SECOND)
    p = judge.compare(PROMPTS, FIRST, SECOND).double().tolist()
    n = len(PROMPTS)
    assert rewards[:n] == pytest.approx(p)
    assert rewards[n:] == pytest.approx([1 - x for x in p])
    # TRL keeps the first completion as chosen where reward[i] >= reward[i + n]: the one our judge prefers
    chosen_first = [a >= b for a, b in zip(rewards[:n], rewards[n:])]
    assert chosen_first == [True, False, True]
    assert rewards[2] == rewards[2 + n] == 0.5  # a tie stays a tie
    assert (reward.pairs, reward.ties) == (3, 1)


def test_plain_text_prompts_work_too():
    reward = PairwiseJudgeReward(RuleJudge(SortTask()))
    rewards = reward(prompts=PROMPTS[:1] * 2, completions=["1 2 3", "3 2 1"])
    assert rewards[0] > 0.5 > rewards[1]


def test_a_batch_not_in_trls_layout_is_refused():
    reward = PairwiseJudgeReward(RuleJudge(SortTask()))
    with pytest.raises(ValueError, match="layout"):
        reward(prompts=PROMPTS[:2], completions=["1 2 3", "5 7 8 9"])  # two different prompts, not one twice


def test_budget_callback_stops_only_when_the_budget_is_spent(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    for seconds, stops in ((0.0, True), (3600.0, False)):
        callback, state, control = budget_stop(seconds), TrainerState(), TrainerControl()
        callback.on_train_begin(args, state, control)
        state.global_step = 1
        callback.on_step_end(args, state, control)
        assert control.should_training_stop is stops
        assert callback.steps == 1
