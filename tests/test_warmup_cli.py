import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfplay.generation import generate
from selfplay.tasks import SortTask, chat_prompt
from selfplay.tiny import build_tiny
from selfplay.warmup import evaluate_task, supervised_warmup


def test_generate_is_reproducible_and_reports_finish_reason(tiny):
    model, tok = tiny
    prompts = [chat_prompt(tok, "Sort ascending: 3 1 2"), chat_prompt(tok, "Sort ascending: 9 8")]
    a = generate(model, tok, prompts, num_samples=3, max_new_tokens=5, temperature=1.0, seed=7)
    b = generate(model, tok, prompts, num_samples=3, max_new_tokens=5, temperature=1.0, seed=7)
    assert a == b and len(a) == 2 and all(len(x) == 3 for x in a)
    for c in (c for row in a for c in row):
        assert c.finish_reason in ("stop", "length")
        assert (c.finish_reason == "stop") == (c.token_ids[-1] == tok.eos_token_id)
        assert len(c.token_ids) <= 5
    greedy = generate(model, tok, prompts, num_samples=2, max_new_tokens=5, temperature=0.0)
    assert greedy[0][0] == greedy[0][1]


def test_warmup_makes_a_weak_but_nontrivial_policy():
    torch.manual_seed(0)
    model, tok = build_tiny(seed=0)
    task = SortTask()
    before = evaluate_task(model, tok, task, task.prompts("eval", 100))
    losses = supervised_warmup(model, tok, task.prompts("train", 2000), steps=60, batch_size=64, lr=2e-3, log=None)
    after = evaluate_task(model, tok, task, task.prompts("eval", 100))
    assert losses[-1] < losses[0] / 3
    assert before["score"] < 0.05
    assert 0.2 <= after["score"] <= 0.6, after


def test_cli_help_and_config_errors():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    out = subprocess.run([sys.executable, "-m", "selfplay.cli", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "warmup" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "selfplay.cli", "config", "--set", "sppo.k=1"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "sppo.k: must be >= 2" in bad.stderr


@pytest.mark.slow
def test_cli_warmup_prints_and_writes_heldout_score(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    out = subprocess.run(
        [sys.executable, "-m", "selfplay.cli", "warmup", "--out", str(tmp_path), "--set", "task.eval_size=60"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "after warm-up" in out.stdout
    result = json.loads((tmp_path / "warmup.json").read_text())
    assert result["heldout_after"]["n"] == 60
    assert result["heldout_after"]["score"] > result["heldout_before"]["score"]
    assert any((tmp_path / "policy").glob("*.safetensors"))
