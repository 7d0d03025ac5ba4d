"""`python compare.py --subset_sizes ...`: the limited-data study on the digits. The subsets
(stratified by class, nested, one draw for every method and seed), the budgets, the refusal of
a folder trained on another fraction, a stopped study continued (two runs at a time), and the
table's gaps recomputed from the runs' own logs."""

import json
import os
import signal
import statistics
import threading
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from scipy import stats

import compare
from pipelines import create_loader
from pipelines.sampling import num_batches, subset_order, training_subset

# 2 epochs of the micro models at 16 px on the torch engine (no loader compilation per run)
TRAIN_FLAGS = (
    "--model mae_vit_micro --img_size 16 --patch_size 4 --batch_size 16 --epochs 2 "
    "--warmup_epochs 1 --aa none --reprob 0 --hflip 0 --mixup 0 --cutmix 0 "
    "--pipeline torch --num_workers 0 --log_interval 1"
)


@pytest.fixture(scope="module")
def data(digits320) -> Path:
    """Digits, 320 scans of train and test (10 steps of 32) and the whole val split (270)."""
    return digits320


def _study(data: Path, out: Path, *flags: str, train: str = TRAIN_FLAGS) -> list[str]:
    head = f"--methods scratch ssat --seeds 0 1 --output_dir {out} {' '.join(flags)}"
    return [*head.split(), "--", "--data_dir", str(data), *train.split()]


def _labels(data: Path) -> np.ndarray:
    args, shared = compare.parse_args(_study(data, Path("unused")))
    return compare.training_labels(compare.plan(args, shared)[0].config)


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["digits", "imbalanced"])
def test_subsets_are_stratified_nested_and_one_draw(data, kind):
    """Every fraction: round(f * n) samples, each class within two of its share (one with
    classes of equal size), inside every larger fraction's; the same for any caller with the
    same seed, another with another seed."""
    if kind == "digits":
        labels, slack = _labels(data), 1.0
    else:  # 5 classes of 200, 60, 25, 10 and 5 samples, shuffled
        sizes = [200, 60, 25, 10, 5]
        labels = np.random.default_rng(1).permutation(np.repeat(np.arange(5), sizes))
        slack = 2.0
    classes, counts = np.unique(labels, return_counts=True)
    fractions = [0.02, 0.1, 0.25, 0.5, 0.9]
    subsets = [training_subset(labels, f, seed=0) for f in fractions]
    for fraction, subset in zip(fractions, subsets, strict=True):
        assert len(subset) == round(fraction * len(labels)) == len(np.unique(subset))
        share = len(subset) * counts / len(labels)
        got = (labels[subset][:, None] == classes[None]).sum(0)
        assert np.abs(got - share).max() <= slack, (fraction, got, share)
    for smaller, larger in zip(subsets[:-1], subsets[1:], strict=True):
        assert set(smaller) < set(larger)
    assert training_subset(labels, 1.0, seed=0) is None
    assert np.array_equal(training_subset(labels, 0.25, seed=0), subsets[2])
    assert not np.array_equal(training_subset(labels, 0.25, seed=1), subsets[2])
    # every prefix of the order is stratified, not only these fractions
    order = subset_order(labels, 0)
    assert sorted(order) == list(range(len(labels)))
    seen = (labels[order][:, None] == classes[None]).cumsum(0)
    shares = np.arange(1, len(labels) + 1)[:, None] * counts[None] / len(labels)
    assert np.abs(seen - shares).max() <= slack


def test_loader_trains_every_seed_on_the_subset_seeds_draw(data):
    """--subset_seed, not --seed, draws the subset: the runs of a study (every method and
    seed) train on the same samples."""

    def subset(seed, subset_seed):
        loader = create_loader(
            "torch",
            data / "digits_train.beton",
            train=True,
            batch_size=16,
            img_size=8,
            seed=seed,
            subset_size=0.25,
            subset_seed=subset_seed,
            num_workers=0,
        )
        return loader.subset

    drawn = training_subset(_labels(data), 0.25, 7)
    assert np.array_equal(subset(0, 7), drawn) and np.array_equal(subset(1, 7), drawn)
    assert np.array_equal(subset(3, None), training_subset(_labels(data), 0.25, 3))


def test_budgets_folders_and_refused_flags(data, tmp_path, capsys):
    """Equal epochs: every fraction --epochs. Equal steps: a fraction trains about as many
    optimizer steps as the whole split, its warmup as many steps as the whole split's. Each
    run in <method>/subset<f>/seed<k> with the study's subset seed."""
    out = tmp_path / "study"
    flags = "--subset_sizes 0.5 0.25 1.0 --subset_seed 4"
    args, shared = compare.parse_args(_study(data, out, flags))
    runs = compare.plan(args, shared)
    assert [(r.method, r.fraction, r.seed) for r in runs[:6]] == [
        ("scratch", 0.25, 0),
        ("ssat", 0.25, 0),
        ("scratch", 0.5, 0),
        ("ssat", 0.5, 0),
        ("scratch", 1.0, 0),
        ("ssat", 1.0, 0),
    ]
    for run in runs:
        cfg = run.config
        assert run.folder == out / run.method / f"subset{run.fraction}" / f"seed{run.seed}"
        assert (cfg.subset_size, cfg.subset_seed, cfg.seed) == (run.fraction, 4, run.seed)
        assert (cfg.epochs, cfg.warmup_epochs) == (2, 1.0)

    args, shared = compare.parse_args(_study(data, out, flags, "--budget steps"))
    labels = _labels(data)
    whole = num_batches(len(labels), train=True, batch_size=16)
    for run in compare.plan(args, shared):
        n = round(run.fraction * len(labels))
        mine = num_batches(n, train=True, batch_size=16)
        assert abs(run.config.epochs * mine - 2 * whole) <= mine / 2
        assert run.config.warmup_epochs * mine == pytest.approx(whole)
        # validated about as often in steps as the whole split, every epoch
        assert abs(run.config.eval_interval * mine - whole) <= mine / 2
    assert compare.plan(args, shared)[-1].config.epochs == 2  # the whole split: as given

    for study, train, message in [
        ("--subset_sizes 0.5", "--subset_size 0.5", "--subset_size after --: give the fractions"),
        ("--subset_sizes 0.5", "--subset_seed 1", "--subset_seed after --: give it to compare"),
        ("--subset_sizes 0.001 --budget steps", "", "--subset_sizes 0.001: 0.001 of the 320"),
    ]:
        assert compare.main(_study(data, out, study, train=f"{TRAIN_FLAGS} {train}")) == 1
        assert message in capsys.readouterr().err
    for flags, message in [
        ("--subset_sizes 0 0.5", "--subset_sizes 0.0 0.5: distinct fractions in (0, 1]"),
        ("--subset_sizes 0.5 0.5", "distinct fractions"),
        ("--parallel 0", "--parallel 0: 1 to"),
        (f"--parallel {len(os.sched_getaffinity(0)) + 1}", "the cores this process may use"),
        ("--parallel 2 --nproc_per_node 2", "would share cores"),
    ]:
        if "--parallel 2" in flags and len(os.sched_getaffinity(0)) < 2:
            continue
        with pytest.raises(SystemExit):
            compare.main(_study(data, out, flags))
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_core_shares_are_disjoint_and_cover_the_cores():
    cores = sorted(os.sched_getaffinity(0))
    assert compare.core_shares(1) == [None]
    for n in range(2, len(cores) + 1):
        shares = compare.core_shares(n)
        assert len(shares) == n and sorted(c for s in shares for c in s) == cores
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_gap_interval_is_the_paired_t_interval():
    """The gap to scratch: the mean per-seed difference, with scipy's paired t interval."""
    ssat, scratch = {0: 91.0, 1: 94.5, 2: 93.0}, {0: 90.0, 1: 92.0, 2: 93.5, 3: 80.0}
    gap = compare.paired_gap(ssat, scratch)
    interval = stats.ttest_rel([91.0, 94.5, 93.0], [90.0, 92.0, 93.5]).confidence_interval(0.95)
    assert gap["seeds"] == [0, 1, 2] and gap["per_seed"] == [1.0, 2.5, -0.5]
    assert gap["mean"] == pytest.approx(1.0)
    assert (gap["low"], gap["high"]) == pytest.approx((interval.low, interval.high))
    alone = compare.paired_gap({0: 91.0}, scratch)
    assert (alone["mean"], alone["low"], alone["high"]) == (1.0, None, None)


def _stop_when(log: Path, text: str) -> None:
    """Once `text` is in `log`, SIGTERM this process's main thread, where compare.py waits on
    its runs (as a scheduler's signal would reach it)."""
    deadline = time.time() + 300
    while time.time() < deadline:
        if log.exists() and text in log.read_text():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
            return
        time.sleep(0.02)


@pytest.mark.slow
def test_study_stops_continues_refuses_and_reports(data, tmp_path, capsys):
    """2 methods x 2 fractions x 2 seeds at 2 epochs: stopped in its second run, continued two
    runs at a time, then the tables, whose numbers are the runs' own; a folder trained on
    another fraction is refused."""
    out = tmp_path / "study"
    flags = "--subset_sizes 0.5 0.25"
    second = out / "ssat" / "subset0.25" / "seed0"

    # 1. SIGTERM two steps into the second run: it saves its place, nothing else starts
    watcher = threading.Thread(target=_stop_when, args=(second / "log.jsonl", '"step": 2,'))
    watcher.start()
    status = compare.main(_study(data, out, flags))
    watcher.join()
    assert status == 128 + signal.SIGTERM
    printed = capsys.readouterr().out
    assert "[1/8] scratch subset 0.25 seed 0: done" in printed
    assert "[2/8] ssat subset 0.25 seed 0: stopped; run the same command again" in printed
    assert not (out / "scratch" / "subset0.5").exists() and not (out / "results.md").exists()

    # 2. the same command, two runs at a time where there are two cores: the first run is
    # skipped, the second continues from its checkpoint, the other six train
    parallel = min(2, len(os.sched_getaffinity(0)))
    assert compare.main(_study(data, out, flags, f"--parallel {parallel}")) == 0
    printed = capsys.readouterr().out
    assert "[1/8] scratch subset 0.25 seed 0: finished earlier, skipped" in printed
    assert f"resumed from {second / 'checkpoint-last.pth'}: epoch 0 at batch" in printed
    assert printed.count("starting afresh") == 6
    launched = [json.loads(line) for line in (out / "launches.jsonl").read_text().splitlines()]
    assert [r["parallel"] for r in launched] == [1, 1] + [parallel] * 7
    if parallel == 2:  # each of two runs at a time on its own core
        assert all(len(r["cores"]) == 1 for r in launched[2:])
        assert "7 launched 2 at a time, each on 1 core" in printed

    # the runs: their fraction of the 320 training scans, 2 epochs, their seed
    samples = {0.25: 80, 0.5: 160}
    for fraction in samples:
        for method in ("scratch", "ssat"):
            for seed in (0, 1):
                folder = out / method / f"subset{fraction}" / f"seed{seed}"
                config = json.loads((folder / "config.json").read_text())
                assert (config["subset_size"], config["subset_seed"]) == (fraction, 0)
                epoch = [r for r in _log(folder) if r.get("type") == "epoch"][-1]
                assert (epoch["train_samples"], epoch["epoch"]) == (samples[fraction], 1)
                assert epoch["step"] == 2 * (samples[fraction] // 16)

    # 3. the tables: every number is the runs' own (the test split: the digits have val and test)
    table = printed[printed.index("digits, fractions 0.25, 0.5") :].split("\nwrote ")[0]
    assert (out / "results.md").read_text() == table
    results = json.loads((out / "results.json").read_text())
    assert [row["fraction"] for row in results["fractions"]] == [0.25, 0.5]
    for row in results["fractions"]:
        tests = {}
        for method in ("scratch", "ssat"):
            for seed in (0, 1):
                folder = out / method / f"subset{row['fraction']}" / f"seed{seed}"
                test = [r for r in _log(folder) if r.get("split") == "test"][-1]
                tests[method, seed] = test
        for key, metric in (("test_acc1", "final_top1"), ("test_acc1_at_best_val", "best_top1")):
            diffs = [tests["ssat", k][key] - tests["scratch", k][key] for k in (0, 1)]
            gap = row["gaps"][metric]["ssat"]
            assert gap["per_seed"] == pytest.approx(diffs)
            half = stats.t.ppf(0.975, 1) * statistics.stdev(diffs) / 2**0.5
            assert gap["mean"] == pytest.approx(statistics.fmean(diffs))
            assert (gap["low"], gap["high"]) == pytest.approx(
                (gap["mean"] - half, gap["mean"] + half)
            )
            for m in row["methods"]:
                mine = [tests[m["method"], k][key] for k in (0, 1)]
                assert m[metric]["mean"] == pytest.approx(statistics.fmean(mine))
                assert m[metric]["std"] == pytest.approx(statistics.stdev(mine))
        g = row["gaps"]["final_top1"]["ssat"]
        c, s = (m["final_top1"] for m in row["methods"])
        cells = (
            f"| {row['fraction']} | {samples[row['fraction']]} | 2 | {row['steps']} | "
            f"{c['mean']:.2f} ± {c['std']:.2f} | {s['mean']:.2f} ± {s['std']:.2f} | "
            f"{g['mean']:+.2f} [{g['low']:+.2f}, {g['high']:+.2f}] |"
        )
        assert cells in table
    assert (
        "| fraction | train samples | epochs | steps | scratch | ssat | ssat − scratch |" in table
    )
    assert "**final top-1, test (%)**" in table and "**best-val top-1, test (%)**" in table
    picture = matplotlib.image.imread(out / "study.png")
    assert picture.std() > 0.05  # drawn, not blank

    # --metric: the finished study tabulated again in balanced accuracy, from the runs' logs
    assert compare.main(_study(data, out, flags, "--metric balanced_acc")) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 8
    assert "**final balanced accuracy, test (%)**" in printed
    results = json.loads((out / "results.json").read_text())
    for row in results["fractions"]:
        diffs = []
        for seed in (0, 1):
            pair = []
            for method in ("scratch", "ssat"):
                folder = out / method / f"subset{row['fraction']}" / f"seed{seed}"
                test = [r for r in _log(folder) if r.get("split") == "test"][-1]
                pair.append(test["test_balanced_acc"])
            diffs.append(pair[1] - pair[0])
        assert row["gaps"]["final_top1"]["ssat"]["per_seed"] == pytest.approx(diffs)

    # 4. a folder trained on another fraction is refused, never tabulated
    other = tmp_path / "other"
    (other / "scratch" / "subset0.5").mkdir(parents=True)
    (out / "scratch" / "subset0.25" / "seed0").rename(other / "scratch" / "subset0.5" / "seed0")
    argv = _study(data, other, "--subset_sizes 0.5 --methods scratch --seeds 0")
    assert compare.main(argv) == 1
    err = capsys.readouterr().err
    assert "was trained with other settings (subset_size=0.25, now 0.5)" in err
    assert not (other / "results.md").exists()


@pytest.mark.slow
def test_both_budgets_and_a_varied_weight_in_one_study(data, tmp_path, capsys):
    """--budget epochs steps with --vary lambda_weight=0.1,0.3: each budget's runs under its own
    folder (a variant's in ssat-lambda_weight<value>/), stopped and continued, then the gaps
    side by side and each budget's tables, every number the runs' own; a variant's folder
    trained with another value is refused."""
    out = tmp_path / "study"
    flags = "--subset_sizes 0.5 --budget epochs steps --vary lambda_weight=0.1,0.3"
    args, shared = compare.parse_args(_study(data, out, flags))
    runs = compare.plan(args, shared)
    assert [(r.budget, r.label, r.seed) for r in runs[:6]] == [
        ("epochs", "scratch", 0),
        ("epochs", "ssat lambda_weight=0.1", 0),
        ("epochs", "ssat lambda_weight=0.3", 0),
        ("steps", "scratch", 0),
        ("steps", "ssat lambda_weight=0.1", 0),
        ("steps", "ssat lambda_weight=0.3", 0),
    ]
    for run in runs:
        kind = "scratch" if run.variant is None else f"ssat-lambda_weight{run.config.lambda_weight}"
        assert run.folder == out / run.budget / kind / "subset0.5" / f"seed{run.seed}"
        assert run.config.epochs == (2 if run.budget == "epochs" else 4)
    assert {r.config.lambda_weight for r in runs if r.method == "ssat"} == {0.1, 0.3}

    # stopped two steps into the steps budget's first run, then continued two at a time
    first_steps = out / "steps" / "scratch" / "subset0.5" / "seed0"
    watcher = threading.Thread(target=_stop_when, args=(first_steps / "log.jsonl", '"step": 2,'))
    watcher.start()
    assert compare.main(_study(data, out, flags)) == 128 + signal.SIGTERM
    watcher.join()
    assert "[4/12] scratch steps subset 0.5 seed 0: stopped" in capsys.readouterr().out
    parallel = min(2, len(os.sched_getaffinity(0)))
    assert compare.main(_study(data, out, flags, f"--parallel {parallel}")) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 3
    assert f"resumed from {first_steps / 'checkpoint-last.pth'}" in printed

    # the tables: the side-by-side gaps, then each budget's, from the runs' own logs
    table = (out / "results.md").read_text()
    assert table in printed
    assert "equal epochs (2 at every fraction) and equal optimizer steps" in table
    results = json.loads((out / "results.json").read_text())
    assert list(results["budgets"]) == ["epochs", "steps"]
    for budget, study in results["budgets"].items():
        (row,) = study["fractions"]
        assert row["steps"] == (20 if budget == "epochs" else 40)
        for value in ("0.1", "0.3"):
            label = f"ssat lambda_weight={value}"
            diffs = []
            for seed in (0, 1):
                pair = []
                for kind in ("scratch", f"ssat-lambda_weight{value}"):
                    folder = out / budget / kind / "subset0.5" / f"seed{seed}"
                    pair.append([r for r in _log(folder) if r.get("split") == "test"][-1])
                diffs.append(pair[1]["test_acc1"] - pair[0]["test_acc1"])
            gap = row["gaps"]["final_top1"][label]
            assert gap["per_seed"] == pytest.approx(diffs)
            cell = f"{gap['mean']:+.2f} [{gap['low']:+.2f}, {gap['high']:+.2f}]"
            assert table.count(cell) >= 2  # in the side-by-side table and the budget's own
    assert (
        "| fraction | equal epochs: steps | equal epochs: ssat (lambda_weight=0.1) − scratch | "
        "equal epochs: ssat (lambda_weight=0.3) − scratch | equal optimizer steps: steps |"
    ) in table
    assert "### equal epochs" in table and "### equal optimizer steps" in table
    # the steps budget's half split (4 epochs) is validated every other epoch, as often in
    # steps as the whole split each epoch
    epochs = [r for r in _log(first_steps) if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs if "val_acc1" in r] == [1, 3]
    picture = matplotlib.image.imread(out / "study.png")
    assert picture.shape[1] > picture.shape[0] and picture.std() > 0.05  # two columns, drawn

    # a variant's folder trained with another value is refused, never tabulated
    other = tmp_path / "other" / "ssat-lambda_weight0.5" / "subset0.5"
    other.mkdir(parents=True)
    (out / "epochs" / "ssat-lambda_weight0.3" / "subset0.5" / "seed0").rename(other / "seed0")
    argv = ["--methods", "ssat", "--seeds", "0", "--output_dir", str(tmp_path / "other")]
    argv += ["--subset_sizes", "0.5", "--vary", "lambda_weight=0.5"]
    argv += ["--", "--data_dir", str(data), *TRAIN_FLAGS.split()]
    assert compare.main(argv) == 1
    err = capsys.readouterr().err
    assert "was trained with other settings (lambda_weight=0.3, now 0.5)" in err


def test_vary_and_budget_refuse_what_they_cannot_run(data, tmp_path, capsys):
    out = tmp_path / "study"
    for flags, train, message in [
        ("--vary lambda_weight=0.1,0.3", "--lambda_weight 0.2", "it is given after -- too"),
        ("--vary seed=1,2", "", "--vary --seed: compare.py trains each of --seeds"),
        ("--vary model=mae_vit_tiny,mae_vit_small", "", "--vary model: each method's model"),
        ("--vary num_workers=1,2", "", "--vary --num_workers: it changes no result"),
        ("--vary lambda_weight=0.1,0.10", "", "two of its values are the same"),
        ("--vary world_size=1,2", "", "--vary world_size: train.py accepts it for the published"),
    ]:
        assert compare.main(_study(data, out, flags, train=f"{TRAIN_FLAGS} {train}")) == 1
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # train.py's own parser refuses the flag, named as given
        compare.main(_study(data, out, "--vary no_such_flag=1,2"))
    assert "--vary no_such_flag: error: unrecognized arguments: --no_such_flag" in (
        capsys.readouterr().err
    )
    for flags, message in [
        ("--vary lambda_weight", "expected FLAG=V1,V2,..."),
        ("--vary lambda_weight=0.1,0.1", "(distinct values)"),
        ("--budget epochs steps", "two budgets need a study (--subset_sizes)"),
        ("--subset_sizes 0.5 --budget steps steps", "--budget names each budget once"),
        ("--seeds -1", "--seeds -1: a seed is 0 or more"),
    ]:
        with pytest.raises(SystemExit):
            compare.main(_study(data, out, flags))
        assert message in capsys.readouterr().err
    argv = ["--methods", "scratch", "--output_dir", str(out), "--vary", "lambda_weight=0.1,0.3"]
    assert compare.main([*argv, "--", "--data_dir", str(data), *TRAIN_FLAGS.split()]) == 1
    assert "--vary makes variants of ssat and fgcr" in capsys.readouterr().err
    assert not out.exists()
