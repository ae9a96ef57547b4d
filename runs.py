"""A training run on disk: what train.py keeps in its --out-dir, and how train.py and sample.py read it back.

    checkpoint.pt             {model, ema, optimizer, step, config, rng, interval, figure_owed} (weights_only)
    checkpoint_NNNNNNN.pt     the same at step NNNNNNN, kept with --keep-every K (the checkpoint history)
    metrics.jsonl             one JSON object per line: the loss every --log-every steps, quality numbers, FID...
    samples/step_NNNNNNN.png  sample figures during training (a grid of images, or 2-D points over fresh data)
    loss.png                  the training and held-out loss of metrics.jsonl, redrawn with each sample figure
    samples.npz, samples.png  sample.py's samples and their figure
    quality.png               sample.py --fid --baselines: samples beside held-out images and Gaussian draws
    inpainting.npz/.png       sample.py --inpaint: held-out images, their masks and completions
    interpolation.npz/.png    sample.py --interpolate: rows of chains that mix two noise streams
    run.lock                  held by the run that uses the folder (PID and host inside), so that there is one

`config` holds everything needed to rebuild the network (config["architecture"]) and to sample from it (shape,
data range, sigmas, n_steps_each, step_size); `rng` and `interval` hold, per process, the random streams and the
losses since the last metrics line, so that a resumed run goes on exactly as if it had never stopped. Every file but
metrics.jsonl (appended to, a line at a time, and cut back to the checkpoint's step on resume) is written atomically:
to a temporary file beside it, flushed to disk, then renamed, so a crash leaves the previous version whole; the
leftovers of a crash are removed when the next run starts. A checkpoint proves its integrity: torch.save writes a zip
whose members carry a CRC-32 of their bytes, checked on load, and its weights must be finite and fit its config.
Problems a user can fix (an unreadable or foreign checkpoint, a busy or unwritable folder, a device that isn't there)
raise RunError, whose message is one line.
"""
import fcntl
import json
import math
import os
import re
import socket
import sys
import zipfile

import torch
from einops import rearrange

import data
import ncsn

CHECKPOINT_KEYS = {"model", "ema", "optimizer", "step", "config", "rng"}
CONFIG_KEYS = {"dataset", "shape", "data_range", "architecture", "sigmas", "objective", "n_steps_each", "step_size",
               "lr", "batch_size", "ema_decay", "steps", "seed", "precision", "log_every", "ckpt_every",
               "sample_every", "n_grid"}


class RunError(Exception):
    """Bad input, a broken file, a diverged run: the scripts print it as one line on stderr and exit with status 1.
    Under torchrun every process meets it alike, and the first alone prints it."""


class RankError(RunError):
    """A RunError of some processes only (their machine's data, their weights): each of them prints it."""


def pick_device(name):
    """--device: auto picks cuda, then mps, then cpu; or a name such as cpu, cuda, cuda:1, mps. On CUDA it also turns
    on TF32 matmuls and convolutions and cuDNN's autotuning: free speed on Ampere and newer."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RunError(f"--device {name} was asked for but MPS is not available; use --device cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device


def _partial_name(path):
    """The temporary file of save_atomic for `path`: hidden, beside it, named by host and process, so that a later
    run knows whose it was."""
    folder, name = os.path.split(os.fspath(path))
    return os.path.join(folder, f".{name}.partial-{socket.gethostname()}-{os.getpid()}")


def save_atomic(write, path):
    """Call write(f) on a temporary file beside `path`, flush it to disk, then rename: a crash leaves the old file,
    and a failed write (a full disk) too, with a one-line RunError."""
    tmp = _partial_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:160]
        raise RunError(f"could not write {path} ({reason}); the previous version, if any, is untouched") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _remove_leftovers(folder):
    """Remove the temporary files of save_atomic whose process, on this host, has ended: what a crash left."""
    pattern = re.compile(rf"\..+\.partial-{re.escape(socket.gethostname())}-(\d+)")
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        match = pattern.fullmatch(name)
        if match and not _alive(int(match.group(1))):
            os.remove(os.path.join(folder, name))


def _alive(pid):
    try:
        os.kill(pid, 0)  # no signal sent: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def prepare_out_dir(out_dir):
    """Create out_dir, prove it writable, lock it for this run (the returned file holds the lock while it is open;
    None where the file system has no locks), and remove the temporary files that a crash during a save left."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("writable\n")
        os.remove(probe)
        lock = open(os.path.join(out_dir, "run.lock"), "a+")
    except (FileExistsError, NotADirectoryError):
        raise RunError(f"--out-dir {out_dir} is a file, or inside one; point --out-dir at a folder") from None
    except OSError as e:
        raise RunError(f"--out-dir {out_dir} cannot be written ({e.strerror}); point --out-dir elsewhere") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel when this process ends, however
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise RunError(f"{out_dir} is in use by another run ({holder}); wait for it to end, or use another "
                       "--out-dir") from None
    except OSError as e:  # Lustre mounted noflock, some FUSE file systems
        print(f"note: {out_dir} cannot be locked ({e.strerror}): nothing stops a second run from using it too",
              file=sys.stderr)
        lock.close()
        lock = None
    if lock is not None:
        lock.seek(0)
        lock.truncate()
        lock.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
    for folder in (out_dir, os.path.join(out_dir, "samples")):
        _remove_leftovers(folder)
    return lock


def load_checkpoint(path, device):
    """The checkpoint dict at `path`, its tensors on `device`, read without running code (weights_only) once the
    CRC-32 of every member of its zip is right; its weights must be finite and fit the network its config describes."""
    try:
        with open(path, "rb") as f:  # one open file: a checkpoint replaced meanwhile cannot mix two versions
            bad = zipfile.ZipFile(f).testzip()  # reads every member and checks its CRC-32
            if bad is not None:
                raise ValueError(f"the CRC-32 of {bad} does not match its bytes")
            f.seek(0)
            ckpt = torch.load(f, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001  -- any unreadable file gets the same one-line answer
        reason = " ".join(str(e).split())[:120] or "no message"
        raise RunError(f"cannot read checkpoint {path} ({type(e).__name__}: {reason}); it is truncated or "
                       "corrupt: move it away to start afresh, or point --out-dir elsewhere") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and "architecture" not in ckpt["config"]:
        ckpt = _upgrade(ckpt)
    if not (isinstance(ckpt, dict) and CHECKPOINT_KEYS <= set(ckpt) and isinstance(ckpt["config"], dict)
            and CONFIG_KEYS <= set(ckpt["config"])):
        raise RunError(f"{path} is not a checkpoint of train.py (it lacks some of {sorted(CHECKPOINT_KEYS)} or of "
                       "their config); move it away to start afresh, or point --out-dir elsewhere")
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        expected = {name: t.shape for name, t in build_model(ckpt["config"]).state_dict().items()}
    for key in ("model", "ema"):
        if {name: t.shape for name, t in ckpt[key].items()} != expected:
            raise RunError(f"{path}: its {key} weights do not fit the network its config describes; it is corrupt "
                           "or was edited: move it away to start afresh, or point --out-dir elsewhere")
        if not all(t.isfinite().all() for t in ckpt[key].values() if t.is_floating_point()):
            raise RunError(f"{path}: its {key} weights are not finite; it is corrupt: move it away to start afresh, "
                           "or point --out-dir elsewhere")
    return ckpt


def _upgrade(ckpt):
    """A checkpoint of an earlier train.py: its config named the network's settings "model", and its U-Net named the
    same parameters, in the same order, differently (a flat list of blocks with attention inside). Renamed in place
    by position, so that old runs resume exactly and sample."""
    config = ckpt["config"]
    if not isinstance(config.get("model"), dict) or not {"model", "ema"} <= set(ckpt):
        return ckpt
    config["architecture"] = config.pop("model")
    with torch.device("meta"):
        names = list(build_model(config).state_dict())
    for key in ("model", "ema"):
        if len(ckpt[key]) == len(names):
            ckpt[key] = dict(zip(names, ckpt[key].values()))
    return ckpt


# CPU features that compute in bf16 (torch.cpu.get_capabilities, from cpuinfo): AVX512-BF16 and AMX-BF16 on x86
# (AVX10.1 includes AVX512-BF16), BF16 and SVE-BF16 on Arm. torch.ops.mkldnn._is_mkldnn_bf16_supported() is not this
# test: it says whether oneDNN's bf16 kernels run at all, which any AVX512 (BW, VL, DQ) CPU passes by emulating them.
NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "avx10_1", "bf16", "sve_bf16")


def cpu_has_native_bf16():
    """Whether this CPU has bf16 arithmetic (NATIVE_BF16); False where torch cannot say (before get_capabilities)."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return any(capabilities.get(flag) is True for flag in NATIVE_BF16)


def usable_precision(precision, device, what="training"):
    """The precision asked for, or fp32 with a note (which says that `what` goes on in fp32) where the device has no
    bf16 autocast, or would only emulate it.

    On a CPU without native bf16 (cpu_has_native_bf16), bf16 is emulated through fp32: measured on an AVX512 CPU with
    oneDNN held to AVX512_CORE (ONEDNN_MAX_CPU_ISA), a training step of the U-Net took 2x the time of fp32, and with
    AVX2 only 11-22x; with native bf16 (avx512_bf16, same CPU) 0.55-0.88x. bf16 is a speed switch, and an emulated
    one is slower and less precise, so such a run goes on in fp32, as on a GPU without bf16; a checkpoint keeps
    --precision bf16, which a resume on a CPU or GPU with bf16 honours."""
    reason = None
    if precision == "bf16" and device.type == "mps":
        reason = "bf16 autocast is not supported on mps here"
    elif precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        reason = "this GPU has no bf16"
    elif precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        reason = ("this CPU has no native bf16 (avx512_bf16, amx_bf16 or Arm's bf16): bf16 would be emulated and "
                  "slower than fp32")
    if reason:
        print(f"note: {reason}; {what} in fp32", file=sys.stderr)
        return "fp32"
    return precision


def build_model(config):
    """The network that config["architecture"] describes: ncsn.NCSN for images, ncsn.MLPScoreNet for vectors."""
    kwargs = dict(config["architecture"])
    kind = kwargs.pop("kind")
    if kind == "NCSN":
        return ncsn.NCSN(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
    return ncsn.MLPScoreNet(**kwargs)


def is_image_run(config):
    return len(config["shape"]) == 3  # (C, H, W); the 2-D sets have shape (2,)


SPLITS = {  # the training and held-out images of each image set, by train=True / False (a folder's: run_images)
    "cifar10": lambda data_dir, train: data.load_cifar10(data_dir, train=train),
    "mnist": lambda data_dir, train: data.load_mnist(data_dir, train=train),
    "digits": lambda data_dir, train: data.load_digits(train=train),
}


def images_dir(config, data_dir):
    """The folder of a run's images: for a run on a folder, data_dir if given (the folder moved), else the folder it
    trained on; otherwise data_dir, else ./data (train.py's default)."""
    folder = config.get("data")
    if folder:
        return os.path.abspath(data_dir) if data_dir else folder["path"]
    return data_dir or "./data"


def run_images(config, data_dir, train=False):
    """All training (train=True) or held-out images of a run's data set, uint8 (N, C, H, W): its training or test
    split, or for a run on a folder the folder less, or only, the slice that train.py set aside (the folder and its
    settings are in the checkpoint's config). The held-out images are what the held-out loss is measured on, and what
    sample.py --inpaint and --data-init take; the training images are FID's reference."""
    which = "training" if train else "held-out"
    folder = config.get("data")
    if folder:
        path = images_dir(config, data_dir)
        if not folder["held_out"] and not train:
            raise RunError(f"the run on {folder['path']} held out no images (--held-out 0, or a folder of fewer "
                           "than 10); nothing to use")
        try:
            if os.path.isdir(path) and folder.get("files") not in (
                    None, data.folder_fingerprint(data.image_files(path))):
                raise data.DataError(f"files were added to or removed from {path} since the run, so its {which} "
                                     "images are not known any more")
            return data.load_folder(path, folder["image_size"], folder["crop"], folder["grayscale"],
                                    held_out=folder["held_out"], train=train, progress=False)
        except data.DataError as e:
            raise RunError(f"{e} (the run's folder, whose {which} images are used; --data-dir if it moved)") \
                from None
    if config["dataset"] not in SPLITS:
        raise RunError(f"no {which} images of {config['dataset']} are known")
    try:
        return SPLITS[config["dataset"]](images_dir(config, data_dir), train)
    except data.DataError as e:
        raise RunError(f"{e} (the {which} images; --data-dir points at them)") from None


def heldout_images(config, data_dir):
    """run_images(config, data_dir, train=False): the held-out images."""
    return run_images(config, data_dir, train=False)


def draw_samples(model, config, n, generator, progress=False, batch_size=None, callback=None, init=None,
                 precision="fp32", compile=False):
    """n samples (n, *shape) of the run's annealed Langevin sampler (notes §9), clamped to its data range; from the
    uniform prior, or from init + sigma_1 noise (ncsn.sample's data_init); the network in `precision`, compiled if
    asked (ncsn.sample's compile)."""
    device = next(model.parameters()).device
    return ncsn.sample(model, (n, *config["shape"]), torch.tensor(config["sigmas"], device=device),
                       config["n_steps_each"], config["step_size"], generator=generator, progress=progress,
                       data_range=tuple(config["data_range"]), batch_size=batch_size, callback=callback, init=init,
                       precision=precision, compile=compile)


def append_metrics(out_dir, record):
    """One JSON line appended to <out_dir>/metrics.jsonl."""
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def cut_metrics(out_dir, step):
    """Drop the lines of metrics.jsonl after `step` (those a resumed run is about to write again; all of them for
    step 0), atomically; a line cut short by a crash goes too. Returns how many lines were dropped."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                keep = json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line.rstrip("\n") + "\n")  # a last line without its newline gets one
            else:
                dropped += 1
    if dropped:
        save_atomic(lambda f: f.write("".join(kept).encode()), path)
    return dropped


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display), imported when a figure is first saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tile(images):
    """(N, C, H, W) in [0, 1] -> (rows H', cols W', C) numpy, a square-ish grid with 2-pixel gaps; images smaller
    than 32x32 magnified by a whole factor (each pixel a square), so that 8x8 digits are not a thumbnail."""
    zoom = max(1, 32 // images.shape[-1])
    images = images.repeat_interleave(zoom, -2).repeat_interleave(zoom, -1)  # (N, C, zoom H, zoom W)
    n = images.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    padded = torch.ones(rows * cols, *images.shape[1:])
    padded[:n] = images.float().cpu()
    padded = torch.nn.functional.pad(padded, (1, 1, 1, 1), value=1.0)
    return rearrange(padded, "(r c) ch h w -> (r h) (c w) ch", r=rows).clamp(0, 1).numpy()


def save_grid(images, path):
    """(N, C, H, W) in [0, 1] -> one PNG, the images as a grid (_tile)."""
    plt = _pyplot()
    grid = _tile(images)
    save_atomic(lambda f: plt.imsave(f, grid.squeeze(-1) if grid.shape[-1] == 1 else grid, format="png",
                                     cmap="gray"), path)


def save_panels(sets, titles, path):
    """A list of image sets (N_i, C, H, W) in [0, 1] -> one PNG of grids side by side, each under its title."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(sets), figsize=(3.2 * len(sets), 3.6), squeeze=False)
    for ax, images, title in zip(axes[0], sets, titles):
        grid = _tile(images)
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout(pad=0.3)
    save_atomic(lambda f: fig.savefig(f, format="png", dpi=100), path)
    plt.close(fig)


def save_loss_curve(out_dir):
    """loss.png from <out_dir>/metrics.jsonl: the training loss and, where logged, the held-out loss against the step
    (log scale: the loss falls by orders of magnitude early). Returns the path, or None while nothing is logged."""
    points = {"loss": [], "heldout_loss": []}
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash
                for key, values in points.items():
                    if isinstance(record.get(key), (int, float)):
                        values.append((record["step"], record[key]))
    except FileNotFoundError:
        return None
    if not points["loss"]:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for (key, values), label in zip(points.items(), ("training batches", "held-out (EMA model, fixed noise)")):
        if values:
            ax.plot(*zip(*values), label=label, marker="." if len(values) < 30 else None)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("NCSN loss (σ²-weighted DSM)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "loss.png")
    save_atomic(lambda f: fig.savefig(f, format="png", dpi=100), path)
    plt.close(fig)
    return path


def save_rows(images, path, titles):
    """(R, K, C, H, W) in [0, 1] -> one PNG of R rows and K columns, each column under its title; pixels drawn as
    squares (nearest neighbour), so that small images stay sharp."""
    plt = _pyplot()
    n_rows, n_cols = images.shape[:2]
    cell = max(1.2, min(2.0, images.shape[-1] / 32))  # inches per image, room for a title
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols * cell, n_rows * cell + 0.4), squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            image = rearrange(images[r, c].float().clamp(0, 1).cpu(), "ch h w -> h w ch").numpy()
            ax = axes[r, c]
            ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    fig.tight_layout(pad=0.3, h_pad=0.2, w_pad=0.2)
    save_atomic(lambda f: fig.savefig(f, format="png", dpi=100), path)
    plt.close(fig)


def save_scatter(samples, reference, path, title):
    """2-D samples (N, 2) over reference points (M, 2) of the data, as one PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(*reference.cpu().T, s=2, alpha=0.3, color="0.6", label="data")
    ax.scatter(*samples.cpu().T, s=2, alpha=0.6, color="C0", label="samples")
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper left", markerscale=5)
    save_atomic(lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"), path)
    plt.close(fig)
