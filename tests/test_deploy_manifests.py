"""Deployment files parse and point at things that exist: images, commands, configs, resources."""

import re
import shlex
from pathlib import Path

import yaml

from selfplay.cli import build_parser
from selfplay.config import load_config

ROOT = Path(__file__).resolve().parent.parent
IMAGE = re.compile(r"^[\w.\-/:]+:[\w.\-]+$")


def containers(spec):
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]], groups


def check_entrypoint(command: str):
    argv = shlex.split(command)
    assert argv[0] == "selfplay"
    args = build_parser().parse_args(argv[1:])  # a real subcommand with valid arguments
    if args.command == "run":
        assert (ROOT / args.config).exists(), args.config
        load_config(ROOT / args.config, args.overrides)


def test_raycluster_has_a_gpu_worker_group_per_role():
    doc = yaml.safe_load((ROOT / "deploy/kuberay/raycluster.yaml").read_text())
    assert doc["kind"] == "RayCluster" and doc["apiVersion"] == "ray.io/v1"
    conts, groups = containers(doc["spec"])
    assert {g["groupName"] for g in groups[1:]} == {"generators", "learners", "judges"}
    for c in conts:
        assert IMAGE.match(c["image"]), c["image"]
    for g in groups[1:]:
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1 and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_rayjob_entrypoint_is_a_real_command_on_a_real_config():
    doc = yaml.safe_load((ROOT / "deploy/kuberay/rayjob.yaml").read_text())
    assert doc["kind"] == "RayJob"
    check_entrypoint(doc["spec"]["entrypoint"])
    yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    conts, _ = containers(doc["spec"]["rayClusterSpec"])
    assert all(IMAGE.match(c["image"]) for c in conts)


def test_slurm_launcher_and_dockerfile_reference_real_commands():
    sbatch = (ROOT / "deploy/slurm/selfplay.sbatch").read_text()
    assert sbatch.startswith("#!/bin/bash") and "#SBATCH --nodes" in sbatch
    assert '"$VENV/bin/selfplay" submit' in sbatch and '"$VENV/bin/selfplay" run "$@"' in sbatch
    assert '"$RAY" start --head --block' in sbatch and "--address=\"$head_ip:$PORT\"" in sbatch
    docker = (ROOT / "deploy/Dockerfile").read_text()
    assert docker.startswith("#") and "FROM rayproject/ray:" in docker
    for path in re.findall(r"^COPY (\S+) ", docker, flags=re.M):
        assert (ROOT / path).exists(), path


def test_grafana_dashboard_queries_the_metrics_the_driver_exports():
    import json

    board = json.loads((ROOT / "deploy/grafana/selfplay-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p["targets"])
    metrics_py = (ROOT / "actors/metrics.py").read_text()
    for name in re.findall(r"ray_(selfplay_[a-z_]+?)(?:_total)?\b", exprs):
        assert f'"{name}"' in metrics_py, name  # every panel reads a metric RunMetrics defines
    assert len(board["panels"]) == 6
