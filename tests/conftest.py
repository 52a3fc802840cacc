import os
import shutil

import pytest

# Tests never touch the network or a real W&B account, and DeepSpeed must not probe for GPUs where there is none.
os.environ.setdefault("WANDB_MODE", "offline")
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run unchanged where CUDA exists and are skipped, saying so, where it does not."""
    if not any("gpu" in item.keywords for item in items):
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False on this machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the embedded tiny model, built once per session. Tests must not train it in place."""
    from selfplay.tiny import build_tiny

    return build_tiny(seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny):
    from selfplay.models import save_pretrained

    model, tok = tiny
    return save_pretrained(model, tok, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def ray_nodes():
    """One local Ray cluster for the whole test session (started lazily by the first test that needs it), as a
    `ray.cluster_utils.Cluster`: tests/test_multinode.py adds worker nodes to it and removes them again.

    Its head has a dashboard on a free port (Ray jobs are submitted there, the state API reads it). Logical CPUs
    exceed the 2 physical cores on purpose: actors in tests mostly wait, and the resource accounting, not the
    hardware, decides whether they can be placed. A dead node is noticed within ~3 s, not Ray's default ~30 s.
    """
    import socket

    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray 2.60 token auth: off on both sides for this local cluster
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dashboard_port = s.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 8, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    cluster.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    ray.init(address=cluster.address, namespace="selfplay-tests", log_to_driver=True)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_cluster(ray_nodes):
    """The `ray` module, connected to the session's cluster."""
    import ray

    return ray


@pytest.fixture(scope="session")
def pairrm_dir(tmp_path_factory):
    """A small random PairRM saved like llm-blender/PairRM-hf (architecture, prefix tokens, safetensors)."""
    from selfplay.judges.pairrm import save_random_pairrm
    from selfplay.tiny import build_tokenizer

    return save_random_pairrm(tmp_path_factory.mktemp("pairrm") / "model", build_tokenizer(0), seed=0)


@pytest.fixture(scope="session")
def warm_policy_dir(tmp_path_factory):
    """The demo's initial policy: the tiny model after the default supervised warm-up, saved as a checkpoint."""
    from selfplay.config import WarmupConfig
    from selfplay.models import save_pretrained
    from selfplay.tasks import SortTask
    from selfplay.tiny import build_tiny
    from selfplay.warmup import supervised_warmup

    model, tok = build_tiny(seed=0)
    w = WarmupConfig()
    supervised_warmup(model, tok, SortTask().prompts("train", 2000), steps=w.steps, batch_size=w.batch_size,
                      lr=w.lr, log=None)
    return save_pretrained(model, tok, tmp_path_factory.mktemp("warm") / "policy")
