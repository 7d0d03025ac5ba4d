"""The trainer end to end on a small .beton: every method with both engines, resume, kill -9,
SIGTERM / SIGUSR1 mid-epoch, a full disk, eval, torchrun, compile, a non-finite loss, and the
errors a user meets first."""

import dataclasses
import hashlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest
import torch

import export
import fabricate
import ssat.run_state
import ssat.training
import train
from processes import torchrun_workers
from ssat.checkpoint import load_checkpoint
from ssat.config import parse_config
from ssat.distributed import DistContext
from ssat.run_state import changed_settings

REPO = Path(__file__).resolve().parents[1]
SMALL = (
    "--img_size 16 --patch_size 4 --batch_size 32 --warmup_epochs 0.5 --blr 4e-3 "
    "--log_interval 2 --num_workers 0"
).split()
# the published augmentation (the digits' recipe turns it off): RandAugment, random erasing,
# flips and small crops run, and are resumed, in these runs
AUGMENTED = "--aa rand-m9-mstd0.5-inc1 --reprob 0.25 --hflip 0.5 --min_scale 0.08".split()
VAL = 270  # the digits' validation split: evaluated every epoch
# two processes on this machine, as torch.distributed.launch / torchrun start them
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def data(digits320) -> Path:
    """Digits, 320 scans of train and test (10 steps of 32) and the whole val split (270)."""
    return digits320


def _args(data: Path, out: Path, *extra) -> list[str]:
    """The command line of a small run on `data` into `out`; `extra` holds flags and values,
    a string of several flags ("--epochs 3 --model vit_tiny") split at its spaces."""
    flags = [word for e in extra for word in (e.split() if isinstance(e, str) else [str(e)])]
    return [
        "--data_path",
        "digits",
        "--data_dir",
        str(data),
        "--output_dir",
        str(out),
        *SMALL,
        *AUGMENTED,
        *flags,
    ]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


METHODS = {
    "ssat": ["--model", "mae_vit_micro"],
    "fgcr2": ["--model", "mae_vit_micro", "--views", "2"],
    "fgcr3": ["--model", "mae_vit_micro", "--views", "3", "--crops", "2"],
    "scratch": ["--model", "vit_micro", "--clip_grad", "0.5"],
}


@pytest.mark.parametrize(
    "method, pipeline",
    # FGCR with r = 3 and two crops on the ffcv engine only: the torch engine's crops are the
    # same batches (tests/test_pipelines.py), and fgcr2 runs on both
    [(m, p) for m in sorted(METHODS) for p in ("torch", "ffcv") if (m, p) != ("fgcr3", "torch")],
)
def test_trains_and_logs(tmp_path, data, method, pipeline):
    out = tmp_path / "run"
    # SSAT reads its data in whole pages, in the page-aware order (a dataset larger than memory)
    in_memory = "0" if method == "ssat" else "auto"
    argv = _args(data, out, "--epochs", 2, "--pipeline", pipeline, "--in_memory", in_memory)
    assert train.main([*argv, *METHODS[method]]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method.rstrip("23") and config["pipeline"] == pipeline
    assert config["in_memory"] == in_memory
    records = _log(out)
    steps = [r for r in records if r["type"] == "step"]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    for r in epochs:
        assert {
            "lr",
            "loss",
            "cls",
            "rec",
            "fgc",
            "train_images_per_s",
            "data_wait",
            "val_acc1",
            "val_acc5",
            "val_loss",
            "best_acc1",
            "epoch_seconds",
            "peak_memory_mb",
        } <= set(r)
        assert r["val_num_samples"] == VAL and 0 <= r["data_wait"] <= 1
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    first, last = sum(r["loss"] for r in steps[:2]) / 2, sum(r["loss"] for r in steps[-2:]) / 2
    assert last < first, (first, last)
    if method.startswith("fgcr"):
        assert all(r["fgc"] > 0 for r in steps)
    # with --clip_grad, the gradient norm before clipping at every log interval
    assert all(r.get("grad_norm", 0) > 0 for r in steps) == (method == "scratch")
    for name in ("checkpoint-last.pth", "checkpoint-best.pth"):
        ckpt = load_checkpoint(out / name)
        assert ckpt["config"]["model"] == config["model"]
    assert load_checkpoint(out / "checkpoint-last.pth")["epoch"] == 1


def test_test_split_is_read_once_at_the_end(tmp_path, data, capsys):
    """With val and test splits, val is evaluated every epoch and test once, when the schedule
    is done: with the final weights and with checkpoint-best.pth's, the numbers `--eval` gives
    for those files on the test split. A dataset with one evaluation split has no test record."""
    out, flags = tmp_path / "run", "--pipeline torch --model mae_vit_micro --epochs 3"
    assert train.main(_args(data, out, flags, "--stop_after 2")) == 0
    assert not [r for r in _log(out) if r["type"] == "test"]  # the schedule is not done
    # a best no later epoch can beat: checkpoint-best.pth stays before the last epoch
    best_epoch = load_checkpoint(out / "checkpoint-best.pth")["epoch"]
    last = load_checkpoint(out / "checkpoint-last.pth")
    torch.save({**last, "best_metric": 101.0}, out / "checkpoint-last.pth")
    capsys.readouterr()
    assert train.main(_args(data, out, flags, "--resume auto")) == 0
    printed = capsys.readouterr().out
    assert "other settings" not in printed  # --stop_after is this invocation's alone
    (record,) = [r for r in _log(out) if r["type"] == "test"]
    assert record["split"] == "test" and record["epoch"] == 2 and record["test_samples"] == 320
    assert record["best_val_epoch"] == best_epoch < 2
    assert {"test_acc1", "test_acc5", "test_loss", "test_acc1_at_best_val"} <= set(record)
    assert "epoch 2: loss" in printed and "val acc1" in printed
    assert f"test acc1 (final weights): {record['test_acc1']:.2f}%" in printed
    at_best = f"test acc1 (best-val weights, epoch {best_epoch}): "
    assert at_best + f"{record['test_acc1_at_best_val']:.2f}%" in printed
    # the same scans without their val split (under another name: the digits would be
    # converted again): the test split is the one evaluation split
    one = tmp_path / "one"
    one.mkdir()
    for split, suffix in itertools.product(("train", "test"), (".beton", ".json")):
        (one / f"scans_{split}{suffix}").symlink_to(data / f"digits_{split}{suffix}")
    flags += " --data_path scans"
    for weights, key in (("last", "test_acc1"), ("best", "test_acc1_at_best_val")):
        checkpoint = out / f"checkpoint-{weights}.pth"
        capsys.readouterr()
        assert train.main(_args(one, tmp_path / "eval", flags, "--eval --resume", checkpoint)) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval"]
        assert result["num_samples"] == 320 and result["acc1"] == pytest.approx(record[key])
    assert train.main(_args(one, tmp_path / "alone", flags, "--epochs 1")) == 0
    records = _log(tmp_path / "alone")
    assert [r["type"] for r in records if r["type"] != "step"] == ["epoch"]
    assert records[-1]["val_num_samples"] == 320


def test_a_run_stopped_before_its_report_writes_it_when_resumed(tmp_path, data, monkeypatch):
    """A run that trained every epoch and stopped while it read the test split (a Ctrl-C, the
    OOM killer) is not finished: --resume auto reads the test split and writes the report,
    once; after that, a finished run reads nothing again."""
    args = _args(data, tmp_path, "--pipeline torch --model vit_micro --epochs 1 --resume auto")
    test_once = train.test_once

    def stopped(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "test_once", stopped)
    assert train.main(args) == 130
    assert not (tmp_path / "eval.json").exists()
    monkeypatch.setattr(train, "test_once", test_once)
    for _ in range(2):
        assert train.main(args) == 0
        assert [r["type"] for r in _log(tmp_path) if r["type"] != "step"] == ["epoch", "test"]
    assert set(json.loads((tmp_path / "eval.json").read_text())) >= {"val", "test"}


@pytest.mark.parametrize("during", ["validate", "test_once"])
def test_a_stop_during_the_final_evaluation_is_answered(
    tmp_path, data, capsys, monkeypatch, during
):
    """SIGTERM while the last epoch is validated stops the run at that epoch's end, the test
    split and the report left to --resume auto; one while the test split is read lets the
    report finish, and says so. Both exit 128 + 15 (both went unanswered, with status 0)."""
    args = _args(data, tmp_path, "--pipeline torch --model vit_micro --epochs 1")
    evaluation = getattr(train, during)

    def signalled(*a, **k):  # the signal arrives as the evaluation starts
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluation(*a, **k)

    monkeypatch.setattr(train, during, signalled)
    assert train.main(args) == 128 + signal.SIGTERM
    printed = capsys.readouterr().out
    if during == "validate":
        assert "stopped by SIGTERM after step 10 (the end of epoch 0)" in printed
        assert not (tmp_path / "eval.json").exists()
        monkeypatch.setattr(train, during, evaluation)
        assert train.main([*args, "--resume", "auto"]) == 0
    else:
        assert "SIGTERM came while the run wrote its report, which it finished" in printed
    assert set(json.loads((tmp_path / "eval.json").read_text())) >= {"val", "test"}


def test_a_stop_while_the_best_checkpoint_is_written_loses_nothing(
    tmp_path, data, monkeypatch, capsys
):
    """A second Ctrl-C while an epoch's checkpoint-best.pth is written (the first save of the
    epoch) leaves the checkpoint before: the resumed run trains that epoch again and logs it
    once, and its best checkpoint exists (the epoch's record and best were lost for good)."""
    args = _args(data, tmp_path, "--pipeline torch --model vit_micro --epochs 2")
    save_checkpoint = ssat.run_state.save_checkpoint

    def interrupted(path, **kwargs):
        if Path(path).name == "checkpoint-best.pth" and kwargs["epoch"] == 0:
            raise KeyboardInterrupt("SIGINT after SIGINT")
        return save_checkpoint(path, **kwargs)

    monkeypatch.setattr(ssat.run_state, "save_checkpoint", interrupted)
    assert train.main(args) == 130
    said = "interrupted (SIGINT after SIGINT): stopped at once; to continue from the last "
    assert said + "checkpoint saved, if any, run the same command with --resume auto" in (
        capsys.readouterr().err
    )
    monkeypatch.setattr(ssat.run_state, "save_checkpoint", save_checkpoint)
    assert train.main([*args, "--resume", "auto"]) == 0
    assert [r["epoch"] for r in _log(tmp_path) if r["type"] == "epoch"] == [0, 1]
    assert load_checkpoint(tmp_path / "checkpoint-best.pth")["epoch"] in (0, 1)


def test_embedded_default_learns_the_digits(tmp_path, capsys):
    """`python train.py`'s recipe on all the digits, its schedule shortened to 6 epochs: well
    above chance (10%) on the validation split, and its pictures (the curves, the validation
    confusion matrix, the reconstructions) drawn and named last."""
    cfg = dataclasses.replace(
        parse_config([]),
        data_dir=str(tmp_path / "data"),
        output_dir=str(tmp_path / "demo"),
        epochs=6,
    )
    assert train.run(cfg, DistContext()) == 0
    epochs = [r for r in _log(tmp_path / "demo") if r["type"] == "epoch"]
    assert len(epochs) == 6 and epochs[-1]["val_num_samples"] == VAL
    assert epochs[-1]["val_acc1"] > 50, [round(r["val_acc1"], 1) for r in epochs]
    printed = capsys.readouterr().out
    # a short start summary, not every setting (config.json holds them)
    data = tmp_path / "data" / "digits_train.beton"
    assert f"data: digits ({data}: 1,077 train, 270 val, 450 test images, 10 classes)" in printed
    assert "recipe: the digits recipe (RECIPES in ssat/config.py)" in printed
    assert '"blr"' not in printed
    last = printed.strip().splitlines()[-4:]
    names = ("curves.png", "confusion.png", "reliability.png", "reconstructions.png")
    for line, name in zip(last, names, strict=True):
        assert line.endswith(str(tmp_path / "demo" / name)), line
        assert matplotlib.image.imread(tmp_path / "demo" / name).std() > 0.05  # drawn, not blank


def test_cpu_runs_take_every_core_unless_told_otherwise(monkeypatch):
    """Importing ffcv set torch's threads to 1; a CPU run takes every core, or OMP_NUM_THREADS."""
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(1)
        train.use_all_cores(DistContext())
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        train.use_all_cores(DistContext())
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("pipeline", ["torch", "ffcv"])
def test_resume_repeats_the_uninterrupted_run(tmp_path, data, pipeline):
    """Also the weights' moving average: saved, resumed, and evaluated each epoch. Both engines'
    crops repeat: the torch engine's per sample, ffcv's per batch of the epoch's order."""
    common = (
        f"--pipeline {pipeline} --model mae_vit_micro --epochs 2 --model_ema --model_ema_decay 0.9"
    )
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(_args(data, straight, common)) == 0
    assert train.main(_args(data, split, common, "--stop_after 1")) == 0
    assert load_checkpoint(split / "checkpoint-last.pth")["epoch"] == 0
    assert train.main(_args(data, split, common, "--resume", "auto")) == 0
    a = load_checkpoint(straight / "checkpoint-last.pth")
    b = load_checkpoint(split / "checkpoint-last.pth")
    assert a["epoch"] == b["epoch"] == 1 and a["step"] == b["step"]
    for weights in ("model", "model_ema"):
        for key, value in a[weights].items():
            assert torch.equal(value, b[weights][key]), (weights, key)
    assert not torch.equal(a["model"]["head.weight"], a["model_ema"]["head.weight"])
    epochs = [r for r in _log(straight) if r["type"] == "epoch"]
    assert all(0 <= r["ema_val_acc1"] <= 100 and r["ema_val_num_samples"] == VAL for r in epochs)


def test_killed_run_finishes_when_rerun(tmp_path, data):
    out = tmp_path / "run"
    command = [
        sys.executable,
        "train.py",
        *_args(data, out, "--pipeline torch --model vit_tiny --epochs 3 --resume auto"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny steps: one thread each, as in-process
    proc = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    deadline = time.time() + 300
    while (
        not (out / "log.jsonl").exists()
        or '"epoch": 1, "step": 14' not in (out / "log.jsonl").read_text()
    ):
        assert proc.poll() is None and time.time() < deadline, (
            "the first run ended before it could be killed"
        )
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-way through epoch 1
    proc.wait()
    with open(out / "log.jsonl", "a") as log:  # as a kill in the middle of a line leaves it
        log.write('{"type": "step", "epo')
    assert load_checkpoint(out / "checkpoint-last.pth")["epoch"] == 0
    assert subprocess.run(command, cwd=REPO, capture_output=True, env=env).returncode == 0
    assert load_checkpoint(out / "checkpoint-last.pth")["epoch"] == 2
    assert [r["epoch"] for r in _log(out) if r["type"] == "epoch"] == [0, 1, 2]
    # epoch 1's steps logged before the kill were dropped with the resume: each is logged once
    assert [r["step"] for r in _log(out) if r["type"] == "step"] == [*range(2, 31, 2)]


def _wait_for_log(out: Path, text: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while not (out / "log.jsonl").exists() or text not in (out / "log.jsonl").read_text():
        assert proc.poll() is None, "the run ended before it could be stopped"
        assert time.time() < deadline, f"no {text!r} in the log after {seconds} s"
        time.sleep(0.02)


def _stop(command: list[str], out: Path, when: str, signum: int, logs: Path, rank=None) -> int:
    """Run `command`, send `signum` once `when` is in its log (to the process, or to the
    torchrun worker of rank `rank`), and return its exit status; its output goes to `logs`.
    The trainer sets its own number of CPU threads (all cores, or OMP_NUM_THREADS), so a run
    here and one in this process sum in the same order and their weights compare exactly."""
    with open(logs / "stdout", "w") as stdout, open(logs / "stderr", "w") as stderr:
        proc = subprocess.Popen(command, cwd=REPO, stdout=stdout, stderr=stderr)
        try:
            _wait_for_log(out, when, proc)
            os.kill(proc.pid if rank is None else torchrun_workers(proc.pid)[rank], signum)
            return proc.wait(timeout=180)
        finally:
            if proc.poll() is None:  # a failed test: leave no process behind
                for pid in torchrun_workers(proc.pid).values():
                    os.kill(pid, signal.SIGKILL)
                proc.kill()
                proc.wait()


def test_sigterm_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(tmp_path, data, capsys):
    """SIGTERM inside epoch 1: the step under way finishes, checkpoint-last.pth records the
    place in the epoch, one line says where and how to go on, the exit status is 128 + 15; the
    same command with --resume auto then ends with exactly the uninterrupted run's weights."""
    # a loader worker: its crops, too, must not depend on where the epoch started
    common = ["--pipeline", "torch", "--model", "mae_vit_tiny", "--epochs", 2, "--num_workers", 1]
    straight, split = tmp_path / "straight", tmp_path / "split"
    command = [sys.executable, "train.py", *_args(data, split, *common)]
    # 10 steps an epoch, logged every 2: step 12 is 2 steps into epoch 1
    status = _stop(command, split, '"epoch": 1, "step": 12', signal.SIGTERM, tmp_path)
    assert status == 128 + signal.SIGTERM, (tmp_path / "stderr").read_text()[-3000:]
    ckpt = load_checkpoint(split / "checkpoint-last.pth")
    position = ckpt["position"]
    assert position["epoch"] == 1 and 2 <= position["batch"] < 10, position
    assert ckpt["epoch"] == 0 and ckpt["step"] == 10 + position["batch"]
    lines = [line for line in (tmp_path / "stdout").read_text().splitlines() if "SIGTERM" in line]
    assert len(lines) == 1, lines
    assert f"after step {ckpt['step']} (epoch 1, batch {position['batch']} of 10)" in lines[0]
    assert "--resume auto" in lines[0] and str(split / "checkpoint-last.pth") in lines[0]
    # exported as it stands, its card quotes no numbers: the log measured epoch 0's weights
    assert export.main([str(split), "--out", str(tmp_path / "exported")]) == 0
    card = (tmp_path / "exported" / "README.md").read_text()
    assert f"1 (and {position['batch']} batches of the next) of 2 epochs" in card
    assert "holds no evaluation of these weights" in card and "| val |" not in card

    capsys.readouterr()  # the place in the epoch holds only for the same batch size
    recorded = (split / "config.json").read_bytes()
    assert train.main(_args(data, split, *common, "--batch_size", 16, "--resume", "auto")) == 1
    assert "stopped inside epoch 1 with 1 process(es) of batch 32" in capsys.readouterr().err
    assert (split / "config.json").read_bytes() == recorded  # a refused resume changes nothing
    # and for the same sample order: in pages (a node with less memory) it is another
    assert train.main(_args(data, split, *common, "--in_memory", 0, "--resume", "auto")) == 1
    said = "reading the train split in a random order through the page cache (--in_memory 1), "
    said += "and this run reads it in whole pages, in the page-aware order (--in_memory 0)"
    assert said in capsys.readouterr().err
    assert train.main(_args(data, split, *common, "--resume", "auto")) == 0
    assert train.main(_args(data, straight, *common)) == 0
    a = load_checkpoint(straight / "checkpoint-last.pth")
    b = load_checkpoint(split / "checkpoint-last.pth")
    assert a["epoch"] == b["epoch"] == 1 and a["step"] == b["step"] == 20
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    # and the log: every loss the stopped epoch logged, as if it had not stopped
    timing = {"images_per_s", "train_images_per_s", "data_wait", "train_seconds"}
    timing |= {"epoch_seconds", "peak_memory_mb"}
    logs = [
        [{k: v for k, v in r.items() if k not in timing} for r in _log(out)]
        for out in (straight, split)
    ]
    assert logs[0] == logs[1]


@pytest.mark.xdist_group("processes")
def test_sigusr1_to_one_rank_stops_every_rank_after_the_same_step(tmp_path, data):
    """torchrun, 2 ranks; SIGUSR1 reaches rank 1 only. Both ranks stop after the same step (else
    rank 0 would wait in the next gradient all-reduce until torchrun killed it, saving nothing),
    rank 0 saves both ranks' generators, and --resume auto finishes the epoch."""
    out = tmp_path / "run"
    flags = ["--pipeline", "torch", "--model", "mae_vit_tiny", "--epochs", 1, "--batch_size", 16]
    command = [*TORCHRUN, "train.py", *_args(data, out, *flags)]
    # 160 samples a rank: 10 steps of 16, logged every 2
    status = _stop(command, out, '"step": 2,', signal.SIGUSR1, tmp_path, rank=1)
    assert status != 0  # torchrun reports its workers' exit status 138 as a failure
    ckpt = load_checkpoint(out / "checkpoint-last.pth")
    position = ckpt["position"]
    assert position["epoch"] == 0 and 2 <= position["batch"] < 10 and position["world_size"] == 2
    assert ckpt["step"] == position["batch"] and len(ckpt["rng_ranks"]) == 2
    assert not torch.equal(ckpt["rng_ranks"][0]["torch"], ckpt["rng_ranks"][1]["torch"])
    printed = (tmp_path / "stdout").read_text()
    assert f"stopped by SIGUSR1 after step {ckpt['step']}" in printed
    assert "exitcode  : 138" in (tmp_path / "stderr").read_text()
    done = subprocess.run(
        [*command, "--resume", "auto"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = load_checkpoint(out / "checkpoint-last.pth")
    assert ckpt["epoch"] == 0 and ckpt["step"] == 10 and ckpt["position"]["batch"] == 0


def test_full_disk_at_save_stops_with_one_clear_error(data, small_disk, capsys):
    """Room for the config and the log but not for a checkpoint (about 70 MiB): exit status 1,
    one error line naming the file and the sizes, no traceback, no file left half-written."""
    out = small_disk("16m")
    capsys.readouterr()
    assert (
        train.main(
            _args(data, out, "--pipeline", "torch", "--model", "mae_vit_tiny", "--epochs", 1)
        )
        == 1
    )
    err = capsys.readouterr().err
    # the epoch's first save, checkpoint-best.pth (checkpoint-last.pth comes last)
    assert f"error: cannot save {out / 'checkpoint-best.pth'}: it needs about" in err
    assert "MiB available" in err and "Traceback" not in err
    assert not [name for name in os.listdir(out) if name.endswith((".pth", ".tmp"))]


@pytest.mark.parametrize(
    "model",
    [["--model", "mae_vit_micro"], ["--model", "vit_micro", "--global_pool"]],
    ids=["ssat", "scratch-global-pool"],
)
def test_eval_reproduces_the_logged_accuracy(tmp_path, data, capsys, model):
    """Also for MAE's fine-tuning format: a global-pool head (`fc_norm.*`, no final `norm.*`)."""
    out = tmp_path / "run"
    assert train.main(_args(data, out, "--pipeline", "ffcv", *model, "--epochs", 2)) == 0
    logged = [r for r in _log(out) if r["type"] == "epoch"][-1]
    weights = load_checkpoint(out / "checkpoint-last.pth")["model"]
    if "--global_pool" in model:
        assert "fc_norm.weight" in weights and "norm.weight" not in weights
    capsys.readouterr()
    assert (
        train.main(
            _args(
                data,
                tmp_path / "eval",
                "--pipeline ffcv",
                *model,
                "--eval --resume",
                out / "checkpoint-last.pth",
            )
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval"]
    assert result["num_samples"] == VAL
    assert result["acc1"] == pytest.approx(logged["val_acc1"])
    assert result["loss"] == pytest.approx(logged["val_loss"], rel=1e-5)
    if "--global_pool" in model:
        return
    # into the run's own folder (the default --output_dir of both): its record is kept
    kept = {name: (out / name).read_bytes() for name in ("config.json", "eval.json")}
    again = _args(data, out, "--pipeline ffcv", *model, "--epochs 5 --eval --resume", out)
    assert train.main(again) == 0
    assert f"{out} holds a training run: its config.json and eval.json are left" in (
        capsys.readouterr().out
    )
    assert {name: (out / name).read_bytes() for name in kept} == kept
    tiny = _args(data, tmp_path / "tiny", "--model mae_vit_tiny --eval --resume", out)
    assert train.main(tiny) == 1  # another model: one line that says which
    assert capsys.readouterr().err.strip() == (
        f"error: cannot resume from {out / 'checkpoint-last.pth'}: it holds mae_vit_micro at 16 "
        f"px, patch 4, and this run builds mae_vit_tiny at 16 px, patch 4: give the "
        f"checkpoint's --model, --img_size and --patch_size"
    )
    # the published robustness study: the same weights on perspective-warped images
    warped = _args(data, tmp_path / "warped", "--pipeline ffcv --device cpu", *model)
    assert (
        train.main(
            warped
            + ["--eval", "--perturb_perspective", "--resume", str(out / "checkpoint-last.pth")]
        )
        == 0
    )
    perturbed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval"]
    assert perturbed["num_samples"] == VAL and perturbed["loss"] != pytest.approx(result["loss"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.xdist_group("processes")
def test_distributed_launch_two_processes_with_published_flags(tmp_path, data):
    """The FGCR README's multi-GPU command shape, on the CPU: `python -m torch.distributed.launch
    --nproc_per_node=2 train.py ...` (which passes --local-rank=N), with published flags that
    change nothing here (each explained in one line), --version naming the run's folder, and
    gradient accumulation under DistributedDataParallel (the all-reduce skipped on inner steps)."""
    flags = "--pipeline torch --model mae_vit_micro --epochs 1 --input_size 16 --accum_iter 2"
    flags += " --dist_eval --no_pin_mem"
    launch = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2"]
    command = [*launch, f"--master_port={_free_port()}", "train.py"]
    command += [*_args(data, tmp_path, flags), "--version", "fgcr_digits"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "fgcr_digits"
    config = json.loads((out / "config.json").read_text())
    assert config["version"] == "fgcr_digits" and config["img_size"] == 16
    assert config["no_effect"] == ["dist_eval", "local_rank", "no_pin_mem"]
    for name in config["no_effect"]:
        assert done.stdout.count(f"--{name}: accepted, no effect here (") == 1, done.stdout[-2000:]
    epoch = [r for r in _log(out) if r["type"] == "epoch"][-1]
    assert epoch["val_num_samples"] == VAL  # every sample once across the two ranks
    # each rank read half of the epoch: 5 batches of 32, so 2 optimizer steps of 2 batches
    assert epoch["step"] == (320 // 2) // 32 // 2


def test_compiled_model_trains_an_epoch(tmp_path, data):
    torch._dynamo.reset()
    out = tmp_path / "run"
    assert (
        train.main(
            _args(
                data, out, "--pipeline", "torch", "--model", "vit_micro", "--epochs", 1, "--compile"
            )
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["compile"] is True
    ckpt = load_checkpoint(out / "checkpoint-last.pth")
    assert not any("_orig_mod" in k for k in ckpt["model"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, data, monkeypatch, capsys
):
    out = tmp_path / "run"
    args = _args(data, out, "--pipeline", "torch", "--model", "mae_vit_micro", "--epochs", 3)
    assert train.main(args[:] + ["--stop_after", "1"]) == 0
    good = hashlib.sha256((out / "checkpoint-last.pth").read_bytes()).hexdigest()
    real = ssat.training.ssat_objective
    calls = {"n": 0}

    def poisoned(*a, **kw):
        losses = real(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 4:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(ssat.training, "ssat_objective", poisoned)
    capsys.readouterr()
    assert train.main(args + ["--resume", "auto"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 13" in err  # 10 steps in epoch 0, then the 4th of epoch 1
    assert f"the last good checkpoint is {out / 'checkpoint-last.pth'}" in err
    assert hashlib.sha256((out / "checkpoint-last.pth").read_bytes()).hexdigest() == good
    calls["n"] = 3  # the first step of a new run
    assert train.main(_args(data, tmp_path / "new", "--pipeline torch --model mae_vit_micro")) == 1
    assert "non-finite loss at step 0 (epoch 0); stopping: no checkpoint" in capsys.readouterr().err


def test_eval_interval_validates_every_nth_epoch_and_the_last(tmp_path, data, capsys):
    """--eval_interval 3 over 4 epochs, stopped after 2 and resumed: the split is validated
    after the invocation's last epoch (1), every third (2) and the schedule's last (3);
    checkpoint-best.pth is one of those, and every epoch keeps its record and checkpoint."""
    out = tmp_path / "run"
    flags = "--pipeline torch --model vit_micro --epochs 4 --eval_interval 3"
    assert train.main(_args(data, out, flags, "--stop_after 2")) == 0
    assert train.main(_args(data, out, flags, "--resume auto")) == 0
    epochs = [r for r in _log(out) if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3]
    assert [r["epoch"] for r in epochs if "val_acc1" in r] == [1, 2, 3]
    assert not any(key.startswith("val_") for key in epochs[0])
    assert epochs[0]["loss"] > 0 and epochs[0]["best_acc1"] is None
    printed = capsys.readouterr().out.splitlines()
    assert sum("on cpu, validated every 3 epochs" in line for line in printed) == 2  # each start
    printed = [line for line in printed if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in printed if " val acc1 " in line] == [
        "epoch 1",
        "epoch 2",
        "epoch 3",
    ]
    assert printed[0].startswith("epoch 0: loss") and " val " not in printed[0]
    best = max(epochs[1:], key=lambda r: r["val_acc1"])  # the first of equals, as train.py
    assert load_checkpoint(out / "checkpoint-best.pth")["epoch"] == best["epoch"]
    assert load_checkpoint(out / "checkpoint-last.pth")["epoch"] == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eval_interval", "0"], "--eval_interval 0: the epochs between validations"),
        (["--nb_classes", "7"], "--nb_classes 7 disagrees with the 10 classes"),
        (["--data_path", "nosuch"], "dataset 'nosuch' not found"),
        (["--model", "mae_vit_gigantic"], "unknown model 'mae_vit_gigantic'"),
        (["--model", "vit_tiny", "--method", "ssat"], "needs a decoder"),
        (["--model", "mae_vit_tiny", "--views", "9"], "r=9, k=4, L=16"),
        (["--epochs", "0"], "--epochs 0: the epochs to train, 1 or more"),
        (["--accum_iter", "0"], "--accum_iter 0: micro-batches per optimizer step, 1 or more"),
        (["--patch_size", "0"], "--patch_size 0: the patch size in pixels, 1 or more"),
        (["--drop_path", "1.5"], "--drop_path 1.5: a probability, in [0, 1)"),
        (["--blr", "-1"], "--blr -1.0: the base learning rate, 0 or more"),
        (["--seed", "-1"], "--seed -1: the random seed, 0 or more"),
        (["--smoothing", "1"], "--smoothing 1.0: the label smoothing, a probability, in [0, 1)"),
        (["--model", "mae_vit_micro", "--mask_ratio", "0"], "mask_ratio 0.0 masks no patch"),
    ],
)
def test_clear_errors(tmp_path, data, capsys, extra, message):
    argv = _args(data, tmp_path / "run", "--pipeline", "torch", "--epochs", 1) + extra
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "config.json").exists()  # no record of a run that never was


def test_an_output_dir_that_cannot_be_a_folder(tmp_path, data, capsys):
    (tmp_path / "file").write_text("")
    for folder, reason in [("file", "a file of that name is there"), ("file/run", "is a file")]:
        assert train.main(_args(data, tmp_path / folder, "--epochs 1")) == 1
        err = capsys.readouterr().err
        assert f"cannot use {tmp_path / folder} as the output folder: " in err and reason in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path, data, capsys):
    argv = _args(data, tmp_path / "run", "--pipeline torch --epochs 1 --device cuda")
    assert train.main(argv) == 1
    assert "--device cuda: no CUDA device is visible" in capsys.readouterr().err


def test_config_file_and_flags(tmp_path, data):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: mae_vit_tiny\nmask_views: 2\nepochs: 7\nsmoothing: 0.2\n")

    parsed = parse_config(["--config", str(cfg), "--epochs", "1", "--views", "3"])
    assert (parsed.model, parsed.mask_views, parsed.epochs, parsed.smoothing) == (
        "mae_vit_tiny",
        3,
        1,
        0.2,
    )
    assert parsed.resolve(cuda=False).method == "fgcr" and parsed.mixup == 0.0
    assert parse_config(["--model", "vit_small"]).resolve(cuda=False).mixup == 0.8
    # MAE's head flags: --global_pool, and --cls_token switching back (the later flag wins)
    assert parse_config(["--global_pool"]).global_pool
    assert not parse_config(["--global_pool", "--cls_token"]).global_pool
    assert not parse_config(["--epochs", "1"]).global_pool
    # the published scripts' names: --input_size, and flags accepted without effect
    published = parse_config("--input_size 64 --pin_mem --world_size 8 --dist_url env://".split())
    assert published.img_size == 64
    assert published.no_effect == ["dist_url", "pin_mem", "world_size"]
    aug = parse_config(  # on a dataset with the published defaults: RandAugment on
        "--data_path c10 --remode rand --recount 2 --cutmix_minmax 0.2 0.8 --mixup_prob 0.5 "
        "--mixup_mode pair --mixup_switch_prob 0.3 --resplit --color_jitter 0.4 --log_dir tb "
        "--start_epoch 3".split()
    ).resolve(cuda=False)
    assert (aug.remode, aug.recount, aug.cutmix_minmax) == ("rand", 2, [0.2, 0.8])
    assert (aug.mixup_prob, aug.mixup_switch_prob, aug.mixup_mode) == (0.5, 0.3, "pair")
    assert (aug.log_dir, aug.start_epoch) == ("tb", 3)
    assert aug.no_effect == ["resplit", "color_jitter"]  # RandAugment replaces colour jitter
    with pytest.raises(ValueError, match="colour jitter is not implemented"):
        parse_config("--color_jitter 0.4 --aa none".split()).resolve(cuda=False)
    for flag in ("--token_size 4", "--vis_mask_ratio 0.5", "--mask_regular"):
        with pytest.raises(ValueError, match="Swin/PVT backbones"):
            parse_config(flag.split())
    default = parse_config([])
    assert (default.data_path, default.model, default.img_size) == ("digits", "mae_vit_micro", 16)
    # the recipe belongs to the dataset: a flag on the digits keeps the rest of it (the file's
    # settings above beat it); the bare command alone also draws pictures into output/demo
    one = parse_config(["--epochs", "1"])
    assert (one.model, one.img_size, one.patch_size, one.batch_size, one.aa, one.epochs) == (
        "mae_vit_micro",
        16,
        4,
        16,
        "none",
        1,
    )
    assert parsed.img_size == 16 and parsed.batch_size == 16
    assert default.pictures and not one.pictures and one.output_dir == "output"
    # and what its stop message says to run, `--resume auto` alone, continues it
    for again in (["--resume", "auto"], ["--resume=auto"]):
        resumed = parse_config(again)
        assert dataclasses.replace(resumed, resume=default.resume) == default
        assert resumed.resume == "auto"
    c10 = parse_config(["--data_path", "c10", "--epochs", "1"])
    assert (c10.model, c10.img_size, c10.batch_size, c10.aa) == (
        "mae_vit_tiny",
        224,
        64,
        "rand-m9-mstd0.5-inc1",
    )
    (tmp_path / "bad.json").write_text(json.dumps({"epoch": 3}))
    with pytest.raises(ValueError, match="unknown setting"):
        parse_config(["--config", str(tmp_path / "bad.json")])
    assert os.environ.get("RANK") is None  # in-process runs stay single-process


@pytest.mark.parametrize("source", ["beton", "folder"])
def test_trains_with_dali_on_the_cpu(tmp_path, data, source, capsys):
    """DALI's CPU decoder, from the .beton files or from an image folder with train/ and val/;
    asked to read in whole pages, the .beton is; the folder is read file by file, and says so
    whatever --in_memory decides (auto: through the page cache, which a folder has no use for)."""
    if source == "folder":
        fabricate.image_folder(tmp_path / "folder", {"train": 32, "val": 8}, classes=4)
        args = [
            "--data_path",
            str(tmp_path / "folder"),
            "--output_dir",
            str(tmp_path / "run"),
            *SMALL,
        ]
    else:  # in whole pages, in the page-aware order (a dataset larger than memory)
        args = _args(data, tmp_path / "run", "--in_memory", "0")
    assert (
        train.main([*args, "--pipeline", "dali", "--model", "mae_vit_micro", "--epochs", "3"]) == 0
    )
    reading = {
        "folder": "reading: an image folder: read file by file, in a random order",
        "beton": "reading: in_memory=0 (as asked): read in whole pages by the loader",
    }
    assert reading[source] in capsys.readouterr().out
    epochs = [r for r in _log(tmp_path / "run") if r["type"] == "epoch"]
    steps = [r for r in _log(tmp_path / "run") if r["type"] == "step"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert all(r["val_num_samples"] == (32 if source == "folder" else VAL) for r in epochs)
    assert sum(r["loss"] for r in steps[-2:]) < sum(r["loss"] for r in steps[:2])
    assert (tmp_path / "run" / "checkpoint-best.pth").is_file()


def test_image_folders_need_dali(tmp_path, capsys):
    fabricate.image_folder(tmp_path / "folder", {"train": 2, "val": 1}, classes=2)
    assert (
        train.main(
            [
                "--data_path",
                str(tmp_path / "folder"),
                "--pipeline",
                "torch",
                "--output_dir",
                str(tmp_path / "run"),
                *SMALL,
            ]
        )
        != 0
    )
    assert "read it with --pipeline dali" in capsys.readouterr().err


def test_tensorboard_event_files(tmp_path, data):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    out = tmp_path / "run"
    assert (
        train.main(
            _args(data, out, "--pipeline", "torch", "--model", "mae_vit_micro", "--epochs", 2)
        )
        == 0
    )
    board = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    assert {"step/loss", "step/rec", "step/lr", "epoch/val_acc1", "epoch/data_wait"} <= tags
    steps = [r for r in _log(out) if r["type"] == "step"]
    assert [e.step for e in board.Scalars("step/loss")] == [r["step"] for r in steps]
    assert [round(e.value, 4) for e in board.Scalars("epoch/val_acc1")] == [
        round(r["val_acc1"], 4) for r in _log(out) if r["type"] == "epoch"
    ]


def test_finetune_uses_layer_decay(tmp_path, data):
    """A --finetune run trains with MAE's layer-wise rates: the embeddings at 0.75 ** 4 of the
    schedule's rate for a 3-block ViT (micro), the head at the full rate."""
    pre = tmp_path / "pre"
    assert (
        train.main(
            _args(data, pre, "--pipeline", "torch", "--model", "mae_vit_micro", "--epochs", 1)
        )
        == 0
    )
    out = tmp_path / "ft"
    assert (
        train.main(
            _args(
                data,
                out,
                "--pipeline torch --model vit_micro --global_pool --finetune",
                pre / "checkpoint-last.pth",
                "--epochs 1 --subset_size 0.5",
            )
        )
        == 0
    )
    groups = load_checkpoint(out / "checkpoint-last.pth")["optimizer"]["param_groups"]
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales[0] == pytest.approx(0.75**4) and scales[-1] == 1.0 and len(scales) == 5
    epoch = [r for r in _log(out) if r["type"] == "epoch"][-1]
    # a limited-data run on half the split: 160 samples, 5 steps of 32, the subset's seed logged
    assert epoch["train_samples"] == 160 and epoch["step"] == 5 and epoch["subset_seed"] == 0
    lr = epoch["lr"]
    assert all(g["lr"] == pytest.approx(lr * g["lr_scale"]) for g in groups)
    # the FGCR README's fine-tuning command: `main_scratch.py -u --resume mae_vit_tiny.pth`,
    # a file of weights alone: the run starts from them at epoch 0 (no layer decay: as there)
    weights = tmp_path / "mae_vit_tiny.pth"
    torch.save({"model": load_checkpoint(pre / "checkpoint-last.pth")["model"]}, weights)
    published = tmp_path / "published"
    argv = _args(data, published, "-u --pipeline torch --model vit_micro --epochs 1 --resume")
    done = subprocess.run(
        [sys.executable, "train.py", *argv, weights, "--subset_size", "0.5"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "-u: accepted, no effect here" in done.stdout
    assert f"--resume {weights}: the file holds weights but no optimizer state" in done.stdout
    loaded = rf"initialised from {re.escape(str(weights))}: missing 0 keys, unused [1-9]"
    assert re.search(loaded, done.stdout)  # the encoder and head, not the decoder
    epochs = [r for r in _log(published) if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0]
    groups = load_checkpoint(published / "checkpoint-last.pth")["optimizer"]["param_groups"]
    assert {g.get("lr_scale", 1.0) for g in groups} == {1.0}


def test_accumulation_equals_the_large_batch(tmp_path, data):
    """--accum_iter 2 --batch_size 16 gives the weights of --batch_size 32 (same effective batch,
    learning rate and schedule; no random augmentation on the device, SSAT with no dropout)."""
    # a clip that never acts, for the logged gradient norms: equal only if each micro-batch's
    # loss is divided by their number (Adam's steps alone would hide a factor of 2)
    same = "--pipeline torch --model mae_vit_micro --epochs 1 --aa none --reprob 0 --clip_grad 1e9"
    big, small = tmp_path / "big", tmp_path / "small"
    assert train.main(_args(data, big, same, "--batch_size 32")) == 0
    assert train.main(_args(data, small, same, "--batch_size 16 --accum_iter 2")) == 0
    a, b = (load_checkpoint(out / "checkpoint-last.pth") for out in (big, small))
    assert a["step"] == b["step"] == 10  # optimizer steps: 320 samples / 32
    for key, value in a["model"].items():
        other = b["model"][key]
        if key.endswith("attn.qkv.bias"):
            # the key bias's true gradient is 0 (softmax ignores a shift shared by all keys), so
            # its gradient is rounding noise that Adam scales up to steps: compare q and v only
            q, _, v = value.chunk(3)
            value, other = torch.cat([q, v]), torch.cat([other.chunk(3)[0], other.chunk(3)[2]])
        torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-6, msg=key)
    for key in ("lr", "grad_norm", "loss"):
        logged = [[r[key] for r in _log(out) if r["type"] == "step"] for out in (big, small)]
        assert logged[0] == pytest.approx(logged[1], rel=1e-4), key


def test_resume_with_another_batch_size_goes_on_from_the_epoch_reached(tmp_path, data, capsys):
    """A run continued at an epoch's end with another batch size takes another number of
    optimizer steps an epoch: its schedule goes on from the epoch reached, as one trained with
    that batch size from the start (the published code counts its schedule in epochs)."""
    flags = "--pipeline torch --model vit_micro --epochs 2"
    straight, changed = tmp_path / "straight", tmp_path / "changed"
    assert train.main(_args(data, straight, flags, "--batch_size 16")) == 0
    assert train.main(_args(data, changed, flags, "--stop_after 1")) == 0  # 10 steps of 32
    capsys.readouterr()
    assert train.main(_args(data, changed, flags, "--batch_size 16 --resume auto")) == 0
    said = capsys.readouterr().out
    assert "10 optimizer steps to epoch 1, batch 0, where this run takes 20 an epoch" in said
    assert "was trained with other settings (batch_size 32, now 16): it goes on" in said
    logged = [[r for r in _log(out) if r["type"] == "step"] for out in (straight, changed)]
    lrs = [[r["lr"] for r in records if r["epoch"] == 1] for records in logged]
    assert len(lrs[0]) == 10 and lrs[0] == lrs[1]
    # the steps go on counting the optimizer steps taken: 10 of 32, then 20 of 16
    assert [r["step"] for r in logged[1]] == [*range(2, 11, 2), *range(12, 31, 2)]


def test_start_epoch_goes_on_from_there(tmp_path, data):
    """MAE's --start_epoch without --resume: epochs before it are skipped and the schedule is
    where it would be after them; TensorBoard files go to --log_dir."""
    out = tmp_path / "run"
    flags = f"--pipeline torch --model vit_micro --epochs 2 --start_epoch 1 --log_dir {tmp_path}/tb"
    assert train.main(_args(data, out, flags)) == 0
    epochs = [r for r in _log(out) if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1] and epochs[0]["step"] == 20
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_resume_names_the_settings_that_changed():
    """A run resumed with other flags goes on with them, as the published code's does, and
    says which: r = 3 mask views on an SSAT run make it FGCR. Where the data are found and what
    this one invocation does (workers, --stop_after) are not compared."""
    base = "--data_path digits --epochs 2"
    trained = parse_config(base.split()).resolve(cuda=False).to_dict()
    flags = f"{base} --data_dir elsewhere --resume auto --num_workers 3 --stop_after 1"
    assert changed_settings(trained, parse_config(flags.split()).resolve(cuda=False)) == []
    fgcr = parse_config(f"{base} --views 3".split()).resolve(cuda=False)
    assert changed_settings(trained, fgcr) == ["method 'ssat', now 'fgcr'", "mask_views 1, now 3"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--aa", "rand-9-inc1"], "RandAugment config 'rand-9-inc1': section '9' is not a key"),
        (["--aa", "rand-m9-mstd0.5-inc1-"], "an empty section is not a key and a number"),
        (["--min_scale", "1.5"], "--min_scale 1.5: the smallest crop area, a fraction of the"),
        (["--hflip", "2"], "--hflip 2.0: a probability, in [0, 1]"),
        (["--reprob", "1.5"], "--reprob 1.5: a probability, in [0, 1]"),
        (["--mixup_prob", "1.5"], "--mixup_prob 1.5: a probability, in [0, 1]"),
        (["--mixup_switch_prob", "-1"], "--mixup_switch_prob -1.0: a probability, in [0, 1]"),
        (["--cutmix_minmax", "0.8", "0.2"], "--cutmix_minmax 0.8 0.2: the cutmix box's shortest"),
    ],
)
def test_augmentation_settings_out_of_range_are_one_line(tmp_path, data, capsys, extra, message):
    """Refused before a batch is made, whichever the pipeline: one line, no traceback."""
    argv = _args(data, tmp_path / "run", "--pipeline", "torch", "--epochs", 1) + extra
    assert train.main(argv) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "run" / "config.json").exists()
