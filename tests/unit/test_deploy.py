"""The deployment files, checked offline: KubeRay manifests, the cluster-launcher YAML (with Ray's
own validator), the Dockerfile, and that every file or config an entrypoint names exists."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from orchestrator.config import PROJECT_ROOT

ROOT = PROJECT_ROOT
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
CLAIM = "cryoal-data"
DATA_MOUNT = "/data"


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def ray_resources(kind: str) -> list[tuple[Path, dict]]:
    """(file, document) for every document of this kind in deploy/kuberay/."""
    return [(path, doc) for path in MANIFESTS for doc in load_docs(path) if doc.get("kind") == kind]


def cluster_specs() -> list[tuple[str, dict]]:
    """The Ray cluster spec of every RayJob and RayCluster, named for test ids."""
    specs = [(f"{p.name}:{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for p, d in ray_resources("RayJob")]
    specs += [(f"{p.name}:{d['metadata']['name']}", d["spec"]) for p, d in ray_resources("RayCluster")]
    return specs


def pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(package: str) -> str:
    """The version specifier pyproject gives `package`, e.g. '==2.60.*' for ray."""
    for requirement in pyproject()["project"]["dependencies"]:
        match = re.match(rf"{package}(\[[^\]]*\])?\s*([<>=!~].*)$", requirement)
        if match:
            return match.group(2).strip()
    raise AssertionError(f"pyproject.toml does not list {package}")


def ray_minor() -> str:
    """'2.60' from the pin '==2.60.*'."""
    spec = pinned("ray")
    match = re.fullmatch(r"==\s*(\d+\.\d+)\.\*", spec) or re.fullmatch(r"==\s*(\d+\.\d+)\.\d+", spec)
    assert match, f"expected ray pinned as ==X.Y.* or ==X.Y.Z in pyproject.toml, got {spec!r}"
    return match.group(1)


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def image_project_dir() -> str:
    """Where the Dockerfile puts the project (its last WORKDIR): entrypoints name files there."""
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", dockerfile(), flags=re.M)
    assert workdirs, "deploy/Dockerfile sets no WORKDIR"
    return workdirs[-1].rstrip("/")


def entrypoints() -> list[tuple[str, str]]:
    return [(f"{p.name}:{d['metadata']['name']}", d["spec"]["entrypoint"]) for p, d in ray_resources("RayJob")]


# -- the KubeRay manifests -------------------------------------------------------------------

def test_every_manifest_parses_and_names_its_api():
    assert [p.name for p in MANIFESTS] == [
        "raycluster.yaml", "rayjob-campaign.yaml", "rayjob-sweep.yaml", "storage.yaml"
    ]
    for path in MANIFESTS:
        for doc in load_docs(path):
            assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), path.name
            if doc["kind"] in ("RayJob", "RayCluster"):
                assert doc["apiVersion"] == "ray.io/v1", path.name


def test_there_is_a_campaign_job_a_sweep_job_and_an_interactive_cluster():
    jobs = {d["metadata"]["name"]: p.name for p, d in ray_resources("RayJob")}
    clusters = {d["metadata"]["name"]: p.name for p, d in ray_resources("RayCluster")}
    assert jobs == {"cryoal-campaign": "rayjob-campaign.yaml", "cryoal-sweep": "rayjob-sweep.yaml"}
    assert clusters == {"cryoal": "raycluster.yaml"}


@pytest.mark.parametrize("job", [pytest.param(d, id=p.name) for p, d in ray_resources("RayJob")])
def test_a_rayjob_submits_an_entrypoint_and_deletes_its_cluster_when_done(job):
    spec = job["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert "rayClusterSpec" in spec and "clusterSelector" not in spec
    if "runtimeEnvYAML" in spec:
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)


@pytest.mark.parametrize("name, spec", [pytest.param(n, s, id=n) for n, s in cluster_specs()])
def test_the_head_has_no_gpu_and_the_workers_one_each_within_autoscaling_bounds(name, spec):
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    for container in head["template"]["spec"]["containers"]:
        for section in ("requests", "limits"):
            assert "nvidia.com/gpu" not in container.get("resources", {}).get(section, {})
    assert spec["workerGroupSpecs"], name
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert group["maxReplicas"] >= 1
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, group["groupName"]


@pytest.mark.parametrize("name, spec", [pytest.param(n, s, id=n) for n, s in cluster_specs()])
def test_every_ray_pod_mounts_the_shared_volume_at_data(name, spec):
    for template in pod_templates(spec):
        pod = template["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert claims.get(mounts.get(DATA_MOUNT)) == CLAIM


def test_the_shared_volume_is_read_write_many():
    claims = [d for d in load_docs(KUBERAY / "storage.yaml") if d["kind"] == "PersistentVolumeClaim"]
    assert [c["metadata"]["name"] for c in claims] == [CLAIM]
    assert claims[0]["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("name, spec", [pytest.param(n, s, id=n) for n, s in cluster_specs()])
def test_every_pod_runs_the_project_image_at_the_pinned_ray_version(name, spec):
    images = {c["image"] for t in pod_templates(spec) for c in t["spec"]["containers"]}
    assert images == {f"cryoal:{pyproject()['project']['version']}"}
    assert spec["rayVersion"].startswith(ray_minor() + ".")


# -- entrypoints name files and configs that exist ---------------------------------------------

def test_every_tune_config_a_manifest_names_exists():
    """Comments included: a manifest must not point a reader at a config that is not there."""
    named = sorted({(path.name, m) for path in MANIFESTS + [DEPLOY / "cluster.yaml"]
                    for m in re.findall(r"tune_configs/[\w.-]+\.ya?ml", path.read_text())})
    assert named, "no manifest names a tune_configs/ file"
    missing = [f"{name} names {config}" for name, config in named if not (ROOT / config).is_file()]
    assert missing == []


@pytest.mark.parametrize("name, entrypoint", [pytest.param(n, e, id=n) for n, e in entrypoints()])
def test_an_entrypoint_names_only_files_that_exist_in_the_image(name, entrypoint):
    words = shlex.split(entrypoint)
    assert ";" not in entrypoint and "&&" not in entrypoint and "|" not in entrypoint, (
        "KubeRay pastes the entrypoint into a shell line after `ray job submit --`: keep it one command"
    )
    assert words[0] == "python"
    prefix = image_project_dir() + "/"
    in_image = [w for w in words if w.startswith(prefix)]
    assert in_image[0] == prefix + "orchestrator/run.py"
    for word in in_image:
        assert (ROOT / word.removeprefix(prefix)).is_file(), f"{word}: no {word.removeprefix(prefix)} in the repo"


@pytest.mark.parametrize(
    "name, entrypoint", [pytest.param(n, e, id=n) for n, e in entrypoints() if "sweep" not in shlex.split(e)]
)
def test_a_campaign_entrypoint_parses_and_its_config_and_overrides_load(name, entrypoint):
    from orchestrator.config import load_config
    from orchestrator.campaign.cli import parse_args

    argv = shlex.split(entrypoint)[2:]
    args = parse_args(argv)
    config, prefix = args.config, image_project_dir() + "/"
    if config and config.startswith(prefix):
        config = ROOT / config.removeprefix(prefix)
    cfg = load_config(config, args.set)  # raises on an unknown config name or --set key
    assert cfg.run_root.startswith(DATA_MOUNT + "/"), "run directories must be on the shared volume"
    assert cfg.data.pool is None or cfg.data.pool.startswith(DATA_MOUNT + "/")


def test_the_sweep_entrypoint_writes_to_the_shared_volume():
    (entrypoint,) = [e for n, e in entrypoints() if "sweep" in shlex.split(e)]
    assert f"run_root={DATA_MOUNT}/" in entrypoint


# -- the cluster launcher ----------------------------------------------------------------------

def launcher_config() -> dict:
    return yaml.safe_load((DEPLOY / "cluster.yaml").read_text())


def test_the_cluster_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import fillout_defaults, prepare_config, validate_config

    config = launcher_config()
    assert validate_config(fillout_defaults(config)) is None  # raises on unknown keys or bad types
    prepared = prepare_config(launcher_config())  # what `ray up` itself does first
    assert validate_config(prepared) is None
    assert set(prepared["available_node_types"]) == set(config["available_node_types"])
    # ... and the same validation refuses a launcher file with a mistake in it
    broken = launcher_config()
    broken["available_node_types"][config["head_node_type"]]["max_wokers"] = 1
    from jsonschema.exceptions import ValidationError

    with pytest.raises(ValidationError, match="max_wokers"):
        validate_config(fillout_defaults(broken))


def test_the_launcher_has_a_cpu_head_and_gpu_workers_running_the_project_image():
    config = launcher_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(w["node_config"]["InstanceType"].startswith(("g", "p")) for w in workers)
    assert all(0 <= w["min_workers"] <= w["max_workers"] <= config["max_workers"] for w in workers)
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"].endswith(f"cryoal:{pyproject()['project']['version']}")


def test_the_launcher_overrides_rays_default_setup_commands():
    """Left out, `setup_commands` falls back to Ray's AWS defaults, which install a nightly Ray."""
    config = launcher_config()
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in config, key
    assert not any("ray-wheels" in c or ("install" in c and "ray" in c) for c in config["setup_commands"])


# -- the Dockerfile ----------------------------------------------------------------------------

def test_the_dockerfile_installs_the_ray_version_pyproject_pins():
    text = dockerfile()
    base = re.search(r"^ARG BASE_IMAGE=rayproject/ray:(\d+\.\d+)\.\d+-py(\d)(\d+)-gpu\s*$", text, flags=re.M)
    assert base, "deploy/Dockerfile: expected ARG BASE_IMAGE=rayproject/ray:X.Y.Z-pyNNN-gpu"
    assert base.group(1) == ray_minor()
    for version in re.findall(r"ray\[[\w,]+\]==([\d.*]+)", text):
        assert version.startswith(ray_minor() + "."), version
    python = f"{base.group(2)}.{base.group(3)}"
    assert pyproject()["project"]["requires-python"] == f">={python}"


def test_the_dockerfile_torch_pin_is_within_pyprojects_range_and_matches_the_makefile():
    from packaging.specifiers import SpecifierSet

    (torch,) = re.findall(r"^ARG TORCH_VERSION=(\S+)", dockerfile(), flags=re.M)
    assert torch in SpecifierSet(pinned("torch"))
    assert f"torch=={torch}" in (ROOT / "Makefile").read_text()


def test_the_image_copies_the_project_and_installs_it_editable():
    text = dockerfile()
    assert re.search(r"^COPY .*\.\s+\.\s*$", text, flags=re.M)
    assert "pip install --no-cache-dir --no-deps -e ." in text
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv/", "runs/", "pools/", ".git/"} <= set(ignored)


def test_the_local_cluster_script_is_valid_bash():
    script = DEPLOY / "local_cluster.sh"
    assert script.stat().st_mode & 0o111, "deploy/local_cluster.sh is not executable"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
