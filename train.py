"""Train a noise-conditional score network (notes §8–§10); sample from it with sample.py.

    python train.py --dataset gmm                          # the notes' two-mode mixture, about a minute on a CPU
    python train.py --dataset digits                       # real 8x8 handwritten digits, a few minutes on a CPU
    python train.py --dataset cifar10                      # NCSNv2's published settings, on a GPU
    torchrun --standalone --nproc_per_node=8 train.py --dataset cifar10 --precision bf16 --compile

Reads top to bottom: the per-dataset presets, the command line, the helpers of each stage (devices, settings, data,
resume, the network's switches, the loop's checks and logs, checkpoints and sample figures), then train() itself,
a flat story that calls them. A run whose --out-dir holds a checkpoint resumes from it. Settings: Song & Ermon (2020),
"Improved techniques for training score-based generative models" (NCSNv2), and the notes' reference table; the 2-D
sets follow the toy experiment of Song & Ermon (2019).
"""
import argparse
import contextlib
import functools
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import ncsn
import runs
from runs import RankError, RunError

# ----------------------------------------------------------------------------------------------------------------
# Presets: every setting a flag can override, per dataset. sigma_max=None means "NCSNv2 technique 1 on the training
# data", n_sigmas=None "technique 2", step_size=None "technique 4 for those sigmas".
# ----------------------------------------------------------------------------------------------------------------
PRESETS = {
    # NCSNv2 CIFAR-10 (notes' reference table): 50 -> 0.01 in 232 levels, T = 5, Adam 1e-4, EMA 0.999. Their step
    # 6.2e-6 is for x + eps s + sqrt(2 eps) z; in the notes' §9 update x + eps/2 s + sqrt(eps) z it is 1.24e-5.
    "cifar10": dict(steps=300_000, batch_size=128, lr=1e-4, sigma_max=50.0, sigma_min=0.01, n_sigmas=232,
                    n_steps_each=5, step_size=1.24e-5, ema_decay=0.999, channels=128, channel_mults=(1, 2, 2, 2),
                    num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, flip=True,
                    sample_every=5000, ckpt_every=5000, log_every=100, n_grid=64),
    # MNIST: a U-Net sized for 28x28 (28 -> 14 -> 7); sigmas and step size from NCSNv2 techniques 1, 2 and 4.
    "mnist": dict(steps=100_000, batch_size=128, lr=1e-4, sigma_max=None, sigma_min=0.01, n_sigmas=None,
                  n_steps_each=5, step_size=None, ema_decay=0.999, channels=64, channel_mults=(1, 2, 2),
                  num_res_blocks=2, attn_resolutions=(14,), dropout=0.1, flip=False,
                  sample_every=5000, ckpt_every=5000, log_every=100, n_grid=64),
    # scikit-learn's 1797 8x8 digits (data.load_digits, 1500 to train on): sigmas and step size from NCSNv2 techniques
    # 1, 2 and 4 as for MNIST (sigma_1 = 4.81, 22 levels at D = 64). The rest was tuned here to finish in under five
    # minutes on 2 CPU cores: a U-Net of width 32 for 8 -> 4, one block per level and attention only in the middle
    # (4x4), Adam 1e-3 and EMA 0.995 (about the last 200 steps) over 3000 steps of 128; two blocks per level in the
    # same time left fewer steps and worse digits; dropout 0.1 as for MNIST (1500 images are easily memorised).
    # T = 20, not NCSNv2's 5: 22 levels are few beside CIFAR-10's 232, 8x8 chains are cheap, and T = 20 gave cleaner
    # digits than 5 or 10 from the same network.
    "digits": dict(steps=3000, batch_size=128, lr=1e-3, sigma_max=None, sigma_min=0.01, n_sigmas=None,
                   n_steps_each=20, step_size=None, ema_decay=0.995, channels=32, channel_mults=(1, 2),
                   num_res_blocks=1, attn_resolutions=(), dropout=0.1, flip=False,
                   sample_every=1000, ckpt_every=1000, log_every=100, n_grid=64),
    # NCSNv2's larger image sets (their configs/celeba.yml, church.yml, ffhq.yml), read from folders of images
    # (data.load_folder). Their sigmas, L, T, batch, Adam and EMA; their steps doubled into the notes' convention, as
    # for CIFAR-10 (celeba 3.3e-6 -> 6.6e-6, church 4.9e-6 -> 9.8e-6, ffhq 9e-7 -> 1.8e-6). The U-Net is DDPM's for the
    # resolution (unet_for) instead of their RefineNet, without dropout, as their network and DDPM's 256 px models;
    # Lanczos resizing where they use bilinear, and the folder less its held-out slice where they train on CelebA's
    # official train split and a seeded 90% of FFHQ (README).
    # CelebA: img_align_celeba/, centre crop 140 then 64 x 64, flips; 210k steps.
    "celeba": dict(steps=210_000, batch_size=128, lr=1e-4, sigma_max=90.0, sigma_min=0.01, n_sigmas=500,
                   n_steps_each=5, step_size=6.6e-6, ema_decay=0.999, channels=128, channel_mults=None,
                   num_res_blocks=2, attn_resolutions=(16,), dropout=0.0, folder="img_align_celeba", image_size=64,
                   crop=140, flip=True, sample_every=5000, ckpt_every=5000, log_every=100, n_grid=64),
    # LSUN church_outdoor at 64 x 64 (shorter side resized, centre crop), flips; 200k steps. LSUN ships as LMDB:
    # export church_outdoor_train_lmdb to church_outdoor_train/ first (README).
    "church": dict(steps=200_000, batch_size=128, lr=1e-4, sigma_max=140.0, sigma_min=0.01, n_sigmas=788,
                   n_steps_each=4, step_size=9.8e-6, ema_decay=0.999, channels=128, channel_mults=None,
                   num_res_blocks=2, attn_resolutions=(16,), dropout=0.0, folder="church_outdoor_train",
                   image_size=64, crop=None, flip=True, sample_every=5000, ckpt_every=5000, log_every=100, n_grid=64),
    # FFHQ at 256 x 256, flips; batch 32, 80k steps, and Adam's eps 1e-3 as in their config.
    "ffhq": dict(steps=80_000, batch_size=32, lr=1e-4, adam_eps=1e-3, sigma_max=348.0, sigma_min=0.01,
                 n_sigmas=2311, n_steps_each=3, step_size=1.8e-6, ema_decay=0.999, channels=128, channel_mults=None,
                 num_res_blocks=2, attn_resolutions=(16,), dropout=0.0, folder="ffhq", image_size=256, crop=None,
                 flip=True, sample_every=5000, ckpt_every=5000, log_every=100, n_grid=36),
    # Any folder of images (--data-dir): NCSNv2 techniques 1, 2 and 4 on its training images, DDPM's U-Net for the
    # resolution, the MNIST preset's training settings.
    "folder": dict(steps=100_000, batch_size=128, lr=1e-4, sigma_max=None, sigma_min=0.01, n_sigmas=None,
                   n_steps_each=5, step_size=None, ema_decay=0.999, channels=128, channel_mults=None,
                   num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, folder="", image_size=64, crop=None,
                   flip=False, sample_every=5000, ckpt_every=5000, log_every=100, n_grid=64),
    # The notes' two-mode mixture 1/5 N((-5,-5), I) + 4/5 N((5,5), I), an MLP score net. Trained levels are noise
    # levels of notes §8 (q_sigma = p * N(0, sigma^2 I)), so they end near 0: 20 -> 0.01 gives unit-variance modes.
    # (The authors' toy levels 20 -> 1 are the modes' standard deviations of their annealed mixture, not noise
    # levels: their last level is p itself, which noise levels reach only at sigma -> 0; see langevin.py.)
    "gmm": dict(steps=5000, batch_size=512, lr=1e-3, sigma_max=20.0, sigma_min=0.01, n_sigmas=30,
                n_steps_each=50, step_size=1e-5, ema_decay=0.99, hidden=128,
                sample_every=1000, ckpt_every=1000, log_every=100, n_grid=2000),
    # A 2-D swiss roll of radius up to 2.9 (data.sample_swissroll), same network and sampler.
    "swissroll": dict(steps=5000, batch_size=512, lr=1e-3, sigma_max=6.0, sigma_min=0.01, n_sigmas=30,
                      n_steps_each=50, step_size=1e-5, ema_decay=0.99, hidden=128,
                      sample_every=1000, ckpt_every=1000, log_every=100, n_grid=2000),
}
# The image sets and the shape (C, H, W) of their images, known before any data is read (or downloaded); a folder's
# images have the shape --image-size gives them.
IMAGE_SETS = {"cifar10": (3, 32, 32), "mnist": (1, 28, 28), "digits": (1, 8, 8), "celeba": (3, 64, 64),
              "church": (3, 64, 64), "ffhq": (3, 256, 256), "folder": None}
FOLDER_SETS = ("celeba", "church", "ffhq", "folder")  # read from folders of pictures by data.load_folder
# Images live in [0, 1]; the 2-D sets in a box that holds all their mass (the sampler's uniform prior).
DATA_RANGES = {**{name: (0.0, 1.0) for name in IMAGE_SETS}, "gmm": (-8.0, 8.0), "swissroll": (-4.0, 4.0)}
# U-Net channel multipliers by resolution: DDPM's for 32 (down to 4x4) and 256 (to 8x8) [Ho et al. 2020], improved
# DDPM's for 64 [Nichol & Dhariwal 2021] and ADM's for 128 [Dhariwal & Nichol 2021], both to 8x8.
CHANNEL_MULTS = {32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}
# What a checkpoint must agree on to be resumed.
IDENTITY = ("dataset", "architecture", "sigmas", "objective")


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
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--dataset", choices=list(PRESETS),
                   help="what to train on (default: gmm; on resume, the checkpoint's)")
    p.add_argument("--data-dir", help="where data sets are found or downloaded to (default: ./data): for celeba, "
                                      "church and ffhq the folder that holds img_align_celeba/, church_outdoor_train/ "
                                      "or ffhq/; for --dataset folder (where it is required) the folder of images "
                                      "itself; on resume, where the run's images are now if they moved")
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
    g.add_argument("--grad-clip", type=float, help="clip the gradients' global norm to this before each step; 0 "
                                                   "turns it off (default: 0, as every preset)")
    g.add_argument("--warmup", type=int, help="raise the learning rate linearly from lr/W to lr over the first W "
                                              "steps; 0 turns it off (default: 0, as every preset)")
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
    g = p.add_argument_group("image folders (--dataset folder, celeba, church, ffhq; the checkpoint keeps the first "
                             "four: a resume may not change them)")
    g.add_argument("--image-size", type=int, help=f"side of the square the images are resized and cropped to: 32, "
                                                  f"64, 128, 256, or below 32 ({preset_help('image_size')})")
    g.add_argument("--crop", type=int, help="centre crop of this side before the resize (preset: celeba 140)")
    colour = g.add_mutually_exclusive_group()
    colour.add_argument("--grayscale", action="store_true", default=None,
                        help="one channel, even if some images are in colour (default: one channel only when "
                             "every image is grey)")
    colour.add_argument("--rgb", dest="grayscale", action="store_false", default=None,
                        help="three channels, even if every image is grey")
    g.add_argument("--held-out", type=int, help="images set aside, never trained on, for sample.py --inpaint and "
                                                "--data-init (default: a tenth of the folder, at most 1000)")
    g.add_argument("--data-on", choices=["auto", "device", "host"], default="auto",
                   help="where the training images live: on the device, or in (pinned) host memory with each batch "
                        "copied over; auto picks the device unless the set takes more than half of its free memory")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help=f"random horizontal flips of training images ({preset_help('flip')})")
    g = p.add_argument_group("logging, checkpoints, samples (default: the dataset's preset; 0 turns one off)")
    g.add_argument("--log-every", type=int, help=f"steps between metrics lines ({preset_help('log_every')})")
    g.add_argument("--ckpt-every", type=int, help=f"steps between checkpoints ({preset_help('ckpt_every')}); "
                                                  "one is always written at the end")
    g.add_argument("--keep-every", type=int, help="also keep a snapshot checkpoint_NNNNNNN.pt every K steps beside the "
                                                  "rolling checkpoint.pt, to sample from or score later (default: 0, "
                                                  "none; NCSNv2 keeps one every 5000 steps)")
    g.add_argument("--sample-every", type=int, help=f"steps between sample figures ({preset_help('sample_every')}); "
                                                    "0 means no sampling at all, not even at the end")
    p.add_argument("--sample", type=int, help=argparse.SUPPRESS)  # the sampling mode is sample.py's now
    p.add_argument("--sample-batch-size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sample is not None or args.sample_batch_size is not None:
        p.error(f"sampling is sample.py's: python sample.py --out-dir {args.out_dir or 'DIR'} -n {args.sample or 'N'}"
                + (f" --batch-size {args.sample_batch_size}" if args.sample_batch_size else ""))
    for name, least in (("steps", 1), ("batch_size", 1), ("channels", 1), ("hidden", 1), ("n_sigmas", 2),
                        ("n_steps_each", 1), ("image_size", 4), ("crop", 1), ("held_out", 0)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    for name in ("log_every", "ckpt_every", "sample_every", "warmup", "keep_every"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0 (0 turns it off), got {getattr(args, name)}")
    if args.grad_clip is not None and not 0 <= args.grad_clip < math.inf:
        p.error(f"--grad-clip must be >= 0 and finite (0 turns it off), got {args.grad_clip}")
    for name in ("lr", "sigma_max", "sigma_min", "step_size"):
        if getattr(args, name) is not None and not 0 < getattr(args, name) < math.inf:
            p.error(f"--{name.replace('_', '-')} must be > 0 and finite, got {getattr(args, name)}")
    if args.ema_decay is not None and not 0 <= args.ema_decay < 1:
        p.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.dataset == "folder" and args.data_dir is None:
        p.error("--dataset folder needs --data-dir PATH, the folder of images to train on")
    args.out_dir = args.out_dir or os.path.join("runs", args.dataset or "gmm")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Devices and processes: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain run is rank 0 of 1.
# ----------------------------------------------------------------------------------------------------------------
def setup_device(name):
    """(device, rank, world size, control): control is the process group of the small CPU messages between ranks
    (errors, a stop), gloo beside nccl so that they never wait for the GPU; None in a single process."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device, control = runs.pick_device(name), None
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        control = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    return device, rank, world, control


class Stopped(RunError):
    """This rank stops because another one met an error, which that one prints."""


def agree(error, control):
    """Under torchrun, an error that only some ranks met (a file that rank 0 alone writes, one machine's data) stops
    every rank: the lowest rank that met it prints it, the others stop quietly. Raises; returns if no rank met one."""
    if control is None:  # a single process
        if error is not None:
            raise error
        return
    failed = torch.zeros(dist.get_world_size())
    failed[dist.get_rank()] = float(error is not None)
    dist.all_reduce(failed, group=control)
    if failed.any():
        first = int(failed.nonzero()[0])
        raise RankError(str(error)) if dist.get_rank() == first else Stopped(f"rank {first} met an error")


def take_out_dir(out_dir, control):
    """Rank 0 creates the out-dir, proves it writable, locks it for this run and clears a crash's leftovers
    (runs.prepare_out_dir), before any work; every rank learns whether that worked. Returns the lock's file."""
    lock, error = None, None
    if is_first_rank(control):
        try:
            lock = runs.prepare_out_dir(out_dir)
        except RunError as e:
            error = e
    agree(error, control)
    return lock


def read_checkpoint(path, device, control):
    """The checkpoint to resume from (runs.load_checkpoint), read by every rank, or None where there is none; then
    metrics.jsonl holds no line of a run that left no checkpoint (a kill before the first one, a file moved away)."""
    ckpt, error = None, None
    try:
        ckpt = runs.load_checkpoint(path, device) if os.path.exists(path) else None
    except RunError as e:
        error = e
    agree(error, control)
    if ckpt is None and is_first_rank(control) and runs.cut_metrics(os.path.dirname(path), 0):
        print("note: metrics.jsonl held the lines of an earlier run without a checkpoint; they are dropped")
    return ckpt


def is_first_rank(control):
    return control is None or dist.get_rank() == 0


# ----------------------------------------------------------------------------------------------------------------
# Settings: the preset, overridden by the checkpoint's settings on resume, overridden by flags, resolved into
# concrete numbers (the config stored in the checkpoint).
# ----------------------------------------------------------------------------------------------------------------
def run_identity(args, saved):
    """dataset, objective, precision and seed: a flag, else the checkpoint's (on resume), else the default."""
    identity = dict(dataset=args.dataset or saved.get("dataset", "gmm"),
                    objective=args.objective or saved.get("objective", "dsm"),
                    precision=args.precision or saved.get("precision", "fp32"),
                    seed=saved.get("seed", 0) if args.seed is None else args.seed)
    if identity["objective"] == "exact" and identity["dataset"] in IMAGE_SETS:  # refused before any download
        shape = IMAGE_SETS[identity["dataset"]]
        raise RunError(f"--objective exact needs one backward pass per dimension per step (D = "
                       f"{math.prod(shape) if shape else 'C x H x W'} for {identity['dataset']}); use dsm or ssm")
    given = [f"--{key.replace('_', '-')}" for key in ("image_size", "crop", "grayscale", "held_out")
             if getattr(args, key) is not None]
    if given and identity["dataset"] not in FOLDER_SETS:
        raise RunError(f"{', '.join(given)} go with the image folders (--dataset {', '.join(FOLDER_SETS)}), not with "
                       f"{identity['dataset']}")
    if saved and saved["dataset"] != identity["dataset"]:
        raise RunError(f"checkpoint {os.path.join(args.out_dir, 'checkpoint.pt')} was trained on a different dataset "
                       f"({saved['dataset']}); use another --out-dir")
    return identity


def unet_for(image_size, preset):
    """(channel_mults, attn_resolutions) of the preset's U-Net, or, where the preset leaves them to the resolution
    (channel_mults None), CHANNEL_MULTS for 32, 64, 128 and 256, and below 32 up to four levels that halve down to no
    less than 4x4; attention at those of the preset's resolutions that the levels have."""
    mults = preset["channel_mults"]
    if mults is None and image_size in CHANNEL_MULTS:
        mults = CHANNEL_MULTS[image_size]
    elif mults is None and image_size < 32:
        levels = next(n for n in (4, 3, 2, 1) if image_size % 2 ** (n - 1) == 0 and image_size >> (n - 1) >= 4)
        mults = (1, 2, 2, 2)[:levels]
    elif mults is None:
        raise RunError(f"--image-size {image_size} has no U-Net here; use one of {sorted(CHANNEL_MULTS)} or a size "
                       "below 32")
    sizes = [image_size >> level for level in range(len(mults))]
    return list(mults), [r for r in preset["attn_resolutions"] if r in sizes]


def resumed_settings(saved):
    """A checkpoint config's settings in the presets' terms: a resumed run keeps them unless a flag changes them."""
    settings = {key: saved[key] for key in ("steps", "batch_size", "lr", "ema_decay", "n_steps_each", "step_size",
                                            "log_every", "ckpt_every", "sample_every", "n_grid")}
    settings.update(grad_clip=saved.get("grad_clip", 0.0), warmup=saved.get("warmup", 0),  # older runs had none
                    keep_every=saved.get("keep_every", 0),
                    adam_eps=saved.get("adam_eps", 1e-8), flip=saved.get("flip", saved["dataset"] == "cifar10"))
    settings.update(sigma_max=saved["sigmas"][0], sigma_min=saved["sigmas"][-1], n_sigmas=len(saved["sigmas"]))
    settings.update({key: saved["architecture"][key] for key in ("channels", "hidden")
                     if key in saved["architecture"]})
    return settings


def resolve_config(args, identity, train_data, folder, device, saved, is_main):
    """Flags over the checkpoint's settings (on resume) over the dataset's preset. NCSNv2 techniques fill what is
    left open (None): sigma_1 is the largest distance between training points (1), L follows from the ratio gamma(D)
    (2), the step size from f(eps) (4)."""
    dataset, images = identity["dataset"], identity["dataset"] in IMAGE_SETS
    preset = {"grad_clip": 0.0, "warmup": 0, "adam_eps": 1e-8, "keep_every": 0, **PRESETS[dataset],
              **(resumed_settings(saved) if saved else {})}
    preset.update({key: getattr(args, key) for key in preset if getattr(args, key, None) is not None})
    if images:
        channel_mults, attn_resolutions = unet_for(int(train_data.shape[-1]), preset)
        architecture = dict(kind="NCSN", in_channels=int(train_data.shape[1]), channels=preset["channels"],
                            channel_mults=channel_mults, num_res_blocks=preset["num_res_blocks"],
                            attn_resolutions=attn_resolutions, dropout=preset["dropout"],
                            image_size=int(train_data.shape[-1]))
    else:
        architecture = dict(kind="MLPScoreNet", dim=2, hidden=preset["hidden"])
    dim = int(np.prod(train_data.shape[1:]))
    sigma_max, n_sigmas, sigma_min = preset["sigma_max"], preset["n_sigmas"], preset["sigma_min"]
    if sigma_max is None:  # technique 1, over the whole training set, in batches
        if is_main:
            print(f"sigma_max: the largest distance between the {len(train_data)} training points (technique 1)")
        # uint8 images in pixel units (no float copy of the set), then / 255 for the model's [0, 1]
        distance = ncsn.max_pairwise_distance(train_data, progress=is_main, device=device)  # blocks to the device
        sigma_max = distance / 255 if images else distance
    if not sigma_max > sigma_min:
        raise RunError(f"--sigma-max ({sigma_max:g}) must be larger than --sigma-min ({sigma_min:g})")
    if n_sigmas is None:  # technique 2
        n_sigmas = math.ceil(math.log(sigma_max / sigma_min) / math.log(ncsn.sigma_ratio(dim))) + 1
    sigmas = ncsn.geometric_sigmas(sigma_max, sigma_min, n_sigmas).tolist()
    if saved:  # the checkpoint's levels verbatim, unless flags set other ones: recomputed from its float32 endpoints,
        # a level can differ in the last bit, which is no change of the run
        flagged = any(getattr(args, k) is not None for k in ("sigma_max", "sigma_min", "n_sigmas"))
        same = len(sigmas) == len(saved["sigmas"]) and np.allclose(sigmas, saved["sigmas"], rtol=1e-6, atol=0)
        if same or not flagged:
            sigmas = saved["sigmas"]
    step_size = preset["step_size"]
    if step_size is None:  # technique 4
        step_size = ncsn.recommended_step_size(sigmas, preset["n_steps_each"], dim)
    return dict(identity, shape=list(train_data.shape[1:]), data_range=list(DATA_RANGES[dataset]),
                architecture=architecture, sigmas=sigmas, n_steps_each=preset["n_steps_each"],
                step_size=float(step_size), lr=preset["lr"], grad_clip=float(preset["grad_clip"]),
                warmup=preset["warmup"], adam_eps=preset["adam_eps"], flip=bool(preset.get("flip", False)),
                data=folder, batch_size=preset["batch_size"],
                ema_decay=preset["ema_decay"], steps=preset["steps"], log_every=preset["log_every"],
                ckpt_every=preset["ckpt_every"], keep_every=preset["keep_every"], sample_every=preset["sample_every"],
                n_grid=preset["n_grid"])


# ----------------------------------------------------------------------------------------------------------------
# Data: image sets live on the device as uint8 and are augmented there; 2-D sets are generated on the device.
# ----------------------------------------------------------------------------------------------------------------
def folder_settings(args, dataset, saved):
    """For the folder sets, where the images are and how they are decoded, {path, image_size, crop, grayscale,
    held_out, files}: the checkpoint's on resume (a flag may not change them: other images make another run; only
    --data-dir may say where they are now), else flags over the preset's. grayscale None is one channel when every
    image is grey; held_out None a tenth of the folder (at most 1000), and files the folder's fingerprint, both
    decided by read_images on the first run. None for the other sets."""
    if dataset not in FOLDER_SETS:
        return None
    preset = PRESETS[dataset]
    path = os.path.abspath(os.path.join(args.data_dir or "./data", preset["folder"]))  # folder: --data-dir itself
    if saved.get("data"):
        folder = dict(saved["data"])
        changed = [f"--{key.replace('_', '-')}" for key in ("image_size", "crop", "held_out")
                   if getattr(args, key) is not None and getattr(args, key) != folder[key]]
        if args.grayscale is not None and args.grayscale != (saved["shape"][0] == 1):
            changed.append("--grayscale" if args.grayscale else "--rgb")
        if changed:
            raise RunError(f"the checkpoint in {args.out_dir} was trained on images with another {', '.join(changed)}; "
                           "use another --out-dir")
        if args.data_dir is not None and path != folder["path"]:  # moved: the fingerprint still checks the files
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"note: the run's images are read from {path} now, no longer from {folder['path']}")
            folder["path"] = path
        return folder
    image_size = args.image_size or preset["image_size"]
    unet_for(image_size, preset)  # a size without a U-Net is refused before any decoding
    return dict(path=path, image_size=image_size, crop=args.crop if args.crop is not None else preset["crop"],
                grayscale=args.grayscale, held_out=args.held_out, files=None)


def read_images(dataset, data_dir, folder, download, progress):
    """The training images of an image set, uint8 (N, C, H, W), and the folder settings, decided: cifar10 and mnist
    from data_dir (downloaded there if asked), digits from scikit-learn, the folder sets from their folder."""
    if dataset == "digits":
        return data.load_digits(train=True), None  # shipped with scikit-learn: nothing to download, no data_dir
    if dataset in FOLDER_SETS:
        path = folder["path"]
        if not os.path.isdir(path):
            raise data.DataError(f"{path} is not a folder: the images of --dataset {dataset} go there (--data-dir)")
        files = data.image_files(path)  # walked once here: the fingerprint and the default held-out count
        fingerprint = data.folder_fingerprint(files)
        if folder.get("files") not in (None, fingerprint):
            raise data.DataError(f"files were added to or removed from {path} since the run began, which would move "
                                 "held-out images into training; restore the folder, or use another --out-dir")
        held_out = min(1000, len(files) // 10) if folder["held_out"] is None else folder["held_out"]
        if len(files) - held_out < 2:
            raise data.DataError(f"--held-out {held_out} leaves fewer than 2 of the {len(files)} images in {path} "
                                 "to train on")
        images = data.load_folder(path, folder["image_size"], folder["crop"], folder["grayscale"],
                                  held_out=held_out, train=True, progress=progress)
        if len(images) < 2:
            raise data.DataError(f"only {len(images)} image of {path} is left to train on; hold out fewer")
        return images, dict(folder, held_out=held_out, files=fingerprint)
    load = data.load_cifar10 if dataset == "cifar10" else data.load_mnist
    return load(data_dir or "./data", train=True, download=download, progress=progress), None


def load_images(dataset, data_dir, folder, control):
    """(N, C, H, W) uint8 on the CPU and the folder settings; the first process of each machine downloads (or
    decodes a folder into its cache), the others wait and read it."""
    is_first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    images, error = None, None
    if is_first:
        try:
            images, folder = read_images(dataset, data_dir, folder, download=True, progress=True)
        except data.DataError as e:  # reach the barrier first, so that no other rank waits forever
            error = e
    if dist.is_initialized():
        dist.barrier(group=control)
    if not is_first:
        try:
            images, folder = read_images(dataset, data_dir, folder, download=False, progress=False)
        except data.DataError as e:
            error = e
    agree(RunError(str(error)) if error is not None else None, control)
    return images, folder


def training_data(identity, args, saved, control):
    """The training set, uint8 images (N, C, H, W), or 10000 points of a 2-D set (only their shape and spread are
    used: the loop draws fresh ones); and for the folder sets the settings of their folder (else None)."""
    if identity["dataset"] in IMAGE_SETS:
        return load_images(identity["dataset"], args.data_dir, folder_settings(args, identity["dataset"], saved),
                           control)
    return data.TOY_SETS[identity["dataset"]](10_000, generator=torch.Generator().manual_seed(identity["seed"])), None


def data_source(config, train_data, device, data_on, is_main):
    """Where batches come from: the images, held on the device or in host memory (data_on; auto: on the device unless
    they take more than half of its free memory), or the 2-D set's sampler."""
    if not runs.is_image_run(config):
        return data.TOY_SETS[config["dataset"]]
    if data_on == "auto":
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else math.inf
        data_on = "device" if train_data.nbytes <= free / 2 else "host"
    if is_main and device.type == "cuda":
        print(f"the {train_data.nbytes / 2 ** 30:.2f} GiB of training images live "
              + ("on the device" if data_on == "device" else "in pinned host memory, each batch copied over"))
    return data.ImageData(train_data, device=device, flip=config.get("flip", config["dataset"] == "cifar10"),
                          on_device=data_on == "device")


def image_layout(device):
    """The memory format of the U-Net and its batches: channels_last on CUDA (cuDNN's fast convolutions, and the fused
    attention kernels take q, k, v without a copy); the default on a CPU, where a training step of the digits and
    CIFAR-10 U-Nets in channels_last took 0.97-1.03x the time in fp32 and 1.1-1.4x under bf16 autocast (1 thread,
    avx512_bf16). bench.py section 4 trains in the same layout."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def draw_batch(source, n, generator, device):
    """(n, *shape) float batch on the device; images in image_layout(device), the layout of the network there."""
    if isinstance(source, data.ImageData):
        return source.batch(n, generator=generator).contiguous(memory_format=image_layout(device))
    return source(n, generator=generator, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Random streams and resume. Every rank seeds its own data, noise and dropout streams; the checkpoint holds the
# states of all of them, so that a resumed run continues bit for bit.
# ----------------------------------------------------------------------------------------------------------------
def seed_streams(seed, rank, step, device):
    """Seed dropout (torch's global generator) and return the generators of a rank at `step`: data, noise, and
    quality (the fresh points and noise behind the toy quality numbers, used by rank 0)."""
    torch.manual_seed(seed * 1000 + rank + 250 + 1_000_003 * step)
    return {"data": torch.Generator(device).manual_seed(seed * 1000 + rank + 1_000_003 * step),
            "noise": torch.Generator(device).manual_seed(seed * 1000 + rank + 500 + 1_000_003 * step),
            "quality": torch.Generator(device).manual_seed(seed + 12345 + 1_000_003 * step)}


def rng_state(generators, device):
    """This process's random streams: the CPU's (dropout on the CPU), its GPU's, and the data and noise generators."""
    state = {"device": device.type, "torch": torch.get_rng_state(), **{k: g.get_state() for k, g in generators.items()}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, generators, device):
    torch.set_rng_state(state["torch"].cpu())
    for k, g in generators.items():
        if k in state:  # a checkpoint of an earlier train.py has no quality generator: it keeps its fresh seed
            g.set_state(state[k].cpu())
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# Adam's fused kernel (all parameters in one kernel per step, instead of torch's default foreach kernels) where it was
# measured to pay: on CUDA, and on the CPU, where torch 2.13's fused Adam took 0.42x the time of foreach per step
# for the gmm MLP, 0.38x for the digits U-Net and 0.17x for the CIFAR-10 U-Net (1 thread, interleaved medians). mps
# keeps torch's default: unmeasured there.
FUSED_ADAM_DEVICES = ("cuda", "cpu")


def adam(model, config, device):
    """Adam (Kingma & Ba 2015) with the run's lr and eps, NCSNv2's betas, fused where FUSED_ADAM_DEVICES says."""
    return torch.optim.Adam(model.parameters(), lr=config["lr"], betas=(0.9, 0.999), eps=config["adam_eps"],
                            fused=True if device.type in FUSED_ADAM_DEVICES else None)


def load_optimizer(optimizer, state, rank):
    """Load a checkpoint's Adam state (moments and step counts) into this run's Adam. The kernel, fused or foreach, is
    this machine's choice, not the checkpoint's: load_state_dict would take the saved one (and place the step counts
    by it: on the parameters' device for fused), so a checkpoint moves between machines and train.py versions. The
    two kernels agree to float rounding, not bit for bit: a change of kernel is said."""
    ours = {key: optimizer.param_groups[0][key] for key in ("fused", "foreach")}
    saved = state["param_groups"]
    optimizer.load_state_dict(dict(state, param_groups=[dict(group, **ours) for group in saved]))
    if rank == 0 and bool(saved[0].get("fused")) != bool(ours["fused"]):
        print(f"note: the checkpoint's Adam ran {'fused' if saved[0].get('fused') else 'unfused'}, this run's is "
              f"{'fused' if ours['fused'] else 'unfused'}: the continuation matches to float rounding, not bit for bit")


def resume(ckpt, config, model, ema, optimizer, generators, ckpt_path, rank, world, device):
    """Load the checkpoint's weights, EMA, optimiser, random streams and unlogged losses, and cut metrics.jsonl back
    to its step; returns (step, generators, this rank's losses since the last metrics line or None)."""
    saved = ckpt["config"]
    for key in IDENTITY:
        if saved[key] != config[key]:
            raise RunError(f"checkpoint {ckpt_path} was trained with a different {key} ({saved[key]!r:.80} here "
                           f"{config[key]!r:.80}); use another --out-dir")
    if config["steps"] < ckpt["step"]:
        raise RunError(f"--steps {config['steps']} is below the step of checkpoint {ckpt_path}, {ckpt['step']}; "
                       "give more steps, or use another --out-dir")
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    load_optimizer(optimizer, ckpt["optimizer"], rank)
    for group in optimizer.param_groups:  # a new --lr applies from here on
        group["lr"] = config["lr"]
    states, interval = ckpt["rng"], None
    if len(states) == world and states[rank].get("device") == device.type:
        set_rng_state(states[rank], generators, device)
        interval = ckpt["interval"][rank] if "interval" in ckpt else None
    else:  # another number of processes or kind of device: weights and optimiser carry over, streams restart
        generators = seed_streams(config["seed"], rank, ckpt["step"], device)
        if rank == 0:
            print(f"note: the checkpoint's random streams are from {len(states)} process(es) on "
                  f"{states[0].get('device')}, this run has {world} on {device.type}: they are reseeded, so the "
                  "continuation is not bit-identical")
    if rank == 0:
        runs.cut_metrics(os.path.dirname(ckpt_path), ckpt["step"])  # the lines after it are about to come again
        changed = "".join(f"; {k} {saved[k]} -> {v}" for k, v in config.items() if k in saved and saved[k] != v)
        print(f"resuming from {ckpt_path} at step {ckpt['step']}{changed}")
    return ckpt["step"], generators, interval


def learning_rate(config, step):
    """The learning rate of step `step` (0-based): lr, after a linear warm-up over the first config["warmup"] steps."""
    return config["lr"] * min(1.0, (step + 1) / config["warmup"]) if config["warmup"] else config["lr"]


def optimizer_step(optimizer, model, config, step):
    """Adam's step at learning_rate(config, step), the gradients' global norm first clipped to config["grad_clip"]
    (when > 0). Clipping returns the norm as a tensor: no host sync."""
    if config["grad_clip"]:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, step)
    optimizer.step()


def check_same_step(step, world, device, out_dir):
    """Every rank must have read the same checkpoint: the out-dir must be shared by every machine."""
    if world > 1:
        steps = torch.tensor([step, -step], device=device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if steps[0] != -steps[1]:
            raise RunError(f"ranks resumed from different steps; --out-dir ({out_dir}) must be on a file system "
                           "that every machine sees")


# ----------------------------------------------------------------------------------------------------------------
# The network under the run's switches: DDP, torch.compile, bf16 autocast, the attention kernel.
# ----------------------------------------------------------------------------------------------------------------
def wrap(model, world, device, compile_, objective):
    """DistributedDataParallel over several processes, then torch.compile if asked for and possible. The checkpoint
    keeps the plain module's state_dict, loadable without either."""
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if compile_ and device.type == "mps":
        print("note: --compile is not supported on mps; running uncompiled", file=sys.stderr)
    elif compile_ and objective != "dsm":
        print(f"note: --compile cannot differentiate twice, which --objective {objective} needs; running uncompiled",
              file=sys.stderr)
    elif compile_:
        torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly, with a warning
        mode = compile_mode(device, world)
        net = torch.compile(net, mode=mode)
        if mode == "reduce-overhead":
            net = each_call_a_new_step(net)
    return net


def compile_mode(device, world):
    """torch.compile's mode for the training network. On one CUDA process, "reduce-overhead": the compiled forward
    and backward each replay as a CUDA graph (cudagraph trees), so the host no longer launches their kernels one by
    one. On an H100 the compiled CIFAR-10 step at batch 128 took 64.0 ms (bench.py section 4) while its kernels
    kept the GPU busy for 28.1 ms (section 7); captured, it took 30.3 ms. Dropout's random numbers come from the CUDA
    generator's graph-safe state, which the checkpoint keeps. Under DDP, whose gradient hooks run between the
    backward's kernels, and on other devices: the default mode."""
    return "reduce-overhead" if device.type == "cuda" and world == 1 else None


def each_call_a_new_step(net):
    """net, each call of which begins a new step for the CUDA graphs (cudagraph trees): its replay may overwrite the
    outputs of the last call, which the training step has used up by then (the loss computed and backpropagated)."""
    def call(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return net(*args, **kwargs)
    return call


def autocast(device, precision):
    """bf16 autocast for the network's forward pass; the loss and the EMA stay in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def network_score(x, sigma, net, device, precision, objective):
    """s_theta(x, sigma) under the run's switches, in fp32. ssm and exact differentiate the network twice, which the
    fused attention kernels cannot: they get PyTorch's math kernel."""
    math_kernel = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH) if objective != "dsm" else \
        contextlib.nullcontext()
    with autocast(device, precision), math_kernel:
        return net(x, sigma).float()


# ----------------------------------------------------------------------------------------------------------------
# The loop's checks and logs. Losses stay on the device between metrics lines: no host sync per step.
# ----------------------------------------------------------------------------------------------------------------
def sigma_bands(sigmas, device, n_bands=4):
    """Levels grouped in up to n_bands bands, largest sigmas first, for the loss per band in metrics.jsonl:
    (the band of each level (L,) on the device, the bands' names)."""
    n_bands = min(n_bands, len(sigmas))
    band_of_level = torch.arange(len(sigmas)) * n_bands // len(sigmas)  # (L,)
    ends = [(band_of_level == b).nonzero().flatten() for b in range(n_bands)]
    return band_of_level.to(device), [f"{sigmas[int(i[0])]:.3g}-{sigmas[int(i[-1])]:.3g}" for i in ends]


def due(step, config, stopping):
    """What step `step` is due for: a metrics line, a checkpoint (always at the end, and when stopping on a signal),
    a sample figure, a check."""
    last = step == config["steps"]
    events = dict(log=bool(config["log_every"]) and step % config["log_every"] == 0,
                  ckpt=bool(config["ckpt_every"]) and step % config["ckpt_every"] == 0 or last or bool(stopping)
                  or keeps_snapshot(step, config),
                  sample=bool(config["sample_every"]) and (step % config["sample_every"] == 0 or last))
    # Non-finite losses are looked for before anything is written, and at least every 100 steps.
    events["check"] = any(events.values()) or step % min(config["log_every"] or 100, 100) == 0
    return events


def keeps_snapshot(step, config):
    """Whether the checkpoint of this step is also kept as checkpoint_NNNNNNN.pt (--keep-every)."""
    return bool(config.get("keep_every")) and step % config["keep_every"] == 0


def check_finite(losses, step, world, out_dir):
    """One host sync: stop on a non-finite loss among `losses` (those of the steps up to `step` not yet checked)
    before anything of them is written."""
    values = torch.stack(losses) if losses else torch.zeros(0)
    bad = (~torch.isfinite(values)).any().float()
    if world > 1:  # every rank stops together, whichever saw it
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad:
        values = values.cpu()
        where = (f"at step {step - len(values) + 1 + int((~torch.isfinite(values)).nonzero()[0])}"
                 if not torch.isfinite(values).all() else f"on another rank by step {step}")
        raise RunError(f"the loss is not finite {where}; stopping before anything more is saved "
                       f"({kept_checkpoint(out_dir)}); try a lower --lr")


def kept_checkpoint(out_dir):
    """What a stop leaves of the run, in words."""
    path = os.path.join(out_dir, "checkpoint.pt")
    return f"the last good checkpoint, {path}, is untouched" if os.path.exists(path) else "no checkpoint was written"


STOP = {"signal": 0}  # the first SIGINT or SIGTERM asks the run to stop after its current step


class Interrupted(KeyboardInterrupt):
    """A signal that ends the run at once (before the loop, or a second Ctrl-C): main() says so in one line."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupt(signum, frame):
    raise Interrupted(signum)


def on_signal(signum, frame):
    """SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption notice) in the loop: finish the step, checkpoint, exit. A
    second Ctrl-C stops at once; further SIGTERMs change nothing (a scheduler may send more than one)."""
    if STOP["signal"] and signum == signal.SIGINT:
        raise Interrupted(signum)
    if not STOP["signal"] and int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this step, with a checkpoint (Ctrl-C again to "
                   "stop at once)", file=sys.stderr)
    STOP["signal"] = STOP["signal"] or signum


def catch_stop_signals():
    """From here on, SIGINT and SIGTERM go to on_signal; returns 0, the signal seen so far."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    return 0


def stop_signal(control):
    """The signal that asked this run to stop, or 0: the same on every rank, so that all stop after the same step
    (under torchrun a small all-reduce per step, on the CPU: it never waits for the GPU)."""
    if control is None:
        return STOP["signal"]
    signum = torch.tensor(STOP["signal"])
    dist.all_reduce(signum, op=dist.ReduceOp.MAX, group=control)
    return int(signum)


def heldout_set(config, data_dir, device, band_of_level, band_names, size=512):
    """Rank 0, image runs: what the held-out loss is measured on, fixed for the whole run (so that its curve is
    smooth and a resumed run logs the same numbers): up to `size` held-out images (runs.heldout_images), each at a
    fixed level (the levels in turn, so every band is covered) with fixed noise. None, with a note, where the run's
    data set has no held-out images at hand."""
    if not runs.is_image_run(config):
        return None
    try:
        images = runs.heldout_images(config, None if config.get("data") else data_dir)
    except RunError as e:
        print(f"note: no held-out loss ({e})", file=sys.stderr)
        return None
    g = torch.Generator().manual_seed(20_191_102)  # its own stream: the training streams are untouched
    images = images[torch.randperm(len(images), generator=g)[:size]]
    levels = torch.arange(len(images)) % len(config["sigmas"])  # (n,)
    return dict(x=images.to(device).float() / 255, levels=levels.to(device),
                noise=torch.randn(images.shape, generator=g).to(device), sigmas=torch.tensor(config["sigmas"],
                device=device), band_of_level=band_of_level, band_names=band_names)


@torch.no_grad()
def heldout_loss(model, heldout, batch_size=128):
    """The NCSN loss (ncsn_loss, DSM) of `model` (the EMA network) on the held-out set, overall and per sigma band:
    over-fitting shows as a held-out loss that rises while the training loss falls (NCSNv2 logs it too)."""
    was_training = model.training
    model.eval()  # no dropout: the same weights give the same number
    per_example = torch.cat([ncsn.ncsn_loss(model, heldout["x"][i:i + batch_size], heldout["sigmas"],
                                            reduction="none", levels=heldout["levels"][i:i + batch_size],
                                            noise=heldout["noise"][i:i + batch_size])
                             for i in range(0, len(heldout["x"]), batch_size)])  # (n,)
    model.train(was_training)
    band = heldout["band_of_level"][heldout["levels"]]  # (n,)
    sums = torch.zeros(len(heldout["band_names"]), device=band.device).index_add_(0, band, per_example)
    counts = torch.bincount(band, minlength=len(heldout["band_names"])).clamp(min=1)
    return dict(heldout_loss=float(per_example.mean()),
                heldout_loss_per_sigma_band={name: float(v) for name, v in zip(heldout["band_names"], sums / counts)})


def log_metrics(step, losses, band_stats, band_names, seconds, config, rank, world, bar, out_dir, ema_model, heldout):
    """The metrics of the steps since the last line, averaged over the ranks (band_stats: (2, n_bands), the sums of
    the per-example losses in each band and their counts), and the EMA model's held-out loss (heldout_set, rank 0);
    rank 0 shows them and appends them to metrics.jsonl."""
    values = torch.stack(losses)
    if world > 1:
        for t in (values, band_stats):
            dist.all_reduce(t)
        values /= world
    line = dict(step=step, loss=float(values.mean()), lr=learning_rate(config, step - 1),
                images_per_s=len(values) * config["batch_size"] / seconds,
                loss_per_sigma_band={name: float(s / max(c, 1)) for name, s, c in zip(band_names, *band_stats.cpu())})
    if rank == 0:
        report(dict(line, **(heldout_loss(ema_model, heldout) if heldout is not None else {})), bar, out_dir)


def unlogged_losses(interval, n_bands, device):
    """The losses since the last metrics line (0-d tensors on the device), their band sums and counts (2, n_bands),
    and the seconds they took: a checkpoint's `interval` of this rank on resume, else none."""
    if interval is None:
        return [], torch.zeros(2, n_bands, device=device), 0.0
    return list(interval["losses"].to(device).unbind()), interval["band_stats"].to(device), interval["seconds"]


def report(line, bar, out_dir):
    """Rank 0: the bar's postfix on a terminal, else a printed line; and the line in metrics.jsonl."""
    heldout = f", held-out {line['heldout_loss']:.4g}" if "heldout_loss" in line else ""
    bar.set_postfix(loss=f"{line['loss']:.4g}", **({"held_out": f"{line['heldout_loss']:.4g}"} if heldout else {}),
                    img_s=f"{line['images_per_s']:.0f}")
    if bar.disable:  # no terminal (a log file, a batch job): one line per interval
        print(f"step {line['step']}: loss {line['loss']:.4g}{heldout}, {line['images_per_s']:.0f} images/s", flush=True)
    runs.append_metrics(out_dir, line)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and sample figures
# ----------------------------------------------------------------------------------------------------------------
def save_checkpoint(path, model, ema, optimizer, step, config, generators, losses, band_stats, seconds, device,
                    control, figure_owed=False):
    """Write {model, ema, optimizer, step, config, rng, interval, figure_owed} atomically (rank 0), once the weights
    are known to be finite; every rank takes part, since the random streams and the losses not yet in a metrics line
    of all of them are saved, and every rank learns whether the write worked. figure_owed: this step's sample figure
    was abandoned by a signal, and the resumed run draws it first."""
    finite = torch.stack([p.isfinite().all() for m in (model, ema.module) for p in m.parameters()]).all().float()
    if control is not None:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite:
        raise RunError(f"the weights are not finite after step {step}; stopping before they are saved "
                       f"({kept_checkpoint(os.path.dirname(path))}); try a lower --lr")
    gathered = [(rng_state(generators, device), dict(losses=torch.stack(losses).cpu() if losses else torch.zeros(0),
                                                     band_stats=band_stats.cpu(), seconds=seconds))]
    if control is not None:
        gathered = gathered + [None] * (dist.get_world_size() - 1)
        dist.all_gather_object(gathered, gathered[0], group=control)
    error = None
    if is_first_rank(control):
        state = dict(model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(), step=step,
                     config=config, rng=[rng for rng, _ in gathered], interval=[interval for _, interval in gathered],
                     figure_owed=figure_owed)
        snapshot = os.path.join(os.path.dirname(path), f"checkpoint_{step:07d}.pt")
        try:
            for target in [path] + ([snapshot] if keeps_snapshot(step, config) else []):
                runs.save_atomic(lambda f: torch.save(state, f), target)
        except RunError as e:
            error = e
    agree(error, control)


def sample_figure(model, config, step, out_dir, generator, control):
    """Rank 0 draws the figure of this step (write_samples) while the others wait; a failure stops every rank.
    Returns False where a signal made rank 0 abandon it (the run is stopping: its checkpoint owes the figure)."""
    error, drawn = None, True
    if is_first_rank(control):
        try:
            drawn = write_samples(model, config, step, out_dir, generator)
        except RunError as e:
            error = e
    agree(error, control)
    return drawn


class Abandoned(Exception):
    """A sample figure given up because the run is stopping."""


def abandon_if_stopping(done, total):
    """ncsn.sample's callback in a sample figure: a signal abandons the figure, which could outlast a grace period."""
    if STOP["signal"]:
        raise Abandoned


def write_samples(model, config, step, out_dir, generator):
    """Rank 0: a figure of samples from the EMA model in <out_dir>/samples/; for 2-D data also the quality numbers
    (data.toy_quality: MMD, and for gmm the mode weights and the Fisher divergence at three sigmas), printed and
    appended to metrics.jsonl; then loss.png redrawn from metrics.jsonl. A signal meanwhile abandons it (the quality
    generator is then left untouched, so that the resumed run draws the same figure): returns whether it was drawn."""
    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
    path = os.path.join(out_dir, "samples", f"step_{step:07d}.png")
    device = next(model.parameters()).device
    generator_of_step = torch.Generator(device).manual_seed(config["seed"] + step)
    try:
        samples = runs.draw_samples(model, config, config["n_grid"], generator_of_step, progress=True,
                                    callback=abandon_if_stopping)
    except Abandoned:
        tqdm.write(f"the sample figure of step {step} is abandoned: the run is stopping (the resumed run draws it)",
                   file=sys.stderr)
        return False
    if runs.is_image_run(config):
        runs.save_grid(samples, path)
    else:
        reference = data.TOY_SETS[config["dataset"]](config["n_grid"], generator=generator, device=device)
        runs.save_scatter(samples, reference, path, f"{config['dataset']}, step {step}")
        quality = data.toy_quality(config["dataset"], samples, generator, score_fn=model, sigmas=config["sigmas"])
        tqdm.write(f"step {step}: {data.format_quality(quality)}")
        runs.append_metrics(out_dir, dict(step=step, **quality))
    runs.save_loss_curve(out_dir)
    return True


def gflops_per_image(model, config, device):
    """The network's forward cost for one input, in GFLOPs (2 per multiply-add; torch's FlopCounterMode), counted
    in eval mode, so that no dropout draw moves the random streams, and with attention on the math kernel: torch
    2.13's FlopCounterMode has no formula for the CPU's flash kernel, and would miss attention's matmuls there."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), \
            FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *config["shape"], device=device), torch.ones(1, device=device))
    model.train(was_training)
    return counter.get_total_flops() / 1e9


def announce(config, model, world, device, out_dir, precision):
    """Rank 0: say what is about to run, in one line (for images also the network's GFLOPs per image; the precision
    the network runs in)."""
    cost = f" ({gflops_per_image(model, config, device):.3g} GFLOPs per image)" if runs.is_image_run(config) else ""
    folder = config.get("data")
    source = (f" from {folder['path']} ({folder['image_size']}x{folder['image_size']}, {folder['held_out']} held "
              "out)") if folder else ""
    print(f"{config['dataset']}{source}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters{cost}, "
          f"{len(config['sigmas'])} sigmas {config['sigmas'][0]:.3g} -> {config['sigmas'][-1]:.3g}, objective "
          f"{config['objective']}, {'bf16 autocast' if precision == 'bf16' else 'fp32'}, {world} process(es) on "
          f"{device}, writing to {out_dir}")


def finish(model, ema, step, stopping, ckpt_path, lock, config, rank, world):
    """The end of a run, finished or stopped by a signal: signals end the process at once again, the ranks must
    agree, the out-dir is released, and rank 0 says where things stand. Returns the signal that stopped the run
    before its last step, or 0."""
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    stopping = stopping if step < config["steps"] else 0  # a stop at the last step is the end of the run
    if world > 1:
        check_ranks_agree(model, ema, world, rank)
    if lock is not None:
        lock.close()
    if rank == 0 and stopping:
        print(f"stopped at step {step} by {signal.Signals(stopping).name}, with checkpoint {ckpt_path}; run the same "
              "command to resume", file=sys.stderr)
    elif rank == 0:
        print(f"done: {step} steps; checkpoint {ckpt_path}")
    return stopping


def check_ranks_agree(model, ema, world, rank):
    """DDP keeps the ranks in lockstep; say so, or stop loudly if they ever drifted apart."""
    fingerprint = torch.stack([torch.cat([p.detach().double().flatten() for p in m.parameters()]).square().sum()
                               for m in (model, ema.module)])
    everyone = [torch.zeros_like(fingerprint) for _ in range(world)]
    dist.all_gather(everyone, fingerprint)
    if any(not torch.equal(f, fingerprint) for f in everyone):
        raise RankError("the model or EMA weights differ between ranks")
    if rank == 0:
        print(f"parameters and EMA agree on all {world} ranks")


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def train(args):
    """Train until --steps; returns 0, or the signal (SIGINT, SIGTERM) that stopped the run at a checkpoint."""
    # Devices, the out-dir (this run's alone from here on), the checkpoint to resume from, the settings.
    device, rank, world, control = setup_device(args.device)
    is_main = rank == 0
    lock = take_out_dir(args.out_dir, control)  # held until the run ends
    ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
    ckpt = read_checkpoint(ckpt_path, device, control)
    saved = ckpt["config"] if ckpt is not None else {}
    identity = run_identity(args, saved)
    train_data, folder = training_data(identity, args, saved, control)

    # Model, EMA, optimiser. They start identical on every rank (same seed); each rank then draws its own data, noise
    # and dropout, and DDP all-reduces the gradients, so the weights and the EMA stay identical everywhere.
    try:  # a combination of settings that the NCSNv2 techniques or the networks refuse
        config = resolve_config(args, identity, train_data, folder, device, saved, is_main)
        torch.manual_seed(config["seed"])
        model = runs.build_model(config).to(device)
    except ValueError as e:
        raise RunError(str(e)) from None
    if config["batch_size"] % world:
        raise RunError(f"--batch-size {config['batch_size']} is not divisible by the {world} processes")
    if runs.is_image_run(config):
        model = model.to(memory_format=image_layout(device))
    ema = ncsn.EMA(model, decay=config["ema_decay"])
    generators = seed_streams(config["seed"], rank, 0, device)
    optimizer = adam(model, config, device)
    step, interval = 0, None

    # Resume.
    if ckpt is not None:
        step, generators, interval = resume(ckpt, config, model, ema, optimizer, generators, ckpt_path, rank, world,
                                            device)
        if ckpt.get("figure_owed"):  # the figure of this step that a signal abandoned, drawn before going on
            sample_figure(ema.module, config, step, args.out_dir, generators["quality"], control)
    check_same_step(step, world, device, args.out_dir)

    # The network under its switches, the data, the noise levels, the losses not yet in a metrics line.
    net = wrap(model, world, device, args.compile, config["objective"])
    precision = runs.usable_precision(config["precision"], device)  # fp32 where bf16 is missing or emulated
    score_fn = functools.partial(network_score, net=net, device=device, objective=config["objective"],
                                 precision=precision)
    source = data_source(config, train_data, device, args.data_on, is_main)
    sigmas = torch.tensor(config["sigmas"], device=device)
    local_batch = config["batch_size"] // world
    band_of_level, band_names = sigma_bands(config["sigmas"], device)
    losses, band_stats, seconds = unlogged_losses(interval, len(band_names), device)
    checked = len(losses)  # how many of them are known to be finite
    heldout = heldout_set(config, args.data_dir, device, band_of_level, band_names) if is_main else None
    if is_main:
        announce(config, model, world, device, args.out_dir, precision)

    # The loop. The bar shows on a terminal only (disable=None), on rank 0; it closes before any error is printed.
    since = time.perf_counter()  # seconds: the training time of the losses since the last metrics line; since when
    stopping = catch_stop_signals()  # from here a signal asks for a checkpoint and a clean exit after the step
    with tqdm(total=config["steps"], initial=step, disable=None if is_main else True, dynamic_ncols=True,
              desc="train") as bar:
        while step < config["steps"] and not stopping:
            # One step.
            model.train()
            x = draw_batch(source, local_batch, generators["data"], device)  # (b, *shape)
            levels = torch.randint(len(sigmas), (local_batch,), device=device, generator=generators["noise"])
            per_example = ncsn.ncsn_loss(score_fn, x, sigmas, objective=config["objective"], reduction="none",
                                         levels=levels, generator=generators["noise"], trace="loop")  # (b,)
            loss = per_example.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer_step(optimizer, model, config, step)
            ema.update(model)
            step += 1
            bar.update(1)
            losses.append(loss.detach())
            band_stats.index_add_(1, band_of_level[levels], torch.stack([per_example.detach(),
                                                                          torch.ones_like(per_example)]))

            # Check: a stop that a signal asked for; a non-finite loss, before anything of this interval is written.
            stopping = stop_signal(control)
            events = due(step, config, stopping)
            if events["check"]:
                check_finite(losses[checked:], step, world, args.out_dir)
                checked = len(losses)
            # Log.
            if events["log"]:
                log_metrics(step, losses, band_stats, band_names, seconds + time.perf_counter() - since, config,
                            rank, world, bar, args.out_dir, ema.module, heldout)
            if events["log"] or (events["check"] and not config["log_every"]):  # a new interval begins
                losses, checked, seconds, since = [], 0, 0.0, time.perf_counter()
                band_stats.zero_()
            # Save: a sample figure, then a checkpoint, which holds the random streams the figure has used (their
            # time is not training time).
            if events["ckpt"] or events["sample"]:
                seconds += time.perf_counter() - since
                owed = events["sample"] and not sample_figure(ema.module, config, step, args.out_dir,
                                                              generators["quality"], control)
                stopping = stopping or stop_signal(control)  # a signal during the figure: stop at this step
                if events["ckpt"] or stopping:
                    save_checkpoint(ckpt_path, model, ema, optimizer, step, config, generators, losses, band_stats,
                                    seconds, device, control, figure_owed=owed)
                since = time.perf_counter()
    return finish(model, ema, step, stopping, ckpt_path, lock, config, rank, world)


def main(argv=None):
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    signal.signal(signal.SIGTERM, interrupt)  # before the loop, SIGTERM ends the run at once, as Ctrl-C does
    try:
        stopped_by = train(args)
        status = 128 + stopped_by if stopped_by else 0
    except Stopped:  # another rank met an error and prints it
        status = 1
    except RunError as e:  # under torchrun, printed once: by rank 0, or by the rank that met it alone
        if rank == 0 or isinstance(e, RankError):
            print(f"train.py: error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr, flush=True)
        status = 1
    except KeyboardInterrupt as e:  # before the loop, or a second Ctrl-C in it
        signum = getattr(e, "signum", signal.SIGINT)
        if rank == 0:
            print(f"train.py: interrupted by {signal.Signals(signum).name}; {kept_checkpoint(args.out_dir)}",
                  file=sys.stderr, flush=True)
        status = 128 + signum
    if dist.is_initialized():  # after train() has returned and its DDP wrapper is gone
        dist.destroy_process_group()
        # gloo's threads can still hold tensors that the interpreter's finalisation then frees without the GIL, an
        # abort ("terminate called without an active exception") in about one exit in five under load: a process of
        # torchrun leaves at once, its output flushed, its files already closed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    main()
