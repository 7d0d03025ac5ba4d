"""What would slow a GPU down, found on a CPU: host-device synchronisations in the training loop
and recompilations of the compiled step (tests/gpu_ready.py counts both; tests/test_gpu.py runs
the same loop on a GPU with CUDA's sync check set to raise).

The loop reads the device once per log interval (one copy of the losses, the gradient norms and
the non-finite check) and at no other step; the compiled step compiles once and never again,
through the epochs, the evaluations between them, the learning-rate schedule and a resume."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import ssat.training
import train
from convert.digits_to_ffcv import main as convert_digits
from gpu_ready import BLOCKING_COPY, CompileCounter, SyncCounter

SMALL = (  # on the CPU also where CUDA is there: the counts are the CPU's
    "--device cpu --img_size 16 --patch_size 4 --num_workers 0 --pipeline torch "
    "--warmup_epochs 0.5 --blr 4e-3"
    # the published augmentation (the digits' recipe turns it off): its device-side work counts
    " --aa rand-m9-mstd0.5-inc1 --reprob 0.25 --hflip 0.5 --min_scale 0.08"
).split()

# the loop's configurations: methods, and what adds work between the steps
CONFIGS = {
    "scratch": "--model vit_micro",
    "ssat": "--model mae_vit_micro",
    "fgcr": "--model mae_vit_micro --views 2",
    "mixup_cutmix": "--model mae_vit_micro --mixup 0.8 --cutmix 1.0",
    "ema": "--model mae_vit_micro --model_ema",
    "clip_accum": "--model mae_vit_micro --clip_grad 1.0 --accum_iter 2",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Digits: 320 scans of train and test, the 270 of val."""
    out = tmp_path_factory.mktemp("gpu_ready_data")
    assert convert_digits(["--out_dir", str(out), "--limit", "320", "--num_workers", "2"]) == 0
    return out


def _args(data: Path, out: Path, extra: str) -> list[str]:
    return [
        *("--data_path", "digits", "--data_dir", str(data), "--output_dir", str(out)),
        *SMALL,
        *extra.split(),
    ]


def _steps_logged(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["type"] == "step"]


def _count_epochs(monkeypatch, make_counter, function: str = "train_one_epoch") -> list:
    """Run every call of train.py's `function` (its training epochs) under a fresh counter;
    returns them, in order."""
    counters, original = [], getattr(train, function)

    def counted(*args, **kwargs):
        counters.append(make_counter())
        with counters[-1]:
            return original(*args, **kwargs)

    monkeypatch.setattr(train, function, counted)
    return counters


def _reads_and_copies(syncs: SyncCounter) -> tuple[list, list]:
    """The host's reads of the device outside the loader's host work, and the blocking copies
    to the device anywhere."""
    copies = [where for op, where in syncs.events if op == BLOCKING_COPY]
    reads = [
        (op, where)
        for op, where in syncs.events
        if op != BLOCKING_COPY and not where.startswith("pipelines/")
    ]
    return reads, copies


def test_the_counter_sees_what_would_wait():
    """A scalar read, a data-dependent shape and a host copy by the project's code are counted,
    with their place; RandAugment's sharpness, whose kernel goes to the device without
    blocking, adds nothing."""
    from pipelines.randaugment import sharpness
    from ssat.training import host_values

    x = torch.arange(6.0)
    with SyncCounter() as syncs:
        x.sum().item()
        torch.nonzero(x > 2)
        host_values(x)
    assert [op for op, _ in syncs.events] == ["_local_scalar_dense", "nonzero", "tolist"]
    assert syncs.events[-1][1].startswith("ssat/training.py:")
    with SyncCounter() as syncs:
        sharpness(torch.rand(2, 3, 8, 8) * 255, torch.tensor([1.5, 0.5]))
    assert syncs.events == []


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_the_loop_reads_the_device_once_per_log_interval(tmp_path, data, monkeypatch, config):
    """An epoch of 10 batches, a log every 4 optimizer steps: the host reads the device at the
    logged steps only (one copy each), never between them, and nothing copies to the device
    with a blocking copy, the loader's device-side augmentation included. The loader's host
    work (the torch engine decodes and crops on the host; RandAugment draws its choices there)
    is not counted as reads: on a GPU it never waits for the device."""
    epochs = _count_epochs(monkeypatch, SyncCounter)
    evaluations = _count_epochs(monkeypatch, SyncCounter, "evaluate")
    extra = f"{CONFIGS[config]} --batch_size 32 --epochs 1 --log_interval 4"
    assert train.main(_args(data, tmp_path, extra)) == 0
    (syncs,) = epochs
    reads, copies = _reads_and_copies(syncs)
    logged = _steps_logged(tmp_path)
    print(
        f"{config}: {len(reads)} host reads and {len(copies)} blocking copies to the device "
        f"in 10 steps, {len(logged)} log intervals"
    )
    assert len(logged) == (2 if "accum" in config else 3)  # steps 4, 8, 10 (5 with accum 2)
    assert not copies, syncs.by_place()
    # one read per log interval, all at the one place that reads
    assert len(reads) == len(logged), syncs.by_place()
    assert len({where for _, where in reads}) == 1, syncs.by_place()
    # the evaluation between epochs (and the EMA weights'): one read each, at its end
    assert len(evaluations) == (2 if config == "ema" else 1)
    for counted in evaluations:
        assert [len(x) for x in _reads_and_copies(counted)] == [1, 0], counted.by_place()


def test_the_compiled_step_compiles_once(tmp_path, data, monkeypatch):
    """Two epochs of 13 batches of 24 (the last 8 samples dropped) with the evaluation (the last
    of its batches partial) between them and the learning rate changing every step; epoch 1 is
    stopped after 5 steps by SIGUSR1 and resumed. One graph and its backward are compiled in
    epoch 0, nothing after: no graph break, no recompilation, also for the resumed run's new
    model. The graphs are compiled by AOTAutograd without inductor's code generation (where
    recompilations are decided; tests/test_train.py compiles with inductor)."""
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compile_(m, backend="aot_eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    calls, step_call = [0], ssat.training.TrainStep.__call__

    def step_then_signal(self, batch, micro=0):
        losses = step_call(self, batch, micro)
        calls[0] += 1
        if calls[0] == 13 + 5:  # as a scheduler would, inside epoch 1
            os.kill(os.getpid(), signal.SIGUSR1)
        return losses

    monkeypatch.setattr(ssat.training.TrainStep, "__call__", step_then_signal)
    epochs = _count_epochs(monkeypatch, CompileCounter)
    args = _args(
        data,
        tmp_path,
        "--model mae_vit_micro --compile --batch_size 24 --epochs 2 --log_interval 4",
    )
    try:
        assert train.main(args) == 128 + signal.SIGUSR1
        assert train.main(args + ["--resume", "auto"]) == 0
    finally:
        torch._dynamo.reset()  # the cheap backend's code stays in no later test
    counts = [dict(c.triggers) for c in epochs]
    print(f"compilations per epoch (epoch 0, epoch 1 stopped, epoch 1 resumed): {counts}")
    assert counts == [{"DYNAMO": 1, "LAZY_BACKWARD": 1}, {}, {}]
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not epochs[0].reasons  # no guard ever failed
    logged = _steps_logged(tmp_path)
    assert len({r["lr"] for r in logged}) > 3  # the schedule ran
    assert [r["step"] for r in logged][-1] == 26  # 13 + 13: all of epoch 1 after the resume
