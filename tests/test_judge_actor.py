import pytest

from selfplay.config import JudgeConfig, TaskConfig

pytestmark = pytest.mark.ray

PROMPT = "Sort ascending: 7 3 9 1"


def groups(n, prefix, k=3):
    cands = ["1 3 7 9", "9 7 3 1", "1 3 9 7", "1", "1 3 7"][:k]
    return [{"prompt_id": f"{prefix}{i}", "prompt": PROMPT, "candidates": cands, "policy_version": 2}
            for i in range(n)]


def test_judge_actor_batches_concurrent_callers_and_returns_rows(ray_cluster):
    import ray

    from actors.judge import JudgeActor

    judge = JudgeActor.options(num_cpus=0.1).remote(JudgeConfig(kind="rule"), TaskConfig(), max_wait_s=0.2)
    refs = [judge.judge.remote(groups(4, f"g{c}-"), verdicts=True) for c in range(3)]  # three generators at once
    results = ray.get(refs, timeout=60)
    stats = ray.get(judge.stats.remote())
    assert stats["calls"] == 3 and stats["groups"] == 12
    assert stats["batches"] < stats["calls"]  # merged into fewer model batches than calls
    for c, res in enumerate(results):
        assert len(res["verdicts"]) == 4
        v = res["verdicts"][0]
        assert v["winner"] == 0 and v["loser"] == 1 and v["valid"]
        assert len(v["probs"]) == 3 and v["probs"][0][0] == 0.5
        rows = res["rows"]
        assert rows.num_rows == 4 and set(rows.column("prompt_id").to_pylist()) == {f"g{c}-{i}" for i in range(4)}
        assert rows.column("chosen").to_pylist() == ["1 3 7 9"] * 4
        assert rows.column("policy_version").to_pylist() == [2] * 4
    plain = ray.get(judge.judge.remote(groups(4, "plain-")), timeout=60)  # what the driver gets: rows and counts
    assert "verdicts" not in plain and plain["groups"] == 4 and plain["rows"].num_rows == 4
    assert (plain["skipped_ties"], plain["skipped_invalid"], plain["skipped_empty"]) == (0, 0, 0)
    ray.kill(judge)


def test_judge_actor_mixed_k_and_errors(ray_cluster, pairrm_dir):
    import ray

    from actors.judge import JudgeActor

    judge = JudgeActor.options(num_cpus=0.1).remote(JudgeConfig(kind="pairrm", path=str(pairrm_dir)))
    a, b = judge.judge.remote(groups(2, "k3-", k=3), True), judge.judge.remote(groups(2, "k5-", k=5), True)
    ra, rb = ray.get([a, b], timeout=120)
    assert len(ra["verdicts"][0]["probs"]) == 3 and len(rb["verdicts"][0]["probs"]) == 5
    for res in (ra, rb):
        probs = res["verdicts"][0]["probs"]
        k = len(probs)
        assert all(abs(probs[i][j] + probs[j][i] - 1) < 1e-5 for i in range(k) for j in range(k))
    with pytest.raises(Exception, match="candidates"):
        ray.get(judge.judge.remote([{"prompt_id": "x", "prompt": "p"}]), timeout=60)
    assert ray.get(judge.stats.remote())["calls"] == 3  # the actor survived the bad call
    ray.kill(judge)
