"""Use a trained noise-conditional score network (notes §9): draw samples, complete images, interpolate, from the
EMA weights of a checkpoint with its annealed Langevin sampler.

    python sample.py --out-dir runs/cifar10 -n 50000        # samples.npz (N, H, W, C) uint8 and a grid samples.png
    python sample.py --out-dir runs/gmm -n 5000             # float (N, 2) points, and a scatter over fresh data
    python sample.py --checkpoint runs/cifar10/checkpoint.pt --out-dir eval/cifar10 -n 1000
    python sample.py --out-dir runs/digits --inpaint right-half    # complete held-out images: inpainting.png/.npz
    python sample.py --out-dir runs/digits --interpolate 10        # rows of chains between two noise streams
    python sample.py --out-dir runs/digits --data-init -n 64       # chains from held-out images + sigma_1 noise
    python sample.py --out-dir runs/cifar10 -n 50000 --fid         # + FID, KID, IS against the training images
    python sample.py --out-dir runs/digits -n 297 --fid --baselines   # + held-out and Gaussian rows, copy check
    python sample.py --out-dir runs/cifar10 -n 1000 --fid --every-checkpoint   # score each snapshot, name the best

The network, the noise levels, the number of steps per level, the step size and the data range all come from the
checkpoint's config, as train.py wrote it; the weights are the exponential moving average (NCSNv2 technique 5).
Samples are clamped to the data range; images are saved as uint8 (x * 255, rounded), the format FID tools read,
and 2-D points as float32.

Inpainting [Song & Ermon 2019, Figure 6] runs langevin.annealed_langevin_inpainting on held-out images (the test
split: CIFAR-10's test batch, MNIST's t10k, the digits' held-out slice), so the network has never seen them; the mask
hides the right half (the papers' figure), a centre square, or a random fraction of the pixels. Interpolation
[Song & Ermon 2020] runs langevin.annealed_langevin_interpolation: each row shares its start, and its noise turns
from one stream to another, cos(a) z_p + sin(a) z_q, a from 0 to pi/2 along the row.

--fid scores the samples with quality.py (torch-fidelity): FID, KID and, for colour images, the Inception Score,
against the run's training images, whose features are cached beside the data. The 8x8 digits are scored in the
features of a small digit classifier trained in the same command. Each score is appended to metrics.jsonl.
"""
import argparse
import math
import os
import re
import signal
import sys
import tempfile

import numpy as np
import torch
from einops import rearrange

import data
import ncsn
import runs
from langevin import annealed_langevin_inpainting, annealed_langevin_interpolation
from runs import RunError

MASKS = ("right-half", "center", "random")
HIDDEN_COLOUR = torch.tensor([0.25, 0.45, 0.85])  # hidden pixels in the figure: blue, never in a grey image


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def mask_spec(text):
    """--inpaint's argument: right-half, center, or random[:F] with F the fraction of pixels hidden (default 0.5)."""
    kind, _, fraction = text.partition(":")
    if kind not in MASKS or (fraction and kind != "random"):
        raise argparse.ArgumentTypeError(f"unknown mask {text!r}; use right-half, center, or random:F (F the "
                                         "fraction of pixels hidden, e.g. random:0.7)")
    try:
        fraction = float(fraction or 0.5)
    except ValueError:
        fraction = math.nan
    if not 0 < fraction < 1:
        raise argparse.ArgumentTypeError(f"the fraction of random:F must be a number in (0, 1), got {text!r}")
    return kind, fraction


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out-dir", help="where the outputs go, and where the checkpoint is read from when --checkpoint "
                                     "is not given (default: the checkpoint's folder)")
    p.add_argument("--checkpoint", help="the checkpoint to use (default: <out-dir>/checkpoint.pt)")
    p.add_argument("-n", "--n-samples", type=int, metavar="N",
                   help="how many samples to draw (default: 64); with --inpaint, how many held-out images to "
                        "complete, and with --interpolate, how many rows (default: 8 for both)")
    p.add_argument("--batch-size", type=int, default=500,
                   help="chains run at once; lower it if memory runs out (default: 500)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the prior draw, the Langevin noise, the held-out images and random masks (default: 0)")
    p.add_argument("--device", default="auto", help="auto (the default) picks cuda, then mps, then cpu; or e.g. cuda:1")
    p.add_argument("--n-steps-each", type=int, help="Langevin steps per noise level T (default: the checkpoint's)")
    p.add_argument("--step-size", type=float, help="step size at the smallest sigma, in the notes' convention "
                                                   "x + eps/2 s + sqrt(eps) z (default: the checkpoint's)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="the network's arithmetic: bf16 runs it under bf16 autocast while the chain stays fp32 "
                        "(ncsn.score_network), faster on GPUs and on CPUs with native bf16; a device without (or one "
                        "that would only emulate it) samples in fp32 with a note (default: fp32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network's evaluation, one graph per batch shape: half a minute of "
                        "compiling first, then on an H100 a CIFAR-10 evaluation in bf16 took 0.36x the uncompiled "
                        "time; on a CPU compiling takes minutes; not on mps (default: off)")
    p.add_argument("--data-init", action="store_true",
                   help="start each chain at a held-out image plus sigma_1 noise instead of the uniform prior "
                        "(NCSNv2's data_init, which takes training images); image runs only")
    g = p.add_argument_group("image tasks (image runs only; instead of plain samples)")
    g.add_argument("--inpaint", type=mask_spec, metavar="MASK",
                   help="complete held-out images whose pixels under MASK are hidden: right-half (the papers' "
                        "figure), center (the middle square, half the side), or random:F (a fraction F of the "
                        "pixels, each image its own); writes inpainting.png (rows: original | masked | completions) "
                        "and inpainting.npz")
    g.add_argument("--completions", type=int,
                   help="with --inpaint, completions drawn per image (default: 4)")
    g.add_argument("--interpolate", type=int, metavar="K",
                   help="K chains per row that share their start and mix two noise streams; writes "
                        "interpolation.png (a row per start) and interpolation.npz (rows run whole: at least K "
                        "chains at once, whatever --batch-size)")
    q = p.add_argument_group("sample quality (plain samples, image runs)")
    q.add_argument("--fid", action="store_true",
                   help="score the samples against the run's training images with torch-fidelity: FID, KID and, for "
                        "colour images, the Inception Score, in Inception's features (for the 8x8 digits, a digit "
                        "classifier's, trained in the same command); prints a line and appends it to metrics.jsonl. "
                        "The papers' protocol is -n 50000 against CIFAR-10's 50,000 training images: FID at another "
                        "-n compares only with FID at that -n")
    q.add_argument("--fid-weights", metavar="PATH",
                   help="a local copy of torch-fidelity's Inception weights (weights-inception-2015-12-05-"
                        "6726825d.pth), for machines without internet (default: downloaded into torch.hub's cache "
                        "on first use)")
    q.add_argument("--baselines", action="store_true",
                   help="with --fid, also score as many held-out images (the floor) and samples of the Gaussian "
                        "fitted to the training images (the baseline to beat), check that the samples are not "
                        "copies of training images, and draw the three side by side in quality.png")
    q.add_argument("--every-checkpoint", action="store_true",
                   help="with --fid, score every snapshot checkpoint_NNNNNNN.pt of the run (train.py --keep-every) "
                        "and its checkpoint.pt, each with -n samples from the same seed, and name the best "
                        "(NCSNv2 chooses its checkpoint so); writes no samples")
    g.add_argument("--data-dir",
                   help="where the run's images are found: the held-out ones for --inpaint and --data-init, the "
                        "training ones for --fid (whose features are cached there, in .ncsn-cache); downloaded there "
                        "if missing as train.py does (default: ./data; the digits need none; for a run on a folder "
                        "of images, the run's own folder, or where that folder is now if it moved)")
    args = p.parse_args(argv)
    if args.out_dir is None and args.checkpoint is None:
        p.error("give --out-dir (a run of train.py) or --checkpoint")
    if (args.inpaint is not None) + (args.interpolate is not None) + args.data_init > 1:
        p.error("--inpaint, --interpolate and --data-init are separate runs; give one")
    for name in ("n_samples", "batch_size", "n_steps_each", "completions"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.interpolate is not None and args.interpolate < 2:
        p.error(f"--interpolate must be >= 2 (chains per row, from a = 0 to a = pi/2), got {args.interpolate}")
    if args.step_size is not None and not 0 < args.step_size < float("inf"):
        p.error(f"--step-size must be > 0 and finite, got {args.step_size}")
    if not args.fid and (args.fid_weights or args.baselines or args.every_checkpoint):
        p.error("--fid-weights, --baselines and --every-checkpoint go with --fid")
    if args.fid and (args.inpaint is not None or args.interpolate is not None):
        p.error("--fid scores plain samples; it does not go with --inpaint or --interpolate")
    if args.every_checkpoint and (args.baselines or args.data_init):
        p.error("--every-checkpoint draws from the prior and scores alone; it does not go with --baselines or "
                "--data-init")
    if args.completions is not None and args.inpaint is None:
        p.error("--completions goes with --inpaint")
    args.completions = args.completions or 4
    if args.n_samples is None:
        args.n_samples = 64 if args.inpaint is None and args.interpolate is None else 8
    return args


def load_run(args):
    """(checkpoint path, out-dir, device), the out-dir made and checked writable before any sampling (a folder that
    cannot take the outputs must not cost the chains)."""
    ckpt_path = args.checkpoint or os.path.join(args.out_dir, "checkpoint.pt")
    out_dir = args.out_dir or os.path.dirname(ckpt_path) or "."
    if not os.path.isfile(ckpt_path):
        raise RunError(f"no checkpoint at {ckpt_path}; train first (python train.py --out-dir ...), or point "
                       "--out-dir or --checkpoint at one")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise RunError("sample.py runs in one process; start it with python, not torchrun")
    try:
        os.makedirs(out_dir, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise RunError(f"--out-dir {out_dir} cannot hold the outputs ({e.strerror}); point --out-dir elsewhere") \
            from None
    return ckpt_path, out_dir, runs.pick_device(args.device)


def load_model(args, ckpt_path, device):
    """(model, config, step): the checkpoint's EMA network in eval mode and the sampler's settings, with
    --n-steps-each and --step-size applied (and announced)."""
    ckpt = runs.load_checkpoint(ckpt_path, device)
    if (args.inpaint is not None or args.interpolate is not None or args.data_init or args.fid) and not \
            runs.is_image_run(ckpt["config"]):
        raise RunError(f"--inpaint, --interpolate, --data-init and --fid need a run on images; {ckpt_path} is of "
                       f"{ckpt['config']['dataset']}, 2-D points")
    model = runs.build_model(ckpt["config"]).to(device)
    model.load_state_dict(ckpt["ema"])  # the EMA's state dict is the averaged network's own
    model.eval()  # dropout off
    # The sampler the run was trained for, unless a flag changes it (and then it says so).
    changes = {k: getattr(args, k) for k in ("n_steps_each", "step_size") if getattr(args, k) is not None}
    config = dict(ckpt["config"], **changes)
    print(f"{ckpt_path} (step {ckpt['step']}): {len(config['sigmas'])} levels x {config['n_steps_each']} steps of "
          f"{config['step_size']:.3g} + denoise" + "".join(f"; {k} {ckpt['config'][k]} -> {v}"
                                                          for k, v in changes.items()))
    return model, config, ckpt["step"]


def check_finite(samples, what):
    """A chain that diverged returns NaN, which would pass for pixels once cast to uint8: refuse to write it."""
    if not samples.isfinite().all():
        bad = int((~samples.isfinite()).flatten(1).any(1).sum())
        raise RunError(f"{bad} of the {len(samples)} {what} are not finite (the chains diverged); nothing was "
                       "written: try a smaller --step-size or another checkpoint")


def as_uint8(images):
    """(..., C, H, W) in [0, 1] -> (..., H, W, C) uint8 numpy, x * 255 rounded: the format FID tools read."""
    return rearrange(as_uint8_chw(images), "... c h w -> ... h w c").numpy()


def as_uint8_chw(images):
    """(..., C, H, W) in [0, 1] -> uint8 (..., C, H, W) on the CPU, x * 255 rounded (as samples.npz holds them)."""
    return (images * 255).round().to(torch.uint8).cpu()


def save_npz(path, **arrays):
    runs.save_atomic(lambda f: np.savez(f, **arrays), path)


def heldout(config, data_dir, n, generator):
    """n held-out images of the run's data set in [0, 1], (n, C, H, W) float, drawn without replacement."""
    images = runs.heldout_images(config, data_dir)
    if n > len(images):
        raise RunError(f"-n {n} asks for more images than the {len(images)} held-out ones of {config['dataset']}")
    if tuple(images.shape[1:]) != tuple(config["shape"]):
        raise RunError(f"the held-out images in {data_dir} have shape {tuple(images.shape[1:])}, the run's "
                       f"{tuple(config['shape'])}")
    return images[torch.randperm(len(images), generator=generator)[:n]].float() / 255


def compiling(args, device):
    """Whether --compile applies here: not on mps, where torch.compile is not supported (a note says so)."""
    if args.compile and device.type == "mps":
        print("note: --compile is not supported on mps; sampling uncompiled", file=sys.stderr)
        return False
    return args.compile


def evaluation(args, model, device):
    """The score function of the image tasks' chains, built as ncsn.sample builds its own (ncsn.chain_network): the
    network in --precision, compiled with --compile, a CUDA graph per batch shape on CUDA."""
    return ncsn.chain_network(model, device, True, runs.usable_precision(args.precision, device, "sampling"),
                              compile=compiling(args, device))


# ---- plain samples ---------------------------------------------------------------------------------------------

def draw(args, model, config, out_dir, device):
    """Draw the samples and write samples.npz and samples.png; returns the samples (N, *shape), in the data range."""
    init = None
    if args.data_init:  # which held-out images: drawn on the CPU, as --inpaint draws them
        init = heldout(config, args.data_dir, args.n_samples, torch.Generator().manual_seed(args.seed))
    precision = runs.usable_precision(args.precision, device, "sampling")
    print(f"sampling {args.n_samples} in batches of {min(args.batch_size, args.n_samples)}, from "
          + ("held-out images + sigma_1 noise" if args.data_init else "the uniform prior")
          + (", the network in bf16 autocast" if precision == "bf16" else ""))
    generator = torch.Generator(device).manual_seed(args.seed)
    samples = runs.draw_samples(model, config, args.n_samples, generator, progress=True, batch_size=args.batch_size,
                                init=init, precision=precision, compile=compiling(args, device))
    check_finite(samples, "samples")
    figure = os.path.join(out_dir, "samples.png")
    if runs.is_image_run(config):
        array = as_uint8(samples)
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
    save_npz(path, arr_0=array)
    print(f"wrote {path} ({array.dtype} {tuple(array.shape)}) and {figure}")
    return samples


# ---- inpainting ------------------------------------------------------------------------------------------------

def make_masks(kind, fraction, n, height, width, generator):
    """(n, 1, H, W) float masks, 1 where the pixel is known: right-half hides columns W//2.., center hides the middle
    square of side H//2 x W//2, random hides round(F H W) pixels (at least one, and one at most left known) drawn anew
    for each image."""
    mask = torch.ones(n, 1, height, width)
    if kind == "right-half":
        mask[..., width // 2:] = 0
    elif kind == "center":
        top, left = (height - height // 2) // 2, (width - width // 2) // 2
        mask[..., top:top + height // 2, left:left + width // 2] = 0
    else:
        hidden = min(max(round(fraction * height * width), 1), height * width - 1)
        for m in mask:
            m.view(-1)[torch.randperm(height * width, generator=generator)[:hidden]] = 0
    return mask


def inpaint(args, model, config, out_dir, device):
    """Complete n held-out images --completions times each; write inpainting.npz and inpainting.png."""
    (kind, fraction), m, n = args.inpaint, args.completions, args.n_samples
    cpu_generator = torch.Generator().manual_seed(args.seed)  # which images, which random pixels
    images = heldout(config, args.data_dir, n, cpu_generator)  # (n, C, H, W)
    masks = make_masks(kind, fraction, n, *images.shape[2:], cpu_generator)  # (n, 1, H, W)
    low, high = config["data_range"]
    known = images.repeat_interleave(m, 0).to(device)  # (n m, C, H, W): m chains per image
    mask = masks.repeat_interleave(m, 0).to(device)  # (n m, 1, H, W)
    generator = torch.Generator(device).manual_seed(args.seed)
    hidden = 1 - masks.mean().item()
    print(f"inpainting {n} held-out images of {config['dataset']}, {hidden:.0%} of the pixels hidden "
          f"({kind}), {m} completions each")
    score_fn = evaluation(args, model, device)
    completions = inpaint_chains(score_fn, config, known, mask, generator, args.batch_size, "inpaint")
    completions = completions.clamp(low, high).cpu().unflatten(0, (n, m))  # (n, m, C, H, W)
    check_finite(completions.flatten(0, 1), "completions")
    shown = images.expand(-1, 3, -1, -1)  # in colour, so that hidden pixels stand out even on grey images
    masked = torch.where(masks.bool(), shown, HIDDEN_COLOUR.reshape(1, 3, 1, 1))
    path, figure = os.path.join(out_dir, "inpainting.npz"), os.path.join(out_dir, "inpainting.png")
    save_npz(path, originals=as_uint8(images), masks=masks[:, 0].bool().numpy(), completions=as_uint8(completions))
    titles = ["original", "masked"] + [f"completion {j + 1}" for j in range(m)]
    runs.save_rows(torch.cat([shown.unsqueeze(1), masked.unsqueeze(1), completions.expand(-1, -1, 3, -1, -1)], 1),
                   figure, titles)
    print(f"wrote {path} (originals, masks, completions uint8 {(n, m, *completions.shape[3:], completions.shape[2])}) "
          f"and {figure}")
    return path


def inpaint_chains(score_fn, config, known, mask, generator, batch_size, desc):
    """annealed_langevin_inpainting of score_fn(x, sigma) on chunks of at most batch_size chains, each from the
    uniform prior."""
    low, high = config["data_range"]
    sigmas, n_steps_each, step_size = config["sigmas"], config["n_steps_each"], config["step_size"]
    total = math.ceil(len(known) / batch_size) * (len(sigmas) * n_steps_each + 1)  # network evaluations
    chunks = []
    with ncsn.progress_bar(total, desc) as bar:
        for start in range(0, len(known), batch_size):
            part = slice(start, start + batch_size)
            x = low + (high - low) * torch.rand(known[part].shape, generator=generator, device=known.device)
            chunks.append(annealed_langevin_inpainting(score_fn, x, known[part], mask[part], sigmas, step_size,
                                                       n_steps_each, generator=generator,
                                                       callback=lambda step, y: bar.update(1)))
    return torch.cat(chunks)


# ---- interpolation ---------------------------------------------------------------------------------------------

def interpolate(args, model, config, out_dir, device):
    """n rows of --interpolate chains each; write interpolation.npz and interpolation.png."""
    rows, k = args.n_samples, args.interpolate
    low, high = config["data_range"]
    sigmas, n_steps_each, step_size = config["sigmas"], config["n_steps_each"], config["step_size"]
    generator = torch.Generator(device).manual_seed(args.seed)
    score_fn = evaluation(args, model, device)
    rows_per_batch = max(1, args.batch_size // k)
    print(f"interpolating: {rows} rows of {k} chains, a = 0 .. pi/2")
    total = math.ceil(rows / rows_per_batch) * (len(sigmas) * n_steps_each + 1)
    chunks = []
    with ncsn.progress_bar(total, "interpolate") as bar:
        for start in range(0, rows, rows_per_batch):
            chunk = min(rows_per_batch, rows - start)
            x = low + (high - low) * torch.rand((chunk, *config["shape"]), generator=generator, device=device)
            chunks.append(annealed_langevin_interpolation(score_fn, x, sigmas, step_size, n_steps_each, k,
                                                          generator=generator, callback=lambda step, y: bar.update(1)))
    chains = torch.cat(chunks).clamp(low, high).cpu()  # (rows, k, C, H, W)
    check_finite(chains.flatten(0, 1), "chains")
    path, figure = os.path.join(out_dir, "interpolation.npz"), os.path.join(out_dir, "interpolation.png")
    save_npz(path, arr_0=as_uint8(chains))
    titles = [f"a = {90 * j / (k - 1):.0f}°" for j in range(k)]
    runs.save_rows(chains, figure, titles)
    print(f"wrote {path} (uint8 {(*chains.shape[:2], *chains.shape[3:], chains.shape[2])}) and {figure}")
    return path


# ---- sample quality --------------------------------------------------------------------------------------------

def import_quality():
    """quality.py, which needs torch-fidelity (imported only for --fid)."""
    try:
        import quality
    except ImportError as e:  # torch-fidelity itself, or a torchvision that does not match this torch
        raise RunError(f"--fid needs torch-fidelity, which does not import here ({' '.join(str(e).split())}); "
                       "pip install torch-fidelity, with a torchvision built for this torch") from None
    return quality


def fid_setup(args, config, device, scratch):
    """What --fid scores against, prepared once: the training images, the feature space and its weights, where the
    reference's features are cached, and for the digits the classifier (trained here, its weights in `scratch`)."""
    quality = import_quality()
    try:  # the weights first: a missing file or download is found before the training images are read
        weights = None if config["dataset"] == "digits" else quality.inception_weights(args.fid_weights)
    except quality.QualityError as e:
        raise RunError(str(e)) from None
    if config["dataset"] == "digits":  # the training digits, read once with the labels the classifier learns
        reference, labels = data.load_digits(train=True, labels=True)
    else:
        reference = runs.run_images(config, args.data_dir, train=True)
    setup = dict(quality=quality, reference=reference, classifier=None, cache_dir=None, cache_name=None)
    if config["dataset"] == "digits":  # Inception sees an 8x8 digit as a blur: a digit classifier's features instead
        print("training the digit classifier whose features score the digits")
        classifier = quality.train_digit_classifier(reference, labels, seed=args.seed)
        held_out, held_out_labels = data.load_digits(train=False, labels=True)
        accuracy = (quality.classify(classifier, held_out) == held_out_labels).float().mean().item()
        weights = os.path.join(scratch, "digit_classifier.pt")
        torch.save(classifier.state_dict(), weights)
        return dict(setup, classifier=classifier, features=quality.DIGITS, weights=weights,
                    space=f"a digit classifier's features ({accuracy:.1%} right on the held-out digits)")
    setup.update(features=quality.INCEPTION, weights=weights, space="Inception features")
    folder = config.get("data")
    cache_dir = os.path.join(runs.images_dir(config, args.data_dir), data.FOLDER_CACHE)
    try:  # beside the data; a folder that cannot be written gets no cache
        os.makedirs(cache_dir, exist_ok=True)
        writable = os.access(cache_dir, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        print(f"note: {cache_dir} cannot be written; the training images' features are not cached", file=sys.stderr)
        return setup
    name = (f"folder-{folder['files']}-{folder['image_size']}-{folder['crop']}-{folder['grayscale']}-"
            f"{folder['held_out']}" if folder else f"{config['dataset']}-train")
    return dict(setup, cache_dir=cache_dir, cache_name=f"{name}-{quality.weights_tag(weights)}")


def score(setup, images, device, progress=True):
    """quality.fidelity of uint8 images (N, C, H, W) against the setup's training images."""
    quality = setup["quality"]
    try:
        return quality.fidelity(images, setup["reference"], setup["features"], setup["weights"], device,
                                reference_name=setup["cache_name"], cache_dir=setup["cache_dir"], progress=progress)
    except quality.QualityError as e:
        raise RunError(str(e)) from None


def record_fid(setup, result, n, step, ckpt_path, out_dir):
    """Print the score as one line and append it to <out_dir>/metrics.jsonl."""
    quality = setup["quality"]
    print(f"{quality.format_fidelity(result)}: {n} samples at step {step} against the {len(setup['reference'])} "
          f"training images, in {setup['space']}")
    runs.append_metrics(out_dir, dict(step=step, n=n, **result, features=setup["features"],
                                      reference=len(setup["reference"]), checkpoint=os.path.abspath(ckpt_path)))


def baselines(args, setup, samples, result, config, out_dir, device):
    """--baselines: the samples beside as many held-out images and Gaussian draws, in one table and quality.png."""
    quality = setup["quality"]
    generator = torch.Generator().manual_seed(args.seed)
    held_out = runs.run_images(config, args.data_dir, train=False)
    held_out = held_out[torch.randperm(len(held_out), generator=generator)[:len(samples)]]
    gaussian = quality.gaussian_fit_samples(setup["reference"], len(samples), generator)
    sets = {"samples": (samples, result), "held-out images": (held_out, None), "Gaussian fit": (gaussian, None)}
    distances = {name: quality.nearest_distances(images, setup["reference"], device=device)
                 for name, (images, _) in sets.items()}
    closest_held_out = distances["held-out images"].min()  # no held-out image is nearer to a training image
    print(f"\n{'set':<16} {'n':>6} {'FID':>8} {'KID':>8}   nearest training image: median, nearer than any "
          "held-out image" + ("   classes 0-9 (%)" if setup["classifier"] is not None else ""))
    titles = []
    for name, (images, result) in sets.items():
        result = result or score(setup, images, device, progress=False)
        d = distances[name]
        line = (f"{name:<16} {len(images):>6} {result['fid']:>8.3f} {result['kid']:>8.4f}   {d.median():.3f}, "
                f"{(d < closest_held_out).float().mean():.1%}")
        if setup["classifier"] is not None:
            shares = torch.bincount(quality.classify(setup["classifier"], images), minlength=10) / len(images)
            line += "   " + " ".join(f"{100 * v:.0f}" for v in shares.tolist())
        print(line)
        titles.append(f"{name}: FID {result['fid']:.2f}")
    figure = os.path.join(out_dir, "quality.png")
    runs.save_panels([images[:64].float() / 255 for images, _ in sets.values()], titles, figure)
    print(f"(distances in pixels scaled to [0, 1]; the held-out images are the floor, the Gaussian the baseline)\n"
          f"wrote {figure}")


def checkpoint_history(ckpt_path):
    """The snapshots checkpoint_NNNNNNN.pt beside ckpt_path, in step order, then ckpt_path itself."""
    folder = os.path.dirname(ckpt_path) or "."
    snapshots = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                       if re.fullmatch(r"checkpoint_\d+\.pt", name))
    return snapshots + [p for p in [ckpt_path] if os.path.abspath(p) not in map(os.path.abspath, snapshots)]


def every_checkpoint(args, ckpt_path, out_dir, device, scratch):
    """--fid --every-checkpoint: -n samples of each checkpoint of the run from the same seed, scored, and the best
    named (the lowest FID)."""
    paths, scores, setup = checkpoint_history(ckpt_path), {}, None
    precision, compile_ = runs.usable_precision(args.precision, device, "sampling"), compiling(args, device)
    print(f"scoring the checkpoints of {os.path.dirname(ckpt_path) or '.'}, {args.n_samples} samples each")
    for path in paths:
        model, config, step = load_model(args, path, device)
        if step in scores:  # checkpoint.pt at the step of the last snapshot
            print(f"step {step} is scored already ({scores[step][1]})")
            continue
        if setup is None:
            setup, shape = fid_setup(args, config, device, scratch), config["shape"]
        elif config["shape"] != shape:
            raise RunError(f"{path} samples images of shape {tuple(config['shape'])}, the others {tuple(shape)}: "
                           "not one run")
        generator = torch.Generator(device).manual_seed(args.seed)
        samples = runs.draw_samples(model, config, args.n_samples, generator, progress=True,
                                    batch_size=args.batch_size, precision=precision, compile=compile_)
        check_finite(samples, f"samples of {path}")
        result = score(setup, as_uint8_chw(samples), device)
        record_fid(setup, result, args.n_samples, step, path, out_dir)
        scores[step] = (result["fid"], path)
    step = min(scores, key=lambda s: scores[s][0])
    print(f"best: {scores[step][1]} (step {step}), FID {scores[step][0]:.3f} at {args.n_samples} samples")


def interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)  # as Ctrl-C: one line, and no file half written
    try:
        ckpt_path, out_dir, device = load_run(args)
        with tempfile.TemporaryDirectory() as scratch:
            if args.every_checkpoint:
                return every_checkpoint(args, ckpt_path, out_dir, device, scratch)
            model, config, step = load_model(args, ckpt_path, device)
            if args.fid:  # before sampling: missing weights or training images must not cost the chains
                setup = fid_setup(args, config, device, scratch)
            task = inpaint if args.inpaint is not None else interpolate if args.interpolate is not None else draw
            samples = task(args, model, config, out_dir, device)
            if args.fid:
                samples = as_uint8_chw(samples)
                result = score(setup, samples, device)
                record_fid(setup, result, len(samples), step, ckpt_path, out_dir)
                if args.baselines:
                    baselines(args, setup, samples, result, config, out_dir, device)
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
