"""Train a noise-conditional score network (notes §8–§10) and sample from it with annealed Langevin dynamics (§9).

    python train.py --dataset gmm                          # the notes' two-mode mixture, about a minute on a CPU
    python train.py --dataset cifar10                      # NCSNv2's published settings, on a GPU
    torchrun --standalone --nproc_per_node=8 train.py --dataset cifar10 --precision bf16 --compile
    python train.py --dataset cifar10 --sample 50000       # samples.npz from the EMA weights, for FID

Reads top to bottom: the per-dataset presets, the command line, data, model, the training loop with its
checkpoints and samples, and the sampling mode. A run whose --out-dir holds a checkpoint resumes from it.
Settings: Song & Ermon (2020), "Improved techniques for training score-based generative models" (NCSNv2), and
the notes' reference table; the 2-D sets follow the toy experiment of Song & Ermon (2019).
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from einops import rearrange
from tqdm import tqdm

import data
import ncsn

# ----------------------------------------------------------------------------------------------------------------
# Presets: every setting a flag can override, per dataset. sigmas=None means "NCSNv2 techniques 1 and 2 on the
# training data"; step_size=None means "technique 4 for those sigmas".
# ----------------------------------------------------------------------------------------------------------------
PRESETS = {
    # NCSNv2 CIFAR-10 (notes' reference table): 50 -> 0.01 in 232 levels, T = 5, Adam 1e-4, EMA 0.999. Their step
    # 6.2e-6 is for x + eps s + sqrt(2 eps) z; in the notes' §9 update x + eps/2 s + sqrt(eps) z it is 1.24e-5.
    "cifar10": dict(steps=300_000, batch_size=128, lr=1e-4, sigma_max=50.0, sigma_min=0.01, n_sigmas=232,
                    n_steps_each=5, step_size=1.24e-5, ema_decay=0.999, channels=128, channel_mults=(1, 2, 2, 2),
                    num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
                    sample_every=5000, ckpt_every=5000, log_every=100, n_grid=64),
    # MNIST: a U-Net sized for 28x28 (28 -> 14 -> 7); sigmas and step size from NCSNv2 techniques 1, 2 and 4.
    "mnist": dict(steps=100_000, batch_size=128, lr=1e-4, sigma_max=None, sigma_min=0.01, n_sigmas=None,
                  n_steps_each=5, step_size=None, ema_decay=0.999, channels=64, channel_mults=(1, 2, 2),
                  num_res_blocks=2, attn_resolutions=(14,), dropout=0.1,
                  sample_every=5000, ckpt_every=5000, log_every=100, n_grid=64),
    # The notes' two-mode mixture 1/5 N((-5,-5), I) + 4/5 N((5,5), I), an MLP score net. The toy reference
    # (20 -> 1, L = 10) ends at sigma = 1, which leaves samples of variance 2 per mode (0.5 after the final
    # denoising step); ending at 0.01 recovers the unit variance, with the exact score and with a trained one.
    "gmm": dict(steps=5000, batch_size=512, lr=1e-3, sigma_max=20.0, sigma_min=0.01, n_sigmas=30,
                n_steps_each=50, step_size=1e-5, ema_decay=0.99, hidden=128,
                sample_every=1000, ckpt_every=1000, log_every=100, n_grid=2000),
    # A 2-D swiss roll of radius up to 2.9 (data.sample_swissroll), same network and sampler.
    "swissroll": dict(steps=5000, batch_size=512, lr=1e-3, sigma_max=6.0, sigma_min=0.01, n_sigmas=30,
                      n_steps_each=50, step_size=1e-5, ema_decay=0.99, hidden=128,
                      sample_every=1000, ckpt_every=1000, log_every=100, n_grid=2000),
}
IMAGE_SETS = ("cifar10", "mnist")
# What a checkpoint must agree on to be resumed or sampled from.
IDENTITY = ("dataset", "model", "sigmas", "objective")


def preset_help(key):
    return "preset: " + ", ".join(f"{name} {p.get(key)}" for name, p in PRESETS.items() if key in p)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default; a flag whose default comes from the dataset's preset lists the presets instead."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--dataset", choices=list(PRESETS),
                   help="what to train on (default: gmm; on resume, the checkpoint's)")
    p.add_argument("--data-dir", default="./data", help="where data sets are found or downloaded to")
    p.add_argument("--out-dir", default=None, help="checkpoint, samples and metrics (default: runs/<dataset>)")
    p.add_argument("--seed", type=int, help="seed of data, noise, dropout and initialisation (default: 0)")
    p.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu; or e.g. cuda:1")
    g = p.add_argument_group("training (default: the dataset's preset; on resume, the checkpoint's settings)")
    g.add_argument("--steps", type=int, help=f"total optimiser steps ({preset_help('steps')})")
    g.add_argument("--batch-size", type=int, help=f"global batch, split over ranks ({preset_help('batch_size')})")
    g.add_argument("--lr", type=float, help=f"Adam learning rate ({preset_help('lr')})")
    g.add_argument("--channels", type=int, help=f"U-Net base width, image sets ({preset_help('channels')})")
    g.add_argument("--hidden", type=int, help=f"MLP width, 2-D sets ({preset_help('hidden')})")
    g.add_argument("--ema-decay", type=float, help=f"EMA decay of the weights ({preset_help('ema_decay')})")
    g.add_argument("--objective", choices=["dsm", "ssm", "exact"],
                   help="denoising (§4), sliced with variance reduction (§5) or exact (§3) score matching, "
                        "each sigma^2-weighted over the noise levels; exact is for 2-D data only (default: dsm)")
    g.add_argument("--precision", choices=["fp32", "bf16"], help="bf16 autocast for the network (default: fp32)")
    g.add_argument("--compile", action="store_true", help="torch.compile the network")
    g = p.add_argument_group("noise levels and sampler (default: the dataset's preset; on resume, the checkpoint's)")
    g.add_argument("--sigma-max", type=float,
                   help=f"largest sigma ({preset_help('sigma_max')}; None: NCSNv2 technique 1)")
    g.add_argument("--sigma-min", type=float, help=f"smallest sigma ({preset_help('sigma_min')})")
    g.add_argument("--n-sigmas", type=int,
                   help=f"number of levels L ({preset_help('n_sigmas')}; None: NCSNv2 technique 2)")
    g.add_argument("--n-steps-each", type=int, help=f"Langevin steps per level T ({preset_help('n_steps_each')})")
    g.add_argument("--step-size", type=float, help=f"step size at sigma_min ({preset_help('step_size')}; "
                                                   "None: NCSNv2 technique 4)")
    g = p.add_argument_group("logging, checkpoints, samples (default: the dataset's preset; 0 turns one off)")
    g.add_argument("--log-every", type=int, help=f"steps between metrics lines ({preset_help('log_every')})")
    g.add_argument("--ckpt-every", type=int, help=f"steps between checkpoints ({preset_help('ckpt_every')}); "
                                                  "one is always written at the end")
    g.add_argument("--sample-every", type=int, help=f"steps between sample figures ({preset_help('sample_every')}); "
                                                    "0 means no sampling at all, not even at the end")
    g.add_argument("--sample", type=int, metavar="N", default=None,
                   help="sampling mode: no training; draw N samples from the EMA weights of --out-dir's checkpoint "
                        "into <out-dir>/samples.npz and samples.png")
    g.add_argument("--sample-batch-size", type=int, default=500, help="batch size of the sampling mode")
    args = p.parse_args(argv)
    for name, least in (("steps", 1), ("batch_size", 1), ("channels", 1), ("hidden", 1), ("n_sigmas", 2),
                        ("n_steps_each", 1), ("sample_batch_size", 1), ("sample", 1)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    for name in ("log_every", "ckpt_every", "sample_every"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0 (0 turns it off), got {getattr(args, name)}")
    for name in ("lr", "sigma_max", "sigma_min", "step_size"):
        if getattr(args, name) is not None and not 0 < getattr(args, name) < math.inf:
            p.error(f"--{name.replace('_', '-')} must be > 0 and finite, got {getattr(args, name)}")
    if args.ema_decay is not None and not 0 <= args.ema_decay < 1:
        p.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    args.out_dir = args.out_dir or os.path.join("runs", args.dataset or "gmm")
    return args


class Failure(Exception):
    """Bad input, a broken file, a diverged run: main() reports it as one line on stderr and exits with status 1."""


def fail(message):
    raise Failure(message)


# ----------------------------------------------------------------------------------------------------------------
# Devices and processes: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain run is rank 0 of 1.
# ----------------------------------------------------------------------------------------------------------------
def setup_device(name):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        fail("--device mps was asked for but MPS is not available; use --device cpu")
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":  # TF32 matmuls and convolutions: free speed on Ampere and newer
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device, rank, world


# ----------------------------------------------------------------------------------------------------------------
# Configuration: the preset, overridden by flags, resolved into concrete numbers and stored in the checkpoint.
# ----------------------------------------------------------------------------------------------------------------
def resumed_settings(saved):
    """A checkpoint config's settings in the presets' terms: a resumed run keeps them unless a flag changes them."""
    settings = {key: saved[key] for key in ("steps", "batch_size", "lr", "ema_decay", "n_steps_each", "step_size",
                                            "log_every", "ckpt_every", "sample_every", "n_grid")}
    settings.update(sigma_max=saved["sigmas"][0], sigma_min=saved["sigmas"][-1], n_sigmas=len(saved["sigmas"]))
    settings.update({key: saved["model"][key] for key in ("channels", "hidden") if key in saved["model"]})
    return settings


def resolve_config(args, train_data, device, saved=None, is_main=True):
    """Flags over the checkpoint's settings (on resume) over the dataset's preset. NCSNv2 techniques fill what is
    left open (None): sigma_1 is the largest distance between training points (1), L follows from the ratio gamma(D)
    (2), the step size from f(eps) (4)."""
    preset = dict(PRESETS[args.dataset])
    if saved is not None:
        preset.update(resumed_settings(saved))
    for key in preset:
        if getattr(args, key, None) is not None:
            preset[key] = getattr(args, key)
    if args.dataset in IMAGE_SETS:
        model = dict(kind="NCSN", in_channels=int(train_data.shape[1]), channels=preset["channels"],
                     channel_mults=list(preset["channel_mults"]), num_res_blocks=preset["num_res_blocks"],
                     attn_resolutions=list(preset["attn_resolutions"]), dropout=preset["dropout"],
                     image_size=int(train_data.shape[-1]))
    else:
        model = dict(kind="MLPScoreNet", dim=2, hidden=preset["hidden"])
    dim = int(np.prod(train_data.shape[1:]))
    sigma_max, n_sigmas, sigma_min = preset["sigma_max"], preset["n_sigmas"], preset["sigma_min"]
    if sigma_max is None:  # technique 1, over the whole training set, in batches
        if is_main:
            print(f"sigma_max: the largest distance between the {len(train_data)} training points (technique 1)")
        points = train_data.to(device).float() / 255 if args.dataset in IMAGE_SETS else train_data.to(device)
        sigma_max = ncsn.max_pairwise_distance(points)
    if not sigma_max > sigma_min:
        fail(f"--sigma-max ({sigma_max:g}) must be larger than --sigma-min ({sigma_min:g})")
    if n_sigmas is None:  # technique 2
        n_sigmas = math.ceil(math.log(sigma_max / sigma_min) / math.log(ncsn.sigma_ratio(dim))) + 1
    sigmas = ncsn.geometric_sigmas(sigma_max, sigma_min, n_sigmas).tolist()
    if saved is not None and all(getattr(args, k) is None for k in ("sigma_max", "sigma_min", "n_sigmas")):
        sigmas = saved["sigmas"]  # verbatim: recomputing them from the rounded endpoints could move the last bit
    step_size = preset["step_size"]
    if step_size is None:  # technique 4
        step_size = ncsn.recommended_step_size(sigmas, preset["n_steps_each"], dim)
    images = args.dataset in IMAGE_SETS
    # Images live in [0, 1]; the 2-D sets in a box that holds all their mass (the prior of the sampler).
    data_range = [0.0, 1.0] if images else [-8.0, 8.0] if args.dataset == "gmm" else [-4.0, 4.0]
    return dict(dataset=args.dataset, shape=list(train_data.shape[1:]), data_range=data_range, model=model,
                sigmas=sigmas, objective=args.objective,
                n_steps_each=preset["n_steps_each"], step_size=float(step_size), lr=preset["lr"],
                batch_size=preset["batch_size"], ema_decay=preset["ema_decay"], steps=preset["steps"],
                seed=args.seed, precision=args.precision, log_every=preset["log_every"],
                ckpt_every=preset["ckpt_every"], sample_every=preset["sample_every"], n_grid=preset["n_grid"])


# ----------------------------------------------------------------------------------------------------------------
# Data: image sets live on the device as uint8 and are augmented there; 2-D sets are generated on the device.
# ----------------------------------------------------------------------------------------------------------------
def load_images(args):
    """(N, C, H, W) uint8 on the CPU; the first process of each machine downloads, the others wait and read it."""
    load = data.load_cifar10 if args.dataset == "cifar10" else data.load_mnist
    is_first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    images, error = None, None
    if is_first:
        try:
            images = load(args.data_dir, train=True, download=True, progress=True)
        except data.DataError as e:  # reach the barrier first, so that no other rank waits forever
            error = e
    if dist.is_initialized():
        dist.barrier()
    if error is not None:
        raise error
    if not is_first:
        images = load(args.data_dir, train=True, download=False, progress=False)
    return images


def toy_sampler(dataset):
    return data.sample_gmm if dataset == "gmm" else data.sample_swissroll


def make_batches(config, images, device, generator):
    """A function batch(n) -> (n, *shape) float tensor on the device, in the data range of the config."""
    if images is not None:
        source = data.ImageData(images, device=device, flip=config["dataset"] == "cifar10")
        if device.type == "cuda":  # the layout of the channels_last model, so that no conv converts its input
            return lambda n: source.batch(n, generator=generator).contiguous(memory_format=torch.channels_last)
        return lambda n: source.batch(n, generator=generator)
    sample_toy = toy_sampler(config["dataset"])
    return lambda n: sample_toy(n, generator=generator, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
def make_model(config):
    kwargs = dict(config["model"])
    kind = kwargs.pop("kind")
    if kind == "NCSN":
        for key in ("channel_mults", "attn_resolutions"):
            kwargs[key] = tuple(kwargs[key])
        return ncsn.NCSN(**kwargs)
    return ncsn.MLPScoreNet(**kwargs)


def autocast(device, precision):
    """bf16 autocast for the network's forward pass; the loss and the EMA stay in fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: one dict {model, ema, optimizer, step, config, rng}, written atomically, read with weights_only.
# ----------------------------------------------------------------------------------------------------------------
def save_atomic(write, path):
    """Write to a temporary file beside `path`, flush it to disk, then rename: a crash leaves the old file intact."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


CHECKPOINT_KEYS = {"model", "ema", "optimizer", "step", "config", "rng"}
CONFIG_KEYS = {"dataset", "shape", "data_range", "model", "sigmas", "objective", "n_steps_each", "step_size", "lr",
               "batch_size", "ema_decay", "steps", "seed", "precision", "log_every", "ckpt_every", "sample_every",
               "n_grid"}


def load_checkpoint(path, device):
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001  -- any unreadable file gets the same one-line answer
        fail(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); it may be "
             "truncated or corrupt: move it away to start afresh, or point --out-dir elsewhere")
    if not (isinstance(ckpt, dict) and CHECKPOINT_KEYS <= set(ckpt) and isinstance(ckpt["config"], dict)
            and CONFIG_KEYS <= set(ckpt["config"])):
        fail(f"{path} is not a checkpoint of train.py (it lacks some of {sorted(CHECKPOINT_KEYS)} or of their "
             "config); move it away to start afresh, or point --out-dir elsewhere")
    return ckpt


def check_identity(saved, config, path):
    for key in IDENTITY:
        if saved.get(key) != config.get(key):
            fail(f"checkpoint {path} was trained with a different {key} ({saved.get(key)!r:.80} here "
                 f"{config.get(key)!r:.80}); use another --out-dir")


def rng_state(generators, device):
    """This process's random streams: the CPU's (dropout on the CPU), its GPU's, and the data and noise generators."""
    state = {"device": device.type, "torch": torch.get_rng_state(), **{k: g.get_state() for k, g in generators.items()}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, generators, device):
    torch.set_rng_state(state["torch"].cpu())
    for k, g in generators.items():
        g.set_state(state[k].cpu())
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# ----------------------------------------------------------------------------------------------------------------
# Samples and their quality
# ----------------------------------------------------------------------------------------------------------------
def draw_samples(model, config, n, device, seed, progress=False, batch_size=None):
    generator = torch.Generator(device).manual_seed(seed)
    return ncsn.sample(model, (n, *config["shape"]), torch.tensor(config["sigmas"], device=device),
                       config["n_steps_each"], config["step_size"], generator=generator, progress=progress,
                       data_range=tuple(config["data_range"]), batch_size=batch_size)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display), imported when a figure is first saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_grid(images, path):
    """(N, C, H, W) in [0, 1] -> one PNG, a square-ish grid with 2-pixel gaps."""
    plt = pyplot()
    n = images.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    padded = torch.ones(rows * cols, *images.shape[1:])
    padded[:n] = images.float().cpu()
    padded = torch.nn.functional.pad(padded, (1, 1, 1, 1), value=1.0)
    grid = rearrange(padded, "(r c) ch h w -> (r h) (c w) ch", r=rows).clamp(0, 1).numpy()
    save_atomic(lambda f: plt.imsave(f, grid.squeeze(-1) if grid.shape[-1] == 1 else grid, format="png",
                                     cmap="gray"), path)


def save_scatter(samples, reference, path, title):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(*reference.cpu().T, s=2, alpha=0.3, color="0.6", label="data")
    ax.scatter(*samples.cpu().T, s=2, alpha=0.6, color="C0", label="samples")
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper left", markerscale=5)
    save_atomic(lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"), path)
    plt.close(fig)


def mmd(a, b, bandwidths=(0.1, 0.3, 1.0, 3.0)):
    """Unbiased MMD^2 between two sample sets with a sum of Gaussian kernels."""
    def kernel(u, v):
        d2 = torch.cdist(u, v).square()
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    n, m = len(a), len(b)
    kaa, kbb = kernel(a, a), kernel(b, b)
    return float((kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
                 - 2 * kernel(a, b).mean())


@torch.no_grad()
def toy_quality(model, samples, config, device, generator):
    """Numbers that say how good a 2-D model is: MMD to fresh data; for gmm the mode weights and the exact Fisher
    divergence 1/2 E|s(x, sigma) - grad log q_sigma(x)|^2 at the largest, a middle and the smallest sigma."""
    fresh = toy_sampler(config["dataset"])(len(samples), generator=generator, device=device)
    quality = {"mmd": mmd(samples.float(), fresh)}  # NaN if any chain diverged
    if config["dataset"] == "gmm":
        side = samples.sum(1)  # < 0 near (-5,-5), > 0 near (5,5); NaN where a chain diverged
        quality["mode_weights"] = [float((side < 0).float().mean()), float((side >= 0).float().mean())]
        quality["diverged"] = float(side.isnan().float().mean())
        sigmas = config["sigmas"]
        for sigma in (sigmas[0], sigmas[len(sigmas) // 2], sigmas[-1]):
            x = fresh + sigma * torch.randn(fresh.shape, generator=generator, device=device)
            s = torch.full((len(x),), sigma, device=device)
            fisher = 0.5 * (model(x, s).float() - data.gmm_noisy_score(x, s)).square().sum(1).mean()
            quality[f"fisher@{sigma:.3g}"] = float(fisher)
    return quality


def write_samples(model, config, step, out_dir, device, generator):
    """Rank 0: sample from the EMA model, save the figure, return the quality numbers (2-D data) or {}."""
    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
    path = os.path.join(out_dir, "samples", f"step_{step:07d}.png")
    samples = draw_samples(model, config, config["n_grid"], device, seed=config["seed"] + step)
    if config["dataset"] in IMAGE_SETS:
        save_grid(samples, path)
        return {}
    reference = toy_sampler(config["dataset"])(config["n_grid"], generator=generator, device=device)
    save_scatter(samples, reference, path, f"{config['dataset']}, step {step}")
    return toy_quality(model, samples, config, device, generator)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def train(args):
    device, rank, world = setup_device(args.device)
    is_main = rank == 0
    ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
    ckpt = load_checkpoint(ckpt_path, device) if os.path.exists(ckpt_path) else None
    saved = ckpt["config"] if ckpt is not None else {}
    # What the command line leaves open comes from the checkpoint on resume, else the defaults.
    args.dataset = args.dataset or saved.get("dataset", "gmm")
    args.objective = args.objective or saved.get("objective", "dsm")
    args.precision = args.precision or saved.get("precision", "fp32")
    args.seed = saved.get("seed", 0) if args.seed is None else args.seed
    if args.objective == "exact" and args.dataset in IMAGE_SETS:
        fail(f"--objective exact needs one backward pass per dimension per step (D = "
             f"{'3072' if args.dataset == 'cifar10' else '784'} for {args.dataset}); use dsm or ssm")
    if ckpt is not None and saved["dataset"] != args.dataset:
        fail(f"checkpoint {ckpt_path} was trained on a different dataset ({saved['dataset']}); use another --out-dir")
    try:
        images = load_images(args) if args.dataset in IMAGE_SETS else None
    except data.DataError as e:
        fail(str(e))
    train_data = images if images is not None else toy_sampler(args.dataset)(
        10_000, generator=torch.Generator().manual_seed(args.seed))  # only its shape and spread are used
    try:
        config = resolve_config(args, train_data, device, saved=saved if ckpt is not None else None, is_main=is_main)
    except ValueError as e:  # a combination of settings that the NCSNv2 techniques or the networks refuse
        fail(str(e))
    if config["batch_size"] % world:
        fail(f"--batch-size {config['batch_size']} is not divisible by the {world} processes")

    # The model and its EMA start identical on every rank (same seed); each rank then draws its own data, noise and
    # dropout, and DDP all-reduces the gradients, so the weights and the EMA stay identical everywhere.
    torch.manual_seed(config["seed"])
    try:
        model = make_model(config).to(device)
    except ValueError as e:
        fail(str(e))
    if device.type == "cuda" and images is not None:
        model = model.to(memory_format=torch.channels_last)
    ema = ncsn.EMA(model, decay=config["ema_decay"])

    def seed_streams(step):
        torch.manual_seed(config["seed"] * 1000 + rank + 250 + 1_000_003 * step)  # dropout
        return {"data": torch.Generator(device).manual_seed(config["seed"] * 1000 + rank + 1_000_003 * step),
                "noise": torch.Generator(device).manual_seed(config["seed"] * 1000 + rank + 500 + 1_000_003 * step)}

    generators = seed_streams(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], betas=(0.9, 0.999), eps=1e-8)
    step = 0
    if ckpt is not None:
        check_identity(saved, config, ckpt_path)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # a new --lr applies from here on
            group["lr"] = config["lr"]
        step = ckpt["step"]
        states = ckpt["rng"]
        if len(states) == world and states[rank].get("device") == device.type:
            set_rng_state(states[rank], generators, device)
        else:  # another number of processes or kind of device: weights and optimiser carry over, streams restart
            generators = seed_streams(step)
            if is_main:
                print(f"note: the checkpoint's random streams are from {len(states)} process(es) on "
                      f"{states[0].get('device')}, this run has {world} on {device.type}: they are reseeded, so "
                      "the continuation is not bit-identical")
        changed = {k: (saved[k], config[k]) for k in config if k in saved and saved[k] != config[k]}
        if is_main:
            print(f"resuming from {ckpt_path} at step {step}" + "".join(f"; {k} {a} -> {b}" for k, (a, b) in
                                                                       changed.items()))
    if world > 1:  # every rank must have read the same checkpoint: the out-dir must be shared by every machine
        steps = torch.tensor([step, -step], device=device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if steps[0] != -steps[1]:
            fail(f"ranks resumed from different steps; --out-dir ({args.out_dir}) must be on a file system that "
                 "every machine sees")

    precision = config["precision"]
    if precision == "bf16" and device.type == "mps":
        print("note: bf16 autocast is not supported on mps here; training in fp32", file=sys.stderr)
        precision = "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        print("note: this GPU has no bf16; training in fp32", file=sys.stderr)
        precision = "fp32"
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:  # the checkpoint keeps the plain module's state_dict, loadable without compile
        if device.type == "mps":
            print("note: --compile is not supported on mps; running uncompiled", file=sys.stderr)
        elif config["objective"] != "dsm":
            print(f"note: --compile cannot differentiate twice, which --objective {config['objective']} needs; "
                  "running uncompiled", file=sys.stderr)
        else:
            torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly, with a warning
            net = torch.compile(net)
    batch = make_batches(config, images, device, generators["data"])
    sigmas = torch.tensor(config["sigmas"], device=device)
    local_batch = config["batch_size"] // world
    # ssm and exact differentiate the network twice; fused attention kernels have no double backward.
    attention = contextlib.nullcontext if config["objective"] == "dsm" else \
        lambda: torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)

    def score(x, sigma):
        with autocast(device, precision), attention():
            return net(x, sigma).float()

    def checkpoint():
        """Write {model, ema, optimizer, step, config, rng} atomically, once the weights are known to be finite."""
        finite = torch.stack([p.isfinite().all() for m in (model, ema.module) for p in m.parameters()]).all().float()
        if world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite:
            fail(f"the weights are not finite after step {step}; stopping before they are saved (the last good "
                 f"checkpoint in {args.out_dir} is untouched); try a lower --lr")
        states = [None] * world
        if world > 1:
            dist.all_gather_object(states, rng_state(generators, device))
        else:
            states = [rng_state(generators, device)]
        if is_main:
            os.makedirs(args.out_dir, exist_ok=True)
            state = dict(model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(), step=step,
                         config=config, rng=states)
            save_atomic(lambda f: torch.save(state, f), ckpt_path)

    # Levels are grouped in up to four bands (largest sigmas first) for the per-band loss in metrics.jsonl.
    n_bands = min(4, len(sigmas))
    band_of_level = torch.arange(len(sigmas), device=device) * n_bands // len(sigmas)
    band_names = [f"{config['sigmas'][int((band_of_level == b).nonzero()[0])]:.3g}-"
                  f"{config['sigmas'][int((band_of_level == b).nonzero()[-1])]:.3g}" for b in range(n_bands)]
    losses = []  # 0-d tensors on the device since the last flush: no host sync per step
    band_sum = torch.zeros(n_bands, device=device)
    band_count = torch.zeros(n_bands, device=device)

    def check(step):
        """One host sync: stop on a non-finite loss of the interval before anything is written."""
        values = torch.stack(losses[checked[0]:]) if len(losses) > checked[0] else torch.zeros(0, device=device)
        bad = (~torch.isfinite(values)).any().float()
        if world > 1:  # every rank stops together, whichever saw it
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad:
            values = values.cpu()
            where = (f"at step {step - len(values) + 1 + int((~torch.isfinite(values)).nonzero()[0])}"
                     if not torch.isfinite(values).all() else f"on another rank by step {step}")
            fail(f"the loss is not finite {where}; stopping before anything more is saved (the last good checkpoint "
                 f"in {args.out_dir} is untouched); try a lower --lr")
        checked[0] = len(losses)

    def record(step):
        """The metrics line of the steps since the last one, averaged over the ranks."""
        values = torch.stack(losses)
        if world > 1:
            for t in (values, band_sum, band_count):
                dist.all_reduce(t)
            values /= world
        timer["seconds"] += time.perf_counter() - timer["start"]
        line = dict(step=step, loss=float(values.mean()), lr=config["lr"],
                    images_per_s=len(values) * config["batch_size"] / timer["seconds"],
                    loss_per_sigma_band={name: float(s / max(c, 1)) for name, s, c in
                                         zip(band_names, band_sum.cpu(), band_count.cpu())})
        losses.clear(), band_sum.zero_(), band_count.zero_()
        checked[0], timer["seconds"], timer["start"] = 0, 0.0, time.perf_counter()
        return line

    def log(record):
        if is_main:
            with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    if is_main:
        os.makedirs(args.out_dir, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{config['dataset']}: {n_params / 1e6:.2f} M parameters, {len(sigmas)} sigmas "
              f"{config['sigmas'][0]:.3g} -> {config['sigmas'][-1]:.3g}, objective {config['objective']}, "
              f"{world} process(es) on {device}, writing to {args.out_dir}")
    checked = [0]  # how many of `losses` are known to be finite
    timer = {"start": time.perf_counter(), "seconds": 0.0}  # training time since the last metrics line
    # Non-finite losses are looked for at every metrics line, checkpoint and sample, and at least every 100 steps.
    check_every = min(config["log_every"] or 100, 100)
    quality_generator = torch.Generator(device).manual_seed(config["seed"] + 12345)
    # The bar shows on a terminal only (disable=None), on rank 0; it closes before any error is printed.
    with tqdm(total=config["steps"], initial=step, disable=None if is_main else True, dynamic_ncols=True,
              desc="train") as bar:
        while step < config["steps"]:
            model.train()
            x = batch(local_batch)  # (b, *shape)
            levels = torch.randint(len(sigmas), (local_batch,), device=device, generator=generators["noise"])
            per_example = ncsn.ncsn_loss(score, x, sigmas, objective=config["objective"], reduction="none",
                                         levels=levels, generator=generators["noise"], trace="loop")  # (b,)
            loss = per_example.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema.update(model)
            step += 1
            bar.update(1)
            losses.append(loss.detach())
            band_sum.index_add_(0, band_of_level[levels], per_example.detach())
            band_count.index_add_(0, band_of_level[levels], torch.ones_like(per_example))

            last = step == config["steps"]
            do_log = config["log_every"] and step % config["log_every"] == 0
            do_ckpt = (config["ckpt_every"] and step % config["ckpt_every"] == 0) or last
            do_sample = config["sample_every"] and (step % config["sample_every"] == 0 or last)
            if do_log or do_ckpt or do_sample or step % check_every == 0:
                check(step)  # exits on a non-finite loss before anything of this interval is written
                if not config["log_every"]:  # no metrics lines: nothing to keep once checked
                    losses.clear(), band_sum.zero_(), band_count.zero_()
                    checked[0] = 0
            if do_log:
                line = record(step)
                bar.set_postfix(loss=f"{line['loss']:.4g}", img_s=f"{line['images_per_s']:.0f}")
                if bar.disable and is_main:  # no terminal (a log file, a batch job): one line per interval
                    print(f"step {step}: loss {line['loss']:.4g}, {line['images_per_s']:.0f} images/s", flush=True)
                log(line)
            if do_ckpt or do_sample:
                timer["seconds"] += time.perf_counter() - timer["start"]  # saving and sampling are not training
                if do_ckpt:
                    checkpoint()
                if do_sample and is_main:
                    quality = write_samples(ema.module, config, step, args.out_dir, device, quality_generator)
                    if quality:
                        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else
                                                                f"{k} {[round(w, 3) for w in v]}"
                                                                for k, v in quality.items()))
                        log(dict(step=step, **quality))
                if do_sample and world > 1:
                    dist.barrier()
                timer["start"] = time.perf_counter()
    if world > 1:  # DDP keeps the ranks in lockstep; say so, or stop loudly if they ever drifted apart
        fingerprint = torch.stack([torch.cat([p.detach().double().flatten() for p in m.parameters()]).square().sum()
                                   for m in (model, ema.module)])
        everyone = [torch.zeros_like(fingerprint) for _ in range(world)]
        dist.all_gather(everyone, fingerprint)
        if any(not torch.equal(f, fingerprint) for f in everyone):
            fail(f"rank {rank}: the model or EMA weights differ between ranks")
        if is_main:
            print(f"parameters and EMA agree on all {world} ranks")
    if is_main:
        print(f"done: {step} steps; checkpoint {ckpt_path}")


# ----------------------------------------------------------------------------------------------------------------
# Sampling mode: N samples from the EMA weights, as uint8 NHWC images (or float 2-D points) in samples.npz
# ----------------------------------------------------------------------------------------------------------------
def sample_mode(args):
    device, rank, world = setup_device(args.device)
    if world > 1:
        fail("--sample runs in one process; start it with python, not torchrun")
    ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
    if not os.path.exists(ckpt_path):
        fail(f"no checkpoint at {ckpt_path}; train first, or point --out-dir at a run")
    ckpt = load_checkpoint(ckpt_path, device)
    config = ckpt["config"]
    model = make_model(config).to(device)
    model.load_state_dict(ckpt["ema"])  # the EMA's state dict is the averaged network's own: sample from those weights
    images = config["dataset"] in IMAGE_SETS
    print(f"sampling {args.sample} from {ckpt_path} (step {ckpt['step']}), {len(config['sigmas'])} levels x "
          f"{config['n_steps_each']} steps + denoise")
    samples = draw_samples(model, config, args.sample, device, seed=args.seed or 0, progress=True,
                           batch_size=args.sample_batch_size)
    if images:
        array = rearrange((samples * 255).round().to(torch.uint8).cpu(), "n c h w -> n h w c").numpy()
        save_grid(samples[:100], os.path.join(args.out_dir, "samples.png"))
    else:
        array = samples.cpu().numpy()
        shown = min(len(samples), 5000)
        reference = toy_sampler(config["dataset"])(shown, generator=torch.Generator(device).manual_seed(1),
                                                   device=device)
        save_scatter(samples[:shown], reference, os.path.join(args.out_dir, "samples.png"),
                     f"{config['dataset']}: {args.sample} samples")
    save_atomic(lambda f: np.savez(f, array), os.path.join(args.out_dir, "samples.npz"))
    print(f"wrote {os.path.join(args.out_dir, 'samples.npz')} ({array.dtype} {tuple(array.shape)}) and samples.png")


def main(argv=None):
    args = parse_args(argv)
    try:
        sample_mode(args) if args.sample is not None else train(args)
    except Failure as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:  # after train() has returned and its DDP wrapper is gone, so that nothing outlives the process group
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
