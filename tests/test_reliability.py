"""Runs that cannot trample each other, on real files and real processes: one run per output
folder (and a kill -9 of the holder), Ctrl-C as a clean stop with a step-exact resume, dataset
fingerprints under resume, `storage.verify` finding rotted bytes, and torchrun's elastic restart
and two "nodes" on this machine."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from convert.digits_to_ffcv import main as convert_digits
from processes import torchrun_workers, with_sigint
from ssat.checkpoint import load_checkpoint
from ssat.runlock import LOCK_NAME, STALE_S, FolderInUse, RunLock
from storage.beton import BetonFile
from storage.fingerprint import Fingerprint, beton_fingerprint
from storage.verify import verify_file

REPO = Path(__file__).resolve().parents[1]
# 320 digits: 10 steps of 32 an epoch, logged every 2
SMALL = (
    "--data_path digits --model mae_vit_micro --img_size 16 --patch_size 4 --batch_size 32 "
    "--warmup_epochs 0.5 --blr 4e-3 --log_interval 2 --pipeline torch"
).split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def data(digits320) -> Path:
    """Digits, 320 scans of train and test (10 steps of 32) and the whole val split (270)."""
    return digits320


def _args(data: Path, out: Path, *extra) -> list[str]:
    return ["--data_dir", str(data), "--output_dir", str(out), *SMALL, *map(str, extra)]


def _epochs(out: Path) -> list[int]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [r["epoch"] for r in map(json.loads, lines) if r["type"] == "epoch"]


def _wait_for(out: Path, text: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while not (out / "log.jsonl").exists() or text not in (out / "log.jsonl").read_text():
        assert proc.poll() is None, f"the run ended before {text!r} reached its log"
        assert time.time() < deadline, f"no {text!r} in the log after {seconds} s"
        time.sleep(0.02)


def _start(
    command: list[str], logs: Path, env: dict | None = None, sigint: str = "SIG_DFL"
) -> subprocess.Popen:
    """`command` in its own process group (signals to the group: what a terminal's Ctrl-C
    does), with SIGINT at `sigint` whatever pytest inherited, its output in `logs`.stdout /
    .stderr."""
    with open(f"{logs}.stdout", "w") as stdout, open(f"{logs}.stderr", "w") as stderr:
        return subprocess.Popen(
            with_sigint(sigint, command),
            cwd=REPO,
            env=env or ENV,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )


def _end(*procs: subprocess.Popen) -> None:
    """Leave no process behind (a failed test)."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _signalled_at_step_2(command: list[str], out: Path, logs: Path, signum: int, **start) -> int:
    """`command` started as `_start` starts it (`start`: its env and sigint), `signum` sent to
    its process group once step 2 is in `out`'s log; its exit status."""
    run = _start(command, logs, **start)
    try:
        _wait_for(out, '"step": 2,', run)
        os.killpg(run.pid, signum)
        return run.wait(timeout=120)
    finally:
        _end(run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------- the folder lock
def test_second_run_into_a_folder_refuses_and_a_killed_holder_never_blocks(tmp_path, data, capsys):
    out = tmp_path / "run"
    first = _start([sys.executable, "train.py", *_args(data, out, "--epochs", 50)], tmp_path / "a")
    try:
        _wait_for(out, '"step": 2,', first)
        config = (out / "config.json").read_text()
        began = time.perf_counter()
        assert train.main(_args(data, out, "--epochs", 3, "--resume", "auto")) == 1
        refused_in = time.perf_counter() - began
        err = capsys.readouterr().err
        assert f"{out} is in use by another run: PID {first.pid} on host " in err, err
        assert "started 20" in err and "--epochs 50" in err and "another --output_dir" in err
        assert refused_in < 30  # at once: before any data or model is built
        assert (out / "config.json").read_text() == config  # nothing of the first run touched
        assert first.poll() is None
        first.send_signal(signal.SIGKILL)  # the OS drops its lock with it
        first.wait()
    finally:
        _end(first)
    assert train.main(_args(data, out, "--epochs", 1, "--stop_after", 1, "--resume", "auto")) == 0
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()


def _hold(folder: Path, ready) -> None:
    RunLock(folder, os_lock=False).acquire()
    ready.set()
    time.sleep(600)


def test_record_lock_where_file_locks_do_not_work(tmp_path):
    """The fallback of filesystems without working locks: a host/PID record, taken over when
    its process is gone (this host) or its heartbeat is old (another host)."""
    folder = tmp_path / "run"
    ready = multiprocessing.get_context("fork").Event()
    holder = multiprocessing.get_context("fork").Process(target=_hold, args=(folder, ready))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(FolderInUse, match=f"PID {holder.pid} on host {socket.gethostname()}"):
            RunLock(folder, os_lock=False).acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join()
    with RunLock(folder, os_lock=False):  # the record of a dead process is stale
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (folder / LOCK_NAME).exists()  # the record goes with its holder

    elsewhere = {"host": "another-node", "pid": 1, "started": "2026-01-01 00:00:00 UTC"}
    (folder / LOCK_NAME).write_text(json.dumps(elsewhere))
    with pytest.raises(FolderInUse, match="PID 1 on host another-node"):
        RunLock(folder, os_lock=False).acquire()  # a fresh heartbeat from another host
    old = time.time() - STALE_S - 60
    os.utime(folder / LOCK_NAME, (old, old))
    RunLock(folder, os_lock=False).acquire().release()
    # a record naming no process here, and a file holding no record, once old: taken over
    # (they raised ValueError and AttributeError)
    (folder / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": "abc"}))
    RunLock(folder, os_lock=False).acquire().release()
    (folder / LOCK_NAME).write_text('"x"')
    os.utime(folder / LOCK_NAME, (old, old))
    RunLock(folder, os_lock=False).acquire().release()


# ------------------------------------------------------------------------------- Ctrl-C
def test_sigterm_to_the_whole_run_stops_it_cleanly_with_loader_workers(tmp_path, data):
    """SIGTERM to every process of a run, its two loader workers included (a scheduler that
    signals a whole job does so: Slurm's scancel, its preemption), inside epoch 0: the workers
    leave it to the trainer, which finishes its step, records the place and exits 143. A worker
    ended by it would fail the step under way."""
    out = tmp_path / "run"
    command = [sys.executable, "train.py", *_args(data, out, "--num_workers", 2)]
    # two threads: a worker then has a thread from before its own code runs
    env = {**ENV, "OMP_NUM_THREADS": "2"}
    status = _signalled_at_step_2(command, out, out, signal.SIGTERM, env=env)
    err = Path(f"{out}.stderr").read_text()
    assert status == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    position = load_checkpoint(out / "checkpoint-last.pth")["position"]
    assert position["epoch"] == 0 and 2 <= position["batch"] < 10
    assert "stopped by SIGTERM after step" in Path(f"{out}.stdout").read_text()


def test_a_process_that_exits_mid_epoch_ends_its_loader_workers(data):
    """The workers that leave a scheduler's SIGTERM to the trainer still end by the one their
    own process sends them (multiprocessing does, as a process exits with workers alive): a
    script that exits in the middle of a torch loader's epoch ends, workers included."""
    script = (
        "import sys; from pipelines import create_loader; "
        f"loader = create_loader('torch', {str(data / 'digits_train.beton')!r}, train=True, "
        "batch_size=8, img_size=16, num_workers=2); "
        "batches = iter(loader); next(batches); print('mid-epoch', flush=True)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=ENV, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout == "mid-epoch\n", done.stderr[-3000:]


def test_ctrl_c_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(tmp_path, data, capsys):
    """Ctrl-C (SIGINT to the process group, loader worker included) inside epoch 0: the step
    finishes, checkpoint-last.pth records the place, one line says how to go on, exit 130.
    Resuming over a re-converted train split is refused, naming both fingerprints; on the
    same data it ends with exactly the uninterrupted run's weights."""
    flags = ["--epochs", 1, "--num_workers", 1]
    split, straight = tmp_path / "split", tmp_path / "straight"
    command = [sys.executable, "train.py", *_args(data, split, *flags)]
    status = _signalled_at_step_2(command, split, tmp_path / "run", signal.SIGINT)
    stdout = Path(f"{tmp_path / 'run'}.stdout").read_text()
    assert status == 130, Path(f"{tmp_path / 'run'}.stderr").read_text()[-3000:]
    ckpt = load_checkpoint(split / "checkpoint-last.pth")
    batch = ckpt["position"]["batch"]
    assert ckpt["position"]["epoch"] == 0 and 2 <= batch < 10 and ckpt["step"] == batch
    lines = [line for line in stdout.splitlines() if "SIGINT" in line]
    assert len(lines) == 1 and f"after step {batch} (epoch 0, batch {batch} of 10)" in lines[0]
    assert "--resume auto (exit status 130)" in lines[0]
    assert ckpt["data_fingerprints"]["train"] == beton_fingerprint(data / "digits_train.beton")

    other = tmp_path / "other"  # the same dataset converted again, another --limit
    assert convert_digits(["--out_dir", str(other), "--limit", "352", "--split", "train"]) == 0
    for name in ("val", "test"):
        for suffix in (".beton", ".json"):
            shutil.copy(data / f"digits_{name}{suffix}", other)
    capsys.readouterr()
    assert train.main([*_args(other, split, *flags), "--resume", "auto"]) == 1
    err = capsys.readouterr().err
    new = json.loads((other / "digits_train.json").read_text())["fingerprint"]
    assert ckpt["data_fingerprints"]["train"][:19] in err and new[:19] in err, err
    assert "stopped inside an epoch" in err

    assert train.main([*_args(data, split, *flags), "--resume", "auto"]) == 0
    assert train.main(_args(data, straight, *flags)) == 0
    a = load_checkpoint(straight / "checkpoint-last.pth")
    b = load_checkpoint(split / "checkpoint-last.pth")
    assert a["step"] == b["step"] == 10
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key

    capsys.readouterr()  # at an epoch's end another train split is a warning, not an error
    argv = [*_args(other, split, "--epochs", 2, "--stop_after", 1, "--resume", "auto")]
    assert train.main(argv) == 0
    assert "warning: " in capsys.readouterr().out


def _two_ctrl_c(tmp_path: Path, data: Path, attempt: int) -> tuple[int, str, str, Path]:
    """A run given Ctrl-C twice, 10 ms apart: its status, stdout, stderr and output folder."""
    out, logs = tmp_path / f"run{attempt}", tmp_path / f"r{attempt}"
    run = _start([sys.executable, "train.py", *_args(data, out, "--epochs", 5)], logs)
    try:
        _wait_for(out, '"step": 2,', run)
        os.killpg(run.pid, signal.SIGINT)
        time.sleep(0.01)
        os.killpg(run.pid, signal.SIGINT)
        status = run.wait(timeout=120)
    finally:
        _end(run)
    return status, Path(f"{logs}.stdout").read_text(), Path(f"{logs}.stderr").read_text(), out


def test_second_ctrl_c_stops_at_once_and_leaves_no_partial_checkpoint(tmp_path, data):
    # On a busy machine both signals can arrive before Python runs the handler of the first:
    # a pending signal is not queued twice, so the run sees one Ctrl-C and stops as after one
    # (stderr empty, its message on stdout). That run is set aside and the test tries again.
    for attempt in range(3):
        status, printed, err, out = _two_ctrl_c(tmp_path, data, attempt)
        if err.strip() or "stopped by SIGINT" not in printed:
            break
    assert status == 130 and "interrupted (SIGINT after SIGINT" in err, err[-3000:]
    # only a traceback Python prints for an exception raised in a destructor (the loader's,
    # when the second Ctrl-C lands there; the run then stops at its next check)
    assert err.count("Traceback") == err.count("Exception ignored in"), err[-3000:]
    assert not list(out.glob(".*.tmp"))  # an abandoned save leaves no temporary file
    if (out / "checkpoint-last.pth").exists():
        load_checkpoint(out / "checkpoint-last.pth")


# ------------------------------------------------------------------- fingerprints, verify
def test_fingerprint_is_computed_per_sample_in_index_order(data):
    path = data / "digits_train.beton"
    beton = BetonFile(path)
    recorded = json.loads(path.with_suffix(".json").read_text())["fingerprint"]
    assert recorded == beton_fingerprint(path)
    running = Fingerprint()
    for i in range(len(beton)):
        meta = beton.images[i]
        running.update(
            beton.labels[i], meta["mode"], meta["height"], meta["width"], beton.raw_bytes(i)
        )
    assert running.value == recorded and running.count == 320
    swapped = Fingerprint()  # the same samples in another order are other data
    for i in [1, 0, *range(2, len(beton))]:
        meta = beton.images[i]
        swapped.update(
            beton.labels[i], meta["mode"], meta["height"], meta["width"], beton.raw_bytes(i)
        )
    assert swapped.value != recorded


def _copy(data: Path, to: Path, split: str = "train") -> Path:
    to.mkdir(parents=True, exist_ok=True)
    for suffix in (".beton", ".json"):
        shutil.copy(data / f"digits_{split}{suffix}", to)
    return to / f"digits_{split}.beton"


def test_verify_finds_a_rotted_byte(tmp_path, data, capsys):
    good = data / "digits_val.beton"
    rotted = _copy(data, tmp_path / "rotted")
    for split in ("val", "test"):
        _copy(data, rotted.parent, split)
    beton = BetonFile(rotted)
    at = int(beton.images["data_ptr"][123]) + 17  # a byte inside sample 123's pixels
    with open(rotted, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))
    done = subprocess.run(
        [sys.executable, "-m", "storage.verify", str(good), str(rotted)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 1 and len(lines) == 2, done.stdout + done.stderr
    assert lines[0].startswith(f"OK {good}: 270 samples decoded (8x8)") and "matches" in lines[0]
    assert lines[1].startswith(f"FAILED {rotted}: content fingerprint") and "differs" in lines[1]

    # training with --verify_data stops before the first step, with the same line
    assert (
        train.main([*_args(rotted.parent, tmp_path / "out", "--epochs", 1), "--verify_data"]) == 1
    )
    printed = capsys.readouterr()
    assert f"FAILED {rotted}" in printed.out and "--verify_data" in printed.err
    assert not (tmp_path / "out" / "log.jsonl").exists()


def test_verify_names_an_undecodable_sample_and_accepts_older_metadata(tmp_path, data):
    jpegs = tmp_path / "jpg"
    argv = ["--out_dir", str(jpegs), "--limit", "40", "--split", "val", "--write_mode", "jpg"]
    assert convert_digits(argv) == 0
    path = jpegs / "digits_val.beton"
    start = int(BetonFile(path).images["data_ptr"][7])
    with open(path, "r+b") as f:  # sample 7's JPEG loses its start-of-image marker
        f.seek(start)
        f.write(b"\0\0\0\0")
    verdict = verify_file(path, workers=2)
    assert not verdict.ok and f"{path}: sample 7 is not a decodable" in verdict.line

    older = _copy(data, tmp_path / "older", "val")  # metadata from before fingerprints
    meta = json.loads(older.with_suffix(".json").read_text())
    del meta["fingerprint"]
    older.with_suffix(".json").write_text(json.dumps(meta))
    verdict = verify_file(older, workers=2)
    assert verdict.ok and "no fingerprint recorded" in verdict.line, verdict.line


# -------------------------------------------------------------------------------- torchrun
@pytest.mark.xdist_group("processes")
@pytest.mark.slow
def test_elastic_restart_resumes_and_logs_every_epoch_once(tmp_path, data):
    """torchrun --max-restarts 1: a worker killed by SIGKILL inside epoch 1 ends the workers'
    group; torchrun starts it again, --resume auto continues from checkpoint-last.pth (the
    end of epoch 0), and the job finishes with each epoch logged once."""
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    torchrun += [
        "--max-restarts=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
    ]
    flags = ["--batch_size", 16, "--epochs", 2, "--num_workers", 0, "--resume", "auto"]
    # torch's shared rendezvous store keeps the first round's keys, so a restarted worker may
    # read a dead one's address and fail to connect: each round gets its own store instead
    env = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    job = _start([*torchrun, "train.py", *_args(data, out, *flags)], tmp_path / "job", env)
    try:
        _wait_for(out, '"epoch": 1, "step": 12', job)  # 10 steps an epoch a rank
        os.kill(torchrun_workers(job.pid)[1], signal.SIGKILL)
        status = job.wait(timeout=300)
    finally:
        _end(job)
    err = Path(f"{tmp_path / 'job'}.stderr").read_text()
    stdout = Path(f"{tmp_path / 'job'}.stdout").read_text()
    assert status == 0, err[-3000:]
    assert "resumed from" in stdout and "epoch 0 done" in stdout, stdout[-2000:]
    assert _epochs(out) == [0, 1]
    assert load_checkpoint(out / "checkpoint-last.pth")["step"] == 20


@pytest.mark.xdist_group("processes")
@pytest.mark.slow
def test_two_nodes_train_together_and_ctrl_c_to_one_stops_both(tmp_path, data):
    """`torchrun --nnodes 2 --node_rank 0/1` with a c10d rendezvous on localhost, one process
    a "node", both writing to one --output_dir (rank 0 alone holds its lock): epoch 0 trained
    together. Then a terminal's Ctrl-C to node 0 (torchrun's group alone: its workers run in
    their own sessions) reaches its worker through torchrun, and every rank stops after the same
    step, rank 0 saving both ranks' place, as on SIGTERM."""
    out, port = tmp_path / "run", _free_port()
    nodes = []
    try:
        for rank in (0, 1):
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2"]
            command += ["--nproc_per_node=1", f"--node_rank={rank}", "--rdzv_backend=c10d"]
            command += [f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes", "train.py"]
            flags = ["--batch_size", 16, "--epochs", 2, "--num_workers", 0]
            nodes.append(_start([*command, *_args(data, out, *flags)], tmp_path / f"n{rank}"))
        _wait_for(out, '"epoch": 1, "step": 12', nodes[0])  # 10 steps an epoch a rank
        os.killpg(nodes[0].pid, signal.SIGINT)
        for node in nodes:  # torchrun's own status: it reports the signal as a failure
            node.wait(timeout=120)
    finally:
        _end(*nodes)
    assert _epochs(out) == [0]
    ckpt = load_checkpoint(out / "checkpoint-last.pth")
    position = ckpt["position"]
    assert position["world_size"] == 2 and position["epoch"] == 1, position
    assert 2 <= position["batch"] < 10 and len(ckpt["rng_ranks"]) == 2
    printed = "".join(Path(f"{tmp_path / f'n{r}'}.stdout").read_text() for r in (0, 1))
    assert f"stopped by SIGINT after step {ckpt['step']}" in printed, printed[-2000:]


# -------------------------------------------------- the commands that start runs, on Ctrl-C
def _ctrl_c_mid_conversion(tmp_path: Path, sigint: str) -> tuple[int, str, Path]:
    """The digits converter started with SIGINT at `sigint`, given a terminal's Ctrl-C once its
    train split is written under its temporary name: its status, stderr and output folder."""
    out, logs = tmp_path / "out", tmp_path / "c"
    command = [sys.executable, "convert/digits_to_ffcv.py", "--out_dir", str(out)]
    proc = _start([*command, "--num_workers", "1"], logs, sigint=sigint)
    try:
        deadline = time.time() + 120
        # the train split's .beton under its temporary name: written, not yet renamed
        while not out.is_dir() or not any(".beton.ssat-" in p.name for p in out.iterdir()):
            assert time.time() < deadline and proc.poll() is None, "no conversion under way"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the writer's workers too
        status = proc.wait(timeout=60)
    finally:
        _end(proc)
    return status, Path(f"{logs}.stderr").read_text(), out


def test_ctrl_c_during_a_conversion_leaves_nothing_at_the_final_paths(tmp_path):
    status, err, out = _ctrl_c_mid_conversion(tmp_path, "SIG_DFL")
    assert status == 130 and "interrupted: nothing was written at the final paths" in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_conversion_started_with_sigint_ignored_keeps_ignoring_it(tmp_path):
    status, err, out = _ctrl_c_mid_conversion(tmp_path, "SIG_IGN")
    assert status == 0 and "interrupted" not in err, err
    written = [
        f"digits_{split}{suffix}"
        for split in ("test", "train", "val")
        for suffix in (".beton", ".json")
    ]
    assert sorted(p.name for p in out.iterdir()) == written


def test_a_run_started_with_sigint_ignored_keeps_ignoring_it(tmp_path, data):
    """A background job's run (SIGINT ignored, as `cmd &` in a script starts it): a Ctrl-C to
    its group inside epoch 0 changes nothing, and the run trains to its end."""
    out, logs = tmp_path / "run", tmp_path / "run"
    command = [sys.executable, "train.py", *_args(data, out, "--epochs", 2)]
    # at step 2: 18 steps still to go
    status = _signalled_at_step_2(command, out, logs, signal.SIGINT, sigint="SIG_IGN")
    stdout = Path(f"{logs}.stdout").read_text()
    assert status == 0, Path(f"{logs}.stderr").read_text()[-3000:]
    assert "SIGINT" not in stdout and _epochs(out) == [0, 1]
    assert load_checkpoint(out / "checkpoint-last.pth")["step"] == 20


def _compare(
    tmp_path: Path, data: Path, name: str, sigint: str
) -> tuple[list, Path, subprocess.Popen]:
    """compare.py started with SIGINT at `sigint`, once its run has logged step 2: its argv,
    the run's folder and the process (its output in `tmp_path / name`.stdout / .stderr)."""
    out = tmp_path / name
    argv = ["--methods", "ssat", "--seeds", "0", "--size", "micro", "--output_dir", str(out)]
    argv += ["--", "--data_dir", str(data), "--img_size", "16", "--patch_size", "4"]
    argv += ["--batch_size", "32", "--epochs", "1", "--log_interval", "2", "--pipeline", "torch"]
    run = out / "ssat" / "seed0"
    proc = _start([sys.executable, "compare.py", *argv], tmp_path / name, sigint=sigint)
    try:
        _wait_for(run, '"step": 2,', proc)
    except BaseException:
        _end(proc)
        raise
    return argv, run, proc


def test_compare_holds_its_folder_and_stops_cleanly_on_ctrl_c(tmp_path, data, capsys):
    import compare

    argv, run, proc = _compare(tmp_path, data, "cmp", "SIG_DFL")
    try:
        assert compare.main(argv) == 1  # a second comparison into the same folder
        out = tmp_path / "cmp"
        assert f"{out} is in use by another run: PID {proc.pid}" in capsys.readouterr().err
        os.killpg(proc.pid, signal.SIGINT)
        status = proc.wait(timeout=120)
    finally:
        _end(proc)
    err = Path(f"{tmp_path / 'cmp'}.stderr").read_text()
    assert status == 130 and "interrupted; run the same command again to continue" in err, err
    assert "Traceback" not in err
    position = load_checkpoint(run / "checkpoint-last.pth")["position"]
    assert position["epoch"] == 0 and position["batch"] >= 2  # the run saved inside its epoch


def test_compare_started_with_sigint_ignored_keeps_ignoring_it(tmp_path, data):
    """compare.py in a background job: it and the run it starts (which inherits the ignored
    SIGINT) go on through a Ctrl-C to their group, and the comparison is complete."""
    _, run, proc = _compare(tmp_path, data, "cmp", "SIG_IGN")
    try:
        os.killpg(proc.pid, signal.SIGINT)
        status = proc.wait(timeout=120)
    finally:
        _end(proc)
    err = Path(f"{tmp_path / 'cmp'}.stderr").read_text()
    assert status == 0 and "interrupted" not in err, err[-3000:]
    assert (tmp_path / "cmp" / "results.md").is_file()
    assert load_checkpoint(run / "checkpoint-last.pth")["step"] == 10
