"""Every user mistake in a config, a prompt file, a flag, a model or checkpoint path or a Ray address, made
through the real command line (a `selfplay` subprocess): one error naming the file, line or key, exit status 2,
no traceback, and nothing started — no Ray cluster, no output directory. docs/reliability.md lists each case
with its message; CASES below is that list.
"""

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from selfplay.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "configs" / "demo.yaml")
PAIRRM_JUDGE = ["--set", "judge.kind=pairrm", "--set", "judge.path=llm-blender/PairRM-hf"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# (id, argv after `selfplay`, extra environment, the message stderr must contain). {d}: the case files' folder.
CASES = [
    # -- config files and --set ---------------------------------------------------------------------------------
    ("config-missing", ["run", "{d}/nope.yaml"], {}, "{d}/nope.yaml: config file not found"),
    ("config-directory", ["run", "{d}"], {}, "{d}: is a directory, not a config file"),
    ("config-malformed-yaml", ["run", "{d}/malformed.yaml"], {}, "{d}/malformed.yaml:3: malformed YAML"),
    ("config-not-utf8", ["run", "{d}/latin1.yaml"], {}, "{d}/latin1.yaml:1: not UTF-8 text"),
    ("config-unknown-key", ["run", "{d}/typo.yaml"], {}, "{d}/typo.yaml:1: trian: unknown key (did you mean train?)"),
    ("config-duplicate-key", ["run", "{d}/duplicate.yaml"], {},
     "{d}/duplicate.yaml:3: train.lr: duplicate key (first set on line 2"),
    ("set-not-key-value", ["run", DEMO, "--set", "train.lr"], {}, "--set 'train.lr': expected key=value"),
    ("set-wrong-type", ["run", DEMO, "--set", "train.steps=abc"], {}, "--set: train.steps: expected an integer"),
    ("set-nan", ["run", DEMO, "--set", "train.lr=.nan"], {}, "--set: train.lr: expected a finite number, got nan"),
    ("set-unknown-choice", ["run", DEMO, "--set", "mode=fast"], {}, "mode: expected one of 'sync', 'async'"),
    ("zero-count", ["run", DEMO, "--set", "resources.num_generators=0"], {},
     "--set: resources.num_generators: must be >= 1, got 0"),
    ("negative-steps", ["demo", "--set", "train.steps=-5"], {}, "--set: train.steps: must be >= 1, got -5"),
    ("batch-not-divisible", ["run", DEMO, "--set", "resources.num_learners=3"], {},
     "train.batch_size: must divide evenly over resources.num_learners (3), got 32"),
    ("checkpoint-not-multiple-of-sync", ["run", DEMO, "--set", "train.sync_every=2", "--set", "train.checkpoint_every=3"],
     {}, "--set: train.checkpoint_every: must be a multiple of train.sync_every (2)"),
    ("pairrm-without-path", ["run", DEMO, "--set", "judge.kind=pairrm"], {},
     "judge.path: is required for the pairrm judge"),
    ("rule-judge-on-prompt-file", ["run", DEMO, "--set", "task.name=file", "--set", "task.path={d}/answers.jsonl"],
     {}, "judge.kind: the rule judge scores the answers of a synthetic task"),
    ("wandb-without-api-key", ["demo", "--set", "logging.wandb=true"],
     {"WANDB_MODE": "", "WANDB_API_KEY": "", "HOME": "{d}", "NETRC": ""},
     "logging.wandb: W&B has no API key on this machine (WANDB_API_KEY, or `wandb login`)"),
    ("gpus-the-machine-lacks", ["demo", "--set", "resources.learner_gpus=64"], {},
     "resources.learner_gpus × resources.num_learners (64 × 1 = 64) = 64 GPU(s), but the cluster has"),
    # -- prompt files ---------------------------------------------------------------------------------------------
    ("warmup-without-reference-answers",
     ["run", DEMO, "--set", "task.name=file", "--set", "task.path={d}/no_answers.jsonl", *PAIRRM_JUDGE], {},
     "warmup.steps: the warm-up of the tiny model (60 steps) needs reference answers, but 185 of the 185 training "
     "prompts of task.path {d}/no_answers.jsonl have none"),
    ("prompt-file-missing", ["run", DEMO, "--set", "task.name=file", "--set", "task.path={d}/nope.jsonl",
                             *PAIRRM_JUDGE], {}, "{d}/nope.jsonl: prompt file not found"),
    ("prompt-file-empty", ["run", DEMO, "--set", "task.name=file", "--set", "task.path={d}/empty.jsonl",
                           *PAIRRM_JUDGE], {}, "{d}/empty.jsonl: empty prompt file (0 bytes)"),
    ("prompt-file-bad-record", ["run", DEMO, "--set", "task.name=file", "--set", "task.path={d}/bad_record.jsonl",
                                "--set", "warmup.steps=0", *PAIRRM_JUDGE], {},
     "1 bad record in {d}/bad_record.jsonl: {d}/bad_record.jsonl:3: missing field 'prompt' (fields: ['text'])"),
    ("prompt-file-csv", ["run", DEMO, "--set", "task.name=file", "--set", "task.path={d}/prompts.csv",
                         *PAIRRM_JUDGE], {}, "unsupported prompt file type '.csv'"),
    ("no-held-out-prompts", ["run", DEMO, "--set", "task.name=file", "--set", "task.path={d}/three.jsonl",
                             "--set", "warmup.steps=0", *PAIRRM_JUDGE], {},
     "task.heldout_fraction: 0.05 of the 3 prompts of task.path {d}/three.jsonl leaves no prompt for evaluation"),
    ("sapo-without-reference-field", ["run", DEMO, "--set", "algorithm=sapo", "--set", "task.name=file",
                                      "--set", "task.path={d}/answers.jsonl", *PAIRRM_JUDGE], {},
     "task.reference_field: is required for SAPO on a prompt file"),
    # -- model, judge and checkpoint paths -----------------------------------------------------------------------
    ("model-without-safetensors", ["demo", "--set", "model.policy={d}/no_weights"], {},
     "model.policy: {d}/no_weights: no *.safetensors weights"),
    ("model-directory-missing", ["demo", "--set", "model.policy={d}/missing/model"], {},
     "model.policy: {d}/missing/model: cannot load causal LM: model directory not found"),
    ("model-not-a-causal-lm", ["demo", "--set", "model.policy={d}/deberta"], {},
     "model.policy: {d}/deberta/config.json: model_type 'deberta-v2'"),
    ("reference-directory-missing", ["demo", "--set", "model.reference={d}/missing/ref"], {},
     "model.reference: {d}/missing/ref: cannot load causal LM: model directory not found"),
    ("judge-not-pairrm", ["demo", "--set", "judge.kind=pairrm", "--set", "judge.path={d}/causal_lm"], {},
     "judge.path: {d}/causal_lm: model_type 'qwen2' is not a PairRM checkpoint"),
    ("judge-directory-missing", ["demo", "--set", "judge.kind=pairrm", "--set", "judge.path={d}/missing/pairrm"], {},
     "judge.path: {d}/missing/pairrm: no such directory"),
    ("resume-without-checkpoint", ["run", "--resume", "{d}/run_without_checkpoint"], {},
     "{d}/run_without_checkpoint: --resume: no complete checkpoint to resume from"),
    ("resume-not-a-run", ["run", "--resume", "{d}/missing_run"], {},
     "{d}/missing_run/config.yaml: not found; --resume {d}/missing_run is not the output directory of a run"),
    ("resume-with-another-config", ["run", DEMO, "--resume", "{d}/run_without_checkpoint"], {},
     "selfplay run --resume DIR continues with DIR/config.yaml"),
    ("out-is-a-file", ["demo", "--out", "{d}/three.jsonl"], {}, "{d}/three.jsonl: the output directory is a file"),
    # -- Ray addresses ------------------------------------------------------------------------------------------
    ("address-unreachable", ["demo", "--address", "127.0.0.1:{port}"], {},
     "Ray at 127.0.0.1:{port} does not answer"),
    ("ray-address-env-unreachable", ["demo"], {"RAY_ADDRESS": "127.0.0.1:{port}"},
     "Ray at 127.0.0.1:{port} does not answer"),
    ("address-is-a-job-server", ["run", DEMO, "--address", "http://127.0.0.1:8265"], {},
     "Ray address 'http://127.0.0.1:8265' is a job server (dashboard) address"),
    ("address-malformed", ["demo", "--address", "headnode"], {}, "Ray address 'headnode': expected HOST:PORT"),
    # -- flags ----------------------------------------------------------------------------------------------------
    ("unknown-algorithm", ["demo", "--algorithm", "ppo"], {},
     "error: selfplay demo: argument --algorithm: invalid choice: 'ppo'"),
    ("unknown-flag", ["run", DEMO, "--steps", "3"], {}, "error: selfplay: unrecognized arguments: --steps 3"),
    ("run-without-config", ["run"], {}, "selfplay run: give a config file (or --resume DIR)"),
    ("resume-auto-without-config", ["run", "--resume", "auto"], {},
     "selfplay run --resume auto: give the config file too (it starts the run when there is nothing to resume)"),
    ("resume-auto-changed-config", ["run", DEMO, "--out", "{d}/run_with_checkpoint", "--resume", "auto"], {},
     f"selfplay run --resume auto: {DEMO} differs from {{d}}/run_with_checkpoint/config.yaml, the run it would "
     "resume, at seed (5 there, 0 here); resume that run with --resume {d}/run_with_checkpoint (and --set)"),
    ("plan-zero-gpus", ["plan", "--gpus", "0", "--gen-seconds", "1", "--rows-per-request", "8",
                        "--train-seconds", "1", "--batch", "8"], {}, "--gpus must be > 0, got 0"),
    ("eval-negative-revisions", ["eval", "--policy-a", "tiny", "--policy-b", "tiny", "--revisions", "-1"], {},
     "--revisions must be >= 0, got -1"),
    ("eval-without-opponent", ["eval", "--policy-a", "tiny"], {},
     "give --policy-b, the opponent (or --export FORMAT DIR)"),
    ("eval-export-unknown-format", ["eval", "--policy-a", "tiny", "--export", "mt_bench", "{d}/x"], {},
     "--export mt_bench: unknown format; use one of alpaca_eval"),
    ("submit-env-without-value", ["submit", "--env", "WANDB_MODE", "--", "selfplay", "demo"], {},
     "--env 'WANDB_MODE': expected KEY=VALUE"),
]


@pytest.fixture(scope="module")
def case_files(tmp_path_factory, tiny_dir, pairrm_dir):
    d = tmp_path_factory.mktemp("cli")
    sort_prompts = [{"prompt": f"Sort ascending: {i} {i % 7} {i % 3}"} for i in range(192)]
    (d / "no_answers.jsonl").write_text("".join(json.dumps(p) + "\n" for p in sort_prompts))
    (d / "answers.jsonl").write_text("".join(json.dumps({**p, "answer": "1 2 3"}) + "\n" for p in sort_prompts))
    (d / "bad_record.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"text": "c"}\n')
    (d / "three.jsonl").write_text("".join(json.dumps(p) + "\n" for p in sort_prompts[:3]))
    (d / "empty.jsonl").write_text("")
    (d / "prompts.csv").write_text("prompt\nSort ascending: 3 1 2\n")
    (d / "malformed.yaml").write_text("train:\n  lr: [1e-6\n")
    (d / "latin1.yaml").write_bytes("out_dir: caf\xe9\n".encode("latin-1"))
    (d / "typo.yaml").write_text("trian:\n  steps: 3\n")
    (d / "duplicate.yaml").write_text("train:\n  lr: 1e-6\n  lr: 1e-5\n")
    (d / "no_weights").mkdir()
    (d / "no_weights" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    os.symlink(tiny_dir, d / "causal_lm")
    os.symlink(pairrm_dir, d / "deberta")
    (d / "run_without_checkpoint").mkdir()
    (d / "run_without_checkpoint" / "config.yaml").write_text(Path(DEMO).read_text())
    (d / "run_with_checkpoint" / "checkpoints" / "step_2").mkdir(parents=True)  # complete: driver_state.json
    (d / "run_with_checkpoint" / "checkpoints" / "step_2" / "driver_state.json").write_text("{}")
    (d / "run_with_checkpoint" / "config.yaml").write_text(load_config(DEMO, ["seed=5"]).to_yaml())
    return d


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "selfplay.cli", *argv], cwd=cwd, env={**environment, **env},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def results(case_files, tmp_path_factory):
    """Every case run once, two at a time (each is a short subprocess, mostly Python imports)."""
    port = str(_free_port())
    cwd = tmp_path_factory.mktemp("cwd")

    def fill(text: str) -> str:
        return text.replace("{d}", str(case_files)).replace("{port}", port)

    def one(case):
        name, argv, env, expected = case
        return name, (_run([fill(a) for a in argv], {k: fill(v) for k, v in env.items()}, cwd), fill(expected))

    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(pool.map(one, CASES))
    if os.environ.get("SELFPLAY_CLI_CATALOGUE"):  # regenerate the table in docs/reliability.md
        _write_catalogue(Path(os.environ["SELFPLAY_CLI_CATALOGUE"]), done, str(case_files), port)
    return done, cwd


def _write_catalogue(path: Path, done: dict, case_dir: str, port: str) -> None:
    def short(text: str) -> str:
        return text.replace(DEMO, "configs/demo.yaml").replace(case_dir + "/", "").replace(case_dir, "DIR") \
            .replace(port, "PORT").replace("{d}/", "").replace("{d}", "DIR").replace("{port}", "PORT")

    lines = []
    for name, argv, env, _ in CASES:
        command = " ".join(short(a) if " " not in a else repr(short(a)) for a in argv)
        command = " ".join([*(f"{k}={short(v)}" for k, v in env.items()), "selfplay", command])
        message = " ⏎ ".join(short(line) for line in done[name][0].stderr.strip().splitlines()).replace("|", "\\|")
        lines.append(f"| `{name}` | `{command}` | {message} |")
    path.write_text("\n".join(lines) + "\n")


def test_the_catalogue_has_at_least_25_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_a_mistake_is_one_clear_error_before_anything_starts(results, name):
    done, cwd = results
    proc, expected = done[name]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr
    assert expected in proc.stderr, proc.stderr
    # nothing started: no Ray cluster, no run output
    assert "Ray cluster" not in proc.stdout and "Started a local Ray instance" not in proc.stderr
    assert not (cwd / "runs").exists()
