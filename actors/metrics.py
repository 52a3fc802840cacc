"""What a run reports, in three places at once: `metrics.jsonl` (one object per learner step), W&B (when
`logging.wandb` is on; offline with WANDB_MODE=offline) and Ray custom metrics, which the Ray dashboard and
its Prometheus endpoint show live. Also the run's counters and its end-of-run summary
(docs/architecture.md, "The driver")."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class Counters:
    samples_generated: int = 0  # responses sampled
    groups_judged: int = 0
    rows_added: int = 0  # replay rows acknowledged by the buffer
    skipped_ties: int = 0  # judged groups without a row: the judge could not tell the candidates apart,
    skipped_invalid: int = 0  # … it returned NaN / inf / an out-of-range probability,
    skipped_empty: int = 0  # … or every candidate was empty
    empty_responses: int = 0  # empty candidates, judged as losing without asking the judge
    samples_trained: int = 0
    learner_steps: int = 0
    weight_syncs: int = 0
    requests_reissued: int = 0  # generator requests or judge calls sent again after their actor died


def utilization(counters: Counters, generators: list[dict], learners: list[dict], loop_seconds: float,
                generated: list[tuple[float, float]], trained: list[tuple[float, float]]) -> dict[str, Any]:
    """Throughput and idle fractions of the training loop (set-up, final checkpoint and eval excluded), from the
    actors' own busy time (generating or loading weights; training, publishing weights) and the driver's
    generation / training intervals, whose overlap is the time both ran at once."""
    busy_g = [s["busy_seconds"] for s in generators]
    busy_l = [s["busy_seconds"] for s in learners]
    overlap = sum(max(0.0, min(ge, te) - max(gs, ts)) for gs, ge in generated for ts, te in trained)
    return {
        "loop_seconds": round(loop_seconds, 3),
        "samples_trained_per_s": counters.samples_trained / loop_seconds,
        "samples_generated_per_s": counters.samples_generated / loop_seconds,
        "generator_idle_fraction": 1 - sum(busy_g) / (len(busy_g) * loop_seconds),
        "learner_idle_fraction": 1 - sum(busy_l) / (len(busy_l) * loop_seconds),
        "generator_versions": [s["policy_version"] for s in generators],  # served at the end
        "generate_train_overlap_seconds": round(overlap, 3),
        # each process's resident peak since it started (model loading included), MiB
        "peak_rss_mb": {"generators": [round(s["peak_rss_mb"]) for s in generators],
                        "learners": [round(s["peak_rss_mb"]) for s in learners]},
    }


def summary(cfg, counters: Counters, evals: list[dict], replay_stats: dict, **extra: Any) -> dict[str, Any]:
    """summary.json: the final evaluation, the counters, what the buffer did with its rows, plus `extra`."""
    c, final, stats = counters, evals[-1], replay_stats
    return {
        "algorithm": cfg.algorithm, "mode": cfg.mode,
        "learner_steps": c.learner_steps, "samples_generated": c.samples_generated,
        "samples_trained": c.samples_trained, "samples_dropped_stale": stats["dropped_stale"],
        "weight_syncs": c.weight_syncs, "winrate_vs_initial": final["winrate_vs_initial"],
        "winrate_stderr": final["stderr"], "task_score": final["task_score"],
        "initial_task_score": final["initial_task_score"], "eval_prompts": final["n"],
        "requests_reissued": c.requests_reissued, "rows_added": c.rows_added,
        # acknowledged rows the buffer no longer accounts for (in it, sampled away, evicted or dropped): 0
        "rows_lost": c.rows_added - stats["added"],
        "skipped_ties": c.skipped_ties, "skipped_invalid": c.skipped_invalid, "skipped_empty": c.skipped_empty,
        "empty_responses": c.empty_responses, "rows_evicted": stats["evicted"], "rows_retired": stats["retired"],
        **extra, "evals": evals,
    }


class RunMetrics:
    def __init__(self, out_dir: Path, cfg, run_name: str):
        from ray.util.metrics import Counter, Gauge

        self.path = out_dir / "metrics.jsonl"
        self.file = self.path.open("a")
        self.records: list[dict[str, Any]] = []
        tags = {"algorithm": cfg.algorithm, "mode": cfg.mode}
        keys = tuple(tags)
        self.ray = {
            "samples_generated": Counter("selfplay_samples_generated", "responses sampled by generators", keys),
            "samples_trained": Counter("selfplay_samples_trained", "preference pairs trained on", keys),
            "buffer_size": Gauge("selfplay_buffer_size", "rows in the replay buffer", keys),
            "weight_version_lag": Gauge("selfplay_weight_version_lag",
                                        "learner version minus the version generators serve (mean)", keys),
            "sync_latency": Gauge("selfplay_sync_latency_seconds", "last weight push: publish to all applied", keys),
            "loss": Gauge("selfplay_loss", "learner loss of the last step", keys),
        }
        for metric in self.ray.values():
            metric.set_default_tags(tags)
        self.wandb = None
        if cfg.logging.wandb:
            import wandb

            self.wandb = wandb.init(project=cfg.logging.wandb_project, group=cfg.logging.wandb_group or cfg.algorithm,
                                    name=run_name, config=cfg.to_dict(), dir=str(out_dir), reinit="finish_previous")

    def log(self, record: dict[str, Any], new_samples: int = 0, new_trained: int = 0) -> None:
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if new_samples:
            self.ray["samples_generated"].inc(new_samples)
        if new_trained:
            self.ray["samples_trained"].inc(new_trained)
        for key in ("buffer_size", "weight_version_lag", "sync_latency", "loss"):
            if record.get(key) is not None:
                self.ray[key].set(float(record[key]))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def summary(self, summary: dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})

    def close(self) -> None:
        """Close the file and finish the W&B run (once; closing again does nothing)."""
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def plot(records: list[dict[str, Any]], evals: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """loss.png, version_lag.png, winrate.png from the run's records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    series = [("loss.png", "loss", "learner loss"), ("version_lag.png", "weight_version_lag", "version lag")]
    for name, key, label in series:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if points:
            ax.plot(*zip(*points), lw=1.2)
        ax.set_xlabel("learner step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        made.append(out_dir / name)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if evals:
        ax.plot([e["step"] for e in evals], [e["winrate_vs_initial"] for e in evals], "o-")
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("learner step")
    ax.set_ylabel("win rate vs initial policy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "winrate.png", dpi=100)
    plt.close(fig)
    made.append(out_dir / "winrate.png")
    return made
