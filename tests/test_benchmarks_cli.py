"""`python -m benchmarks`: runs the chosen benchmarks for real, writes the JSON, the plots and the generated block
of the docs page, and leaves the hand-written rest of the page alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_the_aggregator_writes_json_plots_and_only_its_block_of_the_page(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nHand-written analysis.\n\n<!-- benchmarks:begin -->\nold tables\n"
                    "<!-- benchmarks:end -->\n\nMore hand-written text.\n")
    out, plots = tmp_path / "all.json", tmp_path / "img"
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "replay", "--out", str(out),
                          "--plots", str(plots), "--docs", str(page)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["command"] == "python -m benchmarks --quick --only replay"
    rows = data["benchmarks"]["replay"]["results"]
    assert {r["shards"] for r in rows} == {1, 4} and all(r["sample_rows_per_s"] > 0 for r in rows)
    assert (plots / "bench-replay.png").stat().st_size > 1000
    text = page.read_text()
    assert "old tables" not in text and "Hand-written analysis." in text and "More hand-written text." in text
    assert f"| {rows[0]['rows']:,} | {rows[0]['shards']} |" in text
    assert "[benchmarks]" in run.stdout


def test_an_unknown_benchmark_is_refused_by_name(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "replay,pipelin"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "unknown benchmark(s) ['pipelin']" in run.stderr


def test_scale_lora_measures_full_fine_tuning_and_lora_side_by_side(tmp_path):
    """`benchmarks.scale --lora R` (--quick: one layout): trained both ways in one run; LoRA trains and pushes a
    fraction of the model, and the result is added to the JSON without replacing the ladder already there."""
    out = tmp_path / "scale.json"
    out.write_text(json.dumps({"benchmark": "scale", "results": ["the ladder"]}))
    run = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--lora", "4", "--quick", "--rungs", "tiny",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["results"] == ["the ladder"]
    rows = data["lora"]["results"]
    assert [(r["learners"], r["zero"], r["lora_rank"]) for r in rows] == [(1, 0, 0), (1, 0, 4)]  # --quick: ZeRO-0
    for full, lora in zip(rows[::2], rows[1::2]):
        assert lora["trained_parameters"] < full["trained_parameters"] / 5 == full["parameters"] / 5
        assert 0 < lora["publish_mb"] < full["publish_mb"] / 5
    assert "LoRA/full — push bytes" in run.stderr
    bad = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--lora", "0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--lora 0: the rank must be >= 1" in bad.stderr


def test_learner_benchmark_times_shared_prompts_against_whole_rows():
    """`python -m benchmarks.learner --quick` (its own process: it starts DeepSpeed in-process) times both ways for
    every algorithm, and shared prompts put fewer padded tokens through the model (counted, not timed)."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.learner", "--quick"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert [r["case"] for r in out["results"]] == ["sppo", "sapo (orpo)", "sapo (dpo)", "srpo"]
    for r in out["results"]:
        assert r["shared_seconds"] > 0 and r["whole_seconds"] > 0
        assert r["shared_tokens"] < 0.9 * r["whole_tokens"], r
