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

`python langevin.py` redraws Figure 3 of [Song & Ermon 2019] (§7) with the exact score of
p = 1/5 N((-5, -5), I) + 4/5 N((5, 5), I): Langevin keeps the wrong mode weights, annealed Langevin recovers them.
"""
import math

import torch


def _check_chain(step_size, n_steps, n_steps_name, x, generator, noise, total_steps):
    """The checks both samplers share; returns step_size as a float. A pre-drawn noise tensor must hold one standard
    normal draw per step: shape (total_steps, *x.shape)."""
    step_size = float(step_size)
    if not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be a finite number > 0, got {step_size}")
    if n_steps < 0:
        raise ValueError(f"{n_steps_name} must be >= 0, got {n_steps}")
    if noise is not None and generator is not None:
        raise ValueError("pass either generator or noise, not both")
    if noise is not None and noise.shape != (total_steps, *x.shape):
        raise ValueError(f"noise must have shape {(total_steps, *x.shape)} (one draw per step), "
                         f"got {tuple(noise.shape)}")
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
    step_size = _check_chain(step_size, n_steps, "n_steps", x, generator, noise, n_steps)

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
    step_size = _check_chain(step_size, n_steps_each, "n_steps_each", x, generator, noise, len(sigmas) * n_steps_each)

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


# ---- Figure 3 of Song & Ermon (2019): the two-mode mixture of notes §7 ---------------------------------------

_MEANS = ((-5.0, -5.0), (5.0, 5.0))
_WEIGHTS = (0.2, 0.8)


def _two_modes_score(x, sigma=0.0):
    """Exact score of q_sigma = 1/5 N((-5,-5), (1 + sigma^2) I) + 4/5 N((5,5), (1 + sigma^2) I); sigma = 0 is p.

    x: (B, 2); sigma: a float or a (B,) tensor. With the modes' shared variance v = 1 + sigma^2,
    grad log q = (sum_k r_k(x) mu_k - x) / v, where the responsibilities r_k = softmax_k(log w_k - |x - mu_k|^2 / 2v)
    drop the |x|^2 common to every mode and are normalised through logsumexp, so that points far from both modes
    (where every N_k(x) underflows) still get a finite score.
    """
    means = torch.tensor(_MEANS, dtype=x.dtype, device=x.device)  # (K, 2)
    log_weights = torch.tensor(_WEIGHTS, dtype=x.dtype, device=x.device).log()  # (K,)
    var = (1 + torch.as_tensor(sigma, dtype=x.dtype, device=x.device) ** 2).reshape(-1, 1)  # (B, 1) or (1, 1)
    logits = log_weights + (x @ means.T - means.pow(2).sum(1) / 2) / var  # (B, K)
    resp = (logits - logits.logsumexp(dim=1, keepdim=True)).exp()  # (B, K)
    return (resp @ means - x) / var  # (B, 2)


def _two_modes_sample(n, generator):
    """n exact samples of p: the mode by its weight, then unit Gaussian noise around it."""
    means = torch.tensor(_MEANS)
    k = torch.multinomial(torch.tensor(_WEIGHTS), n, replacement=True, generator=generator)  # (n,)
    return means[k] + torch.randn(n, 2, generator=generator)  # (n, 2)


def _mode_weights(x):
    """Fractions of samples nearer (-5,-5) and nearer (5,5), split by the sign of x1 + x2."""
    n_low = (x.sum(1) < 0).sum().item()
    return n_low / len(x), 1 - n_low / len(x)


def main():
    import argparse
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description="Redraw Figure 3 of Song & Ermon (2019) with exact scores.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="figures/two_modes.png", help="where to save the PNG")
    parser.add_argument("--n-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # The paper's toy settings: sigmas geometric 20 -> 1, L = 10, T = 100, step_size 0.1 (notes, reference table).
    sigmas = torch.logspace(math.log10(20.0), 0.0, 10).tolist()
    n_steps_each, step_size = 100, 0.1
    g = torch.Generator().manual_seed(args.seed)
    exact = _two_modes_sample(args.n_samples, g)
    start = torch.rand(args.n_samples, 2, generator=g) * 16 - 8  # uniform on [-8, 8]^2
    # Plain Langevin with as many steps, at the step the annealed chain ends with (fine for the unit-variance modes).
    langevin = langevin_dynamics(_two_modes_score, start, step_size, len(sigmas) * n_steps_each, generator=g)
    # No final denoising here: Figure 3 shows the Langevin chains themselves (Tweedie would shrink each mode).
    annealed = annealed_langevin_dynamics(_two_modes_score, start, sigmas, step_size, n_steps_each,
                                          denoise=False, generator=g)

    panels = [("(a) exact samples", exact), ("(b) Langevin dynamics", langevin),
              ("(c) annealed Langevin dynamics", annealed)]
    # (c) ends by sampling q_sigma at sigma_L = 1, whose modes have variance 1 + 1 = 2: wider than (a), as it should.
    print(f"mode weights: fraction of {args.n_samples} samples near (-5,-5) / near (5,5), "
          f"by the sign of x1 + x2; target {_WEIGHTS[0]:.3f} / {_WEIGHTS[1]:.3f}")
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), sharex=True, sharey=True)
    for ax, (title, x) in zip(axes, panels):
        low, high = _mode_weights(x)
        print(f"  {title:32s} {low:.4f} / {high:.4f}")
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, color="tab:blue", linewidths=0)
        ax.set_title(f"{title}\nweights {low:.2f} / {high:.2f}", fontsize=11)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.set_xticks(range(-10, 11, 5))
        ax.set_yticks(range(-10, 11, 5))
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    fig.suptitle("p = 1/5 N((-5,-5), I) + 4/5 N((5,5), I), exact scores", fontsize=12)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
