import json

import pytest

from selfplay.cli import main


def run_eval(tmp_path, a, b, *extra):
    out = tmp_path / "eval.json"
    assert main(["eval", "--policy-a", str(a), "--policy-b", str(b), "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_policy_against_itself_is_a_coin_flip(tmp_path, warm_policy_dir, capsys):
    r = run_eval(tmp_path, warm_policy_dir, warm_policy_dir, "--prompts", "120")
    assert r["n"] == 120 and r["wins"] + r["ties"] + r["losses"] == 120
    assert abs(r["winrate"] - 0.5) < max(3 * r["stderr"], 0.05)
    assert r["wins"] > 0 and r["losses"] > 0  # sampling with different seeds: real noise, not identical answers
    out = capsys.readouterr().out
    assert "win rate" in out and "held-out prompts (rule judge)" in out


def test_against_a_broken_policy_the_win_rate_is_high(tmp_path, warm_policy_dir):
    r = run_eval(tmp_path, warm_policy_dir, "tiny", "--prompts", "60")  # "tiny" = untrained random weights
    assert r["winrate"] > 0.7 and r["task_score_a"] > r["task_score_b"]
    flipped = run_eval(tmp_path, "tiny", warm_policy_dir, "--prompts", "60")
    assert flipped["winrate"] == pytest.approx(1 - r["winrate"], abs=0.1)


def test_eval_with_srpo_revisions_and_pairrm(tmp_path, warm_policy_dir, pairrm_dir):
    r = run_eval(tmp_path, warm_policy_dir, warm_policy_dir, "--prompts", "8", "--revisions", "2", "--greedy",
                 "--set", "judge.kind=pairrm", "--set", f"judge.path={pairrm_dir}")
    assert r["revisions"] == 2 and r["n"] == 8
    assert r["winrate"] == pytest.approx(0.5)  # greedy + same policy: identical answers, P = ½ exactly


def test_eval_bad_arguments(tmp_path, capsys):
    assert main(["eval", "--policy-a", str(tmp_path / "missing"), "--policy-b", "tiny"]) == 2
    assert "cannot load tokenizer" in capsys.readouterr().err


def test_export_alpaca_eval_writes_the_policys_answers_in_model_outputs_format(tmp_path, warm_policy_dir, capsys):
    from selfplay.evaluate import alpaca_eval_outputs
    from selfplay.tasks import Prompt

    prompts = [{"prompt": f"Sort ascending: {i} {i % 5} {i % 3}"} for i in range(6)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    out = tmp_path / "alpaca"
    assert main(["eval", "--policy-a", str(warm_policy_dir), "--export", "alpaca_eval", str(out), "--greedy",
                 "--set", "task.name=file", "--set", f"task.path={tmp_path / 'prompts.jsonl'}",
                 "--set", "judge.kind=pairrm", "--set", "judge.path=unused"]) == 0
    records = json.loads((out / "model_outputs.json").read_text())
    assert [set(r) for r in records] == [{"instruction", "output", "generator"}] * 6
    assert [r["instruction"] for r in records] == [p["prompt"] for p in prompts]  # as asked, in order
    assert {r["generator"] for r in records} == {warm_policy_dir.name}
    assert all(isinstance(r["output"], str) for r in records) and any(r["output"] for r in records)
    assert "alpaca_eval --model_outputs" in capsys.readouterr().out
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        alpaca_eval_outputs([Prompt("a", "x"), Prompt("b", "y")], ["only one"], "m")
