"""Every benchmark runs both ways the READMEs give: as a module (`python -m bench.x`, what
bench/gpu_check.sh runs, tested by tests/test_gpu_check.py) and as a file (`python bench/x.py`):
`--help` as a file, without PYTHONPATH and outside the checkout, imports this checkout and
prints its usage.

One interpreter runs every script in turn as `python bench/x.py` would (`runpy.run_path` as
`__main__`, `sys.argv` set), so torch is imported once rather than once per script; before
each script the checkout leaves `sys.path` and its modules leave `sys.modules`, so each script
must find the checkout by itself, as it does when run alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RUN_EACH = r"""
import contextlib, io, json, runpy, sys
from pathlib import Path

repo = Path(sys.argv[1])
local = {p.stem for p in repo.glob("*.py")} | {p.parent.name for p in repo.glob("*/__init__.py")}
local.add("bench")
for script in sys.argv[2:]:
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != repo]
    sys.path.insert(0, str(Path(script).parent))  # what `python bench/x.py` puts first
    for name in [m for m in sys.modules if m.split(".")[0] in local]:
        del sys.modules[name]
    sys.argv = [script, "--help"]
    out, err, status = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as stop:
            status = stop.code or 0
        except BaseException as failure:
            status = f"{type(failure).__name__}: {failure}"
    sys.path.pop(0)
    print(json.dumps({"script": script, "status": status, "out": out.getvalue()[:500],
                      "err": err.getvalue()[-3000:]}), flush=True)
"""


def test_every_benchmark_runs_as_a_file(tmp_path):
    scripts = sorted((REPO / "bench").glob("*.py"))
    assert {"conversion.py", "end_to_end.py", "loaders.py", "storage.py", "train_step.py"} <= {
        p.name for p in scripts
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the script's own way
    done = subprocess.run(
        [sys.executable, "-c", RUN_EACH, str(REPO), *map(str, scripts)],
        cwd=tmp_path,  # not the checkout: it is not on the path unless a script puts it there
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["script"] for r in results] == list(map(str, scripts))
    for result in results:
        name = Path(result["script"]).name
        assert result["status"] == 0, f"python bench/{name} --help:\n{result['err']}"
        assert result["out"].startswith("usage:"), f"python bench/{name} --help:\n{result['out']}"
