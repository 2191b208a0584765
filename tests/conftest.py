"""Shared fixtures. Tests are offline: nothing is downloaded; W&B runs offline."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from taskpgm_ray.config import TEST_CONFIG  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray cluster (token auth on, dashboard on 127.0.0.1), shared by every module that asks for
    it: started by the first, left up for the next (a start costs seconds), again if a test shut it down."""
    from taskpgm_ray.distributed.cluster import init_ray

    init_ray(num_cpus=2)
    yield


def pytest_sessionfinish(session, exitstatus):
    """Shut the shared cluster down once, at the end."""
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="session")
def suite_dir(tmp_path_factory) -> Path:
    """The full synthetic suite (seed 7), written once per session."""
    from taskpgm_ray.tasks.synthetic import write_suite

    out = tmp_path_factory.mktemp("suite") / "suite"
    write_suite(out, 7)
    return out


@pytest.fixture
def test_config_dict() -> dict:
    """The shipped test-mode config as a dict, for tests to modify."""
    return yaml.safe_load(TEST_CONFIG.read_text())


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path
