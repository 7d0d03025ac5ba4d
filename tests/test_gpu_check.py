"""bench/gpu_check.sh --dry-run: every step of the GPU check at tiny sizes on the CPU, through the
real benchmarks (photos and their .beton, the training steps with the ffcv loader, the published
recipe end to end, the loaders), ending with a table that has every row and no step that failed
or ran out of time."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = ("mae_vit_tiny ssat", "vit_small scratch", "vit_base scratch")
ROWS = (
    "device, software",
    "GPU tests (pytest -m gpu)",
    "photos: JPEGs -> .beton",
    "training steps compiled ahead (kernel cache)",
    *(f"{run}: {what}" for run in RUNS for what in ("img/s eager / compiled", "MFU")),
    *(f"{run}: ffcv loader / synthetic" for run in RUNS),
    "end to end, published (ImageFolder+PIL+timm, eager fp16): img/s",
    "end to end, ours (ffcv + device aug, compiled bf16): img/s",
    "end to end, ours / published",
    "loader ffcv, 1 crop(s): img/s",
    "loader ffcv-engine, 1 crop(s): img/s",
    "whole check (to the table)",
)


def test_dry_run_ends_with_every_row(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "WORK": str(tmp_path / "work")}
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    table = (out / "table.md").read_text()
    assert done.stdout.rstrip().endswith(table.rstrip())  # the table ends the output
    rows = {}
    for line in table.splitlines()[2:]:
        if line.startswith("|"):
            check, result, target, met = (cell.strip() for cell in line.strip("|").split("|"))
            rows[check] = (result, target, met)
    assert [r for r in ROWS if r not in rows] == [], table
    broken = {
        check: result
        for check, (result, _, _) in rows.items()
        if re.match(r"(timed out|failed|not run|not measured|skipped)", result)
    }
    assert broken == {
        "training steps compiled ahead (kernel cache)": "skipped: dry run: nothing is compiled"
    }, table
    assert all(met in ("", "-") for _, _, met in rows.values()), table  # no verdicts: dry run
    assert re.fullmatch(r"\d+ skipped in .*", rows["GPU tests (pytest -m gpu)"][0]), table
    assert re.fullmatch(r"\d+\.\d\dx", rows["end to end, ours / published"][0]), table
    assert rows["end to end, ours / published"][1] == ">= 5x"
    assert rows["mae_vit_tiny ssat: img/s eager / compiled"][1] == ">= 15,000 compiled"
    assert rows["vit_base scratch: MFU"][1] == ">= 35%"
