"""GeneratorActor on both backends (transformers and vLLM) on the session's Ray cluster."""

import importlib.util
import time

import pytest
import torch

from selfplay.config import load_config
from selfplay.tasks import SortTask
from selfplay.weights import WeightSyncError, pack_buckets

pytestmark = [pytest.mark.ray, pytest.mark.slow]

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
BACKENDS = ["hf", pytest.param("vllm", marks=pytest.mark.skipif(not HAVE_VLLM, reason="vLLM not installed"))]
PROMPTS = SortTask().prompts("eval", 6, seed=0)


def make_generator(backend, policy, index=0):
    from actors.generator import GeneratorActor

    cfg = load_config(None, [f"generation.backend={backend}", "generation.max_new_tokens=20"])
    return GeneratorActor.options(num_cpus=0.25).remote(cfg.to_dict(), str(policy), index)


@pytest.fixture(scope="module")
def generators(ray_cluster, warm_policy_dir):
    gens = {"hf": make_generator("hf", warm_policy_dir)}
    if HAVE_VLLM:
        gens["vllm"] = make_generator("vllm", warm_policy_dir, index=1)
    yield gens
    for g in gens.values():
        ray_cluster.kill(g)


def noised(state, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def greedy(gen):
    import ray

    return [r["samples"][0]["token_ids"] for r in ray.get(gen.sample.remote(PROMPTS, k=1, temperature=0.0))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_k_responses_reproducible_with_seed(generators, backend):
    import ray

    gen = generators[backend]
    a = ray.get(gen.sample.remote(PROMPTS, k=4, temperature=1.0, seed=11), timeout=120)
    b = ray.get(gen.sample.remote(PROMPTS, k=4, temperature=1.0, seed=11), timeout=120)
    c = ray.get(gen.sample.remote(PROMPTS, k=4, temperature=1.0, seed=12), timeout=120)
    strip = lambda rs: [[s["token_ids"] for s in r["samples"]] for r in rs]  # noqa: E731
    assert strip(a) == strip(b) and strip(a) != strip(c)
    assert len(a) == len(PROMPTS) and all(len(r["samples"]) == 4 for r in a)
    assert a[0]["prompt_id"] == PROMPTS[0].prompt_id and a[0]["policy_version"] == 0
    for s in (s for r in a for s in r["samples"]):
        assert s["finish_reason"] in ("stop", "length") and len(s["token_ids"]) <= 20
    assert len({s["text"] for s in a[0]["samples"]}) > 1  # temperature 1: the K samples differ


@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM not installed")
def test_vllm_greedy_equals_hf_greedy_before_and_after_a_weight_load(generators):
    import ray

    hf, vl = generators["hf"], generators["vllm"]
    before = greedy(hf)
    assert greedy(vl) == before
    version = ray.get(hf.version.remote()) + 1
    packed = pack_buckets(noised(ray.get(hf.weights.remote()), seed=version), bucket_bytes=300_000)
    for gen in (hf, vl):
        assert ray.get(gen.load_weights.remote(version, packed.buckets, packed.manifest, packed.checksums)) == version
    after = greedy(hf)
    assert after != before  # the new weights are served …
    assert greedy(vl) == after  # … by vLLM too, through its live reload path


@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM not installed")
def test_vllm_requests_in_flight_run_together_and_a_load_between_them_splits_the_versions(generators):
    """Requests sent together run in one engine batch; a weight load sent between them waits for the requests
    already started, and those sent after it (asking for its version, as the driver's do: Ray does not keep the
    order of calls to an asynchronous actor, and this load's tensors reach the actor later than the small calls
    after it) wait for the load: each request is answered by exactly one version, the one it asked for. The new
    version is recognisable token by token: a zero final norm makes every logit 0, so greedy decoding emits token
    0 at every step, which the trained policy never emits."""
    import ray

    gen, hf = generators["vllm"], generators["hf"]
    state, version = ray.get(hf.weights.remote()), ray.get(gen.version.remote())

    def request(min_version=0):
        return gen.sample.remote(PROMPTS, k=1, temperature=0.0, max_new_tokens=20, min_version=min_version)

    def tokens(results):
        return [s["token_ids"] for r in results for s in r["samples"]]

    update = pack_buckets({**state, "model.norm.weight": torch.zeros_like(state["model.norm.weight"])})
    before = [request() for _ in range(3)]  # sent at once, then the load, then three more
    load = gen.load_weights.remote(version + 1, update.buckets, update.manifest, update.checksums)
    after = [request(min_version=version + 1) for _ in range(3)]
    before, after = [r for rs in ray.get(before, timeout=120) for r in rs], [r for rs in ray.get(after, timeout=120) for r in rs]
    assert ray.get(load) == version + 1
    assert all(t and 0 not in t for t in tokens(before))  # the old version, to the last token
    assert all(t == [0] * 20 for t in tokens(after))  # the new one, from the first token
    assert {r["policy_version"] for r in before} == {version} and {r["policy_version"] for r in after} == {version + 1}
    assert ray.get(gen.stats.remote())["most_requests_at_once"] >= 2  # they did run together
    same = pack_buckets(state, bucket_bytes=300_000)  # back to the hf generator's weights for the tests after
    assert ray.get(gen.load_weights.remote(version + 2, same.buckets, same.manifest, same.checksums)) == version + 2


@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM not installed")
def test_with_mid_request_a_load_lands_inside_a_running_request_and_it_goes_on_with_the_new_weights(
        ray_cluster, tiny_dir):
    """weight_sync.mid_request: the load does not wait. The untrained tiny model never emits EOS, so a request of
    400 new tokens runs hundreds of engine steps; the load is sent once it has run 8 of them (the generator's
    `engine_steps`), so it lands at a known point, not before the first token. The new version (a zero final
    norm: every logit 0, greedy emits token 0) takes over mid-sequence: each response is the old version's
    tokens up to the load, then token 0 to the end. The results record the version the request started with."""
    import ray
    from safetensors.torch import load_file

    from actors.generator import GeneratorActor

    cfg = load_config(None, ["generation.backend=vllm", "weight_sync.mid_request=true"])
    gen = GeneratorActor.options(num_cpus=0.25).remote(cfg.to_dict(), str(tiny_dir), 2)
    state = load_file(str(tiny_dir / "model.safetensors"))

    def request(min_version=0):
        return gen.sample.remote(PROMPTS, k=1, temperature=0.0, max_new_tokens=400, min_version=min_version)

    alone = [r["samples"][0]["token_ids"] for r in ray.get(request(), timeout=300)]
    assert all(len(t) == 400 and 0 not in t for t in alone)
    update = pack_buckets({**state, "model.norm.weight": torch.zeros_like(state["model.norm.weight"])})
    steps = ray.get(gen.stats.remote())["engine_steps"]
    running = request()
    deadline = time.monotonic() + 60
    while ray.get(gen.stats.remote())["engine_steps"] < steps + 8:  # served between engine steps
        assert time.monotonic() < deadline, "the running request did not run 8 engine steps within 60 s"
        time.sleep(0.002)
    load = gen.load_weights.remote(1, update.buckets, update.manifest, update.checksums)
    after = request(min_version=1)
    running, after = ray.get(running, timeout=300), ray.get(after, timeout=300)
    assert ray.get(load) == 1 and ray.get(gen.stats.remote())["loads_mid_request"] == 1
    for old, result in zip(alone, running):
        tokens = result["samples"][0]["token_ids"]
        switched = tokens.index(0)  # the first token of the new version
        assert 0 < switched < 400 and tokens[:switched] == old[:switched] and set(tokens[switched:]) == {0}
    assert {r["policy_version"] for r in running} == {0}  # the version it started with
    assert all(r["samples"][0]["token_ids"] == [0] * 400 and r["policy_version"] == 1 for r in after)
    ray.kill(gen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_update_is_refused_and_a_mix_of_versions_is_never_served(generators, backend):
    import ray

    gen = generators[backend]
    index = ray.get(gen.stats.remote())["index"]
    hf_state = ray.get(generators["hf"].weights.remote())
    version = ray.get(gen.version.remote())
    before = greedy(gen)
    packed = pack_buckets(noised(hf_state, seed=99), bucket_bytes=300_000)
    assert len(packed.buckets) >= 3

    def load(v, buckets, p=packed):
        return ray.get(gen.load_weights.remote(v, buckets, p.manifest, p.checksums))

    def corrupted(i):
        bad = [b.clone() for b in packed.buckets]
        bad[i][10] ^= 0xFF  # one flipped byte in transit
        return bad

    # refused before the engine changes: a bad first bucket, a manifest that is not this model's, an old version
    with pytest.raises(WeightSyncError, match="still serving .*bucket 0: checksum mismatch"):
        load(version + 1, corrupted(0))
    wrong = pack_buckets({**hf_state, "model.norm.weight": torch.ones(7)})
    with pytest.raises(WeightSyncError, match="model.norm.weight"):
        load(version + 1, wrong.buckets, wrong)
    with pytest.raises(WeightSyncError, match="not newer"):
        load(version, packed.buckets)
    assert ray.get(gen.version.remote()) == version and greedy(gen) == before
    # a bad bucket after others were loaded: the engine holds a mix of two versions, and serves nothing
    with pytest.raises(WeightSyncError, match="bucket 1: checksum mismatch.*serves no request"):
        load(version + 1, corrupted(1))
    with pytest.raises(WeightSyncError, match=f"generator {index}: weight version {version + 1} failed while loading"):
        greedy(gen)
    # until a complete version has loaded (the hf generator's weights: both backends must then answer as it does)
    same = pack_buckets(hf_state, bucket_bytes=300_000)
    assert load(version + 1, same.buckets, same) == version + 1
    assert greedy(gen) == greedy(generators["hf"])
    assert ray.get(gen.stats.remote())["weight_refusals"] >= 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_policy_file_is_served_to_evaluation_only_until_a_pushed_version_loads(generators, backend, tmp_path):
    """actors/evaluation.py: a generator loads the policy a learner saved and answers with it; it serves no
    training request meanwhile. A file that is not this model's is refused before anything moves."""
    import ray
    from safetensors.torch import save_file

    gen, hf = generators[backend], generators["hf"]
    hf_state = ray.get(hf.weights.remote())
    version = ray.get(gen.version.remote())

    def answers(g):
        return ray.get(g.answer.remote(PROMPTS, temperature=0.0, top_p=1.0, max_new_tokens=20, seed=7), timeout=120)

    before = answers(gen)
    bad = tmp_path / "bad.safetensors"
    save_file({**hf_state, "model.norm.weight": torch.ones(7)}, str(bad))
    with pytest.raises(WeightSyncError, match=f"{bad}: model.norm.weight"):
        ray.get(gen.load_policy_file.remote(str(bad)))
    assert answers(gen) == before and greedy(gen)  # nothing moved: training requests are still served
    policy = tmp_path / "policy.safetensors"
    save_file(noised(hf_state, seed=5), str(policy))
    assert ray.get(gen.load_policy_file.remote(str(policy))) == str(policy)
    assert answers(gen) != before
    with pytest.raises(WeightSyncError, match="serves the evaluation policy .*no training request"):
        greedy(gen)
    same = pack_buckets(hf_state, bucket_bytes=300_000)  # a pushed version: training requests again
    assert ray.get(gen.load_weights.remote(version + 1, same.buckets, same.manifest, same.checksums)) == version + 1
    assert greedy(gen) == greedy(hf) and answers(gen) == answers(hf)


def test_a_restarted_generator_serves_nothing_until_it_has_the_current_weights(ray_cluster, warm_policy_dir):
    import ray

    from actors.generator import GeneratorActor
    from actors.remote import ActorDiedError, get_all, wait_restarted

    cfg = load_config(None, ["generation.max_new_tokens=8"])
    gen = GeneratorActor.options(num_cpus=0.25, max_restarts=1).remote(cfg.to_dict(), str(warm_policy_dir), 7)
    state = ray.get(gen.weights.remote())
    packed = pack_buckets(noised(state, seed=5))
    assert ray.get(gen.load_weights.remote(3, packed.buckets, packed.manifest, packed.checksums)) == 3
    served = ray.get(gen.sample.remote(PROMPTS[:2], k=1, temperature=0.0))
    pid = ray.get(gen.stats.remote())["pid"]
    ray.kill(gen, no_restart=False)  # asynchronous: the old process may still answer for a moment
    back = wait_restarted(gen, 300, "generator", 7)
    for _ in range(600):
        if back["pid"] != pid:
            break
        time.sleep(0.1)
        back = wait_restarted(gen, 300, "generator", 7)
    assert back["pid"] != pid and back["policy_version"] == 0  # a fresh process with the initial weights...
    with pytest.raises(ActorDiedError, match="generator 7: .*does not have the current weights"):
        get_all({7: gen.sample.remote(PROMPTS[:2], k=1, temperature=0.0)}, 60, "generate", "generator")  # ...refuses
    assert ray.get(gen.load_weights.remote(3, packed.buckets, packed.manifest, packed.checksums)) == 3
    again = ray.get(gen.sample.remote(PROMPTS[:2], k=1, temperature=0.0))
    assert [r["samples"] for r in again] == [r["samples"] for r in served]  # the same policy as before the kill
    ray.kill(gen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_rollout_splices_policy_segment_into_chosen(generators, backend, warm_policy_dir):
    import ray

    from selfplay.models import load_tokenizer

    gen = generators[backend]
    chosen = [p.reference for p in PROMPTS]
    out = ray.get(gen.segment_rollout.remote(PROMPTS, chosen, segment_len=4, temperature=1.0, seed=3))
    assert [r["prompt_id"] for r in out] == [p.prompt_id for p in PROMPTS]
    tokenizer = load_tokenizer(str(warm_policy_dir))
    for r in out:
        ids = tokenizer(r["chosen"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        assert r["segment_len"] == min(4, len(ids))
        assert 0 <= r["cut"] <= max(0, len(ids) - 3 - r["segment_len"])  # never into the last 3 tokens
        prefix = tokenizer.decode(ids[: r["cut"]], skip_special_tokens=True)
        assert r["rejected"].startswith(prefix)
    whole = ray.get(gen.segment_rollout.remote(PROMPTS[:2], chosen[:2], segment_len=1000, seed=3))
    assert all(r["cut"] == 0 for r in whole)  # g = L: the whole response is regenerated


@pytest.mark.parametrize("backend", BACKENDS)
def test_revise_returns_chains(generators, backend):
    import ray

    out = ray.get(generators[backend].revise.remote(PROMPTS[:3], ["1 2", "3", "9 9 9"], rounds=2, seed=0))
    assert [len(r["chain"]) for r in out] == [3, 3, 3]
    assert out[0]["chain"][0] == "1 2" and out[0]["policy_version"] >= 0
