"""benchmarks/gpu_check.sh: it refuses to run without a GPU (no CPU fallback), and its --dry-run path (the same
stages on CPU with tiny sizes) runs to the end and prints every measurement."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_without_a_gpu_it_fails_loudly_and_does_not_fall_back_to_cpu():
    out = run(timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("gpu_check: FAILED: no NVIDIA GPU on this machine") and "--dry-run" in out.stderr


def test_the_python_side_refuses_a_cpu_only_torch_too():
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 2 and "gpu_check: FAILED: torch" in out.stderr and "sees no CUDA device" in out.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_dry_run_runs_every_stage_and_prints_every_measurement(tmp_path):
    out = run("--dry-run", "--keep", str(tmp_path), timeout=480)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("gpu_check: ")]
    text = "\n".join(lines)
    for stage in ("build model", "tasks", "probes", "estimate", "select", "train", "forward vs scoring", "total"):
        assert f"gpu_check: {stage} " in text, stage
    assert "tokens/s vs raw forward" in text and "fine-tune:" in text and "estimate stage end to end" in text
    assert lines[-1] == "gpu_check: OK (dry run)"
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["forward"]["scoring_vs_raw"] > 0 and result["finetune_tokens_per_s"] > 0
    assert [s["stage"] for s in result["stages"]][1:6] == ["tasks", "probes", "estimate", "select", "train"]
    assert (tmp_path / "run" / "train" / "checkpoint" / "config.json").exists()
