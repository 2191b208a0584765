"""Time `taskpgm run --test-mode` end to end in a fresh run directory, stage by stage, against the 3-minute target.

    .venv/bin/python benchmarks/testmode.py            # prints the stage table and the ratio to the target
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 180.0


def main() -> None:
    out = Path(tempfile.mkdtemp(prefix="taskpgm-testmode-")) / "run"
    taskpgm = Path(sys.executable).parent / "taskpgm"
    start = time.perf_counter()
    subprocess.run([str(taskpgm), "run", "--test-mode", "--output-dir", str(out)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    stages = json.loads((out / "stages.json").read_text())
    print(f"taskpgm run --test-mode in {out}")
    for name, rec in stages.items():
        print(f"  {name:<9} {rec['seconds']:7.1f} s")
    print(f"  wall      {wall:7.1f} s  (target {TARGET_S:.0f} s: ratio {wall / TARGET_S:.2f}, "
          f"{'met' if wall <= TARGET_S else 'NOT met'})")


if __name__ == "__main__":
    main()
