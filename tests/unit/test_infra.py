"""Cluster configs validate against the schema that ships with Ray (no cloud is reachable here)."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

KUBERAY = REPO / "infra" / "ray" / "kuberay.yaml"


def _schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_aws_autoscaler_config_matches_rays_schema():
    schema = _schema()
    config = yaml.safe_load((REPO / "infra" / "ray" / "aws.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # training never lands on the head
    gpu = [t for name, t in types.items() if name.startswith("gpu_")]
    assert gpu and all(t["min_workers"] == 0 for t in gpu)  # scale from zero


def test_schema_catches_a_broken_config():
    schema = _schema()
    config = yaml.safe_load((REPO / "infra" / "ray" / "aws.yaml").read_text())
    config["available_node_types"]["head"]["min_workers"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


# --- KubeRay (infra/ray/kuberay.yaml) ------------------------------------------------------------------
#
# The KubeRay autoscaler sidecar fetches the RayCluster CR from the API server and turns it into an
# autoscaler config with `_derive_autoscaling_config_from_ray_cr` (ray/autoscaler/_private/kuberay/
# autoscaling_config.py). Only the fetch (AutoscalingConfigProducer) talks to Kubernetes; the derivation
# is a pure function of the CR dict, so it runs here on the YAML as the sidecar would see it. It reads
# `metadata.namespace`, which the API server fills in, so the tests add one.

GPU_GROUPS = {"gpu-a100": "accelerator_a100", "gpu-h100": "accelerator_h100"}


def _kuberay() -> tuple[dict, dict]:
    doc = yaml.safe_load(KUBERAY.read_text())
    assert doc["apiVersion"] == "v1" and doc["kind"] == "List"  # one document, so the RayJob can alias the spec
    by_kind = {item["kind"]: item for item in doc["items"]}
    assert sorted(by_kind) == ["RayCluster", "RayJob"] and len(doc["items"]) == 2
    assert all(item["apiVersion"] == "ray.io/v1" for item in doc["items"])
    return by_kind["RayCluster"], by_kind["RayJob"]


def _as_ray_cr(name: str, spec: dict) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": name, "namespace": "opt"}, "spec": copy.deepcopy(spec)}


def _autoscaling_config(cr: dict) -> dict:
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    config = _derive_autoscaling_config_from_ray_cr(copy.deepcopy(cr))
    jsonschema.validate(config, _schema())  # derive already runs Ray's validate_config; say it here too
    return config


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_cluster_derives_the_autoscaler_config_we_intend():
    cluster, _ = _kuberay()
    aws = yaml.safe_load((REPO / "infra" / "ray" / "aws.yaml").read_text())
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    config = _autoscaling_config(_as_ray_cr(cluster["metadata"]["name"], spec))

    assert config["idle_timeout_minutes"] == aws["idle_timeout_minutes"] == 10  # idleTimeoutSeconds: 600
    assert config["upscaling_speed"] == 1000  # upscalingMode Default: no rate limit
    types = config["available_node_types"]
    assert set(types) == {"headgroup", "cpu", *GPU_GROUPS}
    head = types["headgroup"]
    assert head["resources"]["CPU"] == 0 and "GPU" not in head["resources"]  # num-cpus "0": no training on the head
    assert (head["min_workers"], head["max_workers"]) == (0, 0)
    assert types["cpu"]["resources"]["CPU"] == 60 and "GPU" not in types["cpu"]["resources"]
    assert (types["cpu"]["min_workers"], types["cpu"]["max_workers"]) == (0, 32)
    for group, accelerator in GPU_GROUPS.items():
        t = types[group]
        assert (t["min_workers"], t["max_workers"]) == (0, 16)  # scale from zero
        assert t["resources"]["GPU"] == 8 and t["resources"][accelerator] == 8  # nvidia.com/gpu limit and rayStartParams
        assert t["resources"]["CPU"] >= 8  # a data loader thread or more per GPU rank
    assert config["max_workers"] == 32 + 16 * len(GPU_GROUPS)
    # The custom accelerator resources are aws.yaml's, so a config pinning one schedules on both clusters.
    aws_accelerators = {k for t in aws["available_node_types"].values() for k in t["resources"] if k.startswith("accelerator_")}
    assert aws_accelerators == set(GPU_GROUPS.values())
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]  # Ray does not check this (see below)


def test_kuberay_pods_run_the_platform_image_with_shm_secrets_and_probes():
    cluster, _ = _kuberay()
    spec = cluster["spec"]
    aws = yaml.safe_load((REPO / "infra" / "ray" / "aws.yaml").read_text())
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"ray[train]=={spec["rayVersion"]}"' in pyproject  # rayVersion is the Ray the image installs
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        c = pod["containers"][0]  # KubeRay: the Ray container is the first
        assert c["image"] == aws["docker"]["image"]
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_USAGE_STATS_ENABLED"]["value"] == "0"
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "opt-s3-credentials", "key": key}
        assert len(shm) == 1 and {"name": shm[0]["name"], "mountPath": "/dev/shm"} in c["volumeMounts"]
        assert c["resources"]["requests"] == c["resources"]["limits"]  # Guaranteed QoS
        for probe in ("readinessProbe", "livenessProbe"):  # not KubeRay's default `wget`, absent from the image
            assert c[probe]["httpGet"]["port"] == 52365 and "exec" not in c[probe]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_kuberay_job_uses_the_same_cluster_and_retries():
    cluster, job = _kuberay()
    js = job["spec"]
    assert js["rayClusterSpec"] == cluster["spec"]  # a YAML alias in the file; this catches a pasted copy drifting
    assert js["submissionMode"] == "K8sJobMode"
    assert js["shutdownAfterJobFinishes"] is True and js["ttlSecondsAfterFinished"] > 0
    assert js["backoffLimit"] >= 1
    # The spec the RayJob's cluster gets derives the same autoscaler config (bar the cluster name).
    from_job = _autoscaling_config(_as_ray_cr(f"{job['metadata']['name']}-raycluster", js["rayClusterSpec"]))
    from_cluster = _autoscaling_config(_as_ray_cr(cluster["metadata"]["name"], cluster["spec"]))
    assert {**from_job, "cluster_name": None} == {**from_cluster, "cluster_name": None}


def _image_path_to_repo(path: str) -> Path:
    """A path in the image (docker/Dockerfile: WORKDIR + COPY <repo dir> <dest>) back to the repo."""
    workdir, copies = PurePosixPath("/"), {}
    for line in (REPO / "docker" / "Dockerfile").read_text().splitlines():
        if m := re.match(r"WORKDIR\s+(\S+)", line):
            workdir = workdir / m.group(1)
        elif m := re.match(r"COPY\s+(\S+)\s+(\S+)$", line):
            copies[workdir / m.group(2)] = m.group(1)
    p = PurePosixPath(path)
    for dest, src in copies.items():
        if p.is_relative_to(dest):
            return REPO / src / p.relative_to(dest)
    raise AssertionError(f"{path} is not copied into the image by docker/Dockerfile")


def test_kuberay_job_entrypoint_is_an_optctl_train_the_cluster_can_place():
    from opt.cli import build_parser, cmd_train
    from opt.config import load_config

    cluster, job = _kuberay()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "optctl" and 'optctl = "opt.cli:main"' in (REPO / "pyproject.toml").read_text()
    args = build_parser().parse_args(argv[1:])  # parses only: nothing runs
    assert args.func is cmd_train and args.config
    config_file = _image_path_to_repo(args.config)
    assert config_file == REPO / "configs" / "opt-125m.yaml" and config_file.is_file()
    t = load_config(config_file, args.overrides).train
    assert t.use_gpu and t.ray_address == "auto"  # the driver joins the RayJob's cluster
    # Every worker's bundle fits on a GPU node type, and the run fits under the group's maxReplicas:
    # otherwise the autoscaler can never place it and the job waits forever.
    types = _autoscaling_config(_as_ray_cr("opt-train", cluster["spec"]))["available_node_types"]
    need = {"CPU": t.cpus_per_worker, "GPU": t.gpus_per_worker, **t.resources_per_worker}
    fits = {name: min(int(nt["resources"].get(k, 0) // v) for k, v in need.items()) for name, nt in types.items()}
    assert fits["headgroup"] == 0  # and never on the head
    assert any(per_node * types[name]["max_workers"] >= t.num_workers for name, per_node in fits.items() if per_node)


def test_kuberay_broken_groups_are_rejected_by_rays_derivation():
    cluster, _ = _kuberay()
    cr = _as_ray_cr("opt-train", cluster["spec"])
    _autoscaling_config(cr)  # the real one passes

    no_name = copy.deepcopy(cr)
    del no_name["spec"]["workerGroupSpecs"][1]["groupName"]
    with pytest.raises(KeyError, match="groupName"):
        _autoscaling_config(no_name)

    bad_gpu = copy.deepcopy(cr)
    bad_gpu["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "eight"
    with pytest.raises(ValueError, match="eight"):
        _autoscaling_config(bad_gpu)

    # rayStartParams `resources` needs KubeRay's extra quotes; plain JSON is a parse error, not ignored
    unquoted = copy.deepcopy(cr)
    unquoted["spec"]["workerGroupSpecs"][1]["rayStartParams"]["resources"] = '{"accelerator_a100": 8}'
    with pytest.raises(json.JSONDecodeError):
        _autoscaling_config(unquoted)

    no_cpu = copy.deepcopy(cr)
    for kind in ("requests", "limits"):
        del no_cpu["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][kind]["cpu"]
    with pytest.raises(ValueError, match="failed to detect `CPU`"):
        _autoscaling_config(no_cpu)

    # maxReplicas < minReplicas gets through Ray's derivation and its schema (verified here), which is
    # why test_kuberay_cluster_derives_the_autoscaler_config_we_intend checks minReplicas <= maxReplicas itself.
    inverted = copy.deepcopy(cr)
    inverted["spec"]["workerGroupSpecs"][1].update(minReplicas=4, maxReplicas=2)
    assert _autoscaling_config(inverted)["available_node_types"]["gpu-a100"]["max_workers"] == 2


def test_image_has_rays_dashboard_for_rayjob_and_probes():
    # RayJob submits through the head's Jobs API (dashboard) and the pod probes call the dashboard agent;
    # both start only when ray[default]'s dependencies are installed: the image installs the `cluster` extra.
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("ray[default") for dep in project["optional-dependencies"]["cluster"])
    install = next(line for line in (REPO / "docker" / "Dockerfile").read_text().splitlines() if 'pip install ".[' in line)
    assert "cluster" in install
