"""Running a comparison's runs: each a train.py process (forked from a warm process that has
imported train.py; torchrun above one process), N at a time on disjoint cores, resumed and skipped
from their own logs, signals passed on; and what their logs and launches.jsonl say once they have
run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from comparison.plan import CompareError, Run
from comparison.warm import TRAIN, ForkedRun
from ssat.preemption import SIGNALS, exit_status
from ssat.runlog import read_records


def metric_value(value: float | None) -> float:
    return float("nan") if value is None else value  # an AUC undefined on one class


@dataclass
class Result:
    """What a finished run's log.jsonl says."""

    run: Run
    curve: list[float]  # evaluation top-1 after each validated epoch
    curve_epochs: list[int]  # those epochs, counted from 1
    final: float  # evaluation top-1 of the last epoch
    best: float  # the highest evaluation top-1 over the epochs
    test: dict | None  # the final test record, for datasets with a val and a test split
    train_seconds: float


# ------------------------------------------------------------------------------- the runs
def read_log(folder: Path) -> tuple[list[dict], dict | None]:
    """A run's epoch records (one per epoch: the last written wins) and its test record."""
    try:
        records, _ = read_records(folder / "log.jsonl")
    except FileNotFoundError:
        return [], None
    epochs, test = {}, None
    for record in records:
        if record.get("type") == "epoch":
            epochs[record["epoch"]] = record
        elif "test_acc1" in record:
            test = record
    return [epochs[e] for e in sorted(epochs)], test


def result(run: Run, metric: str = "acc1") -> Result | None:
    """The run's result in `metric` (--metric), or None while it is not finished: its log
    lacks the last epoch, or it stopped before its report (eval.json; the test split is read
    just before it), which the same command then writes."""
    epochs, test = read_log(run.folder)
    if not epochs or epochs[-1]["epoch"] < run.config.epochs - 1:
        return None
    if not (run.folder / "eval.json").exists():
        return None
    validated = [r for r in epochs if "val_acc1" in r]  # every --eval_interval-th, and the last
    curve = [metric_value(r.get(f"val_{metric}")) for r in validated]
    return Result(
        run=run,
        curve=curve,
        curve_epochs=[r["epoch"] + 1 for r in validated],
        final=curve[-1],
        best=metric_value(epochs[-1].get(f"best_{metric}", np.nanmax(curve))),  # train.py's best
        test=test,
        train_seconds=sum(r["train_seconds"] for r in epochs),
    )


@dataclass
class Launched:
    """A run in progress: its process, the thread printing its lines, the cores it holds."""

    run: Run
    head: str
    proc: subprocess.Popen
    printer: threading.Thread
    cores: list[int]
    began: float


def _print_lines(run: Run, stream) -> None:
    """The run's lines with its name; the config it prints first (indented JSON, saved in its
    config.json) left out."""
    in_config = False
    for line in stream:
        line = line.rstrip("\n")
        if line == "{":
            in_config = True
        elif line == "}" and in_config:
            in_config = False
        elif line and not in_config:
            print(f"  [{run.name}] {line}", flush=True)


def launch(run: Run, head: str, nproc: int, cores: list[int] | None) -> Launched:
    """Start `run` as its own process: forked from the warm process that has imported train.py
    (`comparison.warm`), or torchrun with `nproc` above 1. Its epoch lines are printed with the
    run's name, its progress bars and errors go to this command's stderr. With `cores`, the
    process is pinned to them and runs as many threads (or fewer, where OMP_NUM_THREADS says
    so): its loader and torch size themselves by the cores it may use."""
    env = None
    if cores is not None:
        given = os.environ.get("OMP_NUM_THREADS", "").split(",")[0]
        threads = min(int(given), len(cores)) if given.isdigit() and int(given) > 0 else len(cores)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if nproc == 1:
        proc = ForkedRun(run.argv, cores, env)
    else:
        proc = _torchrun(run, nproc, cores, env)
    printer = threading.Thread(target=_print_lines, args=(run, proc.stdout), daemon=True)
    printer.start()
    return Launched(run, head, proc, printer, cores or sorted(os.sched_getaffinity(0)), time.time())


def _torchrun(run: Run, nproc: int, cores: list[int] | None, env: dict | None) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    mine = sorted(os.sched_getaffinity(0))
    if cores is not None:
        os.sched_setaffinity(0, cores)  # this thread's mask, which the child inherits
    try:
        return subprocess.Popen(
            [*launcher, f"--nproc_per_node={nproc}", str(TRAIN), *run.argv],
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )
    finally:
        if cores is not None:
            os.sched_setaffinity(0, mine)


def core_shares(parallel: int) -> list[list[int]] | list[None]:
    """The cores of each of `parallel` runs at a time: disjoint equal shares of this process's
    cores (None, with one run at a time: it keeps them all)."""
    if parallel == 1:
        return [None]
    cores = sorted(os.sched_getaffinity(0))
    return [part.tolist() for part in np.array_split(cores, parallel)]


def _within(folder: Path, out: Path) -> str:
    """A run folder as launches.jsonl names it: within the output folder, which may move."""
    try:
        return str(folder.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(folder.resolve())


def record_launch(out: Path, job: Launched, parallel: int, status: int) -> None:
    """One line per run launched, in <output_dir>/launches.jsonl: how many ran at a time, on
    which cores, when and for how long (the table says what ran in parallel)."""
    line = {
        "folder": _within(job.run.folder, out),
        "parallel": parallel,
        "cores": job.cores,
        "began": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(job.began)),
        "began_unix": round(job.began, 2),
        "wall_seconds": round(time.time() - job.began, 2),
        "status": status,
    }
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "launches.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def train_all(runs: list[Run], nproc: int, parallel: int = 1, out: Path | None = None) -> int:
    """Train the runs not finished yet, `parallel` at a time, each on its share of the cores;
    0, or the status of the first run that stopped (a stopped run is continued by the same
    command). SIGTERM and SIGUSR1 go on to every run in progress (as SIGTERM to torchrun, which
    passes that on to its workers); they save where they stopped, and the status is then 128 +
    the signal. A failed run stops the others the same way, and is an error."""
    todo = []
    for i, run in enumerate(runs, 1):
        head = f"[{i}/{len(runs)}] {run.name}"
        if result(run) is not None:
            print(f"{head}: finished earlier, skipped ({run.folder})", flush=True)
        else:
            todo.append((head, run))
    free, active, received, failed = core_shares(parallel), [], [], []

    def stop(job: Launched, signum: int) -> None:
        job.proc.send_signal(signal.SIGTERM if nproc > 1 else signum)

    def forward(signum, frame):
        received.append(signum)
        for job in active:
            stop(job, signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # only it may set handlers
        previous = {signum: signal.signal(signum, forward) for signum in SIGNALS}
    try:
        while active or (todo and not received and not failed):
            while todo and free and not received and not failed:
                head, run = todo.pop(0)
                going_on = (run.folder / "checkpoint-last.pth").exists()
                cores = free.pop(0)
                where = "" if cores is None else f" on cores {','.join(map(str, cores))}"
                doing = "continuing" if going_on else "training"
                print(f"{head}: {doing} in {run.folder}{where}", flush=True)
                try:
                    active.append(launch(run, head, nproc, cores))
                except (EOFError, ConnectionError) as err:  # the warm process ended before it
                    free.append(cores)
                    if received:  # a signal to the whole process group: stopped as the runs are
                        again = "run the same command again to continue"
                        print(f"{head}: stopped before it began; {again}", flush=True)
                    else:
                        ended = f"the warm process that forks the runs ended first ({err})"
                        failed.append(CompareError(f"{run.name} did not start: {ended}"))
                    continue
                if received:  # it came while the run was starting (the warm process importing)
                    stop(active[-1], received[0])
            time.sleep(0.05)
            for job in [job for job in active if job.proc.poll() is not None]:
                job.printer.join()
                active.remove(job)
                free.append(None if parallel == 1 else job.cores)
                status = job.proc.returncode
                if out is not None:
                    record_launch(out, job, parallel, status)
                failed += finished(job, status, received)
                if failed and active and not received:  # the others save their place
                    for other in active:
                        other.proc.send_signal(signal.SIGTERM)
    except KeyboardInterrupt:  # Ctrl-C reached the runs too: they end at once
        for job in active:
            job.proc.wait()
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if failed:
        raise failed[0]
    return exit_status(received[0]) if received else 0


def finished(job: Launched, status: int, received: list[int]) -> list[CompareError]:
    """Say how the run ended; [] or the error its end is."""
    run, head = job.run, job.head
    stopped = {exit_status(s) for s in SIGNALS} | {exit_status(signal.SIGTERM)}
    if status != 0 and (received or status in stopped):
        print(f"{head}: stopped; run the same command again to continue", flush=True)
        return []
    if status != 0:
        return [CompareError(f"{run.name} failed (exit status {status}; see its error above)")]
    done = result(run)
    if done is None:
        return [
            CompareError(
                f"{run.name} ended without a record of its last epoch in "
                f"{run.folder / 'log.jsonl'}: remove {run.folder} to train it afresh"
            )
        ]
    print(f"{head}: done ({done.train_seconds:.1f} s of training steps)", flush=True)
    return []


def launches(runs: list[Run], out: Path) -> dict[str, Any]:
    """What launches.jsonl says of these runs: how many ran at a time on how many cores, and
    the wall time in which any of them was running (over every sitting)."""
    folders = {_within(run.folder, out) for run in runs}
    records = []
    if (out / "launches.jsonl").exists():
        records = read_records(out / "launches.jsonl")[0]
        records = [r for r in records if r.get("folder") in folders]
    ways = {}
    for r in records:
        key = (r["parallel"], len(r["cores"]))
        ways[key] = ways.get(key, 0) + 1
    spans = sorted((r["began_unix"], r["began_unix"] + r["wall_seconds"]) for r in records)
    wall, end = 0.0, -math.inf
    for begin, finish in spans:  # the union of the runs' spans
        wall += max(0.0, finish - max(begin, end))
        end = max(end, finish)
    return {
        "launches": len(records),
        "ways": [{"parallel": p, "cores_per_run": c, "launches": n} for (p, c), n in ways.items()],
        "wall_seconds": wall,
    }


def parallel_note(ran: dict[str, Any]) -> str:
    """One sentence: what ran in parallel, and the wall time."""
    if not ran["launches"]:
        return "Launches: not recorded (no launches.jsonl lines for these runs)."
    ways = []
    for w in ran["ways"]:
        cores = f"{w['cores_per_run']} core" + ("s" if w["cores_per_run"] != 1 else "")
        how = "one at a time" if w["parallel"] == 1 else f"{w['parallel']} at a time"
        ways.append(f"{w['launches']} launched {how}, each on {cores}")
    minutes = ran["wall_seconds"] / 60
    return (
        f"Launches: {'; '.join(ways)} (pinned to disjoint cores when more than one at a time); "
        f"wall time with a run in progress: {minutes:.1f} min."
    )
