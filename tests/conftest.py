import os

import pytest

# Tests never touch the network or a real W&B account, and DeepSpeed must not probe for GPUs here.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
def ray_cluster():
    """One local Ray cluster for the whole test session (started lazily by the first test that needs it).

    Logical CPUs exceed the 2 physical cores on purpose: actors in tests mostly wait, and the resource
    accounting, not the hardware, decides whether they can be placed.
    """
    import ray

    ray.init(num_cpus=8, include_dashboard=False, namespace="selfplay-tests", log_to_driver=True)
    yield ray
    ray.shutdown()
