"""Sample from a trained noise-conditional score network (notes §9): annealed Langevin dynamics, EMA weights.

    python sample.py --out-dir runs/cifar10 -n 50000        # samples.npz (N, H, W, C) uint8 and a grid samples.png
    python sample.py --out-dir runs/gmm -n 5000             # float (N, 2) points, and a scatter over fresh data
    python sample.py --checkpoint runs/cifar10/checkpoint.pt --out-dir eval/cifar10 -n 1000

The network, the noise levels, the number of steps per level, the step size and the data range all come from the
checkpoint's config, as train.py wrote it; the weights are the exponential moving average (NCSNv2 technique 5).
Samples are clamped to the data range; images are saved as uint8 (x * 255, rounded), the format FID tools read,
and 2-D points as float32.
"""
import argparse
import os
import signal
import sys

import numpy as np
import torch
from einops import rearrange

import data
import runs
from runs import RunError


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out-dir", help="where samples.npz and samples.png go, and where the checkpoint is read from "
                                     "when --checkpoint is not given (default: the checkpoint's folder)")
    p.add_argument("--checkpoint", help="the checkpoint to sample from (default: <out-dir>/checkpoint.pt)")
    p.add_argument("-n", "--n-samples", type=int, default=64, metavar="N",
                   help="how many samples to draw (default: 64)")
    p.add_argument("--batch-size", type=int, default=500,
                   help="chains run at once; lower it if memory runs out (default: 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prior draw and the Langevin noise (default: 0)")
    p.add_argument("--device", default="auto", help="auto (the default) picks cuda, then mps, then cpu; or e.g. cuda:1")
    p.add_argument("--n-steps-each", type=int, help="Langevin steps per noise level T (default: the checkpoint's)")
    p.add_argument("--step-size", type=float, help="step size at the smallest sigma, in the notes' convention "
                                                   "x + eps/2 s + sqrt(eps) z (default: the checkpoint's)")
    args = p.parse_args(argv)
    if args.out_dir is None and args.checkpoint is None:
        p.error("give --out-dir (a run of train.py) or --checkpoint")
    for name in ("n_samples", "batch_size", "n_steps_each"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.step_size is not None and not 0 < args.step_size < float("inf"):
        p.error(f"--step-size must be > 0 and finite, got {args.step_size}")
    return args


def sample(args):
    """Draw the samples and write samples.npz and samples.png; returns the path of samples.npz."""
    ckpt_path = args.checkpoint or os.path.join(args.out_dir, "checkpoint.pt")
    out_dir = args.out_dir or os.path.dirname(ckpt_path) or "."
    if not os.path.isfile(ckpt_path):
        raise RunError(f"no checkpoint at {ckpt_path}; train first (python train.py --out-dir ...), or point "
                       "--out-dir or --checkpoint at one")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise RunError("sample.py runs in one process; start it with python, not torchrun")
    device = runs.pick_device(args.device)
    ckpt = runs.load_checkpoint(ckpt_path, device)
    model = runs.build_model(ckpt["config"]).to(device)
    model.load_state_dict(ckpt["ema"])  # the EMA's state dict is the averaged network's own
    # The sampler the run was trained for, unless a flag changes it (and then it says so).
    changes = {k: getattr(args, k) for k in ("n_steps_each", "step_size") if getattr(args, k) is not None}
    config = dict(ckpt["config"], **changes)
    print(f"sampling {args.n_samples} from {ckpt_path} (step {ckpt['step']}): {len(config['sigmas'])} levels x "
          f"{config['n_steps_each']} steps of {config['step_size']:.3g} + denoise, in batches of "
          f"{min(args.batch_size, args.n_samples)}" + "".join(f"; {k} {ckpt['config'][k]} -> {v}"
                                                              for k, v in changes.items()))
    generator = torch.Generator(device).manual_seed(args.seed)
    samples = runs.draw_samples(model, config, args.n_samples, generator, progress=True, batch_size=args.batch_size)
    if not samples.isfinite().all():  # a chain that diverged: its NaNs would pass for pixels once cast to uint8
        bad = int((~samples.isfinite()).flatten(1).any(1).sum())
        raise RunError(f"{bad} of the {args.n_samples} samples are not finite (the chains diverged); nothing was "
                       "written: try a smaller --step-size or another checkpoint")
    os.makedirs(out_dir, exist_ok=True)
    figure = os.path.join(out_dir, "samples.png")
    if runs.is_image_run(config):
        array = rearrange((samples * 255).round().to(torch.uint8).cpu(), "n c h w -> n h w c").numpy()
        runs.save_grid(samples[:100], figure)
    else:
        array = samples.cpu().numpy()
        shown = min(len(samples), 5000)
        reference = data.TOY_SETS[config["dataset"]](shown, generator=torch.Generator(device).manual_seed(1),
                                                     device=device)
        runs.save_scatter(samples[:shown], reference, figure, f"{config['dataset']}: {args.n_samples} samples")
        quality = data.toy_quality(config["dataset"], samples[:shown], torch.Generator(device).manual_seed(2),
                                   score_fn=model, sigmas=config["sigmas"])
        print(f"{shown} samples against as many fresh points: {data.format_quality(quality)}")
    path = os.path.join(out_dir, "samples.npz")
    runs.save_atomic(lambda f: np.savez(f, array), path)
    print(f"wrote {path} ({array.dtype} {tuple(array.shape)}) and {figure}")
    return path


def interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)  # as Ctrl-C: one line, and no file half written
    try:
        sample(args)
    except RunError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args else signal.SIGINT
        print(f"sample.py: interrupted by {signal.Signals(signum).name} (each file is written whole or not at all)",
              file=sys.stderr)
        sys.exit(128 + signum)


if __name__ == "__main__":
    main()
