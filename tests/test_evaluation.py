"""Evaluation metrics: against scikit-learn on fixed scores, a class absent from a batch, a rank
and the split, and the same numbers with 1, 2 and 3 gloo ranks over a split that does not
divide among them."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from sklearn import metrics as skm

import fabricate
from convert.medmnist_to_ffcv import main as convert_medmnist
from pipelines import create_loader
from ssat.config import TrainConfig
from ssat.distributed import DistContext
from ssat.evaluation import classification_metrics, evaluate, gather_split
from ssat.models import create_model

CFG = dataclasses.replace(TrainConfig(), amp="none")


def _scores(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)).astype(np.float32)
    logits[np.arange(n), labels] += 1.0  # better than chance, not perfect
    return logits, labels


@pytest.mark.parametrize("classes", [2, 4, 8])
def test_metrics_equal_scikit_learn(classes):
    logits, labels = _scores(61, classes, seed=classes)
    got = classification_metrics(logits, labels)
    probs = torch.from_numpy(logits).double().softmax(1).numpy()
    pred = logits.argmax(1)
    assert got["acc1"] == pytest.approx(100 * skm.accuracy_score(labels, pred))
    assert got["balanced_acc"] == pytest.approx(100 * skm.balanced_accuracy_score(labels, pred))
    assert got["f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro"))
    if classes == 2:
        assert got["auc"] == pytest.approx(skm.roc_auc_score(labels, probs[:, 1]))
    else:
        assert got["auc"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr"))
    assert got["confusion"] == skm.confusion_matrix(labels, pred).tolist()
    assert got["per_class_acc"] == pytest.approx(
        list(100 * skm.recall_score(labels, pred, average=None))
    )
    ce = F.cross_entropy(torch.from_numpy(logits).double(), torch.from_numpy(labels))
    assert got["loss"] == pytest.approx(ce.item())
    assert ("acc5" in got) == (classes > 5)  # top-5 of 5 or fewer classes is always 100%
    if classes > 5:
        top5 = skm.top_k_accuracy_score(labels, probs, k=5)
        assert got["acc5"] == pytest.approx(100 * top5)
    assert got["num_samples"] == 61


def test_a_class_absent_from_the_split():
    """Class 3 of 5 never occurs: its row of the confusion matrix is empty, its accuracy
    undefined, and AUC averages the one-vs-rest AUCs of the classes that occur."""
    logits, labels = _scores(40, 5, seed=1)
    labels[labels == 3] = 0
    got = classification_metrics(logits, labels)
    probs = torch.from_numpy(logits).double().softmax(1).numpy()
    present = [0, 1, 2, 4]
    by_hand = np.mean([skm.roc_auc_score(labels == c, probs[:, c]) for c in present])
    assert got["auc"] == pytest.approx(by_hand)
    assert got["per_class_acc"][3] is None and sum(got["confusion"][3]) == 0
    pred = logits.argmax(1)
    with pytest.warns(UserWarning):  # what scikit-learn says of a predicted, absent class
        balanced = skm.balanced_accuracy_score(labels, pred)
    assert (pred == 3).any() and got["balanced_acc"] == pytest.approx(100 * balanced)
    one_class = classification_metrics(logits[labels == 0], labels[labels == 0])
    assert one_class["auc"] is None  # undefined, not a number
    json.dumps(one_class, allow_nan=False)  # eval.json stays strict JSON


def test_gathering_keeps_each_sample_once():
    """A padded shard repeats samples; the index keeps each once, in index order."""
    logits, labels = _scores(7, 3, seed=2)
    idx = np.array([6, 0, 3, 0, 5, 1, 2, 4])  # sample 0 twice, as padding adds it
    rows = np.array([6, 0, 3, 0, 5, 1, 2, 4])
    got_labels, got_logits = gather_split(idx, labels[rows], logits[rows], DistContext())
    assert got_labels.tolist() == labels.tolist()
    assert np.array_equal(got_logits, logits)


def _rank(rank: int, world: int, store: str, beton: str, weights: str, out: str) -> None:
    """One of `world` gloo ranks: evaluate the model over its shard of the split."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        ctx = DistContext(rank, world, rank, torch.device("cpu"), dist.new_group(backend="gloo"))
        result = _evaluate(beton, weights, ctx)
        Path(out, f"{world}_{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _evaluate(beton: str, weights: str, ctx: DistContext) -> dict:
    torch.set_num_threads(1)
    model = create_model("vit_micro", num_classes=8, img_size=16, patch_size=4)
    model.load_state_dict(torch.load(weights))
    loader = create_loader(
        "torch",
        beton,
        train=False,
        batch_size=2,
        img_size=16,
        rank=ctx.rank,
        world_size=ctx.world_size,
        num_workers=0,
    )
    labels = [b["labels"].tolist() for b in loader]
    return {"metrics": evaluate(model, loader, CFG, ctx), "labels": labels}


def test_the_same_numbers_on_1_2_and_3_ranks(tmp_path):
    """BloodMNIST-shaped, 8 classes, a test split of 5 images (classes 5-7 absent): 2 and 3 ranks
    hold shards of unequal length, some without a class that others have."""
    fabricate.medmnist(tmp_path / "npz", "bloodmnist", 28, True, 8)
    args = ["--name", "bloodmnist", "--src", tmp_path / "npz", "--out_dir", tmp_path]
    assert convert_medmnist([str(a) for a in args]) == 0
    beton, weights = str(tmp_path / "bloodmnist_test.beton"), str(tmp_path / "weights.pt")
    torch.manual_seed(0)
    model = create_model("vit_micro", num_classes=8, img_size=16, patch_size=4)
    torch.save(model.state_dict(), weights)
    alone = _evaluate(beton, weights, DistContext())["metrics"]
    assert alone["num_samples"] == 5
    for world in (2, 3):
        store = tmp_path / f"store{world}"
        mp.start_processes(
            _rank,
            args=(world, str(store), beton, weights, str(tmp_path)),
            nprocs=world,
            start_method="fork",  # the ranks inherit the imports: no start-up cost
        )
        shards = [json.loads((tmp_path / f"{world}_{r}.json").read_text()) for r in range(world)]
        sizes = [sum(len(b) for b in s["labels"]) for s in shards]
        assert sorted(sizes) != [5 // world] * world and sum(sizes) == 5  # uneven shards
        assert any(set(sum(s["labels"], [])) != {0, 1, 2, 3, 4} for s in shards)
        for shard in shards:
            got = shard["metrics"]
            assert got["confusion"] == alone["confusion"] and got["num_samples"] == 5
            for key in ("acc1", "balanced_acc", "f1", "auc", "loss"):
                assert got[key] == pytest.approx(alone[key], abs=1e-6), (world, key)


def test_a_two_class_run_reports_auc_and_no_top5(tmp_path, capsys):
    """PneumoniaMNIST-shaped (2 classes, 28 px grey scans): each epoch logs balanced accuracy,
    macro-F1, AUC and per-class accuracy, never top-5; --best_metric auc picks the best
    checkpoint; the end of the run prints the block and writes eval.json; --pictures draws the
    confusion matrix."""
    import train
    import visualize

    fabricate.medmnist(tmp_path / "npz", "pneumoniamnist", 28, False, 2)
    args = ["--name", "pmnist", "--src", tmp_path / "npz", "--out_dir", tmp_path / "data"]
    assert convert_medmnist([str(a) for a in args]) == 0
    out = tmp_path / "run"
    flags = (
        f"--data_path pmnist --data_dir {tmp_path / 'data'} --output_dir {out} --model vit_micro "
        "--img_size 16 --patch_size 4 --batch_size 4 --epochs 2 --warmup_epochs 1 "
        "--num_workers 0 --pipeline torch --best_metric auc --pictures"
    )
    capsys.readouterr()
    assert train.main(flags.split()) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    for r in epochs:
        assert {"val_acc1", "val_balanced_acc", "val_f1", "val_auc", "best_auc"} <= set(r)
        assert "val_acc5" not in r and len(r["val_per_class_acc"]) == 2
    (test,) = [r for r in records if r["type"] == "test"]
    assert {"test_auc", "test_auc_at_best_val"} <= set(test) and "test_acc5" not in test
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["class_names"] == ["normal", "pneumonia"]
    assert evaluated["val"]["num_samples"] == 4 and evaluated["test"]["num_samples"] == 5
    assert np.array(evaluated["test"]["confusion"]).sum() == 5
    assert evaluated["val"]["auc"] == pytest.approx(epochs[-1]["val_auc"])
    block = printed[printed.index("val: acc1") :]
    assert "AUC" in block and "acc5" not in printed
    assert "val per-class acc (%): normal" in block and "confusion" in block
    assert (out / "confusion.png").stat().st_size > 0
    # calibration: in eval.json, the log and the printed block, and its picture
    assert evaluated["test"]["nll"] == pytest.approx(evaluated["test"]["loss"])
    assert (
        0 <= evaluated["val"]["ece"] <= 100 and sum(evaluated["val"]["reliability"]["count"]) == 4
    )
    assert {"val_ece", "val_nll"} <= set(epochs[-1]) and {"test_ece", "test_nll"} <= set(test)
    assert "ECE" in block and "NLL" in block
    assert (out / "reliability.png").stat().st_size > 0
    # and afterwards, of any split of the file
    drawn = tmp_path / "test_reliability.png"
    argv = ["reliability", str(out / "eval.json"), "--split", "test", "--out", str(drawn)]
    assert visualize.main(argv) == 0 and drawn.stat().st_size > 0
    assert visualize.main([*argv[:2], "--split", "train"]) == 1
    assert "no train reliability bins" in capsys.readouterr().err
    print(block)


def test_ece_and_nll_equal_a_direct_computation():
    """Known logits: the top-1 confidences fall in known bins; ECE is the count-weighted
    |accuracy - confidence| over the 15 equal-width bins, NLL the mean -log p(true class)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 4)) * 3
    labels = rng.integers(0, 4, size=200)
    result = classification_metrics(logits, labels)
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    ece = 0.0
    for b in range(15):
        inside = (confidence > b / 15) & (confidence <= (b + 1) / 15)
        if inside.any():
            gap = (predicted[inside] == labels[inside]).mean() - confidence[inside].mean()
            ece += inside.mean() * abs(gap)
    assert result["ece"] == pytest.approx(100 * ece, abs=1e-9)
    nll = -np.log(probs[np.arange(200), labels]).mean()
    assert result["nll"] == pytest.approx(nll, rel=1e-9)
    assert (
        result["reliability"]["count"]
        == np.histogram(confidence, np.linspace(0, 1, 16))[0].tolist()
    )
    # a certain, right model: no calibration error, nothing to pay
    sure = classification_metrics(np.eye(3)[[0, 1, 2, 1]] * 50, np.array([0, 1, 2, 1]))
    assert sure["ece"] == pytest.approx(0, abs=1e-9) and sure["nll"] == pytest.approx(0, abs=1e-9)


def test_compare_tabulates_any_metric(tmp_path):
    """compare.py --metric auc: the runs' val AUC per epoch, and the test AUC of the final and
    of the best-val weights, as fractions."""
    import compare

    args, shared = compare.parse_args(
        f"--methods ssat --seeds 0 1 --metric auc --output_dir {tmp_path} -- --epochs 2".split()
    )
    runs = compare.plan(args, shared)
    for run, (val, test) in zip(runs, (([0.6, 0.8], 0.7), ([0.5, None], 0.9)), strict=True):
        run.folder.mkdir(parents=True)
        epochs = [
            {"type": "epoch", "epoch": e, "val_acc1": 50.0, "best_acc1": 50.0, "val_auc": v}
            for e, v in enumerate(val)
        ]
        record = {"type": "test", "test_acc1": 50.0, "test_acc1_at_best_val": 50.0}
        record.update(test_auc=test, test_auc_at_best_val=test - 0.1)
        lines = [json.dumps({**r, "train_seconds": 1.0}) for r in epochs] + [json.dumps(record)]
        (run.folder / "log.jsonl").write_text("\n".join(lines) + "\n")
        (run.folder / "eval.json").write_text("{}\n")  # a finished run's report
    results = [compare.result(run, "auc") for run in runs]
    assert results[0].curve == [0.6, 0.8] and results[0].best == 0.8
    assert results[1].best == 0.5 and np.isnan(results[1].final)  # an undefined AUC
    compare.report(runs, args, shared, "val")
    table = (tmp_path / "results.md").read_text()
    assert "| final AUC, test | best-val AUC, test |" in table
    assert "| ssat | mae_vit_tiny | 2 | 0.80 ± 0.14 | 0.70 ± 0.14 |" in table
    assert json.loads((tmp_path / "results.json").read_text())["metric"] == "auc"
