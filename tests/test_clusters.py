"""The shipped cluster configs and launch scripts: valid for Ray and KubeRay, loopback, authenticated, secret-free.

Fast (no cluster is started): the cluster-launcher YAMLs are checked against Ray's own schema and
config preparation, the KubeRay manifests against the fields the operator requires.
"""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_YAMLS = ["clusters/aws-gpu.yaml", "clusters/gcp-gpu.yaml", "clusters/local.yaml"]
RAYCLUSTER_YAML = "clusters/kuberay-raycluster.yaml"
RAYJOB_YAML = "launch/rayjob.yaml"
ALL_YAMLS = [*LAUNCHER_YAMLS, RAYCLUSTER_YAML, RAYJOB_YAML]
SHELL_SCRIPTS = ["launch/submit.sh", "launch/local_cluster.sh"]
SHIPPED_FILES = sorted(
    str(p.relative_to(REPO)) for d in ("clusters", "launch") for p in (REPO / d).rglob("*") if p.is_file()
)


def load(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text())


def header(path: str) -> str:
    """The comment block a file opens with."""
    lines = (REPO / path).read_text().splitlines()
    if lines and lines[0].startswith("#!"):
        lines = lines[1:]
    block = []
    for line in lines:
        if not line.startswith("#"):
            break
        block.append(line)
    return "\n".join(block)


def ray_schema() -> dict:
    path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(path) as f:
        return json.load(f)


# --- Ray cluster launcher ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", LAUNCHER_YAMLS)
def test_launcher_yaml_passes_rays_schema_and_config_preparation(path):
    jsonschema = pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(path)
    jsonschema.validate(config, ray_schema())
    # What `ray up` does before it launches anything: defaults merged, node types checked.
    validate_config(prepare_config(config))


@pytest.mark.parametrize("path", LAUNCHER_YAMLS)
def test_launcher_yaml_starts_ray_on_loopback_dashboard_with_token_auth(path):
    config = load(path)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in config[commands]:
            if "ray start" in command:
                assert "RAY_AUTH_MODE=token" in command, f"{path}: {command!r} starts Ray without token auth"
    assert 1 <= config["idle_timeout_minutes"] <= 30


@pytest.mark.parametrize("path", ["clusters/aws-gpu.yaml", "clusters/gcp-gpu.yaml"])
def test_cloud_yaml_has_cpu_head_and_autoscaling_gpu_workers(path):
    config = load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, f"{path} has no GPU worker type"
    for name, node_type in gpu_types.items():
        assert node_type["min_workers"] == 0, f"{path}: {name} keeps GPUs running while idle"
    assert any(t["max_workers"] > 0 for t in gpu_types.values())
    # The repository and the Ray token reach every node; credentials do not.
    assert config["file_mounts"]["~/taskpgm_ray"] == "."
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("pip install" in c and "~/taskpgm_ray" in c for c in config["setup_commands"])


def test_local_yaml_stays_on_loopback():
    config = load("clusters/local.yaml")
    assert config["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in " ".join(config["head_start_ray_commands"])


# --- KubeRay ----------------------------------------------------------------------------------------


def check_raycluster_spec(spec: dict, where: str) -> None:
    """The fields the KubeRay operator needs to build the head and the GPU workers."""
    assert spec["authOptions"]["mode"] == "token", f"{where}: token authentication is off"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["template"]["spec"]["containers"][0]["image"]
    assert spec["workerGroupSpecs"], f"{where}: no worker group"
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        container = group["template"]["spec"]["containers"][0]
        assert container["image"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for container in all_containers(spec):
        for env in container.get("env", []):
            if env["name"] == "WANDB_API_KEY":
                assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"], where


def all_containers(spec: dict) -> list:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_raycluster_has_what_the_operator_needs():
    manifest = load(RAYCLUSTER_YAML)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"]
    check_raycluster_spec(manifest["spec"], RAYCLUSTER_YAML)
    assert manifest["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert manifest["spec"]["workerGroupSpecs"][0]["minReplicas"] == 0


def test_rayjob_runs_taskpgm_and_shuts_down():
    manifest = load(RAYJOB_YAML)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayJob"
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    assert re.match(r"taskpgm run configs/\S+\.yaml", spec["entrypoint"])
    assert spec["shutdownAfterJobFinishes"] is True
    check_raycluster_spec(spec["rayClusterSpec"], RAYJOB_YAML)
    key_sources = [
        env["valueFrom"]["secretKeyRef"]
        for c in all_containers(spec["rayClusterSpec"])
        for env in c.get("env", [])
        if env["name"] == "WANDB_API_KEY"
    ]
    assert key_sources, "the W&B key must come from a Kubernetes Secret"


def test_shipped_images_match_the_installed_ray():
    images = []
    for path in [RAYCLUSTER_YAML, RAYJOB_YAML, "clusters/aws-gpu.yaml", "clusters/gcp-gpu.yaml", "clusters/Dockerfile"]:
        images += re.findall(r"rayproject/ray:([\w.\-]+)", (REPO / path).read_text())
    assert images
    assert all(tag.startswith(ray.__version__ + "-") for tag in images), (images, ray.__version__)


# --- Every shipped file -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, command",
    [
        ("clusters/aws-gpu.yaml", "ray up clusters/aws-gpu.yaml"),
        ("clusters/gcp-gpu.yaml", "ray up clusters/gcp-gpu.yaml"),
        ("clusters/local.yaml", "ray up clusters/local.yaml"),
        (RAYCLUSTER_YAML, f"kubectl apply -f {RAYCLUSTER_YAML}"),
        (RAYJOB_YAML, f"kubectl apply -f {RAYJOB_YAML}"),
        ("clusters/Dockerfile", "docker build -f clusters/Dockerfile"),
        ("launch/submit.sh", "launch/submit.sh"),
        ("launch/local_cluster.sh", "launch/local_cluster.sh start"),
    ],
)
def test_file_opens_with_the_command_that_uses_it(path, command):
    assert command in header(path), f"{path} should open with a comment giving `{command}`"


@pytest.mark.parametrize("path", ALL_YAMLS)
def test_yaml_header_gives_cost_and_dashboard_access(path):
    text = header(path)
    assert "Cost" in text
    if path != "clusters/local.yaml":
        assert re.search(r"\$\d[\d.]*(-[\d.]+)?/h", text), f"{path}: no $/hour figure"
        assert re.search(r"idle", text), f"{path}: does not say when idle workers go"
    assert re.search(r"ray dashboard|kubectl port-forward|http://127\.0\.0\.1:8265", text)


@pytest.mark.parametrize("path", SHIPPED_FILES)
def test_dashboard_binds_loopback(path):
    text = (REPO / path).read_text()
    hosts = re.findall(r"dashboard-host[\"']?\s*[=:]\s*[\"']?([\w.]+)", text)
    for host in hosts:
        if path == RAYJOB_YAML:
            # The one exception, explained in its header: the operator polls the job API through the
            # head Service. It must stay behind token authentication.
            assert load(RAYJOB_YAML)["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
            continue
        assert host == "127.0.0.1", f"{path}: dashboard-host {host}"


# Shapes of real credentials, and of a literal value given to a secret-bearing variable.
CREDENTIAL_PATTERNS = [
    r"AKIA[0-9A-Z]{16}",  # AWS access key id
    r"aws_secret_access_key",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"\bgh[pousr]_[A-Za-z0-9]{20,}",  # GitHub token
    r"\bhf_[A-Za-z0-9]{20,}",  # Hugging Face token
    r"\b[0-9a-f]{40}\b",  # W&B API keys are 40 hex characters
    r"(WANDB_API_KEY|RAY_AUTH_TOKEN|HF_TOKEN)\s*[=:]\s*[\"']?[A-Za-z0-9_\-]{8,}",
    r"name:\s*(WANDB_API_KEY|RAY_AUTH_TOKEN)\s*\n\s*value:",
    r"(?i)password\s*[=:]",
]


@pytest.mark.parametrize("path", SHIPPED_FILES)
def test_no_credentials_in_shipped_files(path):
    text = (REPO / path).read_text()
    for pattern in CREDENTIAL_PATTERNS:
        match = re.search(pattern, text)
        assert match is None, f"{path} looks like it holds a credential: {match.group(0)!r}"


@pytest.mark.parametrize("path", SHIPPED_FILES)
def test_no_file_turns_authentication_off(path):
    text = (REPO / path).read_text()
    assert not re.search(r"(?i)(RAY_AUTH_MODE|mode)[\"']?\s*[=:]\s*[\"']?disabled", text), path
    assert "--disable-auth" not in text


# --- Scripts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHELL_SCRIPTS)
def test_shell_script_parses_and_is_strict(path):
    subprocess.run(["bash", "-n", str(REPO / path)], check=True)
    assert "set -euo pipefail" in (REPO / path).read_text()
    assert os.access(REPO / path, os.X_OK), f"{path} is not executable"


def test_submit_without_config_says_what_is_missing():
    result = subprocess.run([str(REPO / "launch/submit.sh")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "missing CONFIG" in result.stderr
    usage = subprocess.run([str(REPO / "launch/submit.sh"), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "launch/submit.sh [--wait]" in usage.stdout
