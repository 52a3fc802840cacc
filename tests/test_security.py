"""Security rules (docs/_reliability_input.md, "Security"): no checkpoint code runs unless asked for, weights in
safetensors, torch.load only with weights_only=True, secrets never in configs, logs or checkpoints, dashboards
and job servers on localhost by default."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from selfplay.config import ConfigError, ModelConfig, load_config
from selfplay.models import ModelLoadError, load_causal_lm, load_tokenizer, safe_torch_load, save_pretrained

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("selfplay", "actors", "deploy", "benchmarks", "scripts")


def source_files():
    return [p for d in CODE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]


def calls(text: str, name: str) -> list[str]:
    """The argument text of every `name(` call (balanced parentheses)."""
    out = []
    for m in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end(): i - 1])
    return out


# -- audit of our own code ----------------------------------------------------------------------------------


def test_no_unsafe_deserialization_or_remote_code_in_our_code():
    problems = []
    for path in source_files():
        text = path.read_text()
        rel = path.relative_to(ROOT)
        problems += [f"{rel}: torch.load({a})" for a in calls(text, "torch.load") if "weights_only=True" not in a]
        for pattern in (r"\bpickle\.loads?\(", r"\bcloudpickle\.loads?\(", r"\bdill\.loads?\(", r"\bjoblib\.load\(",
                        r"trust_remote_code\s*=\s*True", r"safe_serialization\s*=\s*False", r"\btorch\.save\(",
                        r"\bnp\.load\([^)]*allow_pickle\s*=\s*True", r"\byaml\.load\(", r"\byaml\.unsafe_load\("):
            problems += [f"{rel}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not problems, problems


def test_trust_remote_code_is_off_unless_the_config_says_so():
    assert ModelConfig().trust_remote_code is False and load_config().model.trust_remote_code is False
    assert load_config(None, ["model.trust_remote_code=true"]).model.trust_remote_code is True
    with pytest.raises(ConfigError, match="model.trust_remote_code: expected true or false"):
        load_config(None, ["model.trust_remote_code=yes please"])


def test_a_checkpoint_with_its_own_code_is_refused_and_the_code_never_runs(tmp_path, tiny_dir):
    marker = tmp_path / "pwned"
    model = tmp_path / "custom"
    model.mkdir()
    for f in tiny_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code ran')\n"
    (model / "evil.py").write_text(payload + "from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer\n"
                                   "class EvilConfig(Qwen2Config):\n    model_type = 'evil_lm'\n"
                                   "class EvilModel(Qwen2ForCausalLM):\n    config_class = EvilConfig\n"
                                   "class EvilTokenizer(Qwen2Tokenizer):\n    pass\n")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="evil_lm", architectures=["EvilModel"],
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (model / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    tok_config.update(auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer")
    (model / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(ModelLoadError, match=r"model_type 'evil_lm' .* ships its own model code: set "
                                             r"model.trust_remote_code: true only if you trust it"):
        load_causal_lm(str(model))
    try:
        load_tokenizer(str(model))
    except ModelLoadError:
        pass  # refusing is fine; running the checkpoint's code is not
    assert not marker.exists()


# -- weights: safetensors written, pickles refused ------------------------------------------------------------


def test_saved_checkpoints_are_safetensors_only(tmp_path, tiny):
    model, tok = tiny
    out = save_pretrained(model, tok, tmp_path / "m")
    suffixes = {p.suffix for p in out.iterdir()}
    assert ".safetensors" in suffixes and not suffixes & {".bin", ".pt", ".pth", ".pkl", ".ckpt"}


class Exploit:
    """Unpickling this runs open(marker, "w"): any code could stand in its place."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_safe_torch_load_refuses_a_pickle_that_runs_code(tmp_path):
    marker, bad, good = tmp_path / "pwned", tmp_path / "bad.pt", tmp_path / "good.pt"
    torch.save({"state": {"w": torch.ones(2)}, "payload": Exploit(marker)}, bad)
    with pytest.raises(ModelLoadError, match=r"bad.pt: refused to unpickle \(weights_only=True\)"):
        safe_torch_load(bad)
    assert not marker.exists()
    torch.save({"w": torch.ones(2), "step": 3, "names": ["a"]}, good)
    assert safe_torch_load(good)["step"] == 3


DEEPSPEED_RESUME = textwrap.dedent("""
    import datetime, os, socket, sys
    from pathlib import Path
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch, deepspeed
    from actors.learner import _skip_deepspeed_jit_ops, deepspeed_config
    from selfplay.config import load_config
    from selfplay.models import ModelLoadError, weights_only_checkpoint_loading
    from selfplay.tiny import build_tiny
    out, marker = Path(sys.argv[1]), Path(sys.argv[2])
    _skip_deepspeed_jit_ops()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, timeout=datetime.timedelta(seconds=120))
    model, _ = build_tiny(0)
    cfg = load_config(None, ["train.zero_stage=1", "train.batch_size=2"])
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=deepspeed_config(cfg, 1, False))
    ids = torch.randint(0, 50, (2, 8))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.save_checkpoint(str(out), tag="latest", save_latest=False)
    weights_only_checkpoint_loading(engine)
    engine.load_checkpoint(str(out), tag="latest", load_optimizer_states=True)
    print("RESUMED", engine.global_steps, flush=True)

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    optim = next((out / "latest").glob("*optim_states.pt"))
    state = torch.load(optim, weights_only=False)  # our own file, written a moment ago
    state["payload"] = Exploit()
    torch.save(state, optim)
    try:
        engine.load_checkpoint(str(out), tag="latest", load_optimizer_states=True)
        print("LOADED TAMPERED", flush=True)
    except ModelLoadError as e:
        print("REFUSED", e, flush=True)
    torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
def test_deepspeed_resume_loads_weights_only_and_refuses_a_tampered_optimizer_file(tmp_path):
    marker = tmp_path / "pwned"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", DEEPSPEED_RESUME, str(tmp_path / "ck"), str(marker)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert "RESUMED 1" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    assert "REFUSED" in done.stdout and "optim_states.pt: refused to unpickle" in done.stdout, done.stdout[-2000:]
    assert not marker.exists()


# -- secrets --------------------------------------------------------------------------------------------------

SECRET_ENV = {"WANDB_API_KEY": "wandb-4f1c0e9b7a2d", "HF_TOKEN": "hf_s3cr3tT0kenValue", "GITHUB_TOKEN": "ghp_abcdef987654",
              "MY_SERVICE_API_KEY": "svc-key-5566aa", "HUGGING_FACE_HUB_TOKEN": "hf_legacyTok3n42"}


def test_secrets_never_reach_configs_logs_or_checkpoints(tmp_path, monkeypatch, tiny):
    from safetensors.torch import save_file

    from actors.learner import _save_rng
    from actors.metrics import RunMetrics

    for name, value in SECRET_ENV.items():  # W&B's and the hub's own names, and any *_TOKEN / *_KEY
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    secrets = set(SECRET_ENV.values())

    out = tmp_path / "run"
    out.mkdir()
    cfg = load_config(None, ["logging.wandb=true", f"out_dir={out}"])
    (out / "config.yaml").write_text(cfg.to_yaml())  # what the driver writes
    metrics = RunMetrics(out, cfg, run_name="secrets")  # metrics.jsonl + an offline W&B run under out/wandb
    metrics.log({"step": 1, "loss": 0.5, "buffer_size": 8}, new_samples=4, new_trained=2)
    metrics.summary({"winrate_vs_initial": 0.6})
    metrics.close()
    step = out / "checkpoints" / "step_1"
    model, tok = tiny
    save_pretrained(model, tok, step / "model")
    save_file({n: p.detach().clone() for n, p in model.named_parameters()}, str(step / "ema.safetensors"))
    _save_rng(step, 0)
    (step / "trainer_state.json").write_text(json.dumps({"step": 1, "policy_version": 1}))

    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"config.yaml", "metrics.jsonl", "model.safetensors", "rng_rank0.json"} <= {p.name for p in files}
    assert any("wandb" in p.parts for p in files)
    leaks = [f"{p.relative_to(out)}: {s}" for p in files for s in secrets if s.encode() in p.read_bytes()]
    assert not leaks, leaks


def test_the_config_has_no_place_for_secrets():
    def keys(d, prefix=""):
        for k, v in d.items():
            yield prefix + k
            if isinstance(v, dict):
                yield from keys(v, prefix + k + ".")

    secretish = re.compile(r"(^|[._])(api_key|key|token|secret|password|credentials?)$")
    assert not [k for k in keys(load_config().to_dict()) if secretish.search(k)]


# -- network exposure ------------------------------------------------------------------------------------------


def test_dashboards_and_job_servers_default_to_localhost():
    sbatch = (ROOT / "deploy/slurm/selfplay.sbatch").read_text()
    assert "--dashboard-host=127.0.0.1" in sbatch and "0.0.0.0" not in sbatch
    assert '--address "http://127.0.0.1:$DASHBOARD_PORT"' in sbatch
    submit = (ROOT / "deploy/submit.py").read_text()
    assert 'or "http://127.0.0.1:8265"' in submit
    cli = (ROOT / "selfplay/cli.py").read_text()
    assert "include_dashboard=False" in cli  # `selfplay demo|run` start a local cluster without a dashboard
    for name in ("raycluster.yaml", "rayjob.yaml"):  # in a pod the dashboard must listen on the pod network
        text = (ROOT / "deploy/kuberay" / name).read_text()
        assert not re.search(r"type:\s*(LoadBalancer|NodePort)", text), name


def test_slurm_cluster_requires_a_token_by_default():
    sbatch = (ROOT / "deploy/slurm/selfplay.sbatch").read_text()
    assert 'RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"' in sbatch
    assert "umask 077" in sbatch and "RAY_AUTH_TOKEN_PATH" in sbatch


def test_streamed_safetensors_load_like_safetensors_own(tmp_path):
    """write_safetensors (the learners' checkpoint writer: one tensor in memory at a time) makes a file that
    safetensors and transformers read back bit for bit, in every dtype a model holds; a tensor that does not match
    its header is refused."""
    import torch
    from safetensors.torch import load_file

    from selfplay.weights import write_safetensors

    gen = torch.Generator().manual_seed(0)
    state = {"a.weight": torch.randn(3, 5, generator=gen), "b.bias": torch.randn(7, generator=gen).to(torch.bfloat16),
             "c.scale": torch.tensor(2.5, dtype=torch.float16), "d.index": torch.arange(4)}
    specs = [(n, tuple(t.shape), t.dtype) for n, t in state.items()]
    nbytes = write_safetensors(tmp_path / "m.safetensors", specs, iter(state.values()))
    assert nbytes == (tmp_path / "m.safetensors").stat().st_size
    loaded = load_file(str(tmp_path / "m.safetensors"))
    assert loaded.keys() == state.keys()
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="b.bias: got"):
        write_safetensors(tmp_path / "bad.safetensors", specs, iter([state["a.weight"], state["a.weight"]]))
