"""`python compare.py`: scratch and FGCR over two seeds on a fabricated photo folder, stopped
part-way by SIGTERM and continued, then skipped when finished; the test split's numbers where a
log holds them; the errors a user meets first."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import matplotlib.image
import pytest

import compare
import fabricate
from comparison.warm import TRAIN, ForkedRun
from convert.first_use import MIRROR_ENV
from convert.imagenet_to_ffcv import main as convert_folders
from processes import children, status_field, with_sigint

# 8 steps of 8 images an epoch; --log_interval 1, so a step shows in log.jsonl as it ends
TRAIN_FLAGS = (
    "--img_size 16 --patch_size 4 --batch_size 8 --epochs 1 --warmup_epochs 0.5 "
    "--pipeline torch --num_workers 0 --log_interval 1"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two classes of 40x32 photo crops: 64 in train/, 16 in val/, as .beton files."""
    root = tmp_path_factory.mktemp("compare_data")
    fabricate.image_folder(root / "src", {"train": 32, "val": 8}, classes=2)
    argv = f"--src {root / 'src'} --out_dir {root / 'data'} --name photos --num_workers 1"
    assert convert_folders(argv.split()) == 0
    return root / "data"


def _compare(data: Path, out: Path, *flags: str) -> list[str]:
    """compare.py's command line: scratch and fgcr, seeds 0 and 1, on `data`, into `out`."""
    head = f"--data_path photos --methods scratch fgcr --seeds 0 1 --output_dir {out}"
    return [*head.split(), *flags, "--", "--data_dir", str(data), *TRAIN_FLAGS.split()]


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def _stop_when(log: Path, text: str, seen: dict) -> None:
    """Once `text` is in `log`, SIGTERM this process's main thread, where compare.py waits on
    its run (as a scheduler's signal would reach it); `seen` records whether compare.py had a
    handler in place to pass it on (without one the signal would end the test session, so the
    run is stopped directly instead)."""
    deadline = time.time() + 300
    while time.time() < deadline:
        if log.exists() and text in log.read_text():
            seen["handled"] = signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
            if seen["handled"]:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
            return
        time.sleep(0.02)


def test_compare_stops_continues_skips_and_reports(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two cores shared: one thread per run
    out = tmp_path / "cmp"
    first = out / "scratch" / "seed0"

    # 1. SIGTERM two steps into the first run: it saves where it stopped, nothing else starts
    seen = {}
    watcher = threading.Thread(target=_stop_when, args=(first / "log.jsonl", '"step": 2,', seen))
    watcher.start()
    status = compare.main(_compare(data, out))
    watcher.join()
    assert seen == {"handled": True}
    assert status == 128 + signal.SIGTERM
    printed = capsys.readouterr().out
    assert "[1/4] scratch seed 0: stopped; run the same command again to continue" in printed
    config = json.loads((first / "config.json").read_text())
    assert (config["model"], config["method"], config["seed"]) == ("vit_tiny", "scratch", 0)
    assert not (out / "fgcr").exists() and not (out / "results.md").exists()
    before = _log(first)
    stopped_at = max(r["step"] for r in before)
    assert 2 <= stopped_at < 8 and all(r["type"] == "step" for r in before)

    # 2. the same command: the stopped run continues from its step, the other three train
    assert compare.main(_compare(data, out)) == 0
    printed = capsys.readouterr().out
    assert f"resumed from {first / 'checkpoint-last.pth'}: epoch 0 at batch" in printed
    assert printed.count("starting afresh") == 3
    after = _log(first)  # continued, not begun again: the records before the stop stay
    assert after[: len(before)] == before
    assert [r["step"] for r in after if r["type"] == "step"] == list(range(1, 9))
    fgcr = json.loads((out / "fgcr" / "seed1" / "config.json").read_text())
    assert (fgcr["model"], fgcr["method"], fgcr["mask_views"]) == ("mae_vit_tiny", "fgcr", 3)
    table = printed[printed.index("photos: 1 epoch") :].split("\nwrote ")[0]
    assert (out / "results.md").read_text() == table
    assert "| final top-1, val (%) | best top-1, val (%) | training time per run (s) |" in table
    assert "| scratch | vit_tiny | 2 |" in table and "| fgcr (r = 3) | mae_vit_tiny | 2 |" in table
    results = json.loads((out / "results.json").read_text())
    assert [m["method"] for m in results["methods"]] == ["scratch", "fgcr"]
    for m in results["methods"]:
        runs = [r for r in results["runs"] if r["method"] == m["method"]]
        finals = [_log(Path(r["folder"]))[-1]["val_acc1"] for r in runs]
        assert [r["final_top1"] for r in runs] == finals
        assert m["final_top1"]["mean"] == pytest.approx(sum(finals) / 2)
        assert m["final_top1"]["std"] == pytest.approx(abs(finals[0] - finals[1]) / 2**0.5)
        assert m["train_seconds"]["mean"] > 0
    picture = matplotlib.image.imread(out / "comparison.png")
    assert picture.std() > 0.05  # drawn, not blank

    # 3. again: every run is finished, so none starts; the same table
    logs = {p: p.read_bytes() for p in out.glob("*/seed*/log.jsonl")}
    assert compare.main(_compare(data, out)) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 4 and "] epoch 0:" not in printed
    assert {p: p.read_bytes() for p in logs} == logs
    assert table in printed

    # 4. a run that stopped before its report (during the test split, say) is not finished:
    # the same command writes its report, and it alone
    (out / "scratch" / "seed1" / "eval.json").unlink()
    assert compare.main(_compare(data, out)) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 3 and "] done: 1 of 1 epochs" in printed
    assert (out / "scratch" / "seed1" / "eval.json").exists()
    rows = [line for line in table.splitlines() if line.startswith("|")]  # the same numbers
    assert rows == [line for line in printed.splitlines() if line.startswith("|")]
    assert {p: p.read_bytes() for p in logs} == logs

    # 5. a larger budget in the same folder would mix budgets in one table, and so would a
    # flag given before and not now (train.py fills in none: the rate comes from --blr)
    assert compare.main([*_compare(data, out), "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert f"{first} was trained with other settings (epochs=1, now 2)" in err
    config["lr"] = 0.01  # as if trained with --lr 0.01
    (first / "config.json").write_text(json.dumps(config))
    assert compare.main(_compare(data, out)) == 1
    err = capsys.readouterr().err
    assert f"{first} was trained with other settings (lr=0.01, now not given)" in err


def _write_log(folder: Path, val: list[float], test: dict | None) -> None:
    """An epoch record per value, a line cut short (as a killed run can leave one), then the
    test record."""
    folder.mkdir(parents=True)
    best, lines = 0.0, []
    for epoch, acc in enumerate(val):
        best = max(best, acc)
        record = {"type": "epoch", "epoch": epoch, "val_acc1": acc, "best_acc1": best}
        lines.append(json.dumps({**record, "train_seconds": 10.0}))
    lines.insert(1, lines[1][:20])
    if test is not None:
        lines.append(json.dumps({"split": "test", "epoch": len(val) - 1, **test}))
    (folder / "log.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "eval.json").write_text("{}\n")  # a finished run's report


def test_a_run_forked_warm_is_train_py_as_launched(tmp_path, capfd):
    """comparison.warm: a run forked from the warm process prints to its own pipe, writes its
    errors to the launching process's stderr as it is when the run starts, runs in the
    environment it is given (not the one the warm process began in) and ends with train.py's
    status."""
    run = ForkedRun(["--version"])
    assert run.stdout.read().startswith("ssat ") and run.wait() == 0
    with socket.socket() as free:  # a loopback port where nothing listens
        free.bind(("127.0.0.1", 0))
        mirror = f"http://127.0.0.1:{free.getsockname()[1]}/mirror"
    run = ForkedRun(
        ["--data_path", "c10", "--data_dir", str(tmp_path)], env={**os.environ, MIRROR_ENV: mirror}
    )
    assert f"downloading {mirror}/cifar-10-python.tar.gz" in run.stdout.read()
    assert run.wait() == 1
    assert f"cannot download {mirror}/cifar-10-python.tar.gz" in capfd.readouterr().err


def test_a_forked_runs_loader_workers_are_forked_from_it(data, tmp_path):
    """A run forked from the warm process starts processes as `python train.py` does: the torch
    loader's workers are the run's own forked children. A process that a fork server started
    otherwise starts a fork server of its own, whose workers import torch afresh every pass."""
    argv = ["--data_path", "photos", "--data_dir", str(data), "--output_dir", str(tmp_path)]
    argv += [*TRAIN_FLAGS.replace("--num_workers 0", "--num_workers 1").split()]
    run = ForkedRun(argv)
    depth, seen = 0, set()  # how deep the run's processes went below it, and its children
    while run.poll() is None:
        for child in children(run.pid):
            seen.add(child)
            depth = max(depth, 2 if children(child) else 1)
        time.sleep(0.01)
    printed = run.stdout.read()
    assert run.wait() == 0 and "epoch 0:" in printed, printed[-2000:]
    assert depth == 1 and seen, (depth, seen)


def test_runs_fork_warm_under_numbas_openmp_layer(data, tmp_path):
    """`python compare.py` with NUMBA_THREADING_LAYER=omp, as the Docker image runs it: numba's
    OpenMP layer ends every fork from a process that started it (importing ffcv does), so the
    warm process leaves ffcv to the runs, and a run on the ffcv engine with two numba threads
    trains to its end."""
    pytest.importorskip("numba.np.ufunc.omppool", reason="numba's OpenMP layer does not load here")
    argv = [sys.executable, str(TRAIN.parent / "compare.py"), "--data_path", "photos"]
    argv += ["--methods", "ssat", "--seeds", "0", "--output_dir", str(tmp_path / "cmp"), "--"]
    argv += ["--data_dir", str(data), "--img_size", "16", "--patch_size", "4", "--epochs", "1"]
    argv += ["--batch_size", "8", "--pipeline", "ffcv", "--num_workers", "2"]
    env = {**os.environ, "NUMBA_THREADING_LAYER": "omp", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "[1/1] ssat seed 0: done" in done.stdout
    assert (tmp_path / "cmp" / "results.md").exists()


def _warm_process(parent: int) -> int | None:
    """The child of `parent` that is multiprocessing's fork server (the warm process), or None."""
    for pid in children(parent):
        try:
            if b"multiprocessing.forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


def _stop_while_importing(compare_py: subprocess.Popen) -> int:
    """SIGSTOP the warm process that `compare_py` starts for its first run, once it is importing
    torch, and check that it stopped inside its imports: torch's library mapped, scikit-learn's
    (imported after torch) not yet, and Ctrl-C not yet ignored (the server ignores it after its
    last import)."""
    deadline = time.time() + 120
    server = None
    while True:
        assert compare_py.poll() is None and time.time() < deadline, "no warm process importing"
        server = server or _warm_process(compare_py.pid)
        if server and b"libtorch_cpu" in Path(f"/proc/{server}/maps").read_bytes():
            os.kill(server, signal.SIGSTOP)
            break
        time.sleep(0.005)
    while not status_field(server, "State").startswith("T"):
        time.sleep(0.005)
    assert b"sklearn" not in Path(f"/proc/{server}/maps").read_bytes()
    assert not int(status_field(server, "SigIgn"), 16) & 1 << (signal.SIGINT - 1)
    return server


STOPPED = "[1/1] scratch seed 0: stopped; run the same command again to continue\n"
# what compare.py says, and its status, when this reaches it while its first run waits for the
# warm process's imports: signal -> (stdout's last line, stderr, status)
WHILE_IMPORTING = {
    # Ctrl-C: compare.py's message alone, not a traceback of the warm process's import
    "SIGINT to the group": ("", "interrupted; run the same command again to continue\n", 130),
    # a scheduler's signal to compare.py: the run being started stops as it begins
    "SIGTERM to compare.py": (STOPPED, "", 143),
    # a scheduler's signal to every process of the job: the warm process ends with the rest
    "SIGTERM to the group": (STOPPED.replace("stopped;", "stopped before it began;"), "", 143),
    # the warm process killed alone (the OOM killer): an error that says so
    "SIGKILL to the warm process": (
        "",
        "error: scratch seed 0 did not start: the warm process that forks the runs ended first "
        "(unexpected EOF)\n",
        1,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("sent", sorted(WHILE_IMPORTING))
def test_a_signal_while_the_warm_process_imports(data, tmp_path, sent):
    """A comparison's first run waits seconds for the warm process's imports; a signal then
    ends compare.py as it ends any run, the warm process with it, and no run trains."""
    out = tmp_path / "cmp"
    argv = [sys.executable, str(TRAIN.parent / "compare.py"), "--data_path", "photos"]
    argv += ["--methods", "scratch", "--seeds", "0", "--output_dir", str(out), "--"]
    argv += ["--data_dir", str(data), *TRAIN_FLAGS.split()]
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(
            with_sigint("SIG_DFL", argv), stdout=stdout, stderr=stderr, start_new_session=True
        )
    server = None
    name, _, whom = sent.split(" ", 2)
    signum = getattr(signal, name)
    try:
        server = _stop_while_importing(proc)
        if whom == "the group":
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid if whom == "compare.py" else server, signum)
        os.kill(server, signal.SIGCONT)
        status = proc.wait(timeout=300)
        deadline = time.time() + 60
        while status_field(server, "State")[:1] not in ("", "Z"):
            assert time.time() < deadline, "the warm process outlived compare.py"
            time.sleep(0.02)
    finally:
        if server is not None and proc.poll() is None:
            os.kill(server, signal.SIGCONT)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    printed, err = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    last, message, expected = WHILE_IMPORTING[sent]
    assert (status, err) == (expected, message), printed[-2000:] + err[-3000:]
    assert printed.startswith("[1/1] scratch seed 0: training in ") and printed.endswith(last)
    log = out / "scratch" / "seed0" / "log.jsonl"
    assert not log.exists() or '"type": "epoch"' not in log.read_text(), printed[-2000:]


def test_test_record_gives_the_final_and_best_val_numbers(tmp_path):
    """With a val and a test split: final = test top-1 of the last weights, best = test top-1
    of the best-val weights (never the highest test top-1 over the epochs); where a run has no
    test record, every column reports the val split."""
    args, shared = compare.parse_args(
        f"--methods ssat --seeds 0 1 --output_dir {tmp_path} -- --epochs 3".split()
    )
    runs = compare.plan(args, shared)
    tests = [
        {"test_acc1": 61.0, "test_acc1_at_best_val": 64.0, "best_val_epoch": 1},
        {"test_acc1": 63.0, "test_acc1_at_best_val": 66.0, "best_val_epoch": 1},
    ]
    for run, test in zip(runs, tests, strict=True):
        _write_log(run.folder, [50.0, 70.0, 60.0], test)
    results = [compare.result(run) for run in runs]
    assert results[0].curve == [50.0, 70.0, 60.0] and results[0].train_seconds == 30.0
    summary = compare.summarize(results, "val")
    ssat = summary["methods"][0]
    assert ssat["final_top1"]["mean"] == 62.0 and ssat["best_top1"]["mean"] == 65.0
    assert summary["columns"]["best"] == "best-val top-1, test (%)"
    compare.report(runs, args, shared, "val")
    table = (tmp_path / "results.md").read_text()
    assert "| ssat | mae_vit_tiny | 2 | 62.00 ± 1.41 | 65.00 ± 1.41 | 30.0 ± 0.0 |" in table
    assert "test top-1 of the weights with the best val top-1" in table

    (runs[1].folder / "log.jsonl").write_text(
        "\n".join((runs[1].folder / "log.jsonl").read_text().splitlines()[:-1]) + "\n"
    )
    summary = compare.summarize([compare.result(run) for run in runs], "val")
    assert summary["columns"]["final"] == "final top-1, val (%)"
    assert summary["methods"][0]["final_top1"]["mean"] == 60.0
    assert summary["methods"][0]["best_top1"]["mean"] == 70.0
    assert summary["note"] == "1 of 2 runs have no test record, so every column reports val"


def test_each_method_trains_its_model(tmp_path):
    """scratch: vit_<size>; ssat: mae_vit_<size>, one mask view; fgcr: r = --views; every
    run with the shared flags, its own seed and folder, resumed automatically."""
    args, shared = compare.parse_args(
        f"--seeds 5 --size small --output_dir {tmp_path} -- --epochs 7 --pipeline torch".split()
    )
    runs = compare.plan(args, shared)
    got = []
    for run in runs:
        cfg = run.config.resolve(cuda=False)
        assert (cfg.seed, cfg.epochs, cfg.resume) == (5, 7, "auto")
        assert cfg.output_dir == str(tmp_path / run.method / "seed5")
        got.append((cfg.method, cfg.model, cfg.mask_views))
    assert got == [
        ("scratch", "vit_small", 1),
        ("ssat", "mae_vit_small", 1),
        ("fgcr", "mae_vit_small", 3),
    ]


def test_unfinished_run_has_no_result(tmp_path):
    args, shared = compare.parse_args(
        f"--methods scratch --seeds 0 --output_dir {tmp_path} -- --epochs 4".split()
    )
    (run,) = compare.plan(args, shared)
    _write_log(run.folder, [10.0, 20.0, 30.0], None)
    assert compare.result(run) is None


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--methods scratch mae", "argument --methods: invalid choice: 'mae'"),
        ("--seeds", "argument --seeds: expected at least one argument"),
        ("--seeds 0 0", "--methods and --seeds each name a method or a seed once"),
        ("--views 1", "--views 1: FGCR needs 2 or more"),
        ("-- --bogus 1", "unrecognized arguments: --bogus 1"),
    ],
)
def test_clear_usage_errors(capsys, flags, message):
    with pytest.raises(SystemExit) as exit:
        compare.main(flags.split())
    assert exit.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "own, train, message",
    [
        ("--data_path nosuch", "", "dataset 'nosuch' not found"),
        ("", "--seed 3", "--seed after --: compare.py trains each of --seeds"),
        ("", "--views 2", "--mask_views / --views after --: compare.py gives it to the fgcr"),
        ("", "--output_dir x", "--output_dir after --"),
        ("--size small", "--model mae_vit_tiny", "--size small and --model mae_vit_tiny name"),
    ],
)
def test_clear_errors(tmp_path, capsys, own, train, message):
    argv = [*own.split(), "--output_dir", str(tmp_path / "out"), "--", *train.split()]
    assert compare.main([*argv, "--data_dir", str(tmp_path)]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
