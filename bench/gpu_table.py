"""The GPU check's two helpers (bench/gpu_check.sh): what the interpreter has, and the final
table: one row per check from what the steps wrote in the output folder, with its target and
whether it was met. A check without a figure says why (skipped and the reason, timed out,
failed), so the table always has every row.

    python -m bench.gpu_table probe OUT                   # -> OUT/env.json, and a summary line
    python -m bench.gpu_table table OUT --runs mae_vit_tiny:ssat vit_small:scratch ...

The output folder holds `steps.tsv` (one line per step: name, exit status or `skip`, seconds,
time limit, reason) and what the steps wrote: `pytest.log`, `photos.json`, `train_step.json`,
`end_to_end.json`, `loaders.json`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python bench/x.py): import this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.version import add_version_flag

# compiled bf16 images/s and MFU on one GPU at 224 px, batch 256 (bench/README.md)
IMAGES_PER_S = {("mae_vit_tiny", "ssat"): 15_000, ("vit_small", "scratch"): 8_000}
MFU = {("vit_base", "scratch"): 0.35}
EFFICIENCY = 0.9  # the real loader's images/s over the synthetic images/s
END_TO_END = 5.0  # ours over the published recipe, images/s
WHOLE_CHECK = 420  # seconds: the check fits a short loan of a GPU machine
PROBED = {  # module: its distribution's name (a prefix: DALI's names its CUDA version)
    "numpy": "numpy",
    "ffcv": "ffcv",
    "nvidia.dali": "nvidia-dali",
    "torchvision": "torchvision",
    "pytest": "pytest",
}


def _version(module: str, dist: str) -> str | None:
    """The installed version of `module` (from its distribution's metadata: importing ffcv or
    DALI takes seconds), None where it is not installed."""
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except ModuleNotFoundError:  # its parent package is missing
        return None
    for found in importlib.metadata.distributions():
        name = (found.metadata["Name"] or "").lower().replace("_", "-")
        if name == dist or (dist.endswith("dali") and name.startswith(dist)):
            return found.version
    return "installed"


def probe(out: Path) -> str:
    """The device and the versions the check depends on, into out/env.json; returns a summary
    line of `key=value` words (the script reads `cuda`, `ffcv`, `dali` and `pytest` from it)."""
    import torch

    cuda = torch.cuda.is_available()
    env = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        **{module.split(".")[-1]: _version(module, dist) for module, dist in PROBED.items()},
    }
    (out / "env.json").write_text(json.dumps(env, indent=1))
    flags = {"cuda": cuda, **{k: env[k] is not None for k in ("ffcv", "dali", "pytest")}}
    return " ".join(f"{k}={'yes' if v else 'no'}" for k, v in flags.items())


class Results:
    """What the steps left in the output folder."""

    def __init__(self, out: Path):
        self.out = out
        self.steps = {}
        steps = out / "steps.tsv"
        for line in steps.read_text().splitlines() if steps.exists() else []:
            name, status, seconds, limit, reason = (line.split("\t") + [""] * 5)[:5]
            self.steps[name] = (status, seconds, limit, reason)

    def json(self, name: str) -> dict:
        try:
            return json.loads((self.out / f"{name}.json").read_text())
        except (OSError, ValueError):
            return {}

    def why_missing(self, step: str) -> str:
        """Why `step` left no figure for a row."""
        if step not in self.steps:
            return "not run"
        status, seconds, limit, reason = self.steps[step]
        if status == "skip":
            return f"skipped: {reason}"
        if status in ("124", "137"):
            return f"timed out at its {limit} s limit ({step}.log)"
        if status != "0":
            return f"failed, exit {status} ({step}.log)"
        return f"not measured ({step}.log)"


def _met(value: float | None, goal: float, dry_run: bool) -> str:
    if dry_run or value is None:
        return "-"
    return "yes" if value >= goal else "NO"


def pytest_rows(res: Results, dry_run: bool) -> list[tuple]:
    log = res.out / "pytest.log"
    lines = log.read_text().splitlines() if log.exists() else []
    summary = next(
        (ln.strip("= ") for ln in reversed(lines) if re.search(r"\d+ (passed|failed|skipped)", ln)),
        None,
    )
    if summary is None:
        return [("GPU tests (pytest -m gpu)", res.why_missing("pytest"), "all pass", "-")]
    bad = re.search(r"\d+ (failed|error)", summary)
    passed = re.search(r"\d+ passed", summary)
    met = "-" if dry_run else "NO" if bad else "yes" if passed else "-"
    return [("GPU tests (pytest -m gpu)", summary, "all pass", met)]


def photos_rows(res: Results) -> list[tuple]:
    photos = res.json("photos")
    if not photos:
        return [("photos: JPEGs -> .beton", res.why_missing("photos"), "", "")]
    made = f"{photos['images']} JPEGs of about {photos['size'][0]}x{photos['size'][1]}"
    if photos.get("convert_images_per_s") is None:
        return [("photos: JPEGs -> .beton", f"{made}; skipped: {photos['no_beton']}", "", "")]
    rate = photos["convert_images_per_s"]
    return [("photos: JPEGs -> .beton", f"{made}, converted at {rate:.0f} img/s", "", "")]


def compile_rows(res: Results) -> list[tuple]:
    """The training steps compiled ahead, during the tests (their kernels then load from the
    cache): how long it took, or why not, in which case step 2 compiles them itself."""
    status = res.steps.get("compile", ("",))[0]
    label = "training steps compiled ahead (kernel cache)"
    if status == "0":
        return [(label, f"done in {res.steps['compile'][1]} s", "", "")]
    return [(label, res.why_missing("compile"), "", "")]


def step_rows(res: Results, runs: list[tuple[str, str]], dry_run: bool) -> list[tuple]:
    found = {(r["model"], r["method"]): r for r in res.json("train_step").get("rows", [])}
    why = res.why_missing("train_step")
    rows = []
    for model, method in runs:
        r = found.get((model, method))
        goal, mfu = IMAGES_PER_S.get((model, method)), MFU.get((model, method))
        name = f"{model} {method}"
        speed_target = f">= {goal:,} compiled" if goal else ""
        mfu_target = f">= {mfu:.0%}" if mfu else ""
        if r is None:
            rows.append((f"{name}: img/s eager / compiled", why, speed_target, "-"))
            rows.append((f"{name}: MFU", why, mfu_target, "-"))
            rows.append((f"{name}: ffcv loader / synthetic", why, f">= {EFFICIENCY}", "-"))
            continue
        compiled = f"{r['compiled']:.0f}" if r["compiled"] else "- (not compiled)"
        met = _met(r["compiled"], goal, dry_run) if goal else ""
        rows.append(
            (f"{name}: img/s eager / compiled", f"{r['eager']:.0f} / {compiled}", speed_target, met)
        )
        rows.append(mfu_row(name, r, mfu, dry_run))
        if "efficiency" in r:
            value = f"{r['efficiency']:.2f} ({r['fed']:.0f} img/s fed by {r['pipeline']})"
            met = _met(r["efficiency"], EFFICIENCY, dry_run)
        else:  # skipped (no .beton), or the step stopped before the real-loader run
            loader = "train_step_loader" if "train_step_loader" in res.steps else "train_step"
            value, met = res.why_missing(loader), "-"
        rows.append((f"{name}: ffcv loader / synthetic", value, f">= {EFFICIENCY}", met))
    return rows


def mfu_row(name: str, r: dict, goal: float | None, dry_run: bool) -> tuple:
    flops = f"{r['gflop_per_image']:.2f} GFLOP/img"
    if r["mfu"] is None:
        value = f"unknown peak ({r['tflop_per_s']:.2f} TFLOP/s; {flops})"
    else:
        peak = r["peak_tflop_per_s"]
        value = f"{r['mfu']:.1%} ({r['tflop_per_s']:.0f} of {peak:.0f} TFLOP/s; {flops})"
    target = f">= {goal:.0%}" if goal else ""
    return (f"{name}: MFU", value, target, _met(r["mfu"], goal, dry_run) if goal else "")


def end_to_end_rows(res: Results, dry_run: bool) -> list[tuple]:
    """The published recipe (bench.end_to_end) against ours: the ViT-T SSAT step fed by the
    ffcv loader (bench.train_step's row), unless bench.end_to_end measured ours itself."""
    e2e = res.json("end_to_end")
    skipped = e2e.get("skipped", {})
    published = e2e.get("published")
    if published is not None:
        published_text = f"{published:.0f}"
    elif "published" in skipped:
        published_text = f"skipped: {skipped['published']}"
    else:
        published_text = res.why_missing("end_to_end")
    ours = e2e.get("ours")
    if ours is not None:
        ours_text = f"{ours:.0f}"
    else:
        found = res.json("train_step").get("rows", [])
        row = next((r for r in found if (r["model"], r["method"]) == ("mae_vit_tiny", "ssat")), {})
        ours = row.get("fed")
        if ours is not None:
            ours_text = f"{ours:.0f} (the mae_vit_tiny ssat row fed by ffcv)"
        else:
            step = "train_step_loader" if "train_step_loader" in res.steps else "train_step"
            ours_text = res.why_missing(step)
    rows = [
        ("end to end, published (ImageFolder+PIL+timm, eager fp16): img/s", published_text, "", ""),
        ("end to end, ours (ffcv + device aug, compiled bf16): img/s", ours_text, "", ""),
    ]
    target = f">= {END_TO_END:g}x"
    if ours is None or published is None:
        missing = "published" if published is None else "ours"
        rows.append(("end to end, ours / published", f"no figure for {missing}", target, "-"))
    else:
        ratio = ours / published
        met = _met(ratio, END_TO_END, dry_run)
        rows.append(("end to end, ours / published", f"{ratio:.2f}x", target, met))
    return rows


def loader_rows(res: Results) -> list[tuple]:
    found = res.json("loaders").get("rows", [])
    rows = [
        (f"loader {r['loader']}, {r['crops']} crop(s): img/s", f"{r['images_per_s']:.0f}", "", "")
        for r in found
    ]
    if not rows or res.steps.get("loaders", ("0",))[0] != "0":
        rows.append(("loader benchmark", res.why_missing("loaders"), "", ""))
    return rows


def table(out: Path, runs: list[tuple[str, str]], dry_run: bool, seconds: int | None) -> str:
    res = Results(out)
    env = res.json("env")
    software = ", ".join(
        f"{name} {env.get(name) or 'not installed'}"
        for name in ("python", "torch", "numpy", "ffcv", "torchvision", "dali")
    )
    rows = [
        ("device, software", f"{env.get('device', res.why_missing('probe'))}; {software}", "", ""),
        *pytest_rows(res, dry_run),
        *photos_rows(res),
        *compile_rows(res),
        *step_rows(res, runs, dry_run),
        *end_to_end_rows(res, dry_run),
        *loader_rows(res),
        (
            "whole check (to the table)",
            f"{seconds} s" if seconds is not None else "not timed",
            f"<= {WHOLE_CHECK} s",
            "-" if dry_run or seconds is None else "yes" if seconds <= WHOLE_CHECK else "NO",
        ),
    ]
    if "install" in res.steps:
        status = res.steps["install"][0]
        done = "installed" if status == "0" else res.why_missing("install")
        rows.insert(1, ("ffcv from --wheels", done, "", ""))
    header = ("check", "result", "target", "met")
    width = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    lines = [
        "| " + " | ".join(f"{str(c):<{w}}" for c, w in zip(row, width, strict=True)) + " |"
        for row in [header, *rows]
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in width) + "|")
    if dry_run:
        lines.append("(dry run: tiny sizes on the CPU; the figures and targets say nothing)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("what", choices=("probe", "table"))
    p.add_argument("out", type=Path, help="the check's output folder")
    p.add_argument("--runs", nargs="*", default=[], metavar="MODEL:METHOD")
    p.add_argument("--dry_run", action="store_true")
    p.add_argument("--seconds", type=int, default=None, help="how long the check took")
    return add_version_flag(p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.what == "probe":
        print(probe(args.out))
        return 0
    text = table(args.out, [tuple(r.split(":")) for r in args.runs], args.dry_run, args.seconds)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
