"""Where every actor runs: one Ray placement group per role, planned here and created before any actor starts
(docs/architecture.md, "Placement"). Pure: no Ray call, so a layout is checked against the cluster's nodes first.

    learners     one group, a bundle per rank, `resources.learner_strategy` (STRICT_PACK: one node, NVLink)
    generators   one group each: a bundle with the actor's CPUs and GPU; a tensor-parallel one
                 (`resources.generator_gpus` = N > 1) gets the actor's bundle plus one bundle per GPU, on one node
    judges       one group, a bundle per judge, `resources.judge_strategy`
    replay       one group, a bundle per shard, `resources.replay_strategy`

`resources.<role>_resources` adds custom Ray resources to each of the role's bundles (a node started with
`ray start --resources '{"learner_node": 8}'` takes only what asks for them); `resources.<role>_labels` selects
nodes by their Ray labels (`ray start --labels zone=a`, or Ray's own `ray.io/accelerator-type`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from selfplay.config import ConfigError

EPS = 1e-6  # 0.1 × 3 + 0.7 is 1.0000000000000002 in floats
ROLES = ("learner", "generator", "judge", "replay")


class PlacementError(ConfigError):
    """The configured actors cannot be placed on this cluster: raised before any actor starts."""


@dataclass(frozen=True)
class Group:
    role: str  # "learner", "generator 0", "judge", "replay"
    bundles: list[dict[str, float]]
    strategy: str
    labels: dict[str, str] = field(default_factory=dict)  # every bundle's node must carry these labels

    @property
    def key(self) -> str:
        """The prefix of this role's config keys: resources.learner (_cpus, _gpus, _resources, ...)."""
        return "resources." + self.role.split()[0]

    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for bundle in self.bundles:
            for name, amount in bundle.items():
                out[name] = out.get(name, 0.0) + amount
        return out


def tensor_parallel(cfg) -> int:
    """GPUs one generator's engine spans (vLLM tensor_parallel_size): generator_gpus when it is above 1."""
    gpus = cfg.resources.generator_gpus
    return int(gpus) if gpus > 1 else 1


def _bundle(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
    bundle = {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {}),
              **{k: float(v) for k, v in custom.items()}}
    return {k: v for k, v in bundle.items() if v > 0} or {"CPU": 0.001}  # Ray refuses an empty bundle


def groups(cfg, roles: tuple[str, ...] = ROLES) -> list[Group]:
    """The placement groups of a run (or of `roles` only), learners first: the hardest to place go first."""
    r = cfg.resources
    out: list[Group] = []
    if "learner" in roles:
        out.append(Group("learner", [_bundle(r.learner_cpus, r.learner_gpus, r.learner_resources)] * r.num_learners,
                         r.learner_strategy, dict(r.learner_labels)))
    if "generator" in roles:
        tp = tensor_parallel(cfg)
        if tp == 1:
            bundles = [_bundle(r.generator_cpus, r.generator_gpus, r.generator_resources)]
        else:  # the actor's bundle holds no GPU: vLLM's tensor-parallel workers take one bundle per GPU
            bundles = [_bundle(r.generator_cpus, 0, r.generator_resources)] + [{"GPU": 1.0}] * tp
        for i in range(r.num_generators):
            out.append(Group(f"generator {i}", bundles, "STRICT_PACK", dict(r.generator_labels)))
    if "judge" in roles:
        out.append(Group("judge", [_bundle(r.judge_cpus, r.judge_gpus, r.judge_resources)] * r.num_judges,
                         r.judge_strategy, dict(r.judge_labels)))
    if "replay" in roles:
        out.append(Group("replay", [_bundle(r.replay_cpus, 0, r.replay_resources)] * r.replay_shards,
                         r.replay_strategy, dict(r.replay_labels)))
    return out


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + EPS >= v for k, v in bundle.items())


def describe(resources: dict[str, float]) -> str:
    """{CPU: 8, GPU: 2, learner_node: 1}: what a person asks for, without Ray's per-node bookkeeping keys."""
    shown = {k: v for k, v in resources.items()
             if not k.startswith(("node:", "memory", "object_store_memory", "accelerator_type"))}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def group_problem(group: Group, nodes: list[dict]) -> str | None:
    """Why `group` cannot be placed on `nodes` (each {"resources": {...}, "labels": {...}}) even on an empty
    cluster, or None. What other groups hold is Ray's to decide (the driver waits for every group)."""
    eligible = [n for n in nodes if all(n.get("labels", {}).get(k) == v for k, v in group.labels.items())]
    where = f"the nodes labelled {group.labels}" if group.labels else "the cluster"
    if not eligible:
        return f"{group.role}: no node has the labels {group.labels} ({group.key}_labels)"
    missing = sorted({k for b in group.bundles for k in b} - {k for n in eligible for k in n["resources"]})
    if missing:
        name = missing[0]
        key = f"{group.key}_{name.lower()}s" if name in ("CPU", "GPU") else f"{group.key}_resources"
        return f"{group.role}: needs the resource {name!r} ({key}), which no node of {where} has"
    biggest = max(eligible, key=lambda n: sum(n["resources"].get(k, 0.0) for k in ("GPU", "CPU")))["resources"]
    if group.strategy == "STRICT_PACK":
        total = group.total()
        why = "a generator" if group.role.startswith("generator") else f"{group.key}_strategy"
        if not any(_fits(total, n["resources"]) for n in eligible):
            return (f"{group.role}: {len(group.bundles)} bundle(s) {describe(total)} in all must share one node "
                    f"({why} STRICT_PACK), but no node of {where} has that much (the largest: {describe(biggest)})")
        return None
    for bundle in group.bundles:
        if not any(_fits(bundle, n["resources"]) for n in eligible):
            return (f"{group.role}: one bundle {describe(bundle)} fits no node of {where} "
                    f"(the largest: {describe(biggest)})")
    if group.strategy == "STRICT_SPREAD":
        fitting = sum(_fits(group.bundles[0], n["resources"]) for n in eligible)
        if fitting < len(group.bundles):
            return (f"{group.role}: STRICT_SPREAD needs {len(group.bundles)} nodes with {describe(group.bundles[0])}, "
                    f"but {where} has {fitting}")
        return None
    total, capacity = group.total(), {}
    for n in eligible:
        for k, v in n["resources"].items():
            capacity[k] = capacity.get(k, 0.0) + v
    if not _fits(total, capacity):
        return f"{group.role}: {describe(total)} in all, but {where} has {describe(capacity)}"
    return None


def check_placement(cfg, nodes: list[dict], roles: tuple[str, ...] = ROLES) -> list[Group]:
    """Raise PlacementError, naming each role that cannot be placed and listing the nodes; return the groups."""
    planned = groups(cfg, roles)
    problems = [p for g in planned if (p := group_problem(g, nodes))]
    if not problems:
        return planned
    shown = "the cluster's nodes: " + "; ".join(
        describe(n["resources"]) + (f" labels {_user_labels(n)}" if _user_labels(n) else "") for n in nodes)
    fix = "change resources.* (or --set them), or add nodes that have what is missing"
    if len(problems) == 1:
        raise PlacementError(f"the configured actors cannot be placed on this Ray cluster: {problems[0]}; {shown}; {fix}")
    raise PlacementError("the configured actors cannot be placed on this Ray cluster:\n  " + "\n  ".join(problems)
                         + f"\n  {shown}\n  {fix}")


def _user_labels(node: dict) -> dict[str, str]:
    return {k: v for k, v in node.get("labels", {}).items() if not k.startswith("ray.io/node")}
