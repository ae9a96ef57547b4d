"""Langevin and annealed Langevin dynamics: notes §6, §7 and §9.

§6, unadjusted Langevin dynamics, with the score in place of grad log p:

    x_{t+1} = x_t + (step_size / 2) * score(x_t) + sqrt(step_size) * z_t,    z_t ~ N(0, I).

It samples p only as step_size -> 0 and T -> inf; at a finite step its stationary law is slightly off
(no Metropolis-Hastings correction), and between well separated modes it mixes so slowly that the chains
keep whatever split between the modes they started with (§7).

§9, annealed Langevin dynamics [Song & Ermon 2019, Algorithm 1]: run T = n_steps_each steps of the update
above at each noise level sigma_1 > ... > sigma_L of a noise-conditional score s(x, sigma) ≈ grad log q_sigma(x),
with step alpha_i = step_size * sigma_i^2 / sigma_L^2, then [Song & Ermon 2020] one denoising step
x + sigma_L^2 s(x, sigma_L) (Tweedie's formula: E[x_0 | x] for x = x_0 + sigma_L z).

Two tasks of the papers run the same chain: inpainting [Song & Ermon 2019, Figure 6] holds the known entries at
fresh draws of their noisy versions, so the free ones follow the conditional; interpolation [Song & Ermon 2020]
runs chains from one start whose noise turns from one stream to another, cos(a) z_p + sin(a) z_q.

`python langevin.py` redraws Figure 3 of [Song & Ermon 2019] (§7) with the exact scores of
p = 1/5 N((-5, -5), I) + 4/5 N((5, 5), I) and of the authors' annealed versions of it (the mixture whose modes have
standard deviation sigma, for sigma = 20 -> 1): Langevin keeps the wrong mode weights, annealed Langevin recovers
them, with unit-variance modes. It prints each panel's mode weights and per-mode variances.
"""
import math

import torch


def _check_chain(step_size, n_steps, n_steps_name, generator, noise, noise_shape):
    """The checks every sampler here shares; returns step_size as a float. A pre-drawn noise tensor must hold
    standard normal draws of shape noise_shape (one draw of x's shape per step, for the plain samplers)."""
    step_size = float(step_size)
    if not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be a finite number > 0, got {step_size}")
    if n_steps < 0:
        raise ValueError(f"{n_steps_name} must be >= 0, got {n_steps}")
    if noise is not None and generator is not None:
        raise ValueError("pass either generator or noise, not both")
    if noise is not None and noise.shape != noise_shape:
        raise ValueError(f"noise must have shape {tuple(noise_shape)}, got {tuple(noise.shape)}")
    return step_size


@torch.no_grad()
def langevin_dynamics(score_fn, x, step_size, n_steps, generator=None, noise=None, callback=None):
    """Langevin dynamics (notes §6): x <- x + (step_size / 2) score(x) + sqrt(step_size) z, n_steps times.

    score_fn: maps x of shape (B, *event_shape) to a score of the same shape.
    x: the starting points, (B, D) or (B, C, H, W); not modified (the chains run on a copy).
    step_size: epsilon in the notes' convention, > 0. The NCSN authors' code steps `x + alpha s + sqrt(2 alpha) z`,
        which is this update with step_size = 2 alpha.
    n_steps: T >= 0; with 0 steps a copy of x comes back.
    generator: optional torch.Generator (on x's device) for the noise, so that a seed fixes the samples.
    noise: optional pre-drawn standard normal tensor of shape (n_steps, *x.shape); step t adds noise[t].
    callback: optional callback(step, x), called after each step with the step index (0 .. n_steps - 1) and the
        current x; x is updated in place afterwards, so clone it to keep it.
    Returns x after n_steps steps, same shape as the input.
    """
    step_size = _check_chain(step_size, n_steps, "n_steps", generator, noise, (n_steps, *x.shape))

    half_step, sqrt_step = step_size / 2, math.sqrt(step_size)
    x = x.clone()  # the working copy, updated in place below
    z = torch.empty_like(x) if noise is None else None  # one noise buffer, refilled at every step
    for t in range(n_steps):
        x.add_(score_fn(x), alpha=half_step)
        # normal_ on a buffer draws the same numbers as torch.randn(x.shape, generator=generator), without allocating
        x.add_(z.normal_(generator=generator) if noise is None else noise[t], alpha=sqrt_step)
        if callback is not None:
            callback(t, x)
    return x


def _as_sigma_list(sigmas):
    """Check sigmas (a 1-D tensor or a sequence of floats) and return them as Python floats, descending."""
    if isinstance(sigmas, torch.Tensor):
        if sigmas.dim() != 1:
            raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
        sigmas = sigmas.tolist()  # the one host sync of a sampling run
    sigmas = [float(s) for s in sigmas]
    if not sigmas:
        raise ValueError("sigmas must hold at least one noise level, got none")
    if not all(s > 0 and math.isfinite(s) for s in sigmas):
        raise ValueError(f"sigmas must be finite and > 0, got {sigmas}")
    if any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sigmas must be strictly descending (sigma_1 > ... > sigma_L), got {sigmas}")
    return sigmas


@torch.no_grad()
def annealed_langevin_dynamics(score_fn, x, sigmas, step_size, n_steps_each, denoise=True, generator=None,
                               noise=None, callback=None):
    """Annealed Langevin dynamics (notes §9): Algorithm 1 of Song & Ermon (2019), then Tweedie's denoising step.

    For each level i: alpha_i = step_size * sigma_i^2 / sigma_L^2, then n_steps_each times
    x <- x + (alpha_i / 2) score_fn(x, sigma_i) + sqrt(alpha_i) z. With denoise, finally
    x <- x + sigma_L^2 score_fn(x, sigma_L) [Song & Ermon 2020], the posterior mean E[x_0 | x] by Tweedie's formula.

    score_fn: noise-conditional score, score_fn(x, sigma) with sigma a tensor of shape (B,) filled with sigma_i.
    x: the starting points (usually uniform noise), (B, D) or (B, C, H, W); not modified.
    sigmas: 1-D tensor or sequence of floats, strictly descending and positive.
    step_size: the step at the last level, alpha_L (the paper's epsilon), > 0. The NCSN authors' code steps
        `x + alpha s + sqrt(2 alpha) z`, which is this update with step_size doubled.
    n_steps_each: T >= 0 steps per level; with 0 only the denoising step (if any) is taken.
    generator, noise: as in langevin_dynamics; noise has shape (L * n_steps_each, *x.shape).
    callback: optional callback(step, x), called after each update of x with the global step index
        (0 .. L * n_steps_each - 1 for the Langevin steps, then L * n_steps_each for the denoising step).
    Returns the samples, same shape as x.
    """
    sigmas = _as_sigma_list(sigmas)
    step_size = _check_chain(step_size, n_steps_each, "n_steps_each", generator, noise,
                            (len(sigmas) * n_steps_each, *x.shape))

    sigma_last = sigmas[-1]
    x = x.clone()  # the working copy, updated in place below
    z = torch.empty_like(x) if noise is None else None  # one noise buffer, refilled at every step
    step = 0
    for sigma_i in sigmas:
        alpha = step_size * sigma_i ** 2 / sigma_last ** 2  # larger steps at larger noise, same signal-to-noise
        half_alpha, sqrt_alpha = alpha / 2, math.sqrt(alpha)
        sigma = torch.full(x.shape[:1], sigma_i, dtype=x.dtype, device=x.device)  # (B,)
        for _ in range(n_steps_each):
            x.add_(score_fn(x, sigma), alpha=half_alpha)
            x.add_(z.normal_(generator=generator) if noise is None else noise[step], alpha=sqrt_alpha)
            if callback is not None:
                callback(step, x)
            step += 1
    if denoise:
        sigma = torch.full(x.shape[:1], sigma_last, dtype=x.dtype, device=x.device)  # (B,)
        x.add_(score_fn(x, sigma), alpha=sigma_last ** 2)
        if callback is not None:
            callback(step, x)
    return x


def _broadcast_to(t, x, name):
    """t as a tensor of x's dtype and device that broadcasts against x without changing x's shape."""
    t = torch.as_tensor(t, device=x.device)
    try:
        if torch.broadcast_shapes(t.shape, x.shape) == x.shape:
            return t
    except RuntimeError:
        pass
    raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast against x of shape {tuple(x.shape)}")


@torch.no_grad()
def annealed_langevin_inpainting(score_fn, x, known, mask, sigmas, step_size, n_steps_each, denoise=True,
                                 generator=None, noise=None, callback=None):
    """Inpainting by annealed Langevin dynamics [Song & Ermon 2019, Section 6 and Figure 6]: Algorithm 1 in which,
    before every update at level i, the known entries (mask == 1) are set to known + sigma_i z, with a fresh z.

    At level i the chain then runs on q_sigma_i with the known entries held at a draw of their own noisy version, so
    the free entries follow q_sigma_i(x_free | x_known) with x_known ~ N(known, sigma_i^2 I): the noised conditional,
    which becomes the data's p(x_free | x_known = known) as sigma_i -> 0. Drawing x_known anew at every step, not once
    per level, is the NCSN authors' code (NCSNv2 `anneal_Langevin_dynamics_inpainting`). With denoise, the known
    entries are re-noised at sigma_L once more before the denoising step x + sigma_L^2 s(x, sigma_L), the posterior mean
    of the free entries. The result holds `known` exactly where mask == 1.

    score_fn, sigmas, step_size, n_steps_each, denoise, generator, callback: as in annealed_langevin_dynamics (the
        step at level i is alpha_i = step_size sigma_i^2 / sigma_L^2, the update x + alpha_i/2 s + sqrt(alpha_i) z).
    x: the starting points (B, *event_shape), e.g. uniform noise; its known entries are replaced before the first
        update, so only the free ones matter. Not modified.
    known: the observed values, broadcasting against x (e.g. (B, C, H, W), or one image (1, C, H, W) for every chain);
        read only where mask == 1.
    mask: 1 (or True) where the value is known, 0 where it is to be drawn; broadcasts against x: per pixel
        (B, 1, H, W), per channel and pixel (B, C, H, W), or one mask for all (1, *event_shape).
    noise: optional pre-drawn standard normal tensor of shape (L * n_steps_each + denoise, 2, *x.shape): before update
        t the known entries become known + sigma noise[t, 0], and noise[t, 1] is its Langevin noise (the denoising
        update uses noise[t, 0] only).
    Returns the completed samples, same shape as x.
    """
    sigmas = _as_sigma_list(sigmas)
    n_updates = len(sigmas) * n_steps_each + bool(denoise)
    step_size = _check_chain(step_size, n_steps_each, "n_steps_each", generator, noise, (n_updates, 2, *x.shape))
    known = _broadcast_to(known, x, "known").to(x.dtype)
    mask = _broadcast_to(mask, x, "mask")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold only 0 (to be drawn) and 1 (known)")
    mask = mask.bool()

    sigma_last = sigmas[-1]
    x = x.clone()  # the working copy
    z = torch.empty_like(x) if noise is None else None  # one noise buffer, refilled at every draw
    updates = [sigma_i for sigma_i in sigmas for _ in range(n_steps_each)] + ([None] if denoise else [])
    for step, sigma_i in enumerate(updates):  # sigma_i None: the denoising update
        level = sigma_last if sigma_i is None else sigma_i
        sigma = torch.full(x.shape[:1], level, dtype=x.dtype, device=x.device)  # (B,)
        known_noise = z.normal_(generator=generator) if noise is None else noise[step, 0]
        x = torch.where(mask, known + level * known_noise, x)  # the known entries: a fresh draw of q_sigma_i
        if sigma_i is None:  # Tweedie's formula, as in annealed_langevin_dynamics
            x.add_(score_fn(x, sigma), alpha=sigma_last ** 2)
        else:
            alpha = step_size * sigma_i ** 2 / sigma_last ** 2
            x.add_(score_fn(x, sigma), alpha=alpha / 2)
            x.add_(z.normal_(generator=generator) if noise is None else noise[step, 1], alpha=math.sqrt(alpha))
        if callback is not None:
            callback(step, x)
    return torch.where(mask, known, x)  # the known entries exactly, not their last noisy draw


@torch.no_grad()
def annealed_langevin_interpolation(score_fn, x, sigmas, step_size, n_steps_each, n_interpolations, denoise=True,
                                    generator=None, noise=None, callback=None):
    """Interpolation between samples by annealed Langevin dynamics [Song & Ermon 2020, NCSNv2's
    `anneal_Langevin_dynamics_interpolation`]: from each start x_r, n_interpolations chains of Algorithm 1 whose
    Langevin noise at every step is cos(a_j) z_p + sin(a_j) z_q, with z_p, z_q two noise streams of the row and
    a_j = j / (n_interpolations - 1) * pi / 2.

    Since cos^2 + sin^2 = 1 each chain's noise is standard normal, so every chain is a plain sampling chain; chains
    with nearby angles share their start and nearly all their noise, so their samples change smoothly along the row,
    from the chain driven by z_p alone (a = 0) to the chain driven by z_q alone (a = pi/2).

    score_fn, sigmas, step_size, n_steps_each, denoise, generator, callback: as in annealed_langevin_dynamics (the
        score sees all R * n_interpolations chains as one batch).
    x: the starts, (R, *event_shape), one per row; not modified.
    n_interpolations: chains per row, >= 2.
    noise: optional pre-drawn standard normal tensor of shape (L * n_steps_each, 2, *x.shape): noise[t, 0] is z_p and
        noise[t, 1] is z_q at step t.
    Returns (R, n_interpolations, *event_shape).
    """
    sigmas = _as_sigma_list(sigmas)
    if n_interpolations < 2:
        raise ValueError(f"n_interpolations must be >= 2, got {n_interpolations}")
    step_size = _check_chain(step_size, n_steps_each, "n_steps_each", generator, noise,
                             (len(sigmas) * n_steps_each, 2, *x.shape))

    rows, event_dims = x.shape[0], [1] * (x.dim() - 1)
    angles = torch.linspace(0, math.pi / 2, n_interpolations, dtype=torch.float64)
    cos, sin = angles.cos(), angles.sin()
    cos[-1] = 0.0  # cos(pi/2) in floating point is 6e-17, not 0: the last chain is driven by z_q alone, exactly
    cos, sin = (w.to(x.device, x.dtype).reshape(1, -1, *event_dims) for w in (cos, sin))  # (1, N, 1, ..., 1)
    sigma_last = sigmas[-1]
    x = x.unsqueeze(1).repeat(1, n_interpolations, *event_dims).flatten(0, 1)  # (R * N, *event_shape), rows shared
    z = torch.empty(2, rows, *x.shape[1:], dtype=x.dtype, device=x.device) if noise is None else None  # z_p, z_q
    step = 0
    for sigma_i in sigmas:
        alpha = step_size * sigma_i ** 2 / sigma_last ** 2
        half_alpha, sqrt_alpha = alpha / 2, math.sqrt(alpha)
        sigma = torch.full(x.shape[:1], sigma_i, dtype=x.dtype, device=x.device)  # (R * N,)
        for _ in range(n_steps_each):
            z_p, z_q = z.normal_(generator=generator) if noise is None else noise[step]  # (R, *event_shape) each
            mixed = z_p.unsqueeze(1) * cos + z_q.unsqueeze(1) * sin  # (R, N, *event_shape)
            x.add_(score_fn(x, sigma), alpha=half_alpha)
            x.add_(mixed.flatten(0, 1), alpha=sqrt_alpha)
            if callback is not None:
                callback(step, x)
            step += 1
    if denoise:
        sigma = torch.full(x.shape[:1], sigma_last, dtype=x.dtype, device=x.device)
        x.add_(score_fn(x, sigma), alpha=sigma_last ** 2)
        if callback is not None:
            callback(step, x)
    return x.unflatten(0, (rows, n_interpolations))


# ---- Figure 3 of Song & Ermon (2019): the mixture `gmm` of notes §7 ----------------------------------------------

_GMM_MEANS = ((-5.0, -5.0), (5.0, 5.0))
_GMM_WEIGHTS = (0.2, 0.8)


def _gmm_score(x, sigma=1.0):
    """Exact score of the NCSN authors' annealed mixture at level sigma, 1/5 N((-5,-5), sigma^2 I) + 4/5 N((5,5),
    sigma^2 I) (their models/gmm.py, GMMDistAnneal): level sigma = 1 is p itself.

    For sigma >= 1 this level is p * N(0, (sigma^2 - 1) I), so the authors' levels 20 -> 1 are the noise levels
    sqrt(sigma^2 - 1) of notes §8, ending at 0. x: (B, 2); sigma: a float or a (B,) tensor. With the modes' shared
    variance v = sigma^2, grad log q = (sum_k r_k(x) mu_k - x) / v, where the responsibilities
    r_k = softmax_k(log w_k - |x - mu_k|^2 / 2v) drop the |x|^2 common to every mode and are normalised through
    logsumexp, so that points far from both modes (where every N_k(x) underflows) still get a finite score.
    """
    means = torch.tensor(_GMM_MEANS, dtype=x.dtype, device=x.device)  # (K, 2)
    log_weights = torch.tensor(_GMM_WEIGHTS, dtype=x.dtype, device=x.device).log()  # (K,)
    var = (torch.as_tensor(sigma, dtype=x.dtype, device=x.device) ** 2).reshape(-1, 1)  # (B, 1) or (1, 1)
    logits = log_weights + (x @ means.T - means.pow(2).sum(1) / 2) / var  # (B, K)
    resp = (logits - logits.logsumexp(dim=1, keepdim=True)).exp()  # (B, K)
    return (resp @ means - x) / var  # (B, 2)


def _gmm_sample(n, generator):
    """n exact samples of p: the mode by its weight, then unit Gaussian noise around it."""
    means = torch.tensor(_GMM_MEANS)
    k = torch.multinomial(torch.tensor(_GMM_WEIGHTS), n, replacement=True, generator=generator)  # (n,)
    return means[k] + torch.randn(n, 2, generator=generator)  # (n, 2)


def _mode_statistics(x):
    """Each mode's weight and the variance of each coordinate within it; a sample belongs to (-5,-5) when
    x1 + x2 < 0, else to (5,5). Returns [(weight, (var_x1, var_x2)), ...] in the order of _GMM_MEANS."""
    low = x.sum(1) < 0  # (n,)
    return [(float(members.float().mean()), tuple(x[members].var(0).tolist()) if members.sum() > 1 else (math.nan,) * 2)
            for members in (low, ~low)]


def figure3(n_samples=2000, seed=0):
    """The three panels of Figure 3 with the authors' toy settings (runners/toy_runner.py), in the notes' step
    convention, which is also theirs here: (a) exact samples of p; (b) Langevin dynamics, 1000 steps of 0.1 with p's
    score; (c) annealed Langevin dynamics over their levels 20 -> 1 (L = 10, T = 100, step_size 0.1, so alpha_L =
    0.1), whose last level is p itself. Both chains start uniform on [-8, 8]^2; neither takes a denoising step,
    as in the figure. Returns {title: (n_samples, 2) samples}."""
    sigmas = torch.logspace(math.log10(20.0), 0.0, 10).tolist()
    n_steps_each, step_size = 100, 0.1
    g = torch.Generator().manual_seed(seed)
    exact = _gmm_sample(n_samples, g)
    start = torch.rand(n_samples, 2, generator=g) * 16 - 8  # uniform on [-8, 8]^2
    langevin = langevin_dynamics(_gmm_score, start, step_size, len(sigmas) * n_steps_each, generator=g)
    annealed = annealed_langevin_dynamics(_gmm_score, start, sigmas, step_size, n_steps_each, denoise=False,
                                          generator=g)
    return {"(a) exact samples": exact, "(b) Langevin dynamics": langevin, "(c) annealed Langevin dynamics": annealed}


def main():
    import argparse
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description="Redraw Figure 3 of Song & Ermon (2019) with exact scores.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="figures/gmm_figure3.png", help="where to save the PNG")
    parser.add_argument("--n-samples", type=int, default=2000, help="samples per panel")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples, the start and the chains")
    args = parser.parse_args()
    if args.n_samples < 2:
        parser.error(f"--n-samples must be >= 2, got {args.n_samples}")

    panels = figure3(args.n_samples, args.seed)
    print(f"{args.n_samples} samples per panel; a sample belongs to the mode (-5,-5) when x1 + x2 < 0, else to (5,5)")
    print(f"  {'':32s} {'weights':>15s}   {'variance of x1, x2 in each mode':>34s}")
    print(f"  {'target':32s} {_GMM_WEIGHTS[0]:.3f} / {_GMM_WEIGHTS[1]:.3f}   "
          f"{'(1.000, 1.000) / (1.000, 1.000)':>34s}")
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), sharex=True, sharey=True)
    for ax, (title, x) in zip(axes, panels.items()):
        (w_low, var_low), (w_high, var_high) = _mode_statistics(x)
        variances = " / ".join(f"({a:.3f}, {b:.3f})" for a, b in (var_low, var_high))
        print(f"  {title:32s} {w_low:.3f} / {w_high:.3f}   {variances:>34s}")
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, color="tab:blue", linewidths=0)
        ax.set_title(f"{title}\nweights {w_low:.2f} / {w_high:.2f}", fontsize=11)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.set_xticks(range(-10, 11, 5))
        ax.set_yticks(range(-10, 11, 5))
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    fig.suptitle("p = 1/5 N((-5,-5), I) + 4/5 N((5,5), I), exact scores; (c) with the authors' levels 20 -> 1",
                 fontsize=12)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
