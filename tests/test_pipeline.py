"""The whole pipeline, end to end on the session's Ray cluster: quick demos of each algorithm and mode."""

import json
import time
import urllib.request

import pytest

from selfplay.demo import demo_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SUMMARY_FIELDS = {"algorithm", "mode", "policy_version", "learner_steps", "samples_generated", "samples_trained",
                  "samples_dropped_stale", "weight_syncs", "winrate_vs_initial", "wall_seconds", "actor_restarts"}


def run(tmp_path, algorithm, mode, *extra):
    from actors.driver import Driver

    cfg = demo_config(algorithm, mode, quick=True, extra=["resources.generator_cpus=0.25", *extra])
    out = tmp_path / f"{algorithm}-{mode}"
    summary = Driver(cfg, out, log=print).run()
    return cfg, out, summary


def test_sppo_sync_writes_every_output(ray_cluster, tmp_path, monkeypatch):
    """Two generators and two judges; the evaluation (at step 6 and at the end) runs on them."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg, out, summary = run(tmp_path, "sppo", "sync", "logging.wandb=true", "train.checkpoint_every=0",
                            "eval.every=6", "resources.num_generators=2", "resources.num_judges=2")
    assert SUMMARY_FIELDS <= summary.keys()
    assert summary == {**json.loads((out / "summary.json").read_text()), "evals": summary["evals"]}
    assert summary["learner_steps"] == cfg.train.steps and summary["weight_syncs"] == cfg.train.steps
    assert summary["samples_generated"] >= cfg.train.steps * cfg.generation.prompts_per_request * cfg.sppo.k
    assert summary["samples_trained"] == cfg.train.steps * cfg.train.batch_size
    assert summary["policy_version"] == cfg.train.steps and 0.0 <= summary["winrate_vs_initial"] <= 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, cfg.train.steps + 1))
    for key in ("loss", "reward_margin", "grad_norm", "samples_per_s", "buffer_size", "weight_version_lag",
                "trained_version_lag", "sync_latency"):
        assert key in records[-1], key
    assert all(r["weight_version_lag"] == 0 for r in records)  # sync: generators always serve the newest
    assert (out / "config.yaml").exists() and all((out / p).exists() for p in ("loss.png", "winrate.png",
                                                                               "version_lag.png"))
    ckpt = out / "checkpoints" / f"step_{cfg.train.steps}"
    assert (ckpt / "model" / "model.safetensors").exists() and (ckpt / "replay" / "manifest.json").exists()
    # W&B wrote an offline run with the same metrics
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    # Ray's Prometheus endpoint shows our custom metrics (exported every few seconds)
    port = ray_cluster._private.worker.global_worker.node.metrics_export_port
    names = ("selfplay_samples_generated", "selfplay_buffer_size", "selfplay_weight_version_lag",
             "selfplay_sync_latency_seconds")
    deadline, body = time.time() + 60, ""
    while time.time() < deadline and not all(name in body for name in names):  # each export may carry only some
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        time.sleep(2)
    for name in names:
        assert name in body, name
    # the evaluation ran on the generators (each answered half the prompts, from the policy file learner rank 0
    # wrote, deleted once evaluated) and the judges: the final policy scores as it does in one process (greedy)
    assert [e["step"] for e in summary["evals"]] == [6, cfg.train.steps] and not list((out / "evals").iterdir())
    from selfplay.evaluate import against_initial
    from selfplay.judges import make_judge
    from selfplay.models import load_causal_lm, load_tokenizer
    from selfplay.preflight import run_prompts

    _, held, task, _ = run_prompts(cfg)
    initial = str(out / "initial_policy")
    model = load_causal_lm(str(ckpt / "model"), cfg.model.dtype, False, load_tokenizer(initial))
    local, final = against_initial(cfg, model, initial, held, make_judge(cfg.judge, cfg.task), task), summary["evals"][-1]
    assert final["n"] == local["n"] == cfg.eval.prompts and final["task_score"] == pytest.approx(local["task_score_a"], abs=0.05)
    # (equal here to the last digit; a thread count that reorders a sum may flip a greedy token)
    assert final["winrate_vs_initial"] == pytest.approx(local["winrate"], abs=local["stderr"])


def test_async_overlaps_generation_and_training(ray_cluster, tmp_path):
    cfg, out, summary = run(tmp_path, "sppo", "async", "train.steps=16", "train.sync_every=2",
                            "replay.max_staleness=4", "generation.requests_in_flight=2")
    assert summary["mode"] == "async" and summary["learner_steps"] == 16
    assert summary["generate_train_overlap_seconds"] > 0  # a generator was busy while a learner step ran
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["trained_version_lag"] for r in records) > 0  # learners trained on rows of older versions
    assert summary["weight_syncs"] == 8
    assert summary["samples_generated"] > summary["samples_trained"] / cfg.sppo.k


@pytest.mark.parametrize("algorithm", ["sapo", "srpo"])
def test_sapo_and_srpo_run_end_to_end(ray_cluster, tmp_path, algorithm):
    cfg, out, summary = run(tmp_path, algorithm, "sync")
    assert summary["algorithm"] == algorithm and summary["learner_steps"] == cfg.train.steps
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in records)  # no NaN


def test_collective_weight_transport_runs_end_to_end_in_async_mode(ray_cluster, tmp_path, warm_policy_dir):
    """`weight_sync.transport: collective` (a gloo broadcast group here) on the demo config: every push reaches
    the generator, which ends serving the final version. (Sync mode over the collective: test_multinode.py.)
    Unbounded (learners queue a step ahead), but not past an `eval.every` step: its file holds that step's policy."""
    mode = "async"
    from pathlib import Path

    from actors.driver import Driver
    from selfplay.config import load_config

    demo_yaml = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    cfg = load_config(str(demo_yaml), [
        "weight_sync.transport=collective", "weight_sync.bucket_mb=1", "train.steps=8", f"mode={mode}",
        f"model.policy={warm_policy_dir}", "eval.prompts=10", "eval.every=4", "logging.log_every=4",
        "resources.generator_cpus=0.25", "train.max_policy_lag=null"])
    summary = Driver(cfg, tmp_path / f"collective-{mode}", log=print).run()
    assert summary["learner_steps"] == 8 and summary["weight_syncs"] == 8 and summary["policy_version"] == 8
    assert summary["generator_versions"] == [8] and [e["step"] for e in summary["evals"]] == [4, 8]
    peaks = summary["peak_rss_mb"]  # each actor process's resident peak: a model and Python at least
    assert len(peaks["generators"]) == 1 and len(peaks["learners"]) == 1
    assert all(100 < mb < 16_000 for mb in peaks["generators"] + peaks["learners"])


def test_a_lora_run_resumes_to_the_adapter_of_an_uninterrupted_run(ray_cluster, tmp_path, warm_policy_dir):
    """SPPO with LoRA, sync: adapter-only checkpoints (no merged model until the last), and a run resumed from its
    step-2 checkpoint ends on the very adapter the uninterrupted run ends on; the final checkpoint has both the
    adapter (PEFT's layout) and the merged model, which the final evaluation read."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from actors.driver import Driver

    cfg, out, summary = run(tmp_path, "sppo", "sync", "model.lora.rank=4", "train.steps=4", "train.checkpoint_every=2",
                            f"model.policy={warm_policy_dir}", "eval.prompts=10")
    assert summary["learner_steps"] == 4 and summary["evals"][-1]["n"] == 10
    final = out / "checkpoints" / "step_4"
    assert (final / "adapter" / "adapter_model.safetensors").exists() and (final / "model" / "model.safetensors").exists()
    assert not (out / "checkpoints" / "step_2" / "model").exists()
    again = tmp_path / "resumed"
    shutil.copytree(out, again, ignore=shutil.ignore_patterns("step_4", "summary.json", "wandb"))
    resumed = Driver(cfg, again, log=print).run(resume=True)
    assert resumed["resumed_from"] == [2] and resumed["learner_steps"] == 4 and resumed["rows_lost"] == 0
    want, got = (load_file(str(d / "checkpoints" / "step_4" / "adapter" / "adapter_model.safetensors"))
                 for d in (out, again))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("algorithm", ["sapo", "srpo"])
def test_sapo_and_srpo_train_lora_adapters_in_async_mode(ray_cluster, tmp_path, warm_policy_dir, algorithm):
    """Generators serve adapters pushed by the learners (SAPO: the EMA adapter) while the learners train."""
    cfg, out, summary = run(tmp_path, algorithm, "async", "model.lora.rank=4", "train.steps=6",
                            f"model.policy={warm_policy_dir}", "eval.prompts=10")
    assert summary["learner_steps"] == 6 and summary["weight_syncs"] == 6 and summary["rows_lost"] == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in records)  # no NaN
    assert (out / "checkpoints" / "step_6" / "adapter" / "adapter_config.json").exists()
