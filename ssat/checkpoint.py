"""Checkpoints: atomic saves, safe loads, and initialising from MAE / timm / our own files.

A checkpoint is MAE-compatible (`model`, `optimizer`, `epoch`, `scaler`, `args`) plus our keys:
`config` (the run's settings as a plain dict), `step` (optimizer steps taken), `best_metric`,
`rng` (the saving process's random generators), `position` (`{'epoch', 'batch', 'world_size',
'order'}`: where training continues, batch `batch` of epoch `epoch`, and the train split's
sample order, `random` or `pages`; `batch` > 0 for a run stopped inside an epoch, whose
position also holds `logged`: the loss sums its log had reached in the epoch)
and, for such a stop, `rng_ranks` (every rank's generators, indexed by rank, which a run
resuming inside the epoch restores), `data_fingerprints` (the content fingerprints of the
splits it trained and evaluated on, `{'train', 'eval', 'test'}` -> `sha256:<hex>`, where their
metadata has one). `epoch` keeps MAE's meaning, the last epoch completed
(-1 for none), so MAE's own resume code restarts an interrupted epoch from its start. A file
holds only tensors and plain Python values, so it loads with `torch.load(weights_only=True)`.
Files that carry an `argparse.Namespace` (published MAE and FGCR checkpoints) load through an
explicit allow-list, never by turning the safe mode off.

A save checks the free space first (the tensors' bytes plus a margin) and turns a disk that
fills during the write into the same `DiskSpaceError`, naming the file, the space needed and the
space available; either way the previous file at that path is left as it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from ssat.export import is_export, read_weights
from ssat.pos_embed import sincos_2d
from storage.atomic import atomic_path, no_space

# Classes a published checkpoint may pickle besides tensors and plain values.
SAFE_GLOBALS = [argparse.Namespace]
_PREFIXES = ("module.", "_orig_mod.")
# Keys that may be absent from a file (re-created or freshly initialised) or present in it but
# unused by the model (a decoder loaded into a scratch model). Anything else is encoder weight.
_OPTIONAL_MISSING = ("head.", "decoder_", "mask_token", "pos_embed")
_OPTIONAL_UNEXPECTED = ("decoder_", "mask_token")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# ------------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """Every random generator a run draws from, in weights_only-loadable form."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set every generator to `state` (as `rng_state` returned it; tensors on any device)."""
    random.setstate(state["python"])
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].cpu().numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ------------------------------------------------------------------------------ saving
def plain_config(config: Any) -> dict[str, Any]:
    """A dataclass, Namespace or mapping as a dict of plain values (paths become strings)."""
    if config is None:
        return {}
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    elif isinstance(config, argparse.Namespace):
        config = vars(config)
    return {k: str(v) if isinstance(v, os.PathLike) else v for k, v in dict(config).items()}


class DiskSpaceError(OSError):
    """A file that does not fit on its filesystem; the message names the file and both sizes."""


def _tensor_bytes(obj: Any, seen: set[int]) -> tuple[int, int]:
    """(bytes of the distinct tensor storages in `obj`, number of tensors): what torch.save
    writes besides the pickled structure."""
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0, 1
        seen.add(storage.data_ptr())
        return storage.nbytes(), 1
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        sizes = [_tensor_bytes(item, seen) for item in obj]
        return sum(s[0] for s in sizes), sum(s[1] for s in sizes)
    return 0, 0


def estimated_size(obj: Any) -> int:
    """Bytes torch.save needs for `obj`, about: its tensors' storages, plus a margin for the
    pickled structure and the zip records (alignment and headers, some 200 bytes a tensor)."""
    data, count = _tensor_bytes(obj, set())
    return data + data // 100 + 1024 * count + 2**20


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through `storage.atomic.atomic_path`: readers see the old file or the new one.
    Raises DiskSpaceError before writing when the filesystem lacks the room, or when it fills
    during the write (the temporary file is then removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    needed, free = estimated_size(obj), shutil.disk_usage(path.parent).free
    unchanged = f"the previous {path.name}, if any, is unchanged"
    if needed > free:
        raise DiskSpaceError(
            f"cannot save {path}: it needs about {_megabytes(needed)}, "
            f"{_megabytes(free)} available there; {unchanged}"
        )
    written = 0
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
                f.flush()
            finally:
                written = f.tell()
    except Exception as err:
        if not no_space(err):
            raise
        raise DiskSpaceError(
            f"cannot save {path}: the disk filled during the write; it needs "
            f"more than {_megabytes(max(needed, written))}, "
            f"{_megabytes(free)} were available; {unchanged}"
        ) from None


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    epoch: int,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    config: Any = None,
    step: int = 0,
    best_metric: float | None = None,
    position: dict[str, int] | None = None,
    rng_ranks: list[dict[str, Any]] | None = None,
    model_ema: nn.Module | None = None,
    data_fingerprints: dict[str, str] | None = None,
) -> None:
    """Write a resumable checkpoint atomically. `model` may be wrapped (DDP, compiled): the
    plain module's weights are saved, so no `module.` / `_orig_mod.` prefix reaches the file.
    `position` and `rng_ranks` as in the module docstring; a file without `position` continues
    at the start of epoch `epoch + 1`."""
    config = plain_config(config)
    atomic_save(
        {
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "epoch": epoch,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "args": config,  # MAE's key; a plain dict here, not a Namespace
            "config": config,
            "step": step,
            "rng": rng_state(),
            "best_metric": best_metric,
            "position": position,
            **({"rng_ranks": rng_ranks} if rng_ranks is not None else {}),
            # timm's key for the weights' moving average
            **({"model_ema": model_ema.state_dict()} if model_ema is not None else {}),
            **({"data_fingerprints": dict(data_fingerprints)} if data_fingerprints else {}),
        },
        path,
    )


class DataChanged(ValueError):
    """A resume inside an epoch over a train split other than the checkpoint's."""


def _short(fingerprint: str) -> str:
    return fingerprint[: len("sha256:") + 12]


def check_data_fingerprints(
    path: str | os.PathLike,
    saved: dict[str, str] | None,
    current: dict[str, tuple[str, str | None]],
    *,
    inside_epoch: bool,
) -> list[str]:
    """Compare the fingerprints checkpoint `path` recorded (`saved`, role -> fingerprint) with
    the splits a run resumes on (`current`, role -> (path, fingerprint)). Inside an epoch, another
    train split raises DataChanged naming both: the rest of the epoch's saved sample order would
    run over other samples. Any other difference comes back as a warning. A split without a
    fingerprint on either side (files converted before fingerprints) is not compared."""
    warnings = []
    for role, (where, now) in current.items():
        then = (saved or {}).get(role)
        if then is None or now is None or then == now:
            continue
        said = f"{path} was trained with a {role} split of fingerprint {_short(then)}; {where} "
        said += f"has {_short(now)} (converted again, or other data)"
        if role == "train" and inside_epoch:
            raise DataChanged(
                f"{said}. It stopped inside an epoch, whose saved sample order would go on over "
                f"other samples: resume on the data it was trained on, or start afresh (another "
                f"--output_dir; --finetune {path} takes its weights alone)"
            )
        consequence = {
            "train": "training goes on over the new data",
            "eval": "accuracies before and after this resume are not comparable",
        }.get(role, "its numbers are not comparable with earlier ones")
        warnings.append(f"{said}: {consequence}")
    return warnings


# ----------------------------------------------------------------------------- loading
def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load in weights_only mode, with the Namespace allow-list; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:  # torch's own message for one is empty
        raise RuntimeError(f"cannot load checkpoint {path}: the file is empty")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise RuntimeError(f"cannot load checkpoint {path}: {err}") from err


def _state_dict_of(ckpt: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict", "model_ema"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(
            f"{path}: expected a state_dict, or a dict with a 'model' or 'state_dict' entry"
        )
    state = {}
    for key, value in ckpt.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        state[key] = value
    return state


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]
    head_reset: bool
    pos_embed_resampled: bool  # a learned table of another grid, resampled bicubically
    pos_embed_grid: int | None = None  # the file's grid side where it differs from the model's


def _adapt_pos_embed(state: dict, model: nn.Module, key: str) -> tuple[int, bool] | None:
    """Fit a position table of another grid size to the model's. A sin-cos table becomes the
    sin-cos table of the model's grid (exact, whether the model keeps it fixed or learns from it);
    a learned one is resampled bicubically (timm). Returns the file's grid side and whether a
    learned table was resampled; None where the grids are the same."""
    own = getattr(model, key, None)
    if key not in state or own is None or state[key].shape == own.shape:
        return None
    table = state[key]
    old_grid = int((table.shape[1] - 1) ** 0.5)
    new_grid = int(model.num_patches**0.5)
    fixed = sincos_2d(table.shape[-1], old_grid)[None]
    if fixed.shape == table.shape and torch.allclose(table.float(), fixed, atol=1e-5):
        state[key] = sincos_2d(table.shape[-1], new_grid)[None].to(table.dtype)
        return old_grid, False
    state[key] = resample_abs_pos_embed(table, new_size=[new_grid, new_grid], num_prefix_tokens=1)
    return old_grid, True


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> LoadResult:
    """Initialise `model` from an MAE-format, timm-format or ssat checkpoint, or from a model
    export.py wrote (its folder or `.safetensors` file) (fine-tuning).

    Strips `module.` / `_orig_mod.` prefixes, resets the head when its shape differs, fits the
    position embedding to the model's grid, and loads the rest. Raises ValueError when an
    encoder weight would be left out (missing from the file, unused, or of another shape)."""
    path = Path(path)
    target = unwrap(model)
    state = _state_dict_of(read_weights(path) if is_export(path) else load_checkpoint(path), path)
    own = target.state_dict()

    head_keys = [k for k in state if k.startswith("head.")]
    head_reset = any(k not in own or state[k].shape != own[k].shape for k in head_keys)
    if head_reset:
        for key in head_keys:
            del state[key]
        target.reset_head(target.num_classes)
        own = target.state_dict()
    grid, resampled = _adapt_pos_embed(state, target, "pos_embed") or (None, False)
    _adapt_pos_embed(state, target, "decoder_pos_embed")

    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    optional_missing, optional_unexpected = _OPTIONAL_MISSING, _OPTIONAL_UNEXPECTED
    if getattr(target, "global_pool", False):
        # MAE's fine-tuning start: a fresh fc_norm; the pretraining's final norm goes unused
        optional_missing += ("fc_norm.",)
        if "fc_norm.weight" in state:  # an export of a global-pool model: no decoder-side norm
            optional_missing += ("norm.",)
        optional_unexpected += () if target.has_decoder else ("norm.",)
    skipped_missing = [k for k in missing if not k.startswith(optional_missing)]
    skipped_unexpected = [k for k in unexpected if not k.startswith(optional_unexpected)]
    if mismatched or skipped_missing or skipped_unexpected:
        problems = []
        if mismatched:
            problems.append("shape mismatch: " + "; ".join(mismatched[:8]))
        if skipped_missing:
            problems.append("missing from the file: " + ", ".join(skipped_missing[:8]))
        if skipped_unexpected:
            problems.append("not in the model: " + ", ".join(skipped_unexpected[:8]))
        raise ValueError(
            f"{path}: encoder weights would be silently skipped ({' | '.join(problems)}); "
            f"is this checkpoint for another model size, patch size or pooling?"
        )
    target.load_state_dict(state, strict=False)
    return LoadResult(missing, unexpected, head_reset, resampled, grid)
