"""The run's placement groups (planned by `selfplay.placement`), created and ready before any actor starts.

A layout that no node can hold is refused by the plan, at once; one that fits the nodes but not what other jobs
leave free waits up to `resources.placement_timeout_s`, then fails naming the roles still pending. Either way no
actor has started. An actor restarted by Ray stays in its bundle; when a node dies, Ray moves that node's bundles
to nodes that can hold them, and the actors restart there (docs/architecture.md, "Placement").
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from selfplay.placement import ROLES, PlacementError, check_placement, describe


@ray.remote(num_cpus=0)
def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def cluster_nodes() -> list[dict]:
    """The alive nodes as the plan reads them: {"id", "resources", "labels"}."""
    return [{"id": n["NodeID"], "resources": n["Resources"], "labels": n.get("Labels") or {}}
            for n in ray.nodes() if n["Alive"]]


class Placement:
    """The groups of `roles` (`selfplay.placement.groups`), every one ready, or PlacementError and none left."""

    def __init__(self, cfg, roles: tuple[str, ...] = ROLES, log: Callable[[str], None] = print):
        r = cfg.resources
        if "learner" in roles and r.num_learners > 1 and r.learner_strategy != "STRICT_PACK":
            log(f"[selfplay] warning: resources.learner_strategy {r.learner_strategy}: learner ranks may land on "
                "different nodes, and their gradient traffic then crosses the network (STRICT_PACK keeps it on one)")
        planned = check_placement(cfg, cluster_nodes(), roles)
        run = uuid.uuid4().hex[:8]  # names are unique in a namespace: two runs (or groups) must not collide
        self.groups = {g.role: placement_group(
            g.bundles, strategy=g.strategy, name=f"selfplay {g.role} {run}",
            bundle_label_selector=[dict(g.labels)] * len(g.bundles) if g.labels else None) for g in planned}
        pending = {role: group.ready() for role, group in self.groups.items()}
        deadline = time.monotonic() + r.placement_timeout_s
        while pending and time.monotonic() < deadline:
            ready, _ = ray.wait(list(pending.values()), num_returns=len(pending),
                                timeout=max(0.0, deadline - time.monotonic()))
            pending = {role: ref for role, ref in pending.items() if ref not in ready}
        if pending:
            self.remove()
            raise PlacementError(
                f"not placed within resources.placement_timeout_s ({r.placement_timeout_s:g}s): "
                f"{', '.join(pending)}; the nodes fit this layout, but other work holds what it needs (free now: "
                f"{describe(ray.available_resources())}); wait for it to finish, or change resources.*")

    def check_shared_dir(self, directory: Path) -> None:
        """Every node of the run must see `directory` as this driver does: the initial policy is read from it,
        checkpoints, replay snapshots and the final model are written to it by actors on every node. A task in
        each bundle reads a marker the driver just wrote; a node that reads nothing, or another run's marker, has
        its own directory at that path (a relative out_dir, a node-local disk)."""
        marker, token = directory / ".selfplay-shared-check", uuid.uuid4().hex
        marker.write_text(token)
        try:
            refs = {(role, i): _read.options(scheduling_strategy=self.strategy(role, i)).remote(str(marker))
                    for role, group in self.groups.items() for i in range(group.bundle_count)}
            seen = dict(zip(refs, ray.get(list(refs.values()), timeout=300)))
        finally:
            marker.unlink(missing_ok=True)
        blind = sorted({role for (role, _), text in seen.items() if text != token})
        if blind:
            raise PlacementError(
                f"out_dir {directory} is not the same directory on every node: the node(s) of {', '.join(blind)} do "
                "not see what the driver wrote there; put out_dir on storage every node mounts at the same path "
                "(NFS, a ReadWriteMany volume; docs/cluster.md) and give it as an absolute path")

    def strategy(self, role: str, bundle: int = 0, children: bool = False) -> PlacementGroupSchedulingStrategy:
        """Schedule an actor in bundle `bundle` of `role`'s group. children: what the actor starts (vLLM's
        tensor-parallel workers) goes into the same group."""
        return PlacementGroupSchedulingStrategy(placement_group=self.groups[role], placement_group_bundle_index=bundle,
                                                placement_group_capture_child_tasks=children)

    def nodes(self) -> dict[str, list[str]]:
        """The node id of every bundle, per role (from Ray's placement-group table)."""
        table = {role: placement_group_table(group) for role, group in self.groups.items()}
        return {role: [t["bundles_to_node_id"][i] for i in sorted(t["bundles_to_node_id"])] for role, t in table.items()}

    def describe(self) -> str:
        """"10.0.0.5 (3f2a9c): learner ×8; 10.0.0.6 (77b1e0): generator 0, judge, replay ×2": the roles on each
        node (its address and the start of its Ray node id)."""
        address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        by_node: dict[str, list[str]] = {}
        for role, node_ids in self.nodes().items():
            for node in dict.fromkeys(node_ids):
                count = node_ids.count(node)
                name = f"{address.get(node, '?')} ({node[:6]})"
                by_node.setdefault(name, []).append(role + (f" ×{count}" if count > 1 else ""))
        return "; ".join(f"{node}: {', '.join(roles)}" for node, roles in by_node.items())

    def remove(self) -> None:
        while self.groups:
            remove_placement_group(self.groups.popitem()[1])
