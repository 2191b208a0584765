"""The shipped cluster configs and launch scripts: valid for Ray and KubeRay, loopback, authenticated, secret-free,
and every multi-node config with shared storage where Ray Train writes.

Fast (no cluster is started): the cluster-launcher YAMLs are checked against Ray's own schema and
config preparation, the KubeRay manifests against the fields the operator requires, and the run each
multi-node config documents is traced through the real ``build_trainer`` to its Ray Train ``storage_path``.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_YAMLS = ["clusters/aws-gpu.yaml", "clusters/gcp-gpu.yaml", "clusters/local.yaml"]
RAYCLUSTER_YAML = "clusters/kuberay-raycluster.yaml"
RAYJOB_YAML = "launch/rayjob.yaml"
PVC_YAML = "clusters/kuberay-pvc.yaml"
FILES_POD_YAML = "launch/files-pod.yaml"
ALL_YAMLS = [*LAUNCHER_YAMLS, RAYCLUSTER_YAML, RAYJOB_YAML]
CLOUD_LAUNCHER_YAMLS = ["clusters/aws-gpu.yaml", "clusters/gcp-gpu.yaml"]
MULTI_NODE_YAMLS = [*CLOUD_LAUNCHER_YAMLS, RAYCLUSTER_YAML, RAYJOB_YAML]
SHARED = "/mnt/taskpgm"  # where every multi-node config mounts its shared file system
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
        (PVC_YAML, f"kubectl apply -f {PVC_YAML}"),
        (FILES_POD_YAML, f"kubectl apply -f {FILES_POD_YAML}"),
        ("configs/gpu-8b.yaml", "launch/submit.sh configs/gpu-8b.yaml"),
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


def test_request_gpus_says_how_to_use_it():
    text = (REPO / "launch/request_gpus.py").read_text()
    assert 'launch/submit.sh --wait --command "python launch/request_gpus.py" 16' in text
    result = subprocess.run([sys.executable, str(REPO / "launch/request_gpus.py"), "--help"], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "0: release the request" in result.stdout


# --- Shared storage where Ray Train writes (issue 17) -----------------------------------------------


@pytest.mark.parametrize("path", CLOUD_LAUNCHER_YAMLS)
def test_launcher_yaml_mounts_shared_storage_on_every_node_and_in_the_container(path):
    config = load(path)
    # initialization_commands run on every node's host before Docker starts (Ray's schema says so).
    schema = ray_schema()["properties"]["initialization_commands"]["description"]
    assert "outside the container" in schema
    init = " ".join(config["initialization_commands"])
    assert f"mountpoint -q {SHARED} ||" in init  # idempotent: a re-run of `ray up` keeps the mount
    assert re.search(rf"sudo mount -t nfs4? -o \S+ \S+:/\S* {SHARED};", init), f"{path}: no NFS mount at {SHARED}"
    assert f"chmod 1777 {SHARED}" in init  # the container's `ray` user writes there
    for name, node_type in config["available_node_types"].items():
        assert "initialization_commands" not in node_type, f"{path}: {name} replaces the mount commands"
        assert "run_options" not in node_type.get("docker", {}), f"{path}: {name} replaces the bind mount"
    assert f"--volume {SHARED}:{SHARED}" in config["docker"]["run_options"]


def _pod_specs(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"]["template"]["spec"])] + [
        (g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]


@pytest.mark.parametrize("path", [RAYCLUSTER_YAML, RAYJOB_YAML])
def test_kuberay_head_and_every_worker_mount_the_shared_claim(path):
    manifest = load(path)
    spec = manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]
    pvc = load(PVC_YAML)
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for group, pod in _pod_specs(spec):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        ray_container = pod["containers"][0]
        mounts = [m for m in ray_container.get("volumeMounts", []) if m["mountPath"] == SHARED]
        assert len(mounts) == 1, f"{path}: {group} does not mount {SHARED}"
        claim = volumes[mounts[0]["name"]]["persistentVolumeClaim"]
        assert claim["claimName"] == pvc["metadata"]["name"] and not claim.get("readOnly"), (path, group)


def _documented_run(path: str) -> tuple[str, list[str]]:
    """The config (and extra taskpgm args) that a multi-node config's header or entrypoint runs."""
    if path == RAYJOB_YAML:
        words = load(path)["spec"]["entrypoint"].split()
        assert words[:2] == ["taskpgm", "run"]
        return words[2], words[3:]
    match = re.search(r"launch/submit\.sh (configs/\S+\.yaml)((?: --\S+ \S+)*)", header(path))
    assert match, f"{path}: the header does not show the launch/submit.sh CONFIG it runs"
    return match.group(1), match.group(2).split()


@pytest.mark.parametrize("path", MULTI_NODE_YAMLS)
def test_ray_train_storage_path_of_the_documented_run_is_on_the_shared_mount(path, monkeypatch):
    """Traced through the real build_trainer: storage_path = <output_dir>/train/ray, under the shared mount."""
    import types

    import ray.train.torch

    import taskpgm_ray.models
    from taskpgm_ray.cli import main
    from taskpgm_ray.config import load_config
    from taskpgm_ray.train import launch

    config_path, extra = _documented_run(path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the shipped GPU configs name hub models and datasets
    monkeypatch.setenv("WANDB_MODE", "disabled")  # no W&B group file on a mount this machine lacks
    cfg = load_config(REPO / config_path)
    args = dict(zip(extra[::2], extra[1::2]))
    if "--output-dir" in args:
        cfg.output_dir = args["--output-dir"]
    assert set(args) <= {"--output-dir"}, args
    assert cfg.output_dir.startswith(SHARED + "/"), f"{config_path}: output_dir {cfg.output_dir} is not on {SHARED}"
    # Data reaches the cluster: hub datasets, or files on the shared mount (data/ is not uploaded).
    for task in cfg.tasks:
        assert task.source == "hub" or task.path.startswith(SHARED + "/"), (config_path, task.name)
    assert main(["config", "show", str(REPO / config_path)]) == 0

    captured = {}
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", lambda *a, **kw: captured.update(kw) or kw)
    monkeypatch.setattr(launch, "validate_mixture", lambda weights, tasks, cfg: dict(weights))
    monkeypatch.setattr(taskpgm_ray.models, "ensure_run_tokenizer", lambda model, out: Path(out) / "tokenizer")
    tasks = [types.SimpleNamespace(name=t.name, train=[], eval=[]) for t in cfg.tasks]
    launch.build_trainer(cfg, tasks, {t.name: 1 / len(tasks) for t in tasks}, run_dir=cfg.output_dir)
    storage = captured["run_config"].storage_path
    assert storage == f"{cfg.output_dir}/train/ray" and storage.startswith(SHARED + "/"), (path, storage)
    assert captured["scaling_config"].use_gpu and captured["scaling_config"].num_workers > 1


def test_gpu_config_opens_with_its_command_and_batch_arithmetic():
    text = header("configs/gpu-8b.yaml")
    assert "Qwen/Qwen3-0.6B-Base" in text  # the proxy, named until the config can hold it
    assert re.search(r"16 workers x micro-batch 1 x 8 accum = 128 examples per step", text)
    cfg = yaml.safe_load((REPO / "configs/gpu-8b.yaml").read_text())
    train = cfg["train"]
    assert train["num_workers"] * train["micro_batch_size"] * train["grad_accum"] == 128
    assert f"x {train['steps']:,} steps = {128 * train['steps']:,} examples" in text
