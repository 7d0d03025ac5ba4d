"""What a short run of a comparison costs: train.py as a new interpreter, against forked warm.

    python -m bench.run_start [--repeats 5] [--epochs 1] [--subset_size 0.05]

Trains one short SSAT run on the bundled digits (mae_vit_micro at 16 px, patch 4, batch 16, on
`--subset_size` of the training split for `--epochs`: with the defaults 3 optimizer steps, then
the validation and the test split) `--repeats` times each way, the two ways taking turns, on one
core as `compare.py --parallel 2` runs them on two: `python train.py ...` started by
`subprocess` (how compare.py started every run before), and `comparison.warm.ForkedRun` (how it
starts a one-process run now: forked from a process that has imported train.py's modules). One
run each way goes first, untimed: it converts the digits and starts the warm process. Each
figure is the wall time from the start to the exit of a run, median over the repeats. The last
line is `RATIO warm/new-interpreter seconds per run: X.XX`: the share of a run's time that is
left when its start is warm.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python bench/x.py): import this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comparison.warm import TRAIN, ForkedRun
from storage.version import add_version_flag


def run_argv(data: Path, out: Path, epochs: int, subset: float) -> list[str]:
    return [
        *("--data_path", "digits", "--data_dir", str(data), "--output_dir", str(out)),
        *("--model", "mae_vit_micro", "--img_size", "16", "--patch_size", "4"),
        *("--batch_size", "16", "--epochs", str(epochs), "--subset_size", str(subset)),
    ]


def new_interpreter(argv: list[str], cores: list[int], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(TRAIN), *argv],
        stdout=subprocess.DEVNULL,
        env=env,
        preexec_fn=lambda: os.sched_setaffinity(0, cores),
    )
    if done.returncode != 0:
        raise SystemExit(f"python train.py {' '.join(argv)} ended with status {done.returncode}")
    return time.perf_counter() - start


def forked(argv: list[str], cores: list[int], env: dict) -> float:
    start = time.perf_counter()
    run = ForkedRun(argv, cores, env)
    run.stdout.read()
    status = run.wait()
    if status != 0:
        raise SystemExit(f"train.py {' '.join(argv)}, forked warm, ended with status {status}")
    return time.perf_counter() - start


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--subset_size", type=float, default=0.05)
    return add_version_flag(p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))[:1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ways = {"new interpreter": new_interpreter, "forked warm": forked}
    times = {name: [] for name in ways}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        for i in range(args.repeats + 1):
            for name, way in ways.items():
                out = Path(tmp) / f"{name.replace(' ', '_')}{i}"
                seconds = way(run_argv(data, out, args.epochs, args.subset_size), cores, env)
                if i:  # the first of each way is untimed
                    times[name].append(seconds)
    for name, values in times.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"{name}: median {statistics.median(values):.2f} s per run ({shown})")
    ratio = statistics.median(times["forked warm"]) / statistics.median(times["new interpreter"])
    print(f"on core {cores[0]}, {args.epochs} epoch(s) on {args.subset_size} of the digits")
    print(f"RATIO warm/new-interpreter seconds per run: {ratio:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
