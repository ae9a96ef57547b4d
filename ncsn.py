"""Noise conditional score networks: notes §8, §9 and §10, after [Song & Ermon 2019] "Generative modeling by
estimating gradients of the data distribution" (NCSN) and [Song & Ermon 2020] "Improved techniques for training
score-based generative models" (NCSNv2). In the order of the notes:

- §8 noise levels: a geometric sequence sigma_1 > ... > sigma_L                  (geometric_sigmas)
- §8 the loss: one network s_theta(x~, sigma) ≈ grad log q_sigma(x~) for every level, trained with
       L(theta) = 1/L sum_i sigma_i^2 * 1/2 E || s_theta(x + sigma_i z, sigma_i) + z / sigma_i ||^2,
  one level drawn per example                                                     (ncsn_loss)
- §9 the sampler: annealed Langevin dynamics from uniform noise, then NCSNv2's denoising step   (sample)
  (the network optionally in bf16, in channels_last, and replayed as a CUDA graph: the chain is the same)
- §10 NCSNv2's techniques:
  technique 1: sigma_1 = the largest distance between two training points        (max_pairwise_distance)
  technique 2: the ratio gamma of consecutive sigmas from the dimension D          (sigma_ratio, recommended_sigmas)
  technique 3: s_theta(x, sigma) = net(x) / sigma                                  (NCSN(conditional=False))
               (by default NCSN, and MLPScoreNet, also feed log sigma to net: net(x, log sigma) / sigma)
  technique 4: the step size that brings f(eps) of notes §10 closest to 1          (recommended_step_size)
  technique 5: an exponential moving average of the weights                        (EMA)
- the networks: a U-Net with skip connections for images (NCSN), an MLP for 2-D toys (MLPScoreNet).

Files: this one needs denoising.py (the §8 loss) and langevin.py (the §9 sampler) beside it; sliced.py and
score_matching.py are imported only by ncsn_loss(objective="ssm") and (objective="exact"). So ncsn.py, denoising.py
and langevin.py copied alone into a folder train and sample.

The U-Net is the DDPM one [Ho et al. 2020]: residual blocks with GroupNorm and SiLU, self-attention at chosen
resolutions and in the middle. Its default (35.7 M parameters, 12.4 GFLOPs per 32x32 image) is sized like NCSNv2's
RefineNet for CIFAR-10 (29.7 M, 19.8 GFLOPs). By default it also feeds log sigma into every residual block, as
NCSN++ does [Song et al. 2021]; conditional=False gives technique 3 exactly as the notes write it.
"""
import copy
import math
import sys
import types

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

from denoising import denoising_score_matching_loss
from langevin import annealed_langevin_dynamics

OBJECTIVES = ("dsm", "ssm", "exact")


def _expand_like(sigma, x):
    """Reshape a per-example sigma of shape (B,) to (B, 1, ..., 1), so it broadcasts against x of any x.dim()."""
    return sigma.reshape(-1, *[1] * (x.dim() - 1))


# ---- §8: noise levels ------------------------------------------------------------------------------------------

def geometric_sigmas(sigma_max, sigma_min, n, dtype=torch.float32):
    """sigma_i = sigma_max (sigma_min / sigma_max)^((i - 1) / (n - 1)), i = 1..n (notes §8): a geometric sequence.

    Computed in float64 with the endpoints set exactly. n = 1 is allowed only with sigma_max == sigma_min (a single
    level); otherwise n >= 2 and sigma_max > sigma_min > 0.
    """
    sigma_max, sigma_min = float(sigma_max), float(sigma_min)
    if not 0 < sigma_min < math.inf or not sigma_max < math.inf:
        raise ValueError(f"sigmas must be finite and > 0, got sigma_max={sigma_max}, sigma_min={sigma_min}")
    if n == 1 and sigma_max == sigma_min:
        return torch.tensor([sigma_max], dtype=dtype)
    if n < 2 or not sigma_max > sigma_min:
        raise ValueError(f"need n >= 2 levels and sigma_max > sigma_min (or n = 1 and sigma_max == sigma_min), "
                         f"got n={n}, sigma_max={sigma_max}, sigma_min={sigma_min}")
    sigmas = torch.logspace(math.log10(sigma_max), math.log10(sigma_min), n, dtype=torch.float64)
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return sigmas.to(dtype)


def _check_sigmas(sigmas):
    """sigmas must be 1-D, finite, > 0 and strictly descending. Call on CPU tensors only: it reads the values."""
    if sigmas.dim() != 1 or len(sigmas) == 0:
        raise ValueError(f"sigmas must be a non-empty 1-D tensor, got shape {tuple(sigmas.shape)}")
    if not bool(((sigmas > 0) & (sigmas < math.inf)).all()):
        raise ValueError(f"sigmas must be finite and > 0, got {sigmas.tolist()}")
    if len(sigmas) > 1 and not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"sigmas must be strictly descending (sigma_1 > ... > sigma_L), got {sigmas.tolist()}")
    return sigmas


# ---- §8: the NCSN objective ------------------------------------------------------------------------------------

def ncsn_loss(model, x, sigmas, objective="dsm", reduction="mean", levels=None, noise=None, n_projections=1,
              generator=None, trace="auto"):
    """NCSN loss (notes §8): 1/L sum_i sigma_i^2 l(theta; sigma_i), one level per example drawn uniformly.

    objective "dsm": l = 1/2 E || s(x + sigma z, sigma) + z / sigma ||^2 (denoising.py), so that
        sigma^2 l = 1/2 E || sigma s + z ||^2 has unit-scale targets at every level.
    objective "ssm": sigma^2-weighted sliced score matching with variance reduction (sliced.py, Gaussian
        projections) on the noisy data x + sigma z, the NCSN authors' anneal_sliced_score_estimation_vr; its value
        is sigma^2 (Fisher divergence to q_sigma - 1/2 E ||grad log q_sigma||^2), so it can be negative.
    objective "exact": the same with Hyvärinen's exact Jacobian trace (score_matching.py): D backward passes, so
        for low-dimensional data only; `trace` picks its method ("loop" for a model that torch.func cannot
        transform, such as one wrapped in DistributedDataParallel).
    model: model(x, sigma) with sigma of shape (B,); x: clean data (B, *event_shape).
    sigmas: (L,) descending noise levels; keep them on x's device to avoid a copy per step (the values are checked
        only when they are on the CPU, where that needs no device sync).
    levels: optional (B,) long tensor of level indices, for callers that log the loss per level; drawn with
        torch.randint(L, generator=generator) on x's device when None.
    noise: optional standard normal z shaped like x. reduction: "mean" (0-d) or "none" (B,) per-example values.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    sigmas = torch.as_tensor(sigmas)
    if sigmas.device.type == "cpu":
        _check_sigmas(sigmas)
    sigmas = sigmas.to(x.device, x.dtype)
    if levels is None:
        levels = torch.randint(len(sigmas), x.shape[:1], device=x.device, generator=generator)  # (B,)
    elif levels.shape != x.shape[:1]:
        raise ValueError(f"levels must have shape ({x.shape[0]},), got {tuple(levels.shape)}")
    if noise is not None and noise.shape != x.shape:
        raise ValueError(f"noise must have the shape of x, {tuple(x.shape)}, got {tuple(noise.shape)}")
    sigma = sigmas[levels]  # (B,)
    if objective == "dsm":
        loss = denoising_score_matching_loss(lambda y: model(y, sigma), x, sigma, noise=noise, reduction="none",
                                             generator=generator)  # (B,)
    else:  # score matching on the noisy data, whose optimum is the score of q_sigma
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x_noisy = x + _expand_like(sigma, x) * noise  # x~ = x + sigma z, (B, *event_shape)
        if objective == "exact":
            from score_matching import score_matching_loss  # only this objective needs score_matching.py

            loss = score_matching_loss(lambda y: model(y, sigma), x_noisy, reduction="none", trace=trace)  # (B,)
        else:  # sliced.py stacks the n_projections copies of the batch along dim 0, so sigma repeats likewise
            from sliced import sliced_score_matching_loss  # only this objective needs sliced.py

            loss = sliced_score_matching_loss(lambda y: model(y, sigma.repeat(n_projections)), x_noisy,
                                              n_projections=n_projections, variance_reduction=True,
                                              reduction="none", generator=generator)  # (B,)
    loss = sigma ** 2 * loss  # lambda(sigma) = sigma^2
    return loss.mean() if reduction == "mean" else loss


# ---- §9: the sampler -------------------------------------------------------------------------------------------

def _device_dtype(model, sigmas):
    """Where and in what precision to sample: the model's first parameter, else the sigmas."""
    param = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    ref = param if param is not None else torch.as_tensor(sigmas)
    return ref.device, ref.dtype if ref.is_floating_point() else torch.float32


def _log_line(text):
    """tqdm's output as plain lines (no carriage returns, no blank lines), for a log file."""
    text = text.strip("\r\n ")
    if text:
        print(text, file=sys.stderr, flush=True)


def progress_bar(total, desc, enabled=True, unit="eval", log_every_s=30.0):
    """A tqdm bar on a terminal; where stderr is not one (a log file, a batch job), plain lines instead of a bar's
    carriage returns: one at the start, one every log_every_s seconds, one at the end."""
    if not enabled or sys.stderr.isatty():
        return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False, unit=unit)
    return tqdm(total=total, desc=desc, mininterval=log_every_s, maxinterval=log_every_s, unit=unit,
                file=types.SimpleNamespace(write=_log_line, flush=lambda: None),
                bar_format="{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")


PRECISIONS = ("fp32", "bf16")
# The layers whose forward autocast runs in bf16 (F.linear, F.conv*): bf16 copies of their weights are made once per
# call of sample, where autocast would make them anew at every network evaluation (6% of one of the default NCSN on
# a CPU): its cache keeps only casts of weights that require grad, which an EMA copy's don't, until it exits.
_BF16_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _prepared_tensors(model, bf16, channels_last):
    """{name: tensor} of the model's parameters that the network needs in another form: bf16 copies of the weights
    of _BF16_LAYERS, 4-D weights (conv kernels) in channels_last. The model itself is left as it is."""
    tensors = {}
    for prefix, module in model.named_modules():
        for name, weight in module.named_parameters(recurse=False):
            cast = bf16 and isinstance(module, _BF16_LAYERS) and weight.dtype == torch.float32
            new = weight.to(torch.bfloat16) if cast else weight
            new = new.contiguous(memory_format=torch.channels_last) if channels_last and new.dim() == 4 else new
            if new is not weight:
                tensors[f"{prefix}.{name}" if prefix else name] = new
    return tensors


def score_network(model, precision="fp32", channels_last=False):
    """The score function a chain calls (sample's, or langevin's inpainting and interpolation): model(x, sigma), its
    arithmetic in bf16 autocast and/or its layout channels_last as asked, the score returned in the chain's dtype.

    Only the network changes: the chain (x, the update x + alpha/2 s + sqrt(alpha) z, the noise) keeps its dtype and
    layout, so its noise is drawn in the same order and a seed gives the fp32 chain up to the network's rounding.
    The caller's model is not touched: the weights wanted in another form (_prepared_tensors) reach it through
    torch.func.functional_call, which swaps them in for the one call (2 ms per evaluation of the default NCSN on a
    CPU, under 1% of one; nothing under a CUDA graph, which captures it once).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    bf16 = precision == "bf16"
    tensors = _prepared_tensors(model, bf16, channels_last) if isinstance(model, nn.Module) else {}

    def network(x, sigma):
        return torch.func.functional_call(model, tensors, (x, sigma)) if tensors else model(x, sigma)

    def score_fn(x, sigma):
        y = x
        if channels_last:  # (B, C, H, W), NHWC in memory; for C = 1 x.contiguous(memory_format=...) would keep x's
            # strides (then valid in both layouts, read as the default one) and the convolutions would stay NCHW
            y = torch.empty_like(x, memory_format=torch.channels_last).copy_(x)
        if not bf16:
            return network(y, sigma)
        # cache_enabled=False: autocast frees its cached casts when it exits, which a CUDA graph would replay from
        with torch.autocast(x.device.type, dtype=torch.bfloat16, cache_enabled=False):
            score = network(y, sigma)
        return score.to(x.dtype)  # the chain's precision

    return score_fn


def _capture(run, device):
    """run() captured as a CUDA graph, after three warm-up calls on a side stream (lazy initialisation and kernel
    choices happen outside the capture, as torch.cuda.graphs' documentation requires). Returns replay() -> the
    captured output, one buffer that every replay overwrites."""
    stream, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        for _ in range(3):
            run()
    stream.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:  # thread_local: a pinned-memory thread of a data loader may allocate while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_score = run()
    finally:  # where ending the capture fails, torch.cuda.graph leaves its capture stream the current one
        torch.cuda.set_stream(stream)

    def replay():
        graph.replay()
        return static_score

    return replay


def _static_network(network, x, sigma, capture):
    """network(x, sigma) for one batch shape through fixed input buffers: each call copies x and sigma into them
    (device to device: no host sync in the chain) and evaluates the network there, as a CUDA graph replay when
    capture (each of the 1,161 evaluations of a CIFAR-10 chain is then one graph launch, not the network's hundreds of
    kernel launches), plainly otherwise. A failed capture falls back to the plain evaluation with a one-line note on
    stderr. Returns (evaluate, captured); evaluate(x, sigma) returns the score in the graph's output buffer, which the
    next call overwrites: use it before calling again (the chain adds it to x at once).
    """
    static_x, static_sigma = x.clone(), sigma.clone()  # (B, *event_shape), (B,): the graph's fixed inputs

    def run():
        return network(static_x, static_sigma)

    if capture:
        try:
            run = _capture(run, x.device)
        except Exception as e:  # noqa: BLE001  (whatever refuses capture: the plain path still samples)
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            print(f"note: CUDA graph capture failed ({type(e).__name__}: {reason}); sampling without CUDA graphs",
                  file=sys.stderr)
            capture = False

    def evaluate(x, sigma):
        static_x.copy_(x)
        static_sigma.copy_(sigma)
        return run()

    return evaluate, capture


def _per_batch_shape(network, capture):
    """score_fn(x, sigma) through _static_network, built anew when the batch shape changes (sample's last chunk may
    be smaller); one graph, and its memory pool, alive at a time. After a failed capture the later shapes run plain.
    """
    built = {}

    def score_fn(x, sigma):
        nonlocal capture
        if x.shape not in built:
            built.clear()  # the previous shape's graph goes before the next one is captured
            built[x.shape], capture = _static_network(network, x, sigma, capture)
        return built[x.shape](x, sigma)

    return score_fn


def chain_network(model, device, images, precision="fp32", channels_last=None, cuda_graph=None, compile=False):
    """The score function that sample's chains call, built once for all of them: score_network (precision, layout),
    then torch.compile, then the fixed buffers of a CUDA graph per batch shape, with sample's defaults for None
    (channels_last: compiled image models on CUDA; cuda_graph: models on CUDA). Nothing is compiled or captured
    before the first evaluation of a shape. images: whether the samples are (N, C, H, W)."""
    is_module = isinstance(model, nn.Module)
    if channels_last is None:  # compiled on CUDA only: uncompiled, GroupNorm copies channels_last to the default layout
        channels_last = bool(compile) and is_module and images and device.type == "cuda"
    if cuda_graph is None:
        cuda_graph = is_module and device.type == "cuda"
    score_fn = score_network(model, precision, channels_last)
    if compile:
        score_fn = torch.compile(score_fn, dynamic=False)  # static shapes: one graph per batch shape
    if cuda_graph:
        score_fn = _per_batch_shape(score_fn, capture=device.type == "cuda")
    return score_fn


@torch.no_grad()
def sample(model, shape, sigmas, n_steps_each, step_size, denoise=True, generator=None, progress=False,
           data_range=(0.0, 1.0), batch_size=None, callback=None, init=None, precision="fp32", channels_last=None,
           cuda_graph=None, compile=False):
    """Annealed Langevin dynamics from the uniform prior (notes §9; Song & Ermon 2019 Algorithm 1, NCSNv2 denoising),
    or from data points plus sigma_1 noise (NCSNv2's data_init).

    shape: (N, *event_shape) of the samples; sigmas: descending; step_size: eps, the step at the last level
        (alpha_i = eps sigma_i^2 / sigma_L^2, the paper's update x + alpha/2 s + sqrt(alpha) z; the NCSN authors'
        code uses a step twice as large for the same numbers).
    data_range: (low, high); the chains start uniform on it, and only the returned samples are clamped to it (a chain
        that diverged returns NaN).
    init: None for the uniform prior; or data points (N, *event_shape) in the model's range, and then chain j starts
        at init[j] + sigma_1 z (NCSNv2 `data_init`): a draw of q_sigma_1 itself, the law the first level assumes,
        where the uniform prior only approximates it.
    batch_size: chains run in chunks of this many (all at once when None), each from its own prior draw.
    generator: a torch.Generator on the model's device for the prior and the Langevin noise.
    progress: show the network evaluations done (progress_bar: a bar on a terminal, periodic lines in a log).
    callback: optional callback(done, total), called after each network evaluation; an exception it raises stops
        the sampling (so a caller can abandon it).
    precision: "fp32", or "bf16" for the network under bf16 autocast (the weights of its Linear and Conv layers cast
        once per call rather than at every evaluation); the chain, its noise and the returned samples stay in the
        model's dtype, so the only change is the network's rounding (bf16 keeps 8 significant bits).
    channels_last: the network in torch.channels_last (its conv kernels, and its input x), for (N, C, H, W) samples.
        None: only when compiled on CUDA. Uncompiled, PyTorch's GroupNorm copies a channels_last input to the default
        layout and back: on an H100 (bench.py section 5, batch 500) a bf16 evaluation of the CIFAR-10 network took
        72 ms in channels_last and 56 ms in the default layout, and on a CPU channels_last was up to 1.7x slower in
        bf16. False leaves the model as it is; the chain keeps the default layout either way.
    cuda_graph: each batch shape's network evaluation captured once as a CUDA graph and replayed at every step, so
        the chain launches no kernels of the network's own (None: for an nn.Module on CUDA). The model must then be
        a pure function of (x, sigma) on the device: its Python code and hooks run at capture only. Where capture
        fails it samples without, with a note on stderr; off CUDA the same fixed-buffer path runs uncaptured.
    compile: the evaluation (network, autocast and layout change) through torch.compile, one static graph per batch
        shape (compiled at its first evaluation, under a minute on a GPU; the last chunk's smaller shape is another).
        Inductor fuses GroupNorm, SiLU, the casts and the additions: on an H100 (bench.py section 5) a bf16
        evaluation at batch 500 took 19.8 ms against 55.0 ms uncompiled, both captured. On a CPU compiling takes
        minutes.
    The model runs in eval mode (dropout off) under no_grad; its training mode is restored afterwards, and nothing
    else of it is changed (other layouts and precisions are copies).
    """
    device, dtype = _device_dtype(model, sigmas)
    sigmas = _check_sigmas(torch.as_tensor(sigmas).cpu())  # once per call: the sampler reads them on the host
    low, high = map(float, data_range)
    if not low < high:
        raise ValueError(f"data_range must be (low, high) with low < high, got {data_range}")
    n, event_shape = shape[0], tuple(shape[1:])
    if channels_last and len(event_shape) != 3:
        raise ValueError(f"channels_last needs image samples (N, C, H, W), got shape {tuple(shape)}")
    if init is not None and tuple(init.shape) != (n, *event_shape):
        raise ValueError(f"init must have the samples' shape {(n, *event_shape)}, got {tuple(init.shape)}")
    batch_size = batch_size or n
    if n < 1 or batch_size < 1:
        raise ValueError(f"need at least one sample and batch_size >= 1, got shape {tuple(shape)}, "
                         f"batch_size {batch_size}")
    is_module = isinstance(model, nn.Module)
    score_fn = chain_network(model, device, len(event_shape) == 3, precision, channels_last, cuda_graph, compile)
    was_training = model.training if is_module else None
    if was_training:
        model.eval()
    total, done = math.ceil(n / batch_size) * (len(sigmas) * n_steps_each + denoise), 0  # network evaluations

    def evaluated(step, x):  # after each network evaluation of every chunk
        nonlocal done
        done += 1
        bar.update(1)
        if callback is not None:
            callback(done, total)

    try:
        with progress_bar(total, "sample", enabled=progress) as bar:
            chunks = []
            for start in range(0, n, batch_size):
                m = min(batch_size, n - start)
                if init is None:  # (m, *event_shape), uniform prior
                    x = low + (high - low) * torch.rand((m, *event_shape), generator=generator, device=device,
                                                        dtype=dtype)
                else:  # (m, *event_shape), data_init: x + sigma_1 z
                    x = init[start:start + m].to(device, dtype)
                    x = x + float(sigmas[0]) * torch.randn(x.shape, generator=generator, device=device, dtype=dtype)
                chunks.append(annealed_langevin_dynamics(score_fn, x, sigmas, step_size, n_steps_each,
                                                         denoise=denoise, generator=generator, callback=evaluated))
    finally:
        if was_training:
            model.train()
    x = torch.cat(chunks)  # (N, *event_shape)
    # Clamped to the data range; a chain that diverged (inf or NaN anywhere) comes back all NaN, not as a point on
    # the box's edge.
    finite = x.flatten(1).isfinite().all(1)  # (N,)
    return torch.where(_expand_like(finite, x), x.clamp(low, high), torch.nan)


# ---- §10: NCSNv2's techniques 1, 2 and 4 -----------------------------------------------------------------------

def max_pairwise_distance(data, batch_size=2048, progress=False, device=None):
    """max_{i,j} ||x_i - x_j||, NCSNv2 technique 1's sigma_1, by blocks of torch.cdist (memory batch_size^2).

    data: (N, *event_shape), floating, or integer (uint8 images: the distance is then in their units, and only two
        blocks at a time are converted to float, so a set held as uint8 needs no float copy of itself).
    progress: show the blocks done (progress_bar); 60000 MNIST digits are 465 blocks, a wait on a CPU.
    device: where the distances are computed (default: data's device); data may then stay where it is, in host
        memory, and only two blocks at a time are on the device.
    """
    x = data.flatten(1)  # (N, D)
    device = torch.device(device) if device is not None else x.device
    dtype = torch.promote_types(data.dtype, torch.float32) if data.is_floating_point() else torch.float32
    best = torch.zeros((), dtype=dtype, device=device)
    n_blocks = math.ceil(len(x) / batch_size)
    with progress_bar(n_blocks * (n_blocks + 1) // 2, "sigma_1", enabled=progress, unit="block") as bar:
        for i in range(0, len(x), batch_size):
            block = x[i:i + batch_size].to(device, dtype)  # fp16 or uint8 data in fp32
            for j in range(i, len(x), batch_size):  # the upper triangle of blocks: distances are symmetric
                best = torch.maximum(best, torch.cdist(block, x[j:j + batch_size].to(device, dtype)).max())
                bar.update(1)
    return best.item()  # one host sync, at the end


def _normal_cdf(t):
    return 0.5 * math.erfc(-t / math.sqrt(2))


def sigma_ratio(dim):
    """NCSNv2 technique 2: gamma with Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma) = 0.5.

    Solved by bisection. The left side starts at 0.997 for gamma = 1 and falls to 0 only when sqrt(2D) > 3, so
    D >= 5 is needed; for 2-D toy data choose the sigmas by hand.
    """
    if dim < 5:
        raise ValueError(f"technique 2 has a solution only for dim >= 5 (sqrt(2D) > 3), got dim={dim}")
    a = math.sqrt(2 * dim)

    def excess(gamma):  # > 0 below the root, < 0 above it
        return _normal_cdf(a * (gamma - 1) + 3 * gamma) - _normal_cdf(a * (gamma - 1) - 3 * gamma) - 0.5

    lo, hi = 1.0, 2.0
    while excess(hi) > 0:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
        if hi - lo < 1e-14:
            break
    return (lo + hi) / 2


def recommended_sigmas(data, sigma_min=0.01, max_points=None, batch_size=2048, generator=None):
    """NCSNv2 techniques 1 and 2: geometric sigmas from sigma_1 = max distance to sigma_min with ratio <= gamma(D).

    data: training points, (N, *event_shape), a floating tensor in the range the model sees (images in [0, 1]).
    L = ceil(log(sigma_1 / sigma_min) / log gamma) + 1 levels, so the actual ratio is at most gamma.
    max_points: when N is larger, sigma_1 is taken over a random subset of that many points (drawn with
    generator); a subset can only underestimate the maximum distance.
    """
    if not data.is_floating_point():
        raise ValueError(f"data must be a floating tensor in the model's range (e.g. uint8 images / 255), "
                         f"got {data.dtype}")
    if data.dim() < 2 or len(data) < 2:
        raise ValueError(f"data must have shape (N, *event_shape) with N >= 2, got {tuple(data.shape)}")
    if max_points is not None and len(data) > max_points:
        data = data[torch.randperm(len(data), generator=generator)[:max_points].to(data.device)]
    sigma_max = max_pairwise_distance(data, batch_size)
    if not sigma_max > sigma_min:
        raise ValueError(f"the largest distance between data points, {sigma_max:g}, must exceed sigma_min={sigma_min}")
    gamma = sigma_ratio(data[0].numel())
    return geometric_sigmas(sigma_max, sigma_min, math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma)) + 1)


def recommended_step_size(sigmas, n_steps_each, dim=None):
    """NCSNv2 technique 4: the step size eps for which f(eps) of notes §10 comes closest to 1.

    f(eps) = (1 - eps/sigma_L^2)^(2T) (gamma^2 - 2 eps / (sigma_L^2 - sigma_L^2 (1 - eps/sigma_L^2)^2))
             + 2 eps / (sigma_L^2 - sigma_L^2 (1 - eps/sigma_L^2)^2),
    with T = n_steps_each and gamma = (sigma_1 / sigma_L)^(1/(L-1)), the ratio of geometric sigmas. With
    u = eps / sigma_L^2 the last fraction is 2 / (2 - u) >= 1, so f is a weighted mean of gamma^2 and 2 / (2 - u),
    both > 1: f never reaches 1 and the eps sought minimises f. A log-spaced grid over u, then a golden-section
    search between the grid neighbours of the best point. The dimension D cancels in NCSNv2's derivation of f;
    `dim` is accepted for symmetry with sigma_ratio and does not change the result.

    Convention: NCSNv2 derives f for its update x + alpha s + sqrt(2 alpha) z (f is the variance ratio
    s_T^2 / sigma_i^2 after T such steps on N(0, sigma_i^2 I)); this repository steps x + alpha/2 s + sqrt(alpha) z
    (notes §9), the same update with alpha halved. The returned step is therefore twice f's minimiser: for
    50 -> 0.01 in 232 levels and T = 5 it is 1.24e-5, which is NCSNv2's published 6.2e-6 in this convention.
    """
    sigmas = _check_sigmas(torch.as_tensor(sigmas, dtype=torch.float64).cpu())
    if len(sigmas) < 2:
        raise ValueError("technique 4 needs at least two sigmas (the ratio gamma between levels)")
    if n_steps_each < 1:
        raise ValueError(f"n_steps_each must be >= 1, got {n_steps_each}")
    if dim is not None and dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    sigma_last = float(sigmas[-1])
    gamma = float(sigmas[0] / sigmas[-1]) ** (1 / (len(sigmas) - 1))

    def f(u):  # u = eps / sigma_L^2 in (0, 1)
        return (1 - u) ** (2 * n_steps_each) * (gamma ** 2 - 2 / (2 - u)) + 2 / (2 - u)

    grid = torch.logspace(-12, 0, 4001, dtype=torch.float64)[:-1].tolist()  # u in [1e-12, 1)
    k = min(range(len(grid)), key=lambda i: f(grid[i]))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(100):  # golden-section search on [lo, hi]
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, b) if f(a) < f(b) else (a, hi)
    return 2 * (lo + hi) / 2 * sigma_last ** 2  # 2x: from NCSNv2's x + alpha s + sqrt(2 alpha) z to notes §9


# ---- The networks: technique 3 and the U-Net (§8, §10) -------------------------------------------------------

def _sigma_batch(sigma, x):
    """sigma as a (B,) tensor in at least fp32: a Python float, a 0-d tensor or a (B,) tensor is accepted."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # log sigma and the division stay in >= fp32 under autocast
    if not isinstance(sigma, torch.Tensor):
        if not 0 < float(sigma) < math.inf:
            raise ValueError(f"sigma must be > 0 and finite, got {sigma}")
        return torch.full(x.shape[:1], float(sigma), dtype=dtype, device=x.device)
    if sigma.dim() == 0:
        return sigma.to(x.device, dtype).expand(x.shape[0])
    if sigma.shape != x.shape[:1]:
        raise ValueError(f"sigma must be a float or a tensor of shape () or ({x.shape[0]},), got {tuple(sigma.shape)}")
    return sigma.to(x.device, dtype)


def _noise_features(sigma, n):
    """(B,) sigma -> (B, 2 * (n // 2)) sines and cosines of log sigma, the networks' conditioning input.

    Angular frequencies are geometric from 0.01 to 100 per unit of log sigma: the lowest stays below pi across
    sigma in [1e-3, 1e3], so no two levels of a practical range alias, and the highest turns by more than
    3 radians between neighbouring levels of NCSNv2's ratio 1.04, so the network can tell them apart.
    """
    freqs = torch.logspace(-2, 2, n // 2, device=sigma.device, dtype=sigma.dtype)  # (n/2,)
    angles = torch.outer(sigma.log(), freqs)  # (B, n/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _norm(channels):
    # 32 groups as in DDPM, fewer for narrow networks: a group keeps >= 4 channels, since a group of one channel
    # would subtract away the per-channel shift by which the noise embedding enters each residual block. The last
    # gcd makes the count divide any width (9 channels: 1 group of 9); it changes nothing where 32, c // 4 did.
    return nn.GroupNorm(math.gcd(math.gcd(32, max(channels // 4, 1)), channels), channels)


def _zero(module):
    """Zero a layer's weight and bias: the residual branch (or the whole output) starts at exactly 0."""
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; + the noise embedding (if conditional); GroupNorm, SiLU, dropout, conv; + the input
    (1x1-projected when the width changes)."""

    def __init__(self, in_channels, out_channels, dropout, embed_dim=None):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embed = nn.Linear(embed_dim, out_channels) if embed_dim else None
        self.norm2, self.dropout = _norm(out_channels), nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, emb=None):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        if self.embed is not None:
            h = h + rearrange(self.embed(emb), "b c -> b c 1 1")
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Self-attention over the H*W positions, heads of 64 channels (one head when C isn't a multiple of 64)."""

    def __init__(self, channels):
        super().__init__()
        self.heads = channels // 64 if channels % 64 == 0 else 1
        self.norm, self.qkv = _norm(channels), nn.Conv2d(channels, 3 * channels, 1)
        self.out = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        # q, k, v with each head's channels contiguous (stride 1), which the fused kernels of
        # scaled_dot_product_attention require (in the default layout the channels are H*W apart, and SDPA would fall
        # back to its math kernel). So the block runs in channels_last: free where training already uses it (GPUs),
        # in the default layout one copy of the normalised input, a third the size of the qkv map; on a CPU the 1x1
        # convolutions' channels_last path (oneDNN) also makes the layer's forward + backward 15-20% faster.
        x_norm = self.norm(x).contiguous(memory_format=torch.channels_last)  # (B, C, H, W), channels last
        qkv = rearrange(self.qkv(x_norm), "b c h w -> b (h w) c")  # (B, H*W, 3C), a view (no copy: contiguous)
        q, k, v = rearrange(qkv.contiguous(), "b n (three heads d) -> three b heads n d", three=3, heads=self.heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, C/heads): flash / memory-efficient kernels
        # The fused kernels store h as (B, H*W, heads, C/heads), so the out conv's input is channels_last again, a
        # view; the sum keeps x's layout.
        return x + self.out(rearrange(h, "b heads (h w) d -> b (heads d) h w", h=x.shape[2]))


def _layer(block, attention):
    """A residual block and the self-attention after it (nn.Identity where its level has none)."""
    return nn.ModuleDict(dict(block=block, attention=attention))


class NCSN(nn.Module):
    """Noise-conditional U-Net s_theta(x, sigma) = net(x, log sigma) / sigma (notes §8, §10).

    The DDPM U-Net [Ho et al. 2020]. Down: len(channel_mults) levels of num_res_blocks residual blocks (channels *
    mult wide), each followed by self-attention where the feature map is in attn_resolutions, and a strided conv
    between levels. Middle: block, attention, block. Up: the mirror levels with one block more, each block eating
    the down path's activation of the same place (the skip connections), and nearest + conv upsampling.

    Technique 3: the output is divided by sigma, so the network only produces sigma * score, whose target -z has
    unit scale at every level. conditional=True (the default) also feeds log sigma into every residual block, through
    sinusoidal features and an MLP, as NCSN++ does [Song et al. 2021]; conditional=False is technique 3 as the notes
    write it, s_theta(x, sigma) = net(x) / sigma with an unconditional network, so sigma * s_theta(x, sigma) does
    not depend on sigma. Any sigma > 0 is accepted, not just the training levels.

    attn_resolutions: feature-map sizes (H at a level) that get self-attention, for inputs of image_size x
        image_size. The attention layers belong to levels: other input sizes (any H, W divisible by
        2^(len(channel_mults) - 1)) run with attention at the same levels.
    Initialisation (as in DDPM): the last conv of every residual branch, every attention output and the output conv
    are zero, so each block starts as the identity and the score starts at exactly 0, where the sigma^2-weighted
    loss is 1/2 ||z||^2 (D/2 on average) at every level: no level starts with a huge loss.
    """

    def __init__(self, in_channels=3, channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, image_size=32, conditional=True):
        super().__init__()
        sizes = [image_size // 2 ** level for level in range(len(channel_mults))]
        if image_size % 2 ** (len(channel_mults) - 1) or any(r not in sizes for r in attn_resolutions):
            raise ValueError(f"attn_resolutions must be among the level sizes {sizes} of image_size={image_size}, "
                             f"got {tuple(attn_resolutions)}; pass the training image size as image_size")
        self.in_channels, self.n_down = in_channels, len(channel_mults) - 1
        embed_dim = 4 * channels if conditional else None
        self.embed = nn.Sequential(nn.Linear(2 * max(channels // 2, 1), embed_dim), nn.SiLU(),
                                   nn.Linear(embed_dim, embed_dim)) if conditional else None  # log sigma features
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        def attention(level, c):
            return Attention(c) if sizes[level] in attn_resolutions else nn.Identity()

        # Down path: a level is its layers (a block and its attention) and a strided conv; the width after every
        # layer and every downsampling is kept, for the skip connection it leaves.
        self.down, skips, c = nn.ModuleList(), [channels], channels
        for level, mult in enumerate(channel_mults):
            layers = nn.ModuleList()
            for _ in range(num_res_blocks):
                block, c = ResBlock(c, channels * mult, dropout, embed_dim), channels * mult
                layers.append(_layer(block, attention(level, c)))
                skips.append(c)
            last = level == self.n_down
            if not last:
                skips.append(c)
            downsample = nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1)  # (B, C, H/2, W/2)
            self.down.append(nn.ModuleDict(dict(layers=layers, resample=downsample)))
        self.mid_block1, self.mid_attention = ResBlock(c, c, dropout, embed_dim), Attention(c)
        self.mid_block2 = ResBlock(c, c, dropout, embed_dim)
        # Up path: one layer more per level than on the way down, each eating one skip; then nearest + conv.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            layers = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                block, c = ResBlock(c + skips.pop(), channels * mult, dropout, embed_dim), channels * mult
                layers.append(_layer(block, attention(level, c)))
            upsample = nn.Identity() if level == 0 else nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1))  # (B, C, 2H, 2W)
            self.up.append(nn.ModuleDict(dict(layers=layers, resample=upsample)))
        self.norm_out, self.conv_out = _norm(c), _zero(nn.Conv2d(c, in_channels, 3, padding=1))

    def forward(self, x, sigma):
        """s_theta(x, sigma) = net(x, log sigma) / sigma (technique 3); x (B, C, H, W), sigma (B,), 0-d or a float."""
        factor = 2 ** self.n_down
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"NCSN expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"NCSN expects H and W divisible by {factor} (len(channel_mults)-1 downsamplings), "
                             f"got {x.shape[2]}x{x.shape[3]}")
        sigma = _sigma_batch(sigma, x)  # (B,)
        emb = None
        if self.embed is not None:
            emb = F.silu(self.embed(_noise_features(sigma, self.embed[0].in_features).to(x.dtype)))  # (B, 4 * ch)

        h = self.conv_in(x)  # (B, channels, H, W)
        skips = [h]
        for i, level in enumerate(self.down):
            for layer in level["layers"]:
                h = layer["attention"](layer["block"](h, emb))
                skips.append(h)
            if i < self.n_down:
                h = level["resample"](h)
                skips.append(h)
        h = self.mid_block2(self.mid_attention(self.mid_block1(h, emb)), emb)
        for level in self.up:
            for layer in level["layers"]:
                h = layer["attention"](layer["block"](torch.cat([h, skips.pop()], dim=1), emb))
            h = level["resample"](h)  # the identity at the top level
        h = self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)
        return h / _expand_like(sigma, h)


class MLPScoreNet(nn.Module):
    """s_theta(x, sigma) = mlp([x, features(log sigma)]) / sigma for vectors (notes §8; the 2-D toy of NCSN).

    n_layers hidden layers of `hidden` Softplus units (the toy reference is 2-128-128-2), the sinusoidal features
    of log sigma concatenated to the input, the output divided by sigma (technique 3) and its last layer zero, so
    the score starts at 0.
    """

    def __init__(self, dim, hidden=128, n_layers=2, n_features=32):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.dim, self.n_features = dim, n_features
        widths = [dim + 2 * (n_features // 2)] + [hidden] * n_layers
        layers = [m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.Softplus())]
        self.net = nn.Sequential(*layers, _zero(nn.Linear(hidden, dim)))

    def forward(self, x, sigma):
        """s_theta(x, sigma) = net(x, log sigma) / sigma (technique 3); x (B, dim), sigma (B,), 0-d or a float."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLPScoreNet expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        sigma = _sigma_batch(sigma, x)  # (B,)
        h = torch.cat([x, _noise_features(sigma, self.n_features).to(x.dtype)], dim=1)  # (B, dim + n_features)
        out = self.net(h)  # (B, dim)
        return out / _expand_like(sigma, out)


# ---- Technique 5: an exponential moving average of the weights (§10) ------------------------------------------

def _unwrap(model):
    """The plain module under torch.compile's and DistributedDataParallel's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class EMA:
    """Exponential moving average of the weights (notes §10; NCSNv2 samples with decay 0.999).

    e_0 = theta_0 (a copy at construction, as NCSNv2's EMAHelper), then after each optimiser step
    e_k = decay * e_{k-1} + (1 - decay) * theta_k, for parameters and floating buffers alike (other buffers are
    copied). `.module` is the averaged copy, in eval mode without gradients, for evaluation and sampling.
    state_dict() is that copy's state dict, so it loads straight into a fresh model of the same architecture.

    The arithmetic is torch.optim.swa_utils.get_ema_multi_avg_fn's fused lerp, in the dtype of the weights: fp32
    under bf16 autocast, which keeps fp32 master weights. AveragedModel itself isn't used: it reads its step
    counter n_averaged with bool() at every update (a device sync per training step once the counter is on a GPU)
    and replaces the average by the weights at the first update.
    """

    def __init__(self, model, decay=0.999):
        if not 0 <= decay <= 1:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)
        self._average = torch.optim.swa_utils.get_ema_multi_avg_fn(self.decay)

    @torch.no_grad()
    def update(self, model):
        """e <- decay * e + (1 - decay) * theta, for every parameter and floating buffer of model."""
        model = _unwrap(model)
        ema = [*self.module.parameters(), *self.module.buffers()]
        new = [*model.parameters(), *model.buffers()]
        if len(ema) != len(new):
            raise ValueError(f"EMA.update got a model with {len(new)} tensors, the average holds {len(ema)}")
        floats = [(e, t) for e, t in zip(ema, new) if e.is_floating_point()]
        if floats:
            self._average([e for e, _ in floats], [t.detach() for _, t in floats], None)
        for e, t in zip(ema, new):
            if not e.is_floating_point():
                e.copy_(t)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state_dict):
        return self.module.load_state_dict(state_dict)
