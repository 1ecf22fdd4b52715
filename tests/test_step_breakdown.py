"""``benchmarks/step_breakdown.py`` wraps the tracker's per-step functions by name: a rename that the script
does not follow would break it silently for whoever runs it next, so it runs here, briefly (numbers unchecked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "step_breakdown.py"


def test_the_step_breakdown_benchmark_runs_and_times_every_piece():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--k", "8", "--steps", "30", "--warmup", "5", "--models", "logreg"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    for piece in ("hooks", "floor in step", "beyond the floor", "optimizer map", "ids", "rest"):
        assert piece in rows, done.stdout
    assert float(rows["hooks"].split("|")[2]) > float(rows["floor in step"].split("|")[2]) > 0
    assert "aten operators dispatched per step" in done.stdout
