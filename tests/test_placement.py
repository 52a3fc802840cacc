"""Placement: every role's group is planned against the cluster's nodes and refused, naming the role, before any
actor starts (pure cases here; the multi-node run is tests/test_multinode.py)."""

import time

import pytest

from selfplay.config import load_config
from selfplay.placement import PlacementError, check_placement, groups


def node(cpus, gpus=0, labels=None, **custom):
    return {"resources": {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {}), **custom},
            "labels": labels or {}}


GPU_NODES = [node(32, 8), node(32, 8)]  # two 8-GPU nodes


def cfg_of(*overrides):
    return load_config(None, ["generation.backend=vllm", *overrides])


def refused(cfg, nodes) -> str:
    with pytest.raises(PlacementError) as e:
        check_placement(cfg, nodes)
    return str(e.value)


def test_groups_a_bundle_per_actor_and_per_tensor_parallel_gpu():
    cfg = cfg_of("resources.num_learners=4", "resources.learner_gpus=1", "resources.num_generators=2",
                 "resources.generator_gpus=2", "resources.generator_cpus=4", "resources.replay_shards=3",
                 "resources.learner_resources.learner_node=1", "resources.judge_labels.zone=a", "train.batch_size=8")
    planned = {g.role: g for g in groups(cfg)}
    assert list(planned) == ["learner", "generator 0", "generator 1", "judge", "replay"]  # hardest first
    assert planned["learner"].bundles == [{"CPU": 1.0, "GPU": 1.0, "learner_node": 1.0}] * 4
    assert planned["learner"].strategy == "STRICT_PACK"
    # the engine's actor holds the CPUs, its vLLM workers one GPU bundle each, all on one node
    assert planned["generator 0"].bundles == [{"CPU": 4.0}, {"GPU": 1.0}, {"GPU": 1.0}]
    assert planned["generator 0"].strategy == "STRICT_PACK"
    assert planned["judge"].labels == {"zone": "a"} and planned["replay"].bundles == [{"CPU": 0.5}] * 3
    check_placement(cfg, [node(32, 8, learner_node=8), node(32, 8, labels={"zone": "a"})])


def test_learners_that_do_not_fit_one_node_are_refused_unless_allowed_to_spread():
    cfg = cfg_of("resources.num_learners=12", "resources.learner_gpus=1", "train.batch_size=12")
    msg = refused(cfg, GPU_NODES)
    assert msg.startswith("the configured actors cannot be placed on this Ray cluster: learner: 12 bundle(s) "
                          "{CPU: 12, GPU: 12} in all must share one node (resources.learner_strategy STRICT_PACK)")
    assert "the largest: {CPU: 32, GPU: 8}" in msg and "the cluster's nodes: {CPU: 32, GPU: 8}; {CPU: 32, GPU: 8}" in msg
    assert "\n" not in msg  # one problem, one line
    check_placement(load_config(None, ["resources.num_learners=12", "resources.learner_gpus=1", "train.batch_size=12",
                                       "resources.learner_strategy=PACK"]), GPU_NODES)


def test_a_tensor_parallel_generator_needs_its_gpus_on_one_node():
    msg = refused(cfg_of("resources.generator_gpus=4"), [node(16, 2), node(16, 2)])
    assert "generator 0: 5 bundle(s) {CPU: 1, GPU: 4} in all must share one node (a generator STRICT_PACK)" in msg


def test_a_custom_resource_or_label_no_node_has_names_the_role_and_key():
    cfg = cfg_of("resources.learner_resources.learner_node=1", "resources.judge_labels.zone=b")
    msg = refused(cfg, [node(8, labels={"zone": "a"}), node(8, learner_nod=4)])
    assert "learner: needs the resource 'learner_node' (resources.learner_resources)" in msg
    assert "judge: no node has the labels {'zone': 'b'} (resources.judge_labels)" in msg
    assert "labels {'zone': 'a'}" in msg  # the nodes are listed with their labels
    assert msg.count("\n") == 4  # two problems, the nodes, the fix


def test_a_role_limited_by_labels_to_nodes_too_small():
    cfg = cfg_of("resources.judge_gpus=1", "resources.judge_labels.zone=a")
    msg = refused(cfg, [node(8, labels={"zone": "a"}), node(8, 8, labels={"zone": "b"})])
    assert "judge: needs the resource 'GPU' (resources.judge_gpus), which no node of the nodes labelled " \
           "{'zone': 'a'} has" in msg


def test_strict_spread_needs_as_many_nodes_as_bundles_and_pack_the_sum():
    msg = refused(cfg_of("resources.replay_shards=3", "resources.replay_strategy=STRICT_SPREAD"), [node(8), node(8)])
    assert "replay: STRICT_SPREAD needs 3 nodes with {CPU: 0.5}, but the cluster has 2" in msg
    msg = refused(cfg_of("resources.num_judges=3", "resources.judge_cpus=3"), [node(4), node(4)])
    assert "judge: {CPU: 9} in all, but the cluster has {CPU: 8}" in msg
    msg = refused(cfg_of("resources.judge_cpus=6"), [node(4), node(4)])
    assert "judge: one bundle {CPU: 6} fits no node of the cluster (the largest: {CPU: 4})" in msg


def test_an_unplaceable_layout_is_refused_on_a_real_cluster_before_any_actor(ray_cluster, tmp_path):
    from actors.driver import Driver
    from selfplay.demo import demo_config

    cfg = demo_config("sppo", extra=["resources.learner_resources.learner_node=1"])
    t = time.perf_counter()
    with pytest.raises(PlacementError, match=r"learner: needs the resource 'learner_node'"):
        Driver(cfg, tmp_path / "run").run()
    assert time.perf_counter() - t < 10
    assert not (tmp_path / "run" / "initial_policy").exists()  # before the warm-up and any actor


def test_a_layout_that_waits_on_held_resources_times_out_naming_the_role(ray_cluster):
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from actors.placement import Placement

    # another job holds all but half a CPU of the cluster (ready once earlier tests' actors are gone): the replay
    # shard's group fits in what is left, the learner's, the generator's and the judge's never do
    holder = placement_group([{"CPU": ray_cluster.cluster_resources()["CPU"] - 0.5}])
    ray_cluster.get(holder.ready(), timeout=300)
    try:
        cfg = load_config(None, ["resources.placement_timeout_s=2"])
        before = {k for k, v in placement_group_table().items() if v["state"] != "REMOVED"}
        with pytest.raises(PlacementError, match=r"not placed within resources.placement_timeout_s \(2s\): learner, "
                                                 r"generator 0, judge; the nodes fit this layout, but other work holds"):
            Placement(cfg)
        after = {k for k, v in placement_group_table().items() if v["state"] != "REMOVED"}
        assert after == before  # its groups were removed again, the replay shard's too
    finally:
        remove_placement_group(holder)
