from pathlib import Path

import pytest

from selfplay.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_valid_and_demo_yaml_is_the_embedded_demo():
    from selfplay.demo import demo_config

    assert load_config() == Config()
    assert load_config(Path(__file__).parent.parent / "configs" / "demo.yaml") == demo_config("sppo", "sync")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    load_config(path)


def test_yaml_and_overrides_are_typed(tmp_path):
    p = write(tmp_path, "algorithm: sapo\ntrain:\n  lr: 1e-6\n  steps: 7\nsapo:\n  loss: orpo\n")
    cfg = load_config(p, ["train.steps=9", "replay.max_staleness=2", "generation.backend=vllm", "model.policy=/m"])
    assert cfg.algorithm == "sapo" and cfg.sapo.loss == "orpo"
    assert cfg.train.lr == pytest.approx(1e-6) and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 1e-6 as str
    assert cfg.train.steps == 9 and cfg.replay.max_staleness == 2
    assert cfg.generation.backend == "vllm" and cfg.model.policy == "/m"


def test_roundtrip_through_yaml(tmp_path):
    cfg = load_config(None, ["algorithm=srpo", "srpo.revisions=3", "resources.num_learners=2"])
    assert load_config(write(tmp_path, cfg.to_yaml())) == cfg


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    p = write(tmp_path, "sppo:\n  k: 5\n  betta: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}:3: sppo.betta: unknown key (did you mean sppo.beta?)" in str(e.value)


@pytest.mark.parametrize(
    "text, key, message",
    [
        ("resources:\n  num_learners: 0\n", "resources.num_learners", "must be >= 1"),
        ("sppo:\n  k: 1\n", "sppo.k", "must be >= 2"),
        ("sppo:\n  beta: -0.1\n", "sppo.beta", "must be > 0"),
        ("sapo:\n  ema_alpha: 1.5\n", "sapo.ema_alpha", "must be in [0, 1]"),
        ("train:\n  zero_stage: 4\n", "train.zero_stage", "must be 0, 1, 2 or 3"),
        ("resources:\n  learner_gpus: 1.5\n", "resources.learner_gpus", "whole number"),
        ("judge:\n  kind: pairrm\n", "judge.path", "is required"),
        ("task:\n  name: file\n", "task.path", "is required"),
        ("train:\n  steps: many\n", "train.steps", "expected an integer"),
        ("logging:\n  wandb: 1\n", "logging.wandb", "expected true or false"),
        ("mode: sideways\n", "mode", "expected one of 'sync', 'async'"),
        ("train:\n  loss_average: mean\n", "train.loss_average", "expected one of 'sum', 'token_mean'"),
        ("sapo:\n  reference_update_every: -1\n", "sapo.reference_update_every", "must be >= 0"),
        ("train:\n  max_policy_lag: -1\n", "train.max_policy_lag", "must be >= 0 or null"),
        ("train:\n  max_seconds: 0\n", "train.max_seconds", "must be > 0 or null"),
        ("eval:\n  every_seconds: -5\n", "eval.every_seconds", "must be >= 0"),
        ("generation:\n  requests_in_flight: 0\n", "generation.requests_in_flight", "must be >= 1"),
        ("weight_sync:\n  mid_request: true\n", "weight_sync.mid_request", "needs generation.backend: vllm"),
        ("train:\n  batch_size: 3\nresources:\n  num_learners: 2\n", "train.batch_size", "divide evenly"),
    ],
)
def test_impossible_values_name_key_and_line(tmp_path, text, key, message):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    # the key's own line, or its section's line when the problem is a key that is missing
    rows = text.splitlines()
    leaf, section = key.split(".")[-1], key.split(".")[0]
    line = next((i for i, r in enumerate(rows, 1) if r.strip().startswith(leaf + ":")), None) or next(
        i for i, r in enumerate(rows, 1) if r.startswith(section + ":")
    )
    assert f"{p}:{line}: {key}: " in str(e.value)
    assert message in str(e.value)


def test_loss_average_and_reference_refresh_keys(tmp_path):
    cfg = load_config()
    assert cfg.train.loss_average == "sum" and cfg.sapo.reference_update_every == 0
    cfg = load_config(None, ["train.loss_average=token_mean", "sapo.reference_update_every=108"])
    assert cfg.train.loss_average == "token_mean" and cfg.sapo.reference_update_every == 108
    p = write(tmp_path, "train:\n  loss_average: mean\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == (f"invalid configuration: {p}:2: train.loss_average: expected one of 'sum', "
                            "'token_mean', got 'mean'")  # the loader's one-line error
    with pytest.raises(ConfigError) as e:
        load_config(None, ["sapo.reference_update_every=-2"])
    assert str(e.value) == "invalid configuration: --set: sapo.reference_update_every: must be >= 0 (0: never), got -2"


def test_all_problems_reported_at_once_and_overrides_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["sppo.k=1", "resources.num_learners=0", "nosuch.key=3"])
    msg = str(e.value)
    assert "--set: sppo.k: must be >= 2" in msg
    assert "--set: resources.num_learners: must be >= 1" in msg
    assert "--set: nosuch: unknown key" in msg


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml:3: malformed YAML"):
        load_config(write(tmp_path, "a: [1,\n b: 2\n"))
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("seed: 1 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "train: 5\n"))
    with pytest.raises(ConfigError, match=r"train.deepspeed: expected a mapping, got 'zero3'"):
        load_config(None, ["train.deepspeed=zero3"])


def test_demo_micro_batch_follows_the_users_batch():
    """The demo trains in length-sorted micro-batches (a speed setting only): kept where it divides a learner's
    share of the batch, left out where the user's batch size or learner count makes it not divide, and never over
    the user's own value."""
    from selfplay.demo import MICRO_BATCH, demo_config

    for algorithm, micro in MICRO_BATCH.items():
        assert demo_config(algorithm).train.micro_batch_size == micro
        assert demo_config(algorithm, quick=True).train.micro_batch_size == micro
    assert demo_config("sppo", extra=["train.batch_size=24"]).train.micro_batch_size is None
    assert demo_config("sppo", extra=["resources.num_learners=2"]).train.micro_batch_size == 16  # share 16
    assert demo_config("srpo", extra=["train.micro_batch_size=4"]).train.micro_batch_size == 4
    assert demo_config("sppo", extra=["model.lora.rank=8"]).train.lr == pytest.approx(2e-3)  # LoRA's, still
