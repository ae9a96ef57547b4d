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


def load_digits(train=True):
    """scikit-learn's 8x8 digits [Alpaydin & Kaynak 1998] as uint8 (N, 1, 8, 8): the 1500 training or 297 held-out."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise DataError(f"the 8x8 digits come with scikit-learn, which is not installed ({_one_line(error)}); "
                        "pip install scikit-learn") from None
    counts = sklearn_digits().images.astype(np.int64)  # (1797, 8, 8), ink counts 0..16 as float64
    images = ((counts * 255 + 8) // 16).astype(np.uint8)  # round(v * 255 / 16) in integers: 8 -> 127.5 -> 128
    # A fixed permutation: RandomState, whose stream numpy keeps across versions (NEP 19), where default_rng's
    # permutation may change; the held-out digits are the same on every machine and numpy.
    order = np.random.RandomState(DIGITS_SEED).permutation(len(images))  # (1797,)
    chosen = order[DIGITS_HELD_OUT:] if train else order[:DIGITS_HELD_OUT]
    return torch.from_numpy(images[chosen]).unsqueeze(1)  # (N, 1, 8, 8); fancy indexing copies: writable


def _expand_like(t, x):
    return t.reshape(-1, *[1] * (x.dim() - 1))


class ImageData:
    """A whole image set held on the device as uint8 (N, C, H, W), batched there with no host work per batch."""

    def __init__(self, images, device=None, flip=False, dequantize=False):
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.dim() == 4):
            raise ValueError(f"images must be a uint8 tensor of shape (N, C, H, W), got "
                             f"{getattr(images, 'dtype', type(images))} of shape {tuple(getattr(images, 'shape', ()))}")
        self.images = images.to(device) if device is not None else images
        self.flip, self.dequantize = flip, dequantize

    def __len__(self):
        return len(self.images)

    def batch(self, batch_size, generator=None):
        """x in [0, 1] of shape (B, C, H, W): uniform random images, random horizontal flips, k/255 or (k + u)/256."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = self.images.device
        x = self.images[torch.randint(len(self.images), (batch_size,), device=device, generator=generator)]
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
