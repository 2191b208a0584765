"""Job submission end to end: a real single-node Ray cluster on 127.0.0.1 with token authentication,
started by launch/local_cluster.sh, and jobs sent by launch/submit.sh.

The cluster lives in its own temp dir and on free ports, so it neither clashes with nor is picked up
by the `ray.init()` clusters of other tests, and `local_cluster.sh stop` ends only its processes
(a bare `ray stop` would end every Ray process of this user). About 35 s.
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# The test-mode pipeline as a job, with the Tune search switched off and shorter runs: the search itself is
# covered by tests/test_pipeline.py, and the suite must stay under 20 minutes on 2 cores.
JOB_COMMAND = "taskpgm --set tune.enabled=false --set probes.steps=20 --set train.steps=30 run"

REPO = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = str(REPO / "launch" / "local_cluster.sh")
SUBMIT = str(REPO / "launch" / "submit.sh")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def non_loopback_ip() -> str | None:
    """This machine's address on its default route, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET: nothing is sent
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


class Cluster:
    def __init__(self, root: Path):
        self.token = secrets.token_hex(24)
        token_path = root / "token"
        token_path.write_text(self.token)
        token_path.chmod(0o600)
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
        env.update(
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            RAY_TEMP_DIR=str(root / "ray"),
            RAY_AUTH_TOKEN_PATH=str(token_path),
            RAY_PORT=str(free_port()),
            DASHBOARD_PORT=str(self.dashboard_port),
            NUM_CPUS="2",
        )
        self.env = env

    def run(self, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(args),
            env={**self.env, **(env or {})},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(self, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run(SUBMIT, "--wait", "--address", self.address, *args, env=env, timeout=timeout)

    def get(self, path: str, token: str | None) -> int:
        request = urllib.request.Request(self.address + path)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code


@pytest.fixture(scope="module")
def cluster():
    # A short path: Ray's unix sockets live under the temp dir and paths are limited to ~100 bytes.
    root = Path(tempfile.mkdtemp(prefix="tpr-", dir="/tmp"))
    cluster = Cluster(root)
    # Free ports for the daemons that otherwise take fixed ones (10001, 52365).
    ports = [f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
    started = cluster.run(LOCAL_CLUSTER, "start", *ports, timeout=90)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield cluster
    finally:
        stopped = cluster.run(LOCAL_CLUSTER, "stop", timeout=90)
        shutil.rmtree(root, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def report(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"


def test_job_api_refuses_requests_without_the_token(cluster):
    assert cluster.get("/api/jobs/", token=None) == 401
    assert cluster.get("/api/jobs/", token="not-the-token") == 403
    assert cluster.get("/api/jobs/", token=cluster.token) == 200

    # The Ray CLI with no token anywhere (no RAY_AUTH_MODE, no token file in an empty HOME).
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_TOKEN_PATH",)}
    with tempfile.TemporaryDirectory() as home:
        refused = subprocess.run(
            ["ray", "job", "submit", "--address", cluster.address, "--no-wait", "--", "echo", "hi"],
            env={**env, "HOME": home},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert refused.returncode != 0
    assert "Unauthorized" in refused.stderr + refused.stdout, report(refused)
    request = urllib.request.Request(cluster.address + "/api/jobs/")
    request.add_header("Authorization", f"Bearer {cluster.token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        jobs = json.load(response)
    assert not any(job.get("entrypoint") == "echo hi" for job in jobs)


def test_dashboard_is_not_reachable_from_the_network(cluster):
    ip = non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback address")
    with pytest.raises(OSError), socket.create_connection((ip, cluster.dashboard_port), timeout=3):
        pass


def test_submit_passes_the_wandb_environment_and_leaves_out_local_state(cluster):
    probe = (
        'python -c \'import os, sys; print("PROBE", sys.argv[1:], os.environ.get("WANDB_MODE"), '
        'os.environ.get("WANDB_API_KEY", "")[::-1] == "tset-rof-yek-ekaf", os.path.isdir(".venv"), '
        'os.path.isfile("launch/submit.sh"))\''
    )
    result = cluster.submit(
        "--command", probe, "configs/x.yaml", "--output-dir", "/tmp/a b", env={"WANDB_API_KEY": "fake-key-for-test"}
    )
    assert result.returncode == 0, report(result)
    assert "PROBE ['configs/x.yaml', '--output-dir', '/tmp/a b'] offline True False True" in result.stdout
    assert "fake-key-for-test" not in result.stdout + result.stderr  # never echoed
    assert "ray job logs --address" in result.stdout and "--follow taskpgm-" in result.stdout


def test_submit_reports_a_failed_job(cluster):
    result = cluster.submit("--command", "python -c 'raise SystemExit(3)'", "configs/x.yaml")
    assert result.returncode == 1, report(result)
    assert "FAILED" in result.stdout


@pytest.mark.skipif(
    not (REPO / "taskpgm_ray" / "cli.py").exists() or not (REPO / "configs" / "test.yaml").exists(),
    reason="the taskpgm CLI or configs/test.yaml is not written yet",
)
def test_submit_runs_taskpgm_on_the_cluster(cluster, tmp_path):
    out = tmp_path / "run"
    result = cluster.submit("--command", JOB_COMMAND, "configs/test.yaml", "--output-dir", str(out), timeout=900)
    assert result.returncode == 0, report(result)
    assert json.loads((out / "tasks.json").read_text())["tasks"]
    mixture = json.loads((out / "mixture.json").read_text())
    assert mixture["format"] == "taskpgm-mixture/1" and abs(sum(mixture["weights"].values()) - 1) < 1e-9
    assert (out / "train" / "checkpoint").is_dir()
    assert (out / "report" / "summary.json").is_file() and (out / "report" / "mixture.png").is_file()
