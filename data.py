"""The data sets of the experiments (notes §1, §7, §8): images held on the device, and the 2-D toy sets.

- CIFAR-10 [Krizhevsky 2009]: 60000 colour images of 32x32 in 10 classes (50000 train, 10000 test), from the
  official python archive `CIFAR10_URL` (md5 `CIFAR10_MD5`). It holds pickled batches (`cifar-10-batches-py/`,
  the folder torchvision uses too), each a dict with b"data", a (10000, 3072) uint8 array whose rows are the R,
  G, then B planes of a 32x32 image, row-major. Pickle can run code, so the archive is md5-verified before it is
  extracted, and batches are read with an unpickler that admits numpy arrays and nothing else (a folder you put
  there yourself is your own file, as in torchvision, but gets the same unpickler).
- MNIST [LeCun et al. 1998]: 70000 grey 28x28 digits (60000 train, 10000 test) as four gzipped IDX files,
  tried from `MNIST_MIRRORS` in order and md5-verified against `MNIST_MD5` (torchvision's values). Downloads go
  to `<data_dir>/MNIST/raw/` (torchvision's layout); the files, gzipped or not, are also found in `<data_dir>`.
- Digits [Alpaydin & Kaynak 1998]: scikit-learn's 1797 grey 8x8 handwritten digits (`sklearn.datasets.load_digits`,
  shipped with the package, no download), pixel counts 0..16 mapped to 0..255 by round(v * 255 / 16). There is no
  official split: a permutation seeded with `DIGITS_SEED` (numpy's RandomState, whose stream numpy never changes)
  holds out `DIGITS_HELD_OUT` = 297 images, the other 1500 train.
- Image folders (`load_folder`): every PNG, JPEG, WebP and BMP under a folder of your own, recursively, in sorted
  order, decoded by Pillow: turned upright by EXIF, composited on white where transparent, its centre square (of at
  most `crop` pixels) resized with Lanczos to image_size; grey (1 channel) when every picture is grey, else RGB.
  Unreadable files are skipped and named. The decoded set is cached in `<folder>/.ncsn-cache/`, one .npz for each
  setting, rebuilt when any file is added, removed or touched; `held_out` images (a seeded permutation, as for the
  digits) are set aside.
- GMM: notes §7's mixture p = 1/5 N((-5,-5), I) + 4/5 N((5,5), I) of [Song & Ermon 2019, Fig. 3], with the exact
  score of its noised version q_sigma (notes §8) so that learned scores can be compared with the truth.
- Swiss roll: sklearn's `make_swiss_roll` in its (x, z) plane, divided by 5: t = 1.5 pi (1 + 2u), u ~ U(0, 1),
  x = (t cos t, t sin t) / 5 + std * z, so the noiseless roll lies at radius |x| = t / 5 in [0.3 pi, 0.9 pi]
  (about [0.94, 2.83]) and every point in [-2.83, 2.83]^2 up to the jitter (std 0.1 by default).

`toy_quality` says how good samples of the 2-D sets are: the MMD to fresh points; for the GMM also the mode
weights and the exact Fisher divergence of a score to the true noisy score.

Downloads stream to `<name>.part`, are md5-checked, and only then renamed, so a final name is always a whole,
verified file. Every problem a user can fix (no network, md5 mismatch, unsafe or corrupt file) raises
`DataError` with a one-line message that says what to do.
"""
import gzip
import hashlib
import http.client
import math
import os
import pickle
import struct
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib

import numpy as np
import torch
from tqdm import tqdm

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
DIGITS_SEED = 0
DIGITS_HELD_OUT = 297  # of 1797: 1500 left to train on
FOLDER_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")  # matched case-insensitively
FOLDER_CACHE = ".ncsn-cache"  # inside the image folder; not searched for images
FOLDER_CACHE_VERSION = 1  # bump it when decoding changes: every cache then misses once
FOLDER_SEED = 0
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
GMM_WEIGHTS = (0.2, 0.8)
GMM_MEANS = ((-5.0, -5.0), (5.0, 5.0))
GMM_STD = 1.0


class DataError(RuntimeError):
    """A data problem the user can fix (no network, md5 mismatch, unsafe or corrupt file); the message is one line."""


def _one_line(error):
    return " ".join(str(error).split())


def _md5(path):
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_md5(path, md5):
    got = _md5(path)
    if got != md5:
        raise DataError(f"{path}: md5 mismatch, expected {md5}, got {got}; delete it to download it again")


def _download(urls, path, md5, progress):
    """Fetch the first of `urls` that answers with the right md5 to `path`, through `path.part`."""
    part = path + ".part"
    failures = []
    try:
        for url in urls:
            try:
                with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    log = progress and not sys.stderr.isatty()  # a log file: a line at the start and at the end
                    if log:
                        print(f"downloading {url} ({(total or 0) / 2 ** 20:.1f} MiB) to {path}", file=sys.stderr)
                    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                              desc=os.path.basename(path), disable=not progress or log) as bar:
                        for chunk in iter(lambda: response.read(1 << 20), b""):
                            f.write(chunk)
                            bar.update(len(chunk))
                    if log:
                        print(f"downloaded {os.path.basename(path)}", file=sys.stderr, flush=True)
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as error:
                failures.append(f"{url}: {_one_line(error)}")
                continue
            got = _md5(part)
            if got == md5:
                os.replace(part, path)  # only a verified file ever has the final name
                return
            failures.append(f"{url}: md5 mismatch, expected {md5}, got {got}")
    finally:
        if os.path.exists(part):
            os.remove(part)
    raise DataError(f"could not download {os.path.basename(path)} ({'; '.join(failures)}); "
                    f"download it by hand and put it in {os.path.dirname(os.path.abspath(path))}")


def _extract_tar(archive, folder):
    """Extract `archive` into `folder`, refusing it whole unless every member is a file or directory inside."""
    root = os.path.realpath(folder)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                # Checked here as well as by filter="data": older Pythons lack the filter and its rules vary.
                target = os.path.realpath(os.path.join(root, member.name))
                inside = target.startswith(root + os.sep) or (member.isdir() and target == root)  # "./" is fine
                if (not (member.isfile() or member.isdir()) or os.path.isabs(member.name)
                        or ".." in member.name.replace("\\", "/").split("/") or not inside):
                    raise DataError(f"{archive}: refusing unsafe member {member.name!r} (only files and folders "
                                    f"inside the destination are extracted)")
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(root, members=members, **extra)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(f"{archive} is not a readable tar.gz archive ({_one_line(error)}); "
                        f"delete it to download it again") from error


class _BatchUnpickler(pickle.Unpickler):
    """Reads a CIFAR-10 batch: dicts, lists, bytes, numbers and numpy arrays; any other global is refused."""

    allowed = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"),
               ("_codecs", "encode")}  # how Python 3 writes bytes at protocol 2

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _read_cifar_batch(path):
    """(n, 3, 32, 32) uint8 images of one CIFAR-10 batch file."""
    try:
        with open(path, "rb") as f:
            data = _BatchUnpickler(f, encoding="bytes").load()[b"data"]
    except FileNotFoundError as error:
        raise DataError(f"{path} is missing; complete {os.path.dirname(path)} or delete it to extract again") from error
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
        raise DataError(f"{path} is not a CIFAR-10 batch ({_one_line(error)})") from error
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise DataError(f"{path}: b'data' must be a (n, 3072) uint8 array, got {getattr(data, 'shape', type(data))}")
    return data.reshape(-1, 3, 32, 32)  # rows are the R, G, B planes, each 32x32 row-major


def load_cifar10(data_dir, train=True, download=True, progress=True, url=CIFAR10_URL, md5=CIFAR10_MD5):
    """CIFAR-10 [Krizhevsky 2009] as uint8 (N, 3, 32, 32): the 50000 of data_batch_1..5 in order, or test_batch."""
    folder = os.path.join(data_dir, CIFAR10_FOLDER)
    if not os.path.isdir(folder):
        archive = os.path.join(data_dir, CIFAR10_ARCHIVE)
        os.makedirs(data_dir, exist_ok=True)
        if os.path.exists(archive):
            _check_md5(archive, md5)
        elif download:
            _download([url], archive, md5, progress)
        else:
            raise DataError(f"CIFAR-10 not found: put {CIFAR10_ARCHIVE} (from {url}) or its extracted "
                            f"{CIFAR10_FOLDER}/ in {os.path.abspath(data_dir)}")
        # Extract beside the destination, then rename: an interrupted run never leaves a half folder behind.
        with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
            _extract_tar(archive, tmp)
            missing = [n for n in CIFAR10_FILES if not os.path.isfile(os.path.join(tmp, CIFAR10_FOLDER, n))]
            if missing:
                raise DataError(f"{archive} lacks {CIFAR10_FOLDER}/{missing[0]}; it is not the CIFAR-10 archive")
            os.replace(os.path.join(tmp, CIFAR10_FOLDER), folder)
    names = CIFAR10_FILES[:5] if train else ("test_batch",)
    return torch.from_numpy(np.concatenate([_read_cifar_batch(os.path.join(folder, n)) for n in names]))


def _read_idx(path, magic):
    """The array of an IDX file (gzipped or not) after checking its magic number and its size against the header."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} could not be read ({_one_line(error)}); delete it to download it again") from error
    got = int.from_bytes(raw[:4], "big")
    if len(raw) < 4 or got != magic:
        raise DataError(f"{path}: not the expected IDX file (magic {got:#010x}, expected {magic:#010x})")
    ndim = magic & 0xFF  # the magic's last byte counts the dimensions; the one before, 0x08, means uint8
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else ()
    if len(raw) != header + math.prod(dims) or len(dims) != ndim:
        raise DataError(f"{path}: {len(raw)} bytes, not what its header {dims} says; it is truncated or corrupt")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _mnist_file(data_dir, name, download, progress, mirrors, md5):
    """Path of the IDX file `name`: found uncompressed or gzipped (md5-checked), or else downloaded gzipped."""
    raw_dir = os.path.join(data_dir, "MNIST", "raw")
    for folder in (raw_dir, data_dir):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
        if os.path.isfile(path + ".gz"):
            _check_md5(path + ".gz", md5[name + ".gz"])
            return path + ".gz"
    # Every file of the set that is missing is named, so that one trip to a browser fetches them all.
    missing = [f for f in md5 if not any(os.path.isfile(os.path.join(folder, f[:-3]) + ext)
                                         for folder in (raw_dir, data_dir) for ext in ("", ".gz"))]
    where = f"put {', '.join(missing)} (from {mirrors[0]}) in {os.path.abspath(raw_dir)}"
    if not download:
        raise DataError(f"MNIST not found: {where}")
    os.makedirs(raw_dir, exist_ok=True)
    path = os.path.join(raw_dir, name + ".gz")
    try:
        _download([mirror + name + ".gz" for mirror in mirrors], path, md5[name + ".gz"], progress)
    except DataError as error:
        raise DataError(f"{error}; MNIST needs all of its files: {where}") from None
    return path


def load_mnist(data_dir, train=True, download=True, progress=True, mirrors=MNIST_MIRRORS, md5=MNIST_MD5):
    """MNIST [LeCun et al. 1998] as uint8 (N, 1, 28, 28): the 60000 training or the 10000 test digits."""
    prefix = "train" if train else "t10k"
    find = lambda name: _mnist_file(data_dir, name, download, progress, mirrors, md5)  # noqa: E731
    images = _read_idx(find(f"{prefix}-images-idx3-ubyte"), 0x00000803)  # (N, 28, 28)
    labels = _read_idx(find(f"{prefix}-labels-idx1-ubyte"), 0x00000801)  # (N,)
    if images.shape[1:] != (28, 28) or len(labels) != len(images):
        raise DataError(f"MNIST {prefix} files disagree: images {images.shape}, labels {labels.shape}; "
                        f"expected (N, 28, 28) and (N,)")
    return torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28); copy: frombuffer is read-only


def load_digits(train=True, labels=False):
    """scikit-learn's 8x8 digits [Alpaydin & Kaynak 1998] as uint8 (N, 1, 8, 8): the 1500 training or 297 held-out;
    with labels=True, (images, their classes 0..9 as int64 (N,))."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise DataError(f"the 8x8 digits come with scikit-learn, which is not installed ({_one_line(error)}); "
                        "pip install scikit-learn") from None
    digits = sklearn_digits()
    counts = digits.images.astype(np.int64)  # (1797, 8, 8), ink counts 0..16 as float64
    images = ((counts * 255 + 8) // 16).astype(np.uint8)  # round(v * 255 / 16) in integers: 8 -> 127.5 -> 128
    # A fixed permutation: RandomState, whose stream numpy keeps across versions (NEP 19), where default_rng's
    # permutation may change; the held-out digits are the same on every machine and numpy.
    order = np.random.RandomState(DIGITS_SEED).permutation(len(images))  # (1797,)
    chosen = order[DIGITS_HELD_OUT:] if train else order[:DIGITS_HELD_OUT]
    images = torch.from_numpy(images[chosen]).unsqueeze(1)  # (N, 1, 8, 8); fancy indexing copies: writable
    return (images, torch.from_numpy(digits.target[chosen].astype(np.int64))) if labels else images


# ---- A folder of your own images ---------------------------------------------------------------------------------

def image_files(path):
    """Relative paths ("a/b.png") of the files under path with an image extension, sorted by code point."""
    found = []
    for root, folders, names in os.walk(path, onerror=lambda e: print(f"skipping {e.filename} ({e.strerror})",
                                                                       file=sys.stderr)):
        folders[:] = [f for f in folders if f != FOLDER_CACHE]  # never search the cache itself
        found += [os.path.relpath(os.path.join(root, n), path).replace(os.sep, "/")
                  for n in names if n.lower().endswith(FOLDER_EXTENSIONS)]
    return sorted(found)


def folder_fingerprint(files):
    """A short hash of a folder's image files (image_files: their relative names): a run keeps it, so that it notices
    a folder whose files were added or removed (which would move images between its training set and its held-out
    slice)."""
    return hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]


def _is_grey(image):
    """Whether a picture holds grey levels only: a grey mode, or a palette whose colours in use are all grey."""
    if image.mode == "P":
        palette = image.getpalette("RGB") or []
        colours = [palette[3 * i:3 * i + 3] for _, i in image.getcolors(256)]  # (count, index) pairs
        return all(len(c) == 3 and c[0] == c[1] == c[2] for c in colours)
    return image.mode in GREY_MODES


def _flatten(image, grey):
    """The picture as "L" (grey) or "RGB", 8 bits a channel, composited on white where it is transparent."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit grey (older Pillow opens 16-bit PNGs as "I"):
        # its high byte, since convert("L") would clip every level above 255
        image = Image.fromarray((np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
    if image.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in image.info:
        # On white, as a viewer shows it: dropping alpha instead would bring back whatever the file keeps under its
        # transparent pixels (often black, sometimes junk), so alike pictures would train differently by file.
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return image.convert("L" if grey else "RGB")


def _decode(file, image_size, crop, grayscale):
    """One picture as uint8 (C, image_size, image_size), C = 1 if it is (or is made) grey, else 3: turned upright by
    its EXIF orientation, flattened, and its centre square of side min(crop, width, height) resized with Lanczos."""
    from PIL import Image, ImageOps

    with Image.open(file) as image:
        image = ImageOps.exif_transpose(image)  # a copy: the whole file is decoded here, and a truncated one fails
        grey = _is_grey(image) if grayscale is None else grayscale
        image = _flatten(image, grey)
    width, height = image.size
    side = min(width, height, crop or width)
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)  # the centre square
    # One resampling of the centre square: what resizing the shorter side to image_size and then cropping the centre
    # does, without rounding the longer side to whole pixels in between. Lanczos is Pillow's sharpest antialiased
    # filter (its support widens with the reduction); it costs more than bicubic, but only once: the result is cached.
    image = image.resize((image_size, image_size), Image.Resampling.LANCZOS, box=box)
    array = np.asarray(image)  # (H, W) or (H, W, 3)
    return array[None] if grey else array.transpose(2, 0, 1)  # (C, H, W)


def _decode_folder(path, files, image_size, crop, grayscale, progress):
    """uint8 (N, C, image_size, image_size) of the files that decode (None if none does), and for each of the others
    a line "name (why)"; one line on stderr as each is skipped."""
    from PIL import Image

    log = progress and not sys.stderr.isatty()  # a log file: a line at the start and at the end
    if log:
        print(f"decoding {len(files)} images in {path} to {image_size}x{image_size}", file=sys.stderr)
    arrays, skipped = [], []
    for name in tqdm(files, desc=os.path.basename(os.path.normpath(path)), unit="img", disable=not progress or log):
        try:
            arrays.append(_decode(os.path.join(path, name), image_size, crop, grayscale))
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as error:
            # Pillow's own words (it says "broken PNG file" with a SyntaxError), but not the path a second time.
            why = "not an image Pillow can read" if isinstance(error, Image.UnidentifiedImageError) else error
            skipped.append(f"{name} ({_one_line(why)})")
            tqdm.write(f"skipping {os.path.join(path, skipped[-1])}", file=sys.stderr)
    if log:
        print(f"decoded {len(arrays)} images", file=sys.stderr, flush=True)
    if not arrays:
        return None, skipped
    channels = max(len(a) for a in arrays)  # 3 as soon as one picture is in colour
    # A grey picture in a colour set repeats its level in R, G and B, as Pillow's convert("RGB") does.
    return np.stack([np.broadcast_to(a, (channels, *a.shape[1:])) for a in arrays]), skipped


def _stamp(file):
    """(size, mtime_ns) of a file: a change to either means it was rewritten."""
    try:
        stat = os.stat(file)
        return stat.st_size, stat.st_mtime_ns
    except OSError:  # a broken link: decoding it fails and says why
        return None


def _folder_cache(path, files, image_size, crop, grayscale, pillow_version):
    """The cache file of these settings, and the key its content must carry: a hash of the format version, Pillow's
    version, the settings and every file's relative name, size and mtime_ns."""
    stamps = [(name, _stamp(os.path.join(path, name))) for name in files]
    key = hashlib.sha256(repr((FOLDER_CACHE_VERSION, pillow_version, image_size, crop, grayscale,
                               stamps)).encode()).hexdigest()
    colour = {None: "auto", True: "grey", False: "rgb"}[grayscale]
    name = f"{image_size}px-{f'crop{crop}' if crop else 'full'}-{colour}.npz"  # one file per setting, overwritten
    return os.path.join(path, FOLDER_CACHE, name), key


def _read_cache(file, key):
    """(images, skipped) from the cache file if it carries this key; None if it is absent, stale or unreadable."""
    try:
        with np.load(file, allow_pickle=False) as cached:
            if str(cached["key"]) != key:
                return None
            return cached["images"], [str(line) for line in cached["skipped"]]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _write_cache(file, key, images, skipped):
    """Save the cache atomically (a temporary file beside it, fsync, os.replace): a reader sees the old file or the
    new one, never part of one. A folder that cannot be written (read-only, full) leaves a note and no cache."""
    folder, tmp = os.path.dirname(file), None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".part", prefix=os.path.basename(file) + ".", dir=folder)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.array(key), images=images, skipped=np.array(skipped, dtype=str))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except OSError as error:
        print(f"note: not caching the decoded images in {folder} ({_one_line(error)}); they are decoded again next "
              f"time", file=sys.stderr)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def load_folder(path, image_size, crop=None, grayscale=None, held_out=0, train=True, progress=True):
    """Every PNG, JPEG, WebP and BMP under path as uint8 (N, C, image_size, image_size): the centre square (after a
    centre crop of `crop` pixels, as NCSNv2 crops CelebA to 140 before resizing to 64) resized with Lanczos; cached.

    crop: None, or the side of the centre crop taken first (the shorter side where a picture is smaller than crop).
    grayscale: None for 1 channel when every picture is grey and 3 otherwise; True or False for 1 or 3 regardless.
    held_out: how many images train=False returns and train=True leaves out, chosen by a permutation seeded with
        FOLDER_SEED; a count, as for the digits, so that an evaluation set has the size asked for. With 0 (the
        default) every image trains, and train=False is a ValueError.
    Both splits keep the files' sorted order. Files that cannot be decoded are skipped, each named on stderr.
    """
    if image_size < 1 or (crop is not None and crop < 1) or held_out < 0:
        raise ValueError(f"need image_size >= 1, crop None or >= 1 and held_out >= 0, got image_size {image_size}, "
                         f"crop {crop}, held_out {held_out}")
    if not train and held_out == 0:
        raise ValueError("held_out is 0, so there are no held-out images; pass held_out > 0 to set some aside")
    try:
        import PIL
    except ImportError:
        raise DataError("image folders are decoded by Pillow, which is not installed; pip install Pillow") from None
    if not os.path.isdir(path):
        raise DataError(f"{path} is not a folder; pass a folder of PNG, JPEG, WebP or BMP images")
    files = image_files(path)
    if not files:
        raise DataError(f"{path} holds no .png, .jpg, .jpeg, .webp or .bmp file (searched with its subfolders)")
    cache, key = _folder_cache(path, files, image_size, crop, grayscale, PIL.__version__)
    cached = _read_cache(cache, key)
    if cached is not None:
        images, skipped = cached
        for line in skipped if progress else ():  # the same lines as when the cache was written
            print(f"skipping {os.path.join(path, line)}", file=sys.stderr)
        if progress:
            print(f"loaded {len(images)} images of {path} from its cache {cache}", file=sys.stderr)
    else:
        images, skipped = _decode_folder(path, files, image_size, crop, grayscale, progress)
        if images is not None:
            _write_cache(cache, key, images, skipped)
    if skipped and progress:
        print(f"skipped {len(skipped)} of {len(files)} files in {path}", file=sys.stderr, flush=True)
    if images is None:
        raise DataError(f"none of the {len(files)} image files in {path} could be decoded (the lines above say why)")
    if held_out >= len(images):
        raise DataError(f"held_out is {held_out} but {path} has {len(images)} readable images; hold out fewer")
    # A fixed permutation: RandomState, whose stream numpy keeps across versions, as for the digits.
    order = np.random.RandomState(FOLDER_SEED).permutation(len(images))  # (N,)
    chosen = np.sort(order[held_out:] if train else order[:held_out])  # in the files' order
    return torch.from_numpy(images[chosen])  # (N, C, H, W); fancy indexing copies: writable


def _expand_like(t, x):
    return t.reshape(-1, *[1] * (x.dim() - 1))


class ImageData:
    """A whole image set as uint8 (N, C, H, W), batched with no host work per batch beyond an index copy: held on the
    device (on_device=True), or, for a set larger than the device's memory, in host memory (pinned on CUDA), each
    batch then gathered there and copied to the device asynchronously. Both draw the same batches from a generator."""

    def __init__(self, images, device=None, flip=False, dequantize=False, on_device=True):
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.dim() == 4):
            raise ValueError(f"images must be a uint8 tensor of shape (N, C, H, W), got "
                             f"{getattr(images, 'dtype', type(images))} of shape {tuple(getattr(images, 'shape', ()))}")
        self.device = torch.device(device) if device is not None else images.device
        self.on_device = on_device
        if on_device:
            self.images = images.to(self.device)
        else:  # pinned pages copy to a GPU without a staging copy, and asynchronously
            self.images = images.cpu().pin_memory() if self.device.type == "cuda" else images.cpu()
        self.flip, self.dequantize = flip, dequantize

    def __len__(self):
        return len(self.images)

    def batch(self, batch_size, generator=None):
        """x in [0, 1] of shape (B, C, H, W): uniform random images, random horizontal flips, k/255 or (k + u)/256."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = self.device
        index = torch.randint(len(self.images), (batch_size,), device=device, generator=generator)  # (B,)
        if self.on_device:
            x = self.images[index]
        else:  # the indices come to the host (one small sync), the uint8 batch goes to the device without blocking
            x = self.images[index.cpu()]
            x = x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)
        if self.flip:
            flipped = torch.rand(batch_size, device=device, generator=generator) < 0.5  # (B,)
            x = torch.where(_expand_like(flipped, x), x.flip(-1), x)
        if self.dequantize:  # uniform dequantisation [NCSN]: a continuous density over the 256 bins of [0, 1]
            return (x.float() + torch.rand(x.shape, device=device, generator=generator)) / 256
        return x.float() / 255


def _toy_device(device, generator):
    """The device asked for, else the generator's, else the CPU."""
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def sample_gmm(n, generator=None, device=None, dtype=torch.float32):
    """Exact samples (n, 2) of notes §7's p = 1/5 N((-5,-5), I) + 4/5 N((5,5), I) [Song & Ermon 2019, Fig. 3]."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    device = _toy_device(device, generator)
    weights = torch.tensor(GMM_WEIGHTS, device=device)
    means = torch.tensor(GMM_MEANS, device=device, dtype=dtype)  # (K, 2)
    k = torch.multinomial(weights, n, replacement=True, generator=generator)  # (n,) component of each sample
    noise = torch.randn(n, 2, device=device, dtype=dtype, generator=generator)
    return means[k] + GMM_STD * noise


def gmm_noisy_score(x, sigma):
    """grad_x log q_sigma(x) of the GMM noised as in notes §8: q_sigma = sum_k w_k N(mu_k, (std^2 + sigma^2) I)."""
    if not isinstance(sigma, torch.Tensor) and sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    var = (GMM_STD ** 2 + sigma ** 2).reshape(-1, 1, 1)  # (B or 1, 1, 1), shared by all components
    means = torch.tensor(GMM_MEANS, dtype=x.dtype, device=x.device)  # (K, 2)
    log_w = torch.tensor(GMM_WEIGHTS, dtype=x.dtype, device=x.device).log()  # (K,)
    diff = means - x.unsqueeze(1)  # (B, K, 2)
    # Responsibilities by a softmax (logsumexp inside): the Gaussians' normalisers are equal and cancel.
    resp = torch.softmax(log_w - diff.square().sum(-1) / (2 * var.squeeze(-1)), dim=1)  # (B, K)
    return (resp.unsqueeze(-1) * diff / var).sum(1)  # (B, 2)


def sample_swissroll(n, generator=None, device=None, std=0.1, dtype=torch.float32):
    """Swiss roll (n, 2): t = 1.5 pi (1 + 2u), x = (t cos t, t sin t) / 5 + std * z (sklearn's, in its x-z plane)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    device = _toy_device(device, generator)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, device=device, dtype=dtype, generator=generator))  # (n,)
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / 5  # (n, 2)
    if std:
        x = x + std * torch.randn(n, 2, device=device, dtype=dtype, generator=generator)
    return x


TOY_SETS = {"gmm": sample_gmm, "swissroll": sample_swissroll}


# ---- How good samples of a 2-D set are -------------------------------------------------------------------------

def mmd(a, b, bandwidths=(0.1, 0.3, 1.0, 3.0)):
    """Unbiased MMD^2 between two sample sets (n, D) and (m, D) with a sum of Gaussian kernels [Gretton et al. 2012]."""
    def kernel(u, v):
        d2 = torch.cdist(u, v).square()  # (n, m)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    n, m = len(a), len(b)
    kaa, kbb = kernel(a, a), kernel(b, b)
    return float((kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
                 - 2 * kernel(a, b).mean())


@torch.no_grad()
def toy_quality(dataset, samples, generator, score_fn=None, sigmas=()):
    """Numbers that say how good samples (n, 2) of a 2-D set are: the MMD to as many fresh points (NaN if a chain
    diverged); for gmm also the weight of each mode (by the sign of x1 + x2), the fraction of diverged chains, and,
    given score_fn(x, sigma), its exact Fisher divergence 1/2 E|s(x, sigma) - grad log q_sigma(x)|^2 at the largest,
    a middle and the smallest of the descending `sigmas` (a run's levels)."""
    fresh = TOY_SETS[dataset](len(samples), generator=generator, device=samples.device)  # (n, 2)
    quality = {"mmd": mmd(samples.float(), fresh)}
    if dataset == "gmm":
        side = samples.sum(1)  # < 0 near (-5,-5), > 0 near (5,5); NaN where a chain diverged
        quality["mode_weights"] = [float((side < 0).float().mean()), float((side >= 0).float().mean())]
        quality["diverged"] = float(side.isnan().float().mean())
        levels = (sigmas[0], sigmas[len(sigmas) // 2], sigmas[-1]) if score_fn is not None and len(sigmas) else ()
        for sigma in levels:
            x = fresh + sigma * torch.randn(fresh.shape, generator=generator, device=fresh.device)  # x~ ~ q_sigma
            s = torch.full((len(x),), sigma, device=x.device)  # (n,)
            fisher = 0.5 * (score_fn(x, s).float() - gmm_noisy_score(x, s)).square().sum(1).mean()
            quality[f"fisher@{sigma:.3g}"] = float(fisher)
    return quality


def format_quality(quality):
    """toy_quality's numbers as one line: "mmd 0.001, mode_weights [0.2, 0.8], ..."."""
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {[round(w, 3) for w in v]}"
                     for k, v in quality.items())
