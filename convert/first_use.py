"""Datasets on first use: `train.py --data_path c10` with no `<data_dir>/c10_train.beton`
downloads the official files, checks them and converts them with the project's converter.

The files go to `<data_dir>/downloads/`, laid out as torchvision's and medmnist's `root` folder
(`cifar-10-python.tar.gz`, `train_32x32.mat`, `flowers-102/setid.mat`, `pneumoniamnist.npz`,
...). Their URLs and MD5 checksums are the ones torchvision's dataset classes and `medmnist.INFO`
carry, read from those libraries when needed. The conversion is the converter's own `main`, with
the flags of the command `manual_command` prints, so a `.beton` made here equals one made by hand
from the same files.

Each file is downloaded to a hidden `.part` file beside its final name, checked, then renamed:
nothing partial ever sits at a final name. An interrupted download is continued on the next run
where the server takes a byte range (else started again); a file that fails its checksum is
deleted. One lock file per data folder serialises whole preparations, so two runs started at once
on one `--data_dir` do not write the same files; the second waits, then reuses the first's.

Datasets that cannot be downloaded (licence or size) get the converter command that makes them.
"""

from __future__ import annotations

import fcntl
import http.client
import importlib
import os
import shlex
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from storage import DatasetError

DOWNLOADS = "downloads"  # under --data_dir
MIRROR_ENV = "SSAT_DOWNLOAD_MIRROR"
TIMEOUT_S = 60  # a server silent this long ends the download (it continues on the next run)
LOCK = ".first-use.lock"  # in --data_dir


class DownloadError(DatasetError):
    """A dataset that could not be downloaded or checked; the message says what to do by hand."""


@dataclass(frozen=True)
class Remote:
    """One official file: where it comes from, where it goes under downloads/, its MD5."""

    url: str
    path: str
    md5: str


@dataclass(frozen=True)
class Known:
    """A dataset this module can make: the converter (a module under convert/) and its flags,
    the files it reads (downloaded into downloads/) and the archives to unpack first."""

    name: str
    converter: str
    flags: tuple[str, ...]
    src: str | None  # --src, under downloads/ ("" for downloads/ itself); None: no --src
    files: tuple[Remote, ...] = ()
    unpack: tuple[tuple[str, str], ...] = ()  # (archive, the folder it holds), under downloads/
    splits: tuple[str, ...] = ("train", "test")  # what the converter writes, in its order


def _cifar(name: str) -> Known:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "c10" else CIFAR100
    return Known(
        name,
        "cifar_to_ffcv",
        ("--name", name),
        "",
        (Remote(cls.url, cls.filename, cls.tgz_md5),),
        ((cls.filename, cls.base_folder),),
    )


def _svhn(name: str) -> Known:
    from torchvision.datasets import SVHN

    files = tuple(Remote(*SVHN.split_list[split]) for split in ("train", "test"))
    return Known(name, "svhn_to_ffcv", (), "", files)


def _flowers(name: str) -> Known:
    from torchvision.datasets import Flowers102

    prefix, folder = Flowers102._download_url_prefix, "flowers-102"  # torchvision's layout
    files = tuple(
        Remote(prefix + file, f"{folder}/{file}", md5)
        for file, md5 in Flowers102._file_dict.values()
    )
    archive = Flowers102._file_dict["image"][0]
    return Known(
        name,
        "flowers102_to_ffcv",
        (),
        folder,
        files,
        ((f"{folder}/{archive}", f"{folder}/jpg"),),
        ("train", "val", "test"),
    )


def _medmnist(name: str) -> Known | None:
    """`<flag>` (28 px) or `<flag>_<size>`, a flag by its medmnist name or the short alias."""
    from medmnist import INFO

    from convert.medmnist_to_ffcv import ALIASES, SIZES

    base, _, size = name.partition("_")
    flag = ALIASES.get(base, base)
    if flag not in INFO or not _medmnist_2d(INFO[flag]) or size not in ("", *map(str, SIZES)):
        return None
    size = int(size or 28)
    info, suffix = INFO[flag], "" if size == 28 else f"_{size}"
    if f"url{suffix}" not in info:
        return None
    flags = ("--name", name)
    if base != flag or size != 28:  # the converter takes the flag from --name otherwise
        flags += ("--flag", flag, "--size", str(size))
    remote = Remote(info[f"url{suffix}"], f"{flag}{suffix}.npz", info[f"MD5{suffix}"])
    return Known(name, "medmnist_to_ffcv", flags, "", (remote,), splits=("train", "val", "test"))


def _medmnist_2d(info: dict) -> bool:
    """The MedMNIST datasets the converter takes: 2-D, one label per image."""
    return not info["python_class"].endswith("3D") and "multi-label" not in info["task"]


def medmnist_names() -> list[str]:
    from medmnist import INFO

    from convert.medmnist_to_ffcv import ALIASES

    short = {flag: alias for alias, flag in ALIASES.items()}
    return [short.get(flag, flag) for flag, info in INFO.items() if _medmnist_2d(info)]


BUILDERS: dict[str, Callable[[str], Known]] = {
    "c10": _cifar,
    "c100": _cifar,
    "svhn": _svhn,
    "flowers102": _flowers,
}
BUNDLED = Known("digits", "digits_to_ffcv", (), None, splits=("train", "val", "test"))
DOMAINNET = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


def known(name: str) -> Known | None:
    """The dataset `name` names, when this module can make it."""
    if name == BUNDLED.name:
        return BUNDLED
    if name in BUILDERS:
        return BUILDERS[name](name)
    return _medmnist(name)


def by_hand(name: str, data_dir: Path) -> str | None:
    """The converter command for a dataset that cannot be downloaded (licence or size)."""
    if name == "imagenet":
        return f"python convert/imagenet_to_ffcv.py --src IMAGENET_DIR --out_dir {data_dir}"
    if name in DOMAINNET:  # FGCR names a DomainNet domain by itself
        return (
            f"python convert/domainnet_to_ffcv.py --src DOMAINNET_DIR --domain {name} "
            f"--out_dir {data_dir}"
        )
    if name == "chaoyang":
        return f"python convert/chaoyang_to_ffcv.py --src CHAOYANG_DIR --out_dir {data_dir}"
    return None


def known_names() -> str:
    return (
        f"made on first use: digits (bundled), {', '.join(BUILDERS)}, "
        f"{', '.join(medmnist_names())} (MedMNIST: each also as <name>_64, _128, _224); "
        f"converted by hand: imagenet, chaoyang, {', '.join(DOMAINNET)} (DomainNet)"
    )


def converter_argv(item: Known, data_dir: Path) -> list[str]:
    """The converter's flags that make `item` from the files under downloads/."""
    src = [] if item.src is None else ["--src", str(data_dir / DOWNLOADS / item.src)]
    return [*item.flags, *src, "--out_dir", str(data_dir)]


def manual_command(item: Known, data_dir: Path) -> str:
    """The README's convert command that does what `_make` does after the downloads."""
    return shlex.join(["python", f"convert/{item.converter}.py", *converter_argv(item, data_dir)])


def _there(item: Known, data_dir: Path) -> list[str]:
    """The splits whose .beton and .json are both there (a conversion stopped between their
    renames leaves a .beton alone)."""
    return [
        s
        for s in item.splits
        if all((data_dir / f"{item.name}_{s}{suffix}").exists() for suffix in (".beton", ".json"))
    ]


def ready(item: Known, data_dir: Path) -> bool:
    """Every split its converter writes is there (converted here or by hand). A val split may
    be missing where train and test are there: a manual `--merge_val` conversion writes none,
    and an interrupted one writes val before test. The digits need all three (a copy from
    before they had a validation split is converted again)."""
    missing = set(item.splits) - set(_there(item, data_dir))
    if item is not BUNDLED:
        missing.discard("val")  # the converter writes val before test: a --merge_val run
    return not missing


def _to_convert(item: Known, data_dir: Path) -> list[str]:
    """The splits a conversion must write: the missing ones of a conversion stopped after
    its train split (each other split takes its mean/std from train's metadata), or all. A
    train split alone may be a stopped `--merge_val` run (train holds val): all again."""
    there = _there(item, data_dir)
    if "train" not in there or ("val" in item.splits and "val" not in there):
        return list(item.splits)
    return [s for s in item.splits if s not in there]


# ------------------------------------------------------------------------------ prepare
def prepare(
    name: str,
    data_dir: str | Path,
    *,
    main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    download: bool = True,
    mirror: str = "",
) -> str:
    """Make dataset `name` in `data_dir` unless it is there, and return the name its files
    carry. Under torchrun every process calls it: the `main` one of each node downloads and
    converts under the data folder's lock, the others pass one `barrier` and then wait on that
    lock (however long the download takes: a barrier would time out), then check the result.
    A dataset this module cannot make, and that is not there, is an error that says how."""
    data_dir = Path(data_dir)
    item = known(name)
    if item is None:
        return _not_ours(name, data_dir)
    lock = data_dir / LOCK
    if main and not ready(item, data_dir):
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a") as held:  # closing it releases the lock
            first = _lock(held, wait=False)
            barrier()  # the others wait on the lock from here on
            if not first:  # another run (or node, on a shared folder) is preparing
                print(f"{name}: waiting for another run preparing {data_dir}", flush=True)
                _lock(held, wait=True)
            if not ready(item, data_dir):
                _make(item, data_dir, download, mirror or os.environ.get(MIRROR_ENV, ""))
        return name
    barrier()
    if lock.exists():  # a preparation (this run's or another's) may hold it
        with open(lock) as held:
            _lock(held, wait=True)
    if not ready(item, data_dir):
        raise DatasetError(f"{name}: not made in {data_dir} (the first process says why)")
    return name


def _lock(f, wait: bool) -> bool:
    """An exclusive flock on open file `f` (released when it closes, or the process dies);
    False when `wait` is off and another process holds it."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _not_ours(name: str, data_dir: Path) -> str:
    if (data_dir / f"{name}_train.beton").exists():
        return name
    if name in DOMAINNET and (data_dir / f"domainnet_{name}_train.beton").exists():
        return f"domainnet_{name}"  # what the converter names a domain
    train = data_dir / f"{name}_train.beton"
    command = by_hand(name, data_dir)
    if command is not None:
        raise DatasetError(
            f"dataset {name!r} not found: no {train}. It cannot be downloaded (licence or "
            f"size); convert it once with: {command}"
        )
    raise DatasetError(
        f"dataset {name!r} not found: no {train}. Known names: {known_names()}. Any other name "
        f"is one you converted, e.g. python convert/imagenet_to_ffcv.py --src FOLDERS "
        f"--name {name} --out_dir {data_dir}"
    )


def _make(item: Known, data_dir: Path, download: bool, mirror: str) -> None:
    """Download what is missing, check it, unpack, convert (under the lock)."""
    downloads = data_dir / DOWNLOADS
    for remote in item.files:
        final = downloads / remote.path
        got = _md5(final) if final.exists() else None
        if got == remote.md5:
            continue
        wrong = f"{final} has md5 {got}, not {remote.md5} (another file, or a partial one)"
        if not download:
            why = wrong if got else "not downloaded (--no_download)"
            raise DownloadError(_help(item, data_dir, why, mirror))
        if got:
            print(f"{wrong}: downloading it again", flush=True)
        _download(item, remote, data_dir, mirror)
    for archive, folder in item.unpack:
        _unpack(downloads / archive, downloads / folder)
    splits = _to_convert(item, data_dir)
    argv = converter_argv(item, data_dir)
    if splits != list(item.splits):
        argv += [flag for split in splits for flag in ("--split", split)]
    command = shlex.join(["python", f"convert/{item.converter}.py", *argv])
    print(f"{item.name}: converting ({command})", flush=True)
    module = importlib.import_module(f"convert.{item.converter}")
    if module.main(argv) != 0:
        raise DatasetError(f"{item.name}: the conversion failed (its error is above): {command}")


def _url(remote: Remote, mirror: str) -> str:
    """The official URL, or the file's name under a mirror's base URL."""
    return f"{mirror.rstrip('/')}/{Path(remote.path).name}" if mirror else remote.url


def _md5(path: Path) -> str:
    from torchvision.datasets.utils import calculate_md5

    return calculate_md5(path)


def _download(item: Known, remote: Remote, data_dir: Path, mirror: str) -> None:
    """`remote` to its final name under downloads/, through a `.part` file that is checked
    before the rename. torchvision's `download_url` writes at the final name and waits forever
    on a silent server, so the transfer is done here (its MD5 helper does the check)."""
    final = data_dir / DOWNLOADS / remote.path
    part = final.parent / f".{final.name}.part"
    url = _url(remote, mirror)
    final.parent.mkdir(parents=True, exist_ok=True)
    print(f"{item.name}: downloading {url} to {final}", flush=True)
    try:
        _fetch(url, part)
    except urllib.error.HTTPError as err:
        why = f"HTTP {err.code} {err.reason}"
        raise DownloadError(_help(item, data_dir, why, mirror, url)) from None
    except urllib.error.URLError as err:
        raise DownloadError(_help(item, data_dir, str(err.reason), mirror, url)) from None
    except (OSError, http.client.HTTPException) as err:
        raise DownloadError(_help(item, data_dir, str(err) or repr(err), mirror, url)) from None
    got = _md5(part)
    if got != remote.md5:
        part.unlink()
        why = f"checksum mismatch: md5 {got}, expected {remote.md5}; the file was deleted"
        raise DownloadError(_help(item, data_dir, why, mirror, url))
    os.replace(part, final)


def _fetch(url: str, part: Path) -> None:
    """Stream `url` into `part`, continuing a partial `part` where the server takes a range;
    an early end of the transfer is an error (the part stays, to continue from)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "ssat"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S
        )
    except urllib.error.HTTPError as err:
        if err.code != 416 or not have:  # 416: the range starts at the end (or past it)
            raise
        part.unlink()
        return _fetch(url, part)
    with response:
        resumed = have and getattr(response, "status", None) == 206  # None for file://
        length = response.headers.get("Content-Length")
        total = None if length is None else int(length) + (have if resumed else 0)
        bar = tqdm(
            total=total,
            initial=have if resumed else 0,
            unit="B",
            unit_scale=True,
            leave=False,
            disable=None,  # shown on a terminal only
        )
        with open(part, "ab" if resumed else "wb") as f, bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size < total:
        raise OSError(
            f"the connection closed after {size:,} of {total:,} bytes (a next run continues it)"
        )


def _unpack(archive: Path, folder: Path) -> None:
    """Unpack `archive` (checked already) so that `folder` appears whole, through a hidden
    folder beside it (torchvision's extractor)."""
    from torchvision.datasets.utils import extract_archive

    if folder.is_dir():
        return
    tmp = folder.parent / f".unpack-{folder.name}"
    shutil.rmtree(tmp, ignore_errors=True)  # a stopped earlier unpacking (under the lock)
    print(f"unpacking {archive}", flush=True)
    extract_archive(archive, tmp)
    if not (tmp / folder.name).is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetError(f"{archive}: expected a folder {folder.name}/ in the archive")
    os.replace(tmp / folder.name, folder)
    shutil.rmtree(tmp, ignore_errors=True)


def _help(item: Known, data_dir: Path, why: str, mirror: str, url: str | None = None) -> str:
    """One message: what failed, the files expected under downloads/ and the manual command."""
    downloads = data_dir / DOWNLOADS
    missing = [r for r in item.files if not (downloads / r.path).exists()]
    lines = [f"{item.name}: cannot download {url}: {why}" if url else f"{item.name}: {why}"]
    for remote in missing or item.files:
        lines.append(f"  expected: {downloads / remote.path} (md5 {remote.md5})")
        if url != _url(remote, mirror):
            lines[-1] += f" from {_url(remote, mirror)}"
    unpack = " && ".join(
        f"tar xf {downloads / archive} -C {(downloads / folder).parent}"
        for archive, folder in item.unpack
    )
    mirror_too = f", or give a mirror (--download_mirror URL, or {MIRROR_ENV})" if url else ""
    lines += [
        f"  Put the file(s) there and run the same command again{mirror_too}, or convert by hand"
        + (f" once unpacked ({unpack})" if unpack else "")
        + ":",
        f"  {manual_command(item, data_dir)}",
    ]
    return "\n".join(lines)
