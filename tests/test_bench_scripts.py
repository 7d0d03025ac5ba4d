"""Every benchmark runs both ways the READMEs give: as a module (`python -m bench.x`, what
bench/gpu_check.sh runs, tested by tests/test_gpu_check.py) and as a file (`python bench/x.py`):
`--help` as a file, without PYTHONPATH, imports this checkout and prints its usage."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_benchmark_runs_as_a_file():
    scripts = sorted((REPO / "bench").glob("*.py"))
    assert {"conversion.py", "end_to_end.py", "loaders.py", "train_step.py"} <= {
        p.name for p in scripts
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the script's own way
    runs = {  # side by side: each spends its seconds importing torch
        p.name: subprocess.Popen(
            [sys.executable, str(p), "--help"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in scripts
    }
    for name, run in runs.items():
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, f"python bench/{name} --help:\n{err[-3000:]}"
        assert out.startswith("usage:"), f"python bench/{name} --help:\n{out[:500]}"
