"""Tests of data.py: downloads through the real code path from a loopback HTTP server serving small files in the
exact upstream formats (CIFAR-10's python archive, MNIST's gzipped IDX files), their verification and safe
extraction, scikit-learn's digits against its raw counts, batching on the device, and the 2-D toy sets against
closed forms (notes §7, §8)."""
import errno
import gzip
import hashlib
import http.server
import io
import math
import os
import pickle
import socket
import struct
import sys
import tarfile
import tempfile
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import data as data_module
from data import (GMM_MEANS, GMM_STD, GMM_WEIGHTS, ImageData, DataError, gmm_noisy_score, load_cifar10, load_digits,
                  load_folder, load_mnist, mmd, sample_gmm, sample_swissroll, toy_quality)
from data import _decode as decode_one

PIXEL = (5, 7)  # (row, col) of a planted pixel with distinct R, G, B; row != col catches a transposed layout
RGB = (200, 100, 50)


def md5_of(data):
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def server():
    """A loopback HTTP server on 127.0.0.1 serving `files` (path -> bytes), 404 otherwise, recording every path."""
    files, requests = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(120, httpd.shutdown)  # the server stops by itself even if teardown never runs
    watchdog.daemon = True
    watchdog.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_address[1]}", files=files, requests=requests)
    finally:
        watchdog.cancel()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def closed_url():
    """A loopback URL where nothing listens: connecting is refused, as with no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------- CIFAR-10, in the upstream format

def cifar_rows(n, seed):
    """(n, 3072) uint8 rows in the upstream layout: R plane, G plane, B plane, each 32x32 row-major."""
    rows = np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)
    row, col = PIXEL
    for plane, value in enumerate(RGB):
        rows[0, plane * 1024 + row * 32 + col] = value
        rows[0, plane * 1024 + col * 32 + row] = plane + 1  # the transposed position holds something else
    return rows


def tar_add(tar, name, data=None, **fields):
    info = tarfile.TarInfo(name)
    for key, value in fields.items():
        setattr(info, key, value)
    if data is None and info.type == tarfile.REGTYPE:
        info.type = tarfile.DIRTYPE
    info.size = len(data) if data is not None else 0
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def cifar_archive(extra=()):
    """A small CIFAR-10 archive in the exact upstream format, its train rows, its test rows; `extra` adds members."""
    sizes = (2, 3, 1, 2, 2)
    train = [cifar_rows(n, seed) for seed, n in enumerate(sizes)]
    test = cifar_rows(3, 99)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar_add(tar, "cifar-10-batches-py")
        batches = [(f"data_batch_{i + 1}", f"training batch {i + 1} of 5", rows) for i, rows in enumerate(train)]
        for name, label, rows in batches + [("test_batch", "testing batch 1 of 1", test)]:
            batch = {b"batch_label": label.encode(), b"labels": [i % 10 for i in range(len(rows))], b"data": rows,
                     b"filenames": [f"image_{i}.png".encode() for i in range(len(rows))]}
            tar_add(tar, f"cifar-10-batches-py/{name}", pickle.dumps(batch, protocol=2))
        meta = {b"num_cases_per_batch": 10000, b"num_vis": 3072,
                b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
                                 b"ship", b"truck"]}
        tar_add(tar, "cifar-10-batches-py/batches.meta", pickle.dumps(meta, protocol=2))
        tar_add(tar, "cifar-10-batches-py/readme.html", b"<meta HTTP-EQUIV=\"REFRESH\" content=\"0; url=...\">\n")
        for name, data, fields in extra:
            tar_add(tar, name, data, **fields)
    images = lambda rows: torch.from_numpy(rows.reshape(-1, 3, 32, 32))  # noqa: E731
    return buffer.getvalue(), images(np.concatenate(train)), images(test)


def test_cifar10_download_gives_the_images_written_and_is_reused(server, tmp_path, capsys):
    archive, train, test = cifar_archive()
    server.files["/cifar-10-python.tar.gz"] = archive
    url = server.url + "/cifar-10-python.tar.gz"
    x = load_cifar10(tmp_path, url=url, md5=md5_of(archive), progress=True)
    # stderr is not a terminal here, as in a log file: a plain line at the start and one at the end, no bar.
    log = capsys.readouterr().err
    assert "\r" not in log and log.splitlines() == [
        f"downloading {url} ({len(archive) / 2 ** 20:.1f} MiB) to {tmp_path / 'cifar-10-python.tar.gz'}",
        "downloaded cifar-10-python.tar.gz"]
    assert x.dtype == torch.uint8 and x.shape == (10, 3, 32, 32)
    assert torch.equal(x, train)
    assert tuple(x[0, :, PIXEL[0], PIXEL[1]].tolist()) == RGB  # channel order and row-major layout
    assert server.requests == ["/cifar-10-python.tar.gz"]
    # The extracted folder serves the test split and later calls, with no request at all.
    assert torch.equal(load_cifar10(tmp_path, train=False, url=url, md5=md5_of(archive), progress=False), test)
    assert torch.equal(load_cifar10(tmp_path, url=url, md5=md5_of(archive), progress=False), train)
    assert server.requests == ["/cifar-10-python.tar.gz"]
    assert sorted(os.listdir(tmp_path)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_cifar10_existing_archive_is_extracted_without_downloading(server, tmp_path):
    archive, train, _ = cifar_archive(extra=[("./", None, {})])  # a "./" entry, as some tar tools write, is safe
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(archive)
    x = load_cifar10(tmp_path, url=server.url + "/cifar-10-python.tar.gz", md5=md5_of(archive), progress=False)
    assert torch.equal(x, train)
    assert server.requests == []


def test_cifar10_md5_mismatch_is_refused_and_leaves_nothing(server, tmp_path):
    archive, _, _ = cifar_archive()
    server.files["/cifar-10-python.tar.gz"] = archive
    wrong = "0" * 32
    with pytest.raises(DataError, match=f"cifar-10-python.tar.gz.*expected {wrong}, got {md5_of(archive)}"):
        load_cifar10(tmp_path, url=server.url + "/cifar-10-python.tar.gz", md5=wrong, progress=False)
    assert os.listdir(tmp_path) == []
    # An archive already there with the wrong md5 is not extracted either.
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(archive)
    with pytest.raises(DataError, match=f"expected {wrong}"):
        load_cifar10(tmp_path, download=False, md5=wrong)
    assert os.listdir(tmp_path) == ["cifar-10-python.tar.gz"]


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "device"])
def test_cifar10_unsafe_archive_is_refused_and_writes_nothing(tmp_path, kind):
    outside = tmp_path / "evil"
    member = {
        "dotdot": ("cifar-10-batches-py/../../evil", b"x", {}),
        "absolute": (str(outside), b"x", {}),
        "symlink": ("cifar-10-batches-py/link", None, {"type": tarfile.SYMTYPE, "linkname": str(outside)}),
        "hardlink": ("cifar-10-batches-py/link", None, {"type": tarfile.LNKTYPE, "linkname": "../../evil"}),
        "device": ("cifar-10-batches-py/null", None, {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}),
    }[kind]
    archive, _, _ = cifar_archive(extra=[member])  # the unsafe member comes after the good ones
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "cifar-10-python.tar.gz").write_bytes(archive)
    with pytest.raises(DataError, match="unsafe member"):
        load_cifar10(data_dir, download=False, md5=md5_of(archive))
    assert sorted(os.listdir(tmp_path)) == ["data"]
    assert os.listdir(data_dir) == ["cifar-10-python.tar.gz"]  # not even the safe members were extracted


class _Opens:
    """A pickle that, loaded by a plain unpickler, would create a file: what a hostile batch could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_cifar10_batch_with_a_foreign_global_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "created"
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Opens(str(marker))}, protocol=2))
    with pytest.raises(DataError, match="not allowed"):
        load_cifar10(tmp_path, train=False, download=False)
    assert not marker.exists()


def test_cifar10_without_network_names_the_url_and_the_folder(tmp_path):
    url = closed_url() + "/cifar-10-python.tar.gz"
    with pytest.raises(DataError) as error:
        load_cifar10(tmp_path, url=url, progress=False)
    message = str(error.value)
    assert url in message and str(tmp_path) in message and "\n" not in message
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- MNIST, in the upstream format

def idx(magic, array):
    """The bytes of an IDX file: big-endian magic, big-endian uint32 dimensions, then the uint8 data."""
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def mnist_files():
    """The four gzipped IDX files (name -> bytes) and the train and test images written into them."""
    rng = np.random.default_rng(0)
    files, images = {}, {}
    for prefix, n in (("train", 4), ("t10k", 3)):
        digits = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        digits.reshape(n, -1)[0, 3 * 28 + 20] = 255  # flat, row-major: row 3, column 20
        digits.reshape(n, -1)[0, 20 * 28 + 3] = 0
        files[f"{prefix}-images-idx3-ubyte.gz"] = gzip.compress(idx(0x00000803, digits))
        files[f"{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(idx(0x00000801, rng.integers(0, 10, n, dtype=np.uint8)))
        images[prefix] = torch.from_numpy(digits).unsqueeze(1)
    return files, images


def test_mnist_falls_back_to_the_second_mirror_and_is_reused(server, tmp_path):
    files, images = mnist_files()
    for name, data in files.items():
        server.files[f"/good/{name}"] = data
    mirrors = (server.url + "/missing/", server.url + "/good/")
    md5 = {name: md5_of(data) for name, data in files.items()}
    x = load_mnist(tmp_path, mirrors=mirrors, md5=md5, progress=False)
    assert x.dtype == torch.uint8 and x.shape == (4, 1, 28, 28)
    assert torch.equal(x, images["train"]) and x[0, 0, 3, 20] == 255 and x[0, 0, 20, 3] == 0
    assert server.requests == ["/missing/train-images-idx3-ubyte.gz", "/good/train-images-idx3-ubyte.gz",
                               "/missing/train-labels-idx1-ubyte.gz", "/good/train-labels-idx1-ubyte.gz"]
    assert torch.equal(load_mnist(tmp_path, train=False, mirrors=mirrors, md5=md5, progress=False), images["t10k"])
    assert len(server.requests) == 8
    assert torch.equal(load_mnist(tmp_path, mirrors=mirrors, md5=md5, progress=False), images["train"])
    assert len(server.requests) == 8
    assert sorted(os.listdir(tmp_path / "MNIST" / "raw")) == sorted(files)


@pytest.mark.parametrize("where", [".", "MNIST/raw"])
def test_mnist_finds_uncompressed_files_without_downloading(tmp_path, where):
    files, images = mnist_files()
    folder = tmp_path / where
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name[:-3]).write_bytes(gzip.decompress(data))
    x = load_mnist(tmp_path, train=False, mirrors=(closed_url() + "/",), progress=False)
    assert torch.equal(x, images["t10k"])


@pytest.mark.parametrize("damage", ["truncated", "long", "magic", "gzip"])
def test_mnist_corrupt_idx_is_refused(tmp_path, damage):
    files, _ = mnist_files()
    raw = gzip.decompress(files["t10k-images-idx3-ubyte.gz"])
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress(files["t10k-labels-idx1-ubyte.gz"]))
    md5 = None
    if damage == "gzip":  # a gzip cut short, yet with the md5 it was published with
        cut = files["t10k-images-idx3-ubyte.gz"][:-20]
        (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(cut)
        md5 = {"t10k-images-idx3-ubyte.gz": md5_of(cut)}
    else:
        bad = {"truncated": raw[:-1], "long": raw + b"\0", "magic": struct.pack(">I", 0x00000801) + raw[4:]}[damage]
        (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bad)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_mnist(tmp_path, train=False, download=False, md5=md5)


def test_mnist_without_network_names_every_url_and_the_folder(tmp_path):
    mirrors = (closed_url() + "/a/", closed_url() + "/b/")
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path, mirrors=mirrors, progress=False)
    message = str(error.value)
    for mirror in mirrors:
        assert mirror + "train-images-idx3-ubyte.gz" in message
    assert str(tmp_path / "MNIST" / "raw") in message and "\n" not in message
    assert os.listdir(tmp_path / "MNIST" / "raw") == []
    # Every missing file is named, not just the first (here the test images are there already).
    (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path, download=False)
    assert "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-labels-idx1-ubyte.gz (from" in str(
        error.value)


# ---------------------------------------------------------------- scikit-learn's 8x8 digits

def image_set(images):
    """The images of a stack (N, ...), each as bytes, so that whole images can be compared as sets."""
    return {bytes(row) for row in np.asarray(images).reshape(len(images), -1)}


def test_digits_are_sklearns_counts_scaled_to_uint8_and_split_once_the_same_way_every_time():
    """1500 training and 297 held-out images that together are sklearn's 1797 exactly once each, every pixel count v
    in 0..16 mapped to round(v * 255 / 16), drawn from the whole set (not its head or tail), the same on every call."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    train, held_out = load_digits(train=True), load_digits(train=False)
    assert train.dtype == held_out.dtype == torch.uint8
    assert train.shape == (1500, 1, 8, 8) and held_out.shape == (297, 1, 8, 8)
    counts = sklearn_datasets.load_digits().images.astype(int)  # (1797, 8, 8), ink counts 0..16
    table = np.array([round(v * 255 / 16) for v in range(17)], dtype=np.uint8)  # 8 -> 127.5 -> 128 either way
    assert table[[0, 1, 8, 15, 16]].tolist() == [0, 16, 128, 239, 255]
    expected = table[counts].reshape(-1, 64)  # (1797, 64)
    # sklearn's 1797 images are distinct, so equal sets of rows mean: no image twice, none left out, none altered.
    assert len(np.unique(expected, axis=0)) == 1797
    assert image_set(train) | image_set(held_out) == image_set(expected)
    assert len(image_set(train)) == 1500 and len(image_set(held_out)) == 297  # no image twice within a split
    assert not image_set(train) & image_set(held_out)
    assert image_set(held_out) not in (image_set(expected[:297]), image_set(expected[-297:]))
    assert torch.equal(load_digits(train=True), train) and torch.equal(load_digits(train=False), held_out)


def test_digits_without_scikit_learn_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn... now raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match="pip install scikit-learn") as error:
        load_digits()
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- a folder of your own images

def lanczos(image, box, size=8):
    """Pillow's own Lanczos resampling of `box` to size x size, as an array (C, size, size)."""
    array = np.asarray(image.resize((size, size), Image.Resampling.LANCZOS, box=box))
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def picture(seed, height, width, channels=3):
    """Random uint8 pixels (height, width[, channels]) with some smooth structure, so that resampling matters."""
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(height) * 3, np.arange(width) * 5) % 256  # (H, W)
    noise = rng.integers(0, 64, (height, width, channels))
    return ((ramp[..., None] + noise) % 256).astype(np.uint8).squeeze()


def folder_of_images(root, n, name="im{:02d}.png"):
    """n flat grey 4x4 pictures of levels 0, 20, 40, ...: a picture's level says which file it was."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((4, 4), 20 * i, np.uint8)).save(root / name.format(i))
    return root


@pytest.mark.parametrize("crop", [None, 30])
def test_folder_pictures_are_their_centre_square_resized_by_pillow(tmp_path, crop):
    """Landscape, portrait (smaller than the crop), EXIF-rotated and odd-sized pictures in nested folders, in sorted
    order; each equals Pillow's Lanczos resize of the centre square written out by hand (the square of the shorter
    side, or of `crop` where it is smaller, at half pixels where the margin is odd), and a grey JPEG in this colour set
    equals Pillow's convert("RGB") of it resized."""
    (tmp_path / "a" / "z").mkdir(parents=True)
    Image.fromarray(picture(0, 44, 60)).save(tmp_path / "b_landscape.png")
    Image.fromarray(picture(1, 50, 20, 1)).save(tmp_path / "a" / "portrait.JPG", quality=95)  # grey, upper case
    Image.fromarray(picture(2, 31, 45)).save(tmp_path / "a" / "z" / "odd.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to view
    Image.fromarray(picture(3, 20, 50)).save(tmp_path / "a" / "rotated.jpeg", exif=exif, quality=95)
    x = load_folder(tmp_path, 8, crop=crop, progress=False)
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 8, 8)
    portrait = Image.open(tmp_path / "a" / "portrait.JPG").convert("RGB")
    upright = Image.open(tmp_path / "a" / "rotated.jpeg").transpose(Image.Transpose.ROTATE_270)  # 20 wide, 50 high
    odd, landscape = Image.open(tmp_path / "a" / "z" / "odd.png"), Image.open(tmp_path / "b_landscape.png")
    expected = [lanczos(portrait, (0, 15, 20, 35)), lanczos(upright, (0, 15, 20, 35)),  # 20 < 30: the shorter side
                lanczos(odd, (7, 0, 38, 31) if crop is None else (7.5, 0.5, 37.5, 30.5)),
                lanczos(landscape, (8, 0, 52, 44) if crop is None else (15, 7, 45, 37))]
    for got, want in zip(x.numpy(), expected):
        np.testing.assert_array_equal(got, want)


def test_folder_colour_modes_grey_sets_alpha_and_palettes(tmp_path):
    """Grey modes (L, LA, a grey palette, 16-bit) give 1 channel, and 3 with grayscale=False; a colour picture (RGBA, a
    colour palette) makes the set RGB, where grey pictures repeat their level; grayscale=True gives Pillow's luma.
    Transparent pixels are white, 16-bit levels keep their high byte. 12x12 pictures at 12: no resampling."""
    grey, colour = tmp_path / "grey", tmp_path / "mixed"
    grey.mkdir()
    level = picture(0, 12, 12, 1)
    opaque = picture(1, 12, 12, 1) > 100  # (12, 12) where alpha is 255; elsewhere 0
    wide = (np.arange(144, dtype=np.uint16).reshape(12, 12) * 455)  # 16-bit levels up to 65065
    index = np.random.default_rng(2).integers(0, 4, (12, 12)).astype(np.uint8)
    Image.fromarray(level).save(grey / "l.png")
    Image.fromarray(np.stack([level, 255 * opaque.astype(np.uint8)], -1)).save(grey / "la.png")  # black under alpha 0
    grey_palette = Image.fromarray(index)
    grey_palette.putpalette([0, 0, 0, 90, 90, 90, 180, 180, 180, 255, 255, 255])
    grey_palette.save(grey / "p_grey.png")
    Image.fromarray(wide).save(grey / "i16.png")
    assert Image.open(grey / "i16.png").mode == "I;16" and Image.open(grey / "p_grey.png").mode == "P"
    expected_grey = np.stack([wide >> 8, level, np.where(opaque, level, 255),
                              np.array([0, 90, 180, 255])[index]]).astype(np.uint8)[:, None]  # (4, 1, 12, 12)
    x = load_folder(grey, 12, progress=False)
    assert x.shape == (4, 1, 12, 12)
    np.testing.assert_array_equal(x.numpy(), expected_grey)
    np.testing.assert_array_equal(load_folder(grey, 12, grayscale=False, progress=False).numpy(),
                                  np.repeat(expected_grey, 3, axis=1))

    # The same grey pictures beside two colour ones: an RGBA picture and a palette with a transparent colour.
    colour.mkdir()
    for file in grey.glob("*.png"):
        (colour / file.name).write_bytes(file.read_bytes())
    rgb = picture(3, 12, 12)
    Image.fromarray(np.concatenate([rgb, 255 * opaque[..., None].astype(np.uint8)], -1)).save(colour / "rgba.png")
    palette = [[10, 20, 30], [200, 0, 0], [0, 200, 0], [0, 0, 200]]
    colour_palette = Image.fromarray(index)
    colour_palette.putpalette(sum(palette, []))
    colour_palette.save(colour / "p_colour.png", transparency=0)  # colour 0 is transparent
    assert Image.open(colour / "p_colour.png").mode == "P"
    expected_rgb = np.stack([np.where(index[..., None] == 0, 255, np.array(palette)[index]),
                             np.where(opaque[..., None], rgb, 255)]).astype(np.uint8)  # (2, 12, 12, 3)
    x = load_folder(colour, 12, progress=False)  # i16, l, la, p_colour, p_grey, rgba
    assert x.shape == (6, 3, 12, 12)
    np.testing.assert_array_equal(x.numpy()[[0, 1, 2, 4]], np.repeat(expected_grey, 3, axis=1))
    np.testing.assert_array_equal(x.numpy()[[3, 5]], expected_rgb.transpose(0, 3, 1, 2))
    luma = np.stack([np.asarray(Image.fromarray(a).convert("L")) for a in expected_rgb])[:, None]  # Pillow's luma
    x = load_folder(colour, 12, grayscale=True, progress=False)
    assert x.shape == (6, 1, 12, 12)
    np.testing.assert_array_equal(x.numpy()[[0, 1, 2, 4]], expected_grey)
    np.testing.assert_array_equal(x.numpy()[[3, 5]], luma)


def test_folder_skips_unreadable_files_naming_each_and_counting_them(tmp_path, capsys):
    """A truncated PNG, a truncated JPEG and a text file named .png are skipped, each named on stderr, then counted;
    other files (notes.txt) are not images at all. In a log (stderr not a terminal) a line at the start and the end,
    and a cached set says the same skips again."""
    folder_of_images(tmp_path / "deep" / "er", 2)
    png = (tmp_path / "deep" / "er" / "im01.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[:len(png) // 2])
    buffer = io.BytesIO()
    Image.fromarray(picture(0, 16, 16)).save(buffer, "JPEG")
    (tmp_path / "deep" / "cut.jpg").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    (tmp_path / "text.png").write_text("not a picture\n")
    (tmp_path / "notes.txt").write_text("my notes\n")
    x = load_folder(tmp_path, 4, progress=True)
    assert x.shape == (2, 1, 4, 4) and x[:, 0, 0, 0].tolist() == [0, 20]
    skips = [f"skipping {tmp_path / name} (" for name in ("cut.png", "deep/cut.jpg", "text.png")]
    count = f"skipped 3 of 5 files in {tmp_path}"
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"decoding 5 images in {tmp_path} to 4x4" and lines[-2:] == ["decoded 2 images", count]
    assert [line[:len(start)] for line, start in zip(sorted(lines[1:4]), skips)] == skips
    assert "text.png (not an image Pillow can read)" in lines[3] and "notes" not in str(lines)
    assert torch.equal(load_folder(tmp_path, 4, progress=True), x)  # from the cache: the same lines again
    lines = capsys.readouterr().err.splitlines()
    assert [line[:len(start)] for line, start in zip(lines[:3], skips)] == skips and lines[-1] == count
    assert torch.equal(load_folder(tmp_path, 4, progress=False), x)  # quiet (torchrun's other processes)
    assert capsys.readouterr().err == ""


def test_folder_without_images_is_a_one_line_data_error(tmp_path):
    empty, text_only, broken = tmp_path / "empty", tmp_path / "text", tmp_path / "broken"
    for folder in (empty, text_only, broken):
        folder.mkdir()
    (text_only / "notes.txt").write_text("no pictures here\n")
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    for path, says in [(tmp_path / "missing", "is not a folder"), (text_only / "notes.txt", "is not a folder"),
                       (empty, "holds no .png"), (text_only, "holds no .png"), (broken, "none of the 1 image files")]:
        with pytest.raises(DataError, match=says) as error:
            load_folder(path, 8, progress=False)
        assert str(path) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="image_size"):
        load_folder(broken, 0)


@pytest.fixture
def decoded(monkeypatch):
    """The names of the files decoded so far: a set read from its cache decodes none."""
    names = []

    def counting(file, *args):
        names.append(os.path.basename(file))
        return decode_one(file, *args)

    monkeypatch.setattr(data_module, "_decode", counting)
    return names


def test_folder_cache_is_reused_until_a_file_or_a_setting_changes(tmp_path, decoded):
    folder = folder_of_images(tmp_path / "pictures", 3)
    first = load_folder(folder, 4, progress=False)
    assert decoded == ["im00.png", "im01.png", "im02.png"]
    assert os.listdir(folder / ".ncsn-cache") == ["4px-full-auto.npz"]
    for change in [None, "held_out"]:  # nothing changed; a split is taken from the cached set
        decoded.clear()
        got = load_folder(folder, 4, held_out=1 if change else 0, progress=False)
        assert decoded == [] and len(got) == (2 if change else 3)
    assert torch.equal(load_folder(folder, 4, progress=False), first)
    for change, expected in [("touch", 3), ("add", 4), ("remove", 3)]:
        if change == "touch":  # the same bytes, a new mtime
            os.utime(folder / "im01.png", ns=(10 ** 18, 10 ** 18))
        elif change == "add":
            folder_of_images(folder / "sub", 1, "new.png")
        else:
            os.remove(folder / "im00.png")
        decoded.clear()
        assert len(load_folder(folder, 4, progress=False)) == expected and len(decoded) == expected
        decoded.clear()
        load_folder(folder, 4, progress=False)
        assert decoded == []
    (folder / ".ncsn-cache" / "4px-full-auto.npz").write_bytes(b"PK\x03\x04 not a whole zip")  # damaged by hand
    decoded.clear()
    load_folder(folder, 4, progress=False)
    assert len(decoded) == 3
    for settings in [dict(image_size=2), dict(crop=3), dict(grayscale=True), dict(grayscale=False)]:
        decoded.clear()
        load_folder(folder, **{"image_size": 4, **settings}, progress=False)
        assert len(decoded) == 3
    assert sorted(os.listdir(folder / ".ncsn-cache")) == ["2px-full-auto.npz", "4px-crop3-auto.npz",
                                                          "4px-full-auto.npz", "4px-full-grey.npz",
                                                          "4px-full-rgb.npz"]


@pytest.mark.parametrize("failure", ["read-only", "disk full", "interrupted"])
def test_folder_cache_is_written_atomically(tmp_path, monkeypatch, capsys, decoded, failure):
    """A cache that cannot be written (a read-only folder, a full disk) leaves a note, no partial file and the old
    cache untouched, and the images are returned all the same; an interruption leaves no partial file either."""
    folder = folder_of_images(tmp_path / "pictures", 3)
    x = load_folder(folder, 4, progress=False)
    cache = folder / ".ncsn-cache" / "4px-full-auto.npz"
    old = cache.read_bytes()
    os.utime(folder / "im02.png", ns=(10 ** 18, 10 ** 18))  # the cache is stale now

    def unwritable(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    def cut_short(f, **arrays):
        f.write(b"PK\x03\x04 the first bytes of a zip")
        raise KeyboardInterrupt if failure == "interrupted" else OSError(errno.ENOSPC, "No space left on device")

    capsys.readouterr()
    with monkeypatch.context() as patch:
        if failure == "read-only":  # chmod would not stop root, who runs many CI jobs: fail where the cache is made
            patch.setattr(tempfile, "mkstemp", unwritable)
        else:
            patch.setattr(np, "savez", cut_short)
        if failure == "interrupted":
            with pytest.raises(KeyboardInterrupt):
                load_folder(folder, 4, progress=False)
        else:
            assert torch.equal(load_folder(folder, 4, progress=False), x)
            note, = capsys.readouterr().err.splitlines()
            reason = "Read-only file system" if failure == "read-only" else "No space left on device"
            assert note.startswith(f"note: not caching the decoded images in {cache.parent}") and reason in note
    assert os.listdir(cache.parent) == [cache.name] and cache.read_bytes() == old
    # The disk works again: the cache is rebuilt.
    decoded.clear()
    assert torch.equal(load_folder(folder, 4, progress=False), x)
    assert len(decoded) == 3 and cache.read_bytes() != old and os.listdir(cache.parent) == [cache.name]


def test_folder_held_out_images_are_disjoint_cover_the_set_and_are_the_same_every_time(tmp_path):
    """10 pictures whose levels say which file each is: 3 held out, 7 to train on, together each picture once, both in
    file order, drawn from the whole set (not its head or tail), the same on every call."""
    folder = folder_of_images(tmp_path, 10)
    levels = lambda x: x[:, 0, 0, 0].tolist()  # noqa: E731
    train, held_out = load_folder(folder, 4, held_out=3, progress=False), load_folder(
        folder, 4, held_out=3, train=False, progress=False)
    assert train.shape == (7, 1, 4, 4) and held_out.shape == (3, 1, 4, 4)
    assert sorted(levels(train) + levels(held_out)) == [20 * i for i in range(10)]
    assert levels(train) == sorted(levels(train)) and levels(held_out) == sorted(levels(held_out))
    assert levels(held_out) not in ([0, 20, 40], [140, 160, 180])
    assert torch.equal(load_folder(folder, 4, held_out=3, progress=False), train)
    assert torch.equal(load_folder(folder, 4, held_out=3, train=False, progress=False), held_out)
    assert levels(load_folder(folder, 4, progress=False)) == [20 * i for i in range(10)]  # held_out=0: all of them
    with pytest.raises(ValueError, match="held_out is 0"):
        load_folder(folder, 4, train=False)
    with pytest.raises(DataError, match="held_out is 10 but .* has 10 readable images"):
        load_folder(folder, 4, held_out=10, progress=False)


# ---------------------------------------------------------------- batches on the device

def test_image_data_batch_draws_set_images_scaled_to_unit_interval():
    images = torch.randint(0, 256, (5, 3, 4, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = ImageData(images).batch(64, torch.Generator().manual_seed(1))
    assert x.dtype == torch.float32 and x.shape == (64, 3, 4, 6)
    assert x.min() >= 0 and x.max() <= 1
    # Every element is one of the images divided by 255, and every image is drawn.
    match = (x.unsqueeze(1) == images.float().unsqueeze(0) / 255).flatten(2).all(-1)  # (64, 5)
    assert (match.sum(1) == 1).all() and match.any(0).all()


def test_image_data_flips_horizontally_and_nothing_else():
    image = torch.arange(2 * 3 * 5, dtype=torch.uint8).reshape(1, 2, 3, 5)  # asymmetric under every flip
    data = ImageData(image, flip=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.cat([data.batch(100, generator) for _ in range(10)])  # (1000, 2, 3, 5)
    original = (x == image.float() / 255).flatten(1).all(1)
    mirrored = (x == image.flip(-1).float() / 255).flatten(1).all(1)
    assert (original ^ mirrored).all()
    n = len(x)
    assert abs(mirrored.double().mean() - 0.5) < 5 * math.sqrt(0.25 / n)


def test_image_data_batches_repeat_under_a_seeded_generator():
    images = torch.randint(0, 256, (7, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for flip, dequantize in [(False, False), (True, True)]:
        data = ImageData(images, flip=flip, dequantize=dequantize)
        first = [data.batch(8, torch.Generator().manual_seed(3)) for _ in range(2)]
        assert torch.equal(first[0], first[1])


def test_image_data_in_host_memory_draws_the_batches_held_on_the_device_draws():
    """on_device=False keeps the set in host memory and gathers each batch there: the same generator gives the same
    batches, flips and dequantisation noise as the set held on the device."""
    images = torch.randint(0, 256, (9, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for flip, dequantize in [(False, False), (True, True)]:
        on_device = ImageData(images, device="cpu", flip=flip, dequantize=dequantize)
        on_host = ImageData(images, device="cpu", flip=flip, dequantize=dequantize, on_device=False)
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        for _ in range(3):
            assert torch.equal(on_device.batch(16, g1), on_host.batch(16, g2))
        assert torch.equal(g1.get_state(), g2.get_state())  # the same draws, in the same order


def test_image_data_dequantisation_stays_in_the_pixel_bin():
    image = torch.tensor([0, 1, 128, 255], dtype=torch.uint8).reshape(1, 1, 2, 2)
    x = ImageData(image, dequantize=True).batch(2000, torch.Generator().manual_seed(0))
    assert torch.equal(torch.floor(x * 256), image.float().expand_as(x))  # (k + u) / 256 with u in [0, 1)
    u = x * 256 - image.float()  # uniform on [0, 1): mean 1/2, variance 1/12
    assert abs(u.double().mean() - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())


def test_image_data_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        ImageData(torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="batch_size"):
        ImageData(torch.zeros(2, 1, 4, 4, dtype=torch.uint8)).batch(0)


# ---------------------------------------------------------------- 2-D toy sets

def test_sample_gmm_matches_the_mixture():
    n = 100_000
    x = sample_gmm(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert x.shape == (n, 2)
    second = x.sum(1) > 0  # the modes are 5 sqrt(2) standard deviations from the line between them
    frac = second.double().mean()
    assert abs(frac - GMM_WEIGHTS[1]) < 5 * math.sqrt(GMM_WEIGHTS[0] * GMM_WEIGHTS[1] / n)
    for mean, mask in zip(GMM_MEANS, (~second, second)):
        xs = x[mask]
        m = len(xs)
        se_mean = xs.std(0) / math.sqrt(m)
        assert ((xs.mean(0) - torch.tensor(mean, dtype=x.dtype)).abs() < 5 * se_mean).all()
        var = xs.var(0)
        se_var = (((xs - xs.mean(0)) ** 4).mean(0) - var ** 2).sqrt() / math.sqrt(m)
        assert ((var - GMM_STD ** 2).abs() < 5 * se_var).all()


def noisy_log_density(x, sigma):
    """log q_sigma(x) by torch.distributions: per-example mixtures with components N(mu_k, (std^2 + sigma^2) I)."""
    batch, k = len(x), len(GMM_WEIGHTS)
    scale = (GMM_STD ** 2 + sigma ** 2).sqrt().reshape(batch, 1, 1).expand(batch, k, 2)
    loc = torch.tensor(GMM_MEANS, dtype=x.dtype).expand(batch, k, 2)
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=torch.tensor(GMM_WEIGHTS, dtype=x.dtype).expand(batch, k)),
        torch.distributions.Independent(torch.distributions.Normal(loc, scale), 1))
    return mixture.log_prob(x)  # (B,)


@given(seed=st.integers(0, 2 ** 31 - 1), sigma=st.floats(0.0, 20.0), batch=st.integers(1, 16),
       spread=st.sampled_from([1.0, 10.0, 40.0]))
def test_gmm_noisy_score_is_the_gradient_of_the_noisy_log_density(seed, sigma, batch, spread):
    generator = torch.Generator().manual_seed(seed)
    x = (spread * torch.randn(batch, 2, generator=generator, dtype=torch.float64)).requires_grad_()
    sigmas = sigma * torch.rand(batch, generator=generator, dtype=torch.float64)
    for s, s_tensor in [(sigma, torch.full((batch,), sigma, dtype=torch.float64)), (sigmas, sigmas)]:
        expected, = torch.autograd.grad(noisy_log_density(x, s_tensor).sum(), x)
        torch.testing.assert_close(gmm_noisy_score(x.detach(), s), expected)


def test_gmm_noisy_score_is_finite_far_out_in_float32():
    x = torch.tensor([[60.0, -60.0], [-80.0, -80.0], [0.0, 0.0]])
    assert torch.isfinite(gmm_noisy_score(x, 0.01)).all()


def test_toy_samplers_reject_bad_input():
    with pytest.raises(ValueError, match="n must be"):
        sample_gmm(0)
    with pytest.raises(ValueError, match="n must be"):
        sample_swissroll(0)
    with pytest.raises(ValueError, match="sigma must be"):
        gmm_noisy_score(torch.zeros(1, 2), -0.1)


def test_sample_swissroll_lies_on_the_documented_roll():
    n = 50_000
    clean = sample_swissroll(n, generator=torch.Generator().manual_seed(0), std=0.0, dtype=torch.float64)
    r = clean.norm(dim=1)  # = t / 5
    torch.testing.assert_close(clean, r.unsqueeze(1) * torch.stack([torch.cos(5 * r), torch.sin(5 * r)], 1))
    assert r.min() >= 0.3 * math.pi - 1e-12 and r.max() <= 0.9 * math.pi + 1e-12
    assert abs(r.mean() - 0.6 * math.pi) < 5 * r.std() / math.sqrt(n)  # t is uniform on [1.5 pi, 4.5 pi]
    # The same draws with the default jitter, std 0.1: the difference is N(0, 0.1^2 I).
    noisy = sample_swissroll(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    diff = noisy - clean
    assert (diff.mean(0).abs() < 5 * 0.1 / math.sqrt(n)).all()
    assert ((diff.std(0) - 0.1).abs() < 5 * 0.1 / math.sqrt(2 * n)).all()
    x = sample_swissroll(n, generator=torch.Generator().manual_seed(1))
    assert x.shape == (n, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert x.abs().max() <= 0.9 * math.pi + 6 * 0.1  # the documented square, up to six jitter deviations


# ---------------------------------------------------------------- how good 2-D samples are

def test_mmd_is_unbiased_between_equal_laws_and_separates_different_ones():
    """The unbiased MMD^2 has mean 0 when both sets come from one law (within 5 standard errors over 30 pairs) and is
    far above that when one set is shifted by half a standard deviation."""
    g = torch.Generator().manual_seed(0)
    same = torch.tensor([mmd(sample_gmm(300, g), sample_gmm(300, g)) for _ in range(30)])
    se = same.std() / math.sqrt(len(same))
    assert abs(same.mean()) < 5 * se
    shifted = torch.tensor([mmd(sample_gmm(300, g), sample_gmm(300, g) + 0.5) for _ in range(5)])
    assert shifted.min() > same.mean() + 5 * same.std()


def test_toy_quality_of_exact_samples_and_scores():
    """Exact samples give the mode weights 0.2 / 0.8 within 5 binomial standard errors and nothing diverged; the
    exact noisy score has Fisher divergence 0, a score off by a constant c has exactly 1/2 |c|^2; a NaN chain counts
    as diverged; the swiss roll has only the MMD."""
    g = torch.Generator().manual_seed(1)
    n = 2000
    x = sample_gmm(n, g)
    quality = toy_quality("gmm", x, g, score_fn=gmm_noisy_score, sigmas=(20.0, 1.0, 0.01))
    assert abs(quality["mode_weights"][0] - 0.2) < 5 * math.sqrt(0.2 * 0.8 / n)
    assert quality["diverged"] == 0 and quality["mmd"] < 0.01
    assert quality["fisher@20"] == quality["fisher@1"] == quality["fisher@0.01"] == 0
    c = torch.tensor([0.3, -0.4])
    off = toy_quality("gmm", x, g, score_fn=lambda y, s: gmm_noisy_score(y, s) + c, sigmas=(1.0,))
    assert off["fisher@1"] == pytest.approx(0.5 * 0.25, rel=1e-5)
    x[:10] = float("nan")
    assert toy_quality("gmm", x, g)["diverged"] == pytest.approx(10 / n)
    assert set(toy_quality("swissroll", sample_swissroll(500, g), g)) == {"mmd"}
