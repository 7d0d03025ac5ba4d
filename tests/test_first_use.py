"""Datasets on first use, against a loopback HTTP server (never the internet) that serves small
fabricated files in the official formats through the mirror option: download, checksum, unpack,
conversion and training; the second run reusing it; no network, HTTP errors, a wrong checksum and
a transfer cut mid-file; two ranks and two runs sharing one data folder."""

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torchvision.datasets
from medmnist import INFO
from test_convert import check

import fabricate
import train
from convert import first_use
from convert.cifar_to_ffcv import main as convert_cifar
from convert.medmnist_to_ffcv import SIZES
from storage import DatasetError

REPO = Path(__file__).resolve().parents[1]
DOMAINNET = "python convert/domainnet_to_ffcv.py --src DOMAINNET_DIR"
TINY = (
    "--model mae_vit_micro --img_size 16 --patch_size 4 --epochs 1 --batch_size 8 "
    "--num_workers 0 --pipeline torch --no-pictures"
).split()


class Files(http.server.BaseHTTPRequestHandler):
    """GET of a file by name; byte ranges when the server allows them; `cut`: stop after that
    many bytes of a file; `pause`: wait that long in the middle of every transfer."""

    def do_GET(self):
        server = self.server
        name = self.path.split("?")[0].rsplit("/", 1)[-1]  # served from any folder
        server.requests.append((name, self.headers.get("Range")))
        path = server.root / name
        if not path.is_file():
            self.send_error(404, "Not Found")
            return
        data, start = path.read_bytes(), 0
        wanted = self.headers.get("Range")
        if wanted and server.ranges:
            start = int(wanted.removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if name in server.cut:  # the server goes away mid-file
            self.wfile.write(body[: server.cut[name]])
            self.close_connection = True
            return
        half = len(body) // 2
        self.wfile.write(body[:half])
        self.wfile.flush()
        time.sleep(server.pause)
        self.wfile.write(body[half:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    httpd.root, httpd.requests, httpd.cut, httpd.ranges, httpd.pause = root, [], {}, True, 0.0
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/files"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _serve_cifar(server, monkeypatch=None) -> tuple[dict, str]:
    """The CIFAR-10 archive as torchvision downloads it (a tar.gz of the pickles' folder);
    returns the fabricated samples and the archive's MD5 (patched into torchvision's class
    when `monkeypatch` is given: the real archive's would not match)."""
    source = server.root.parent / "cifar"
    expected = fabricate.cifar(source, "c10", per_batch=4)
    archive = server.root / torchvision.datasets.CIFAR10.filename
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = _md5(archive)
    if monkeypatch is not None:
        monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", md5)
    return expected, md5


def _leftovers(data: Path) -> list[str]:
    """What sits at a final name: downloaded files and .beton files (hidden temporaries
    excluded)."""
    return sorted(
        str(p.relative_to(data))
        for p in data.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    )


def test_c10_first_use_downloads_converts_and_trains_then_reuses(
    tmp_path, server, monkeypatch, capsys
):
    expected, _ = _serve_cifar(server, monkeypatch)
    data, out = tmp_path / "data", tmp_path / "run"
    argv = ["--data_path", "c10", "--data_dir", str(data), "--output_dir", str(out), *TINY]
    assert train.main([*argv, "--download_mirror", server.url]) == 0
    printed = capsys.readouterr().out
    archive = data / "downloads" / "cifar-10-python.tar.gz"
    assert f"c10: downloading {server.url}/cifar-10-python.tar.gz to {archive}" in printed
    command = f"python convert/cifar_to_ffcv.py --name c10 --src {data / 'downloads'} "
    assert f"c10: converting ({command}--out_dir {data})" in printed
    assert server.requests == [("cifar-10-python.tar.gz", None)]
    # the files as the manual conversion of the same archive writes them
    metas = check(data, "c10", expected, exact=True, num_classes=10)
    assert (data / "downloads" / "cifar-10-batches-py" / "data_batch_5").is_file()
    by_hand = tmp_path / "by_hand"
    assert (
        convert_cifar(
            ["--name", "c10", "--src", str(data / "downloads"), "--out_dir", str(by_hand)]
        )
        == 0
    )
    for split, meta in metas.items():
        assert json.loads((by_hand / f"c10_{split}.json").read_text()) == meta
    # the start summary, not the whole configuration
    assert f"data: c10 ({data / 'c10_train.beton'}: 20 train, 4 test images, 10 classes)" in printed
    assert "recipe: the published defaults for every setting not given" in printed
    assert '"blr":' not in printed and "epoch 0: loss" in printed
    epoch = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()][-1]
    assert epoch["type"] == "epoch" and epoch["val_num_samples"] == 4
    # a second run downloads nothing, even with no server at all
    monkeypatch.setenv(first_use.MIRROR_ENV, "http://127.0.0.1:9/none")
    assert train.main([*argv, "--epochs", "1", "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "downloading" not in printed and "converting" not in printed
    assert server.requests == [("cifar-10-python.tar.gz", None)]
    assert json.loads(printed[printed.index("{") : printed.index("\n}") + 2])["data_path"] == "c10"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_network_is_one_message_naming_url_file_and_command(tmp_path, capsys):
    data = tmp_path / "data"
    mirror = f"http://127.0.0.1:{_closed_port()}/mirror"
    argv = ["--data_path", "c10", "--data_dir", str(data), "--output_dir", str(tmp_path / "run")]
    assert train.main([*argv, "--download_mirror", mirror, *TINY]) == 1
    err = capsys.readouterr().err
    downloads = data / "downloads"
    assert err.startswith(
        f"error: c10: cannot download {mirror}/cifar-10-python.tar.gz: "
        "[Errno 111] Connection refused\n"
        f"  expected: {downloads / 'cifar-10-python.tar.gz'} "
        f"(md5 {torchvision.datasets.CIFAR10.tgz_md5})\n"
    )
    assert err.rstrip().endswith(
        f"python convert/cifar_to_ffcv.py --name c10 --src {downloads} --out_dir {data}"
    )
    assert "Traceback" not in err and _leftovers(data) == []
    # --no_download: the same message without reaching the network
    assert train.main([*argv, "--no_download", *TINY]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: c10: not downloaded (--no_download)\n")
    assert f"--src {downloads} --out_dir {data}" in err and _leftovers(data) == []
    assert f"from {torchvision.datasets.CIFAR10.url}" in err and "mirror" not in err
    # a file put there by hand is checked before it is used
    (downloads / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(first_use.DownloadError, match="has md5 .*, not .* partial one"):
        first_use.prepare("c10", data, download=False)


def test_wrong_checksum_and_http_errors_leave_nothing_at_a_final_name(tmp_path, server):
    _, md5 = _serve_cifar(server)  # torchvision's checksum stays: the real archive's
    data = tmp_path / "data"
    with pytest.raises(first_use.DownloadError) as err:
        first_use.prepare("c10", data, mirror=server.url)
    official = torchvision.datasets.CIFAR10.tgz_md5
    assert f"checksum mismatch: md5 {md5}, expected {official}; the file was deleted" in str(
        err.value
    )
    assert _leftovers(data) == [] and not list((data / "downloads").iterdir())
    with pytest.raises(first_use.DownloadError, match=r"HTTP 404 Not Found"):
        first_use.prepare("svhn", data, mirror=server.url)
    assert _leftovers(data) == []


def test_transfer_cut_mid_file_continues_on_the_next_run(tmp_path, server, monkeypatch):
    expected, _ = _serve_cifar(server, monkeypatch)
    data, size = tmp_path / "data", (server.root / "cifar-10-python.tar.gz").stat().st_size
    server.cut["cifar-10-python.tar.gz"] = size // 3
    with pytest.raises(first_use.DownloadError, match=f"closed after {size // 3:,} of {size:,}"):
        first_use.prepare("c10", data, mirror=server.url)
    assert _leftovers(data) == []  # the part is hidden, beside the final name
    server.cut.clear()
    assert first_use.prepare("c10", data, mirror=server.url) == "c10"
    assert server.requests[-1] == ("cifar-10-python.tar.gz", f"bytes={size // 3}-")
    check(data, "c10", expected, exact=True, num_classes=10)
    # a server without byte ranges: the download starts again
    archive = data / "downloads" / "cifar-10-python.tar.gz"
    archive.unlink()
    item, server.cut["cifar-10-python.tar.gz"] = first_use.known("c10"), size // 2
    with pytest.raises(first_use.DownloadError):
        first_use._download(item, item.files[0], data, server.url)
    server.cut.clear()
    server.ranges = False
    first_use._download(item, item.files[0], data, server.url)
    assert server.requests[-1] == ("cifar-10-python.tar.gz", f"bytes={size // 2}-")
    assert _md5(archive) == _md5(server.root / "cifar-10-python.tar.gz")


def test_svhn_flowers_and_medmnist_sizes_through_a_mirror(tmp_path, server, monkeypatch):
    svhn = fabricate.svhn(server.root)
    split_list = {
        s: [
            f"http://example.invalid/{s}_32x32.mat",
            f"{s}_32x32.mat",
            _md5(server.root / f"{s}_32x32.mat"),
        ]
        for s in ("train", "test")
    }
    monkeypatch.setattr(torchvision.datasets.SVHN, "split_list", split_list)
    flowers = fabricate.flowers(tmp_path / "flowers")
    with tarfile.open(server.root / "102flowers.tgz", "w:gz") as tar:
        tar.add(tmp_path / "flowers" / "jpg", arcname="jpg")
    files = {"image": "102flowers.tgz", "label": "imagelabels.mat", "setid": "setid.mat"}
    for name in ("imagelabels.mat", "setid.mat"):
        (server.root / name).write_bytes((tmp_path / "flowers" / name).read_bytes())
    monkeypatch.setattr(
        torchvision.datasets.Flowers102,
        "_file_dict",
        {k: (name, _md5(server.root / name)) for k, name in files.items()},
    )
    blood = fabricate.medmnist(server.root, "bloodmnist", 64, rgb=True, classes=8)
    pneumonia = fabricate.medmnist(server.root, "pneumoniamnist", 28, rgb=False, classes=2)
    for flag, key, file in (
        ("bloodmnist", "MD5_64", "bloodmnist_64.npz"),
        ("pneumoniamnist", "MD5", "pneumoniamnist.npz"),
    ):
        monkeypatch.setitem(INFO[flag], key, _md5(server.root / file))
    data = tmp_path / "data"
    for name in ("svhn", "flowers102", "bloodmnist_64"):
        assert first_use.prepare(name, data, mirror=server.url) == name
    # a mirror that is a folder
    assert first_use.prepare("pmnist", data, mirror=server.root.as_uri()) == "pmnist"
    check(data, "svhn", svhn, exact=True, num_classes=10)
    check(data, "flowers102", flowers, exact=False, num_classes=102)
    check(data, "bloodmnist_64", blood, exact=True, num_classes=8)
    check(data, "pmnist", pneumonia, exact=True, num_classes=2)
    assert sorted(name for name, _ in server.requests) == sorted(
        [
            "train_32x32.mat",
            "test_32x32.mat",
            *files.values(),
            "bloodmnist_64.npz",
        ]
    )


@pytest.mark.parametrize("flag", [f for f, info in INFO.items() if first_use._medmnist_2d(info)])
def test_every_2d_medmnist_flag_at_every_published_size(tmp_path, flag):
    """URL and checksum from medmnist's INFO, and the converter flags of the manual command."""
    name = "pmnist" if flag == "pneumoniamnist" else flag
    for size in SIZES:
        item = first_use.known(name if size == 28 else f"{name}_{size}")
        suffix = "" if size == 28 else f"_{size}"
        (remote,) = item.files
        assert (remote.url, remote.md5) == (INFO[flag][f"url{suffix}"], INFO[flag][f"MD5{suffix}"])
        assert remote.path == f"{flag}{suffix}.npz"
        command = first_use.manual_command(item, tmp_path)
        assert command.startswith("python convert/medmnist_to_ffcv.py --name ")
        if size != 28:
            assert f"--flag {flag} --size {size}" in command
    assert first_use.known(f"{name}_32") is None


@pytest.mark.parametrize(
    "name, command",
    [
        ("imagenet", "python convert/imagenet_to_ffcv.py --src IMAGENET_DIR --out_dir {data}"),
        ("clipart", f"{DOMAINNET} --domain clipart --out_dir {{data}}"),
        ("sketch", f"{DOMAINNET} --domain sketch --out_dir {{data}}"),
        ("chaoyang", "python convert/chaoyang_to_ffcv.py --src CHAOYANG_DIR --out_dir {data}"),
        ("chestmnist", None),  # multi-label: the converter takes single-label sets only
        ("nosuch", None),
    ],
)
def test_datasets_made_by_hand_name_their_converter(tmp_path, name, command):
    with pytest.raises(DatasetError) as err:
        first_use.prepare(name, tmp_path)
    message = str(err.value)
    assert message.startswith(f"dataset {name!r} not found: no {tmp_path / name}_train.beton.")
    if command:
        assert message.endswith(f"convert it once with: {command.format(data=tmp_path)}")
    else:
        assert (
            "Known names: made on first use: digits (bundled), c10, c100, svhn, flowers102, "
            in message
        )
        assert "converted by hand: imagenet, chaoyang, clipart," in message
    assert not tmp_path.joinpath("downloads").exists()


_RUN = """import sys, torchvision.datasets
torchvision.datasets.CIFAR10.tgz_md5 = sys.argv[1]
import train
sys.exit(train.main(sys.argv[2:]))
"""


@pytest.mark.xdist_group("processes")
@pytest.mark.slow
def test_two_ranks_download_once(tmp_path, server, monkeypatch):
    _, md5 = _serve_cifar(server)
    script = tmp_path / "run_patched.py"
    script.write_text(_RUN)
    data, out = tmp_path / "data", tmp_path / "run"
    port = _closed_port()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        str(script),
        md5,
    ]
    command += [
        "--data_path",
        "c10",
        "--data_dir",
        str(data),
        "--output_dir",
        str(out),
        *TINY,
        "--download_mirror",
        server.url,
    ]
    server.pause = 1.0  # rank 1 waits on the lock while rank 0 downloads
    done = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert server.requests == [("cifar-10-python.tar.gz", None)]
    assert done.stdout.count("c10: downloading") == 1 and done.stdout.count("c10: converting") == 1
    assert [json.loads(x)["type"] for x in (out / "log.jsonl").read_text().splitlines()][
        -1
    ] == "epoch"


def test_two_runs_on_one_data_dir_download_once(tmp_path, server, monkeypatch, capsys):
    """A run in another process downloads and converts under the data folder's lock; this
    one, started meanwhile, waits for it and reuses its files."""
    _, md5 = _serve_cifar(server, monkeypatch)
    data = tmp_path / "data"
    code = (
        "import sys, torchvision.datasets; torchvision.datasets.CIFAR10.tgz_md5 = sys.argv[1]\n"
        "from convert import first_use\n"
        "print(first_use.prepare('c10', sys.argv[2], mirror=sys.argv[3]))\n"
    )
    server.pause = 1.5  # the other run is still downloading when this one starts
    other = subprocess.Popen(
        [sys.executable, "-c", code, md5, str(data), server.url],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not server.requests and other.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first_use.prepare("c10", data, mirror=server.url) == "c10"
    printed, err = other.communicate(timeout=300)
    assert other.returncode == 0, err[-2000:]
    assert printed.count("c10: downloading") == 1 and printed.count("c10: converting") == 1
    assert capsys.readouterr().out == f"c10: waiting for another run preparing {data}\n"
    assert server.requests == [("cifar-10-python.tar.gz", None)]
    assert all((data / f"c10_{s}.beton").is_file() for s in ("train", "test"))


def test_a_dataset_converted_by_hand_is_used_as_it_is(tmp_path):
    """Train and test are enough (a manual --merge_val conversion has no val split); a .beton
    without its .json, or train and val (a conversion stopped in its test split), is made
    again."""
    mirror = f"http://127.0.0.1:{_closed_port()}"
    for split in ("train", "test"):
        for suffix in (".beton", ".json"):
            (tmp_path / f"pmnist_{split}{suffix}").touch()
    assert first_use.prepare("pmnist", tmp_path, mirror=mirror) == "pmnist"
    assert not (tmp_path / "downloads").exists()
    for gone, also in (("test.json", ()), ("test.beton", ("val.beton", "val.json"))):
        (tmp_path / f"pmnist_{gone}").unlink()
        for name in also:
            (tmp_path / f"pmnist_{name}").touch()
        with pytest.raises(first_use.DownloadError, match="Connection refused"):
            first_use.prepare("pmnist", tmp_path, mirror=mirror)


def test_a_conversion_stopped_before_its_test_split_is_finished(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the test split is written leaves train and val: the next run converts the
    test split alone (train and val stay as they were), with train's mean/std."""
    data = tmp_path / "data"
    fabricate.medmnist(data / "downloads", "pneumoniamnist", 28, rgb=False, classes=2)
    monkeypatch.setitem(INFO["pneumoniamnist"], "MD5", _md5(data / "downloads/pneumoniamnist.npz"))
    assert first_use.prepare("pmnist", data, download=False) == "pmnist"
    kept = {s: _md5(data / f"pmnist_{s}.beton") for s in ("train", "val")}
    test = _md5(data / "pmnist_test.beton")
    for suffix in (".beton", ".json"):
        (data / f"pmnist_test{suffix}").unlink()
    capsys.readouterr()
    assert first_use.prepare("pmnist", data, download=False) == "pmnist"
    assert "--split test" in capsys.readouterr().out
    assert {s: _md5(data / f"pmnist_{s}.beton") for s in ("train", "val")} == kept
    assert _md5(data / "pmnist_test.beton") == test
    train, made = (json.loads((data / f"pmnist_{s}.json").read_text()) for s in ("train", "test"))
    assert made["mean"] == train["mean"] and made["std"] == train["std"]
