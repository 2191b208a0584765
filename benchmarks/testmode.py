"""Time `taskpgm run --test-mode` end to end in a fresh run directory, stage by stage, against issue 24's 90 s.

    .venv/bin/python benchmarks/testmode.py            # prints the stage table and the ratio to the target

Also writes it to benchmarks/results/testmode.txt. Measure on an idle machine: Ray workers share the cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 90.0


def main() -> None:
    out = Path(tempfile.mkdtemp(prefix="taskpgm-testmode-")) / "run"
    taskpgm = Path(sys.executable).parent / "taskpgm"
    start = time.perf_counter()
    subprocess.run([str(taskpgm), "run", "--test-mode", "--output-dir", str(out)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    stages = json.loads((out / "stages.json").read_text())
    lines = [f"taskpgm run --test-mode in {out}"]
    lines += [f"  {name:<9} {rec['seconds']:7.1f} s" for name, rec in stages.items()]
    lines.append(f"  wall      {wall:7.1f} s  (target {TARGET_S:.0f} s: ratio {wall / TARGET_S:.2f}, "
                 f"{'met' if wall <= TARGET_S else 'NOT met'})")
    print("\n".join(lines))
    (Path(__file__).resolve().parent / "results" / "testmode.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
