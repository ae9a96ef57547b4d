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

`python langevin.py` redraws the three problems of naive score-based modelling (§7) into figures/:
- gmm_figure3.png, Figure 3 of [Song & Ermon 2019] (slow mixing), with the exact scores of
  p = 1/5 N((-5, -5), I) + 4/5 N((5, 5), I) and of the authors' annealed versions of it (the mixture whose modes have
  standard deviation sigma, for sigma = 20 -> 1): Langevin keeps the wrong mode weights, annealed Langevin recovers
  them, with unit-variance modes. It prints each panel's mode weights and per-mode variances.
- gmm_score_fields.png, Figure 2 of [Song & Ermon 2019] (low density regions): grad log p of the same mixture beside
  a small network s_theta trained without noise levels; the Fisher divergence 1/2 E_p |s_theta - grad log p|^2 that
  training minimises is small, the same error where p is small is large. It prints both.
- manifold_scores.png (the manifold hypothesis): p uniform on a circle has no score off it; the score of
  q_sigma = p * N(0, sigma^2 I) points to the circle with size distance / sigma^2. It prints the largest size.
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
    """t as a tensor on x's device, checked to broadcast against x without changing x's shape."""
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

    The score thus sees the known entries at a new draw of their noisy version at every step, and the free entries
    move under the drift averaged over those draws: for Gaussian data the drift of q_sigma_i(x_free | x_known = known)
    exactly (the score is linear in x_known), for any data the conditional p(x_free | x_known = known) as sigma_i -> 0.
    The 2019 paper's inpainting (its appendix and code) draws the noisy known values once per level and resets them
    after every step; this is NCSNv2's code (`anneal_Langevin_dynamics_inpainting`), which draws them anew before
    every step. Unlike both, a denoising step ends the chain by default, as in annealed_langevin_dynamics: the known
    entries are re-noised at sigma_L once more, then x + sigma_L^2 s(x, sigma_L), the posterior mean of the free
    entries. The result holds `known` exactly where mask == 1.

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

    Since cos^2 + sin^2 = 1 each chain's noise is standard normal, so every chain is a plain sampling chain; two
    chains of a row at angles a and b share their start and have noise correlated by cos(a - b), which turns smoothly
    from the chain driven by z_p alone (a = 0) to the chain driven by z_q alone (a = pi/2). The samples need not
    change smoothly: the chain amplifies small differences of noise at the large sigmas. Unlike NCSNv2's code, a
    denoising step ends the chains by default, as in annealed_langevin_dynamics.

    score_fn, sigmas, step_size, n_steps_each, denoise, generator, callback: as in annealed_langevin_dynamics (the
        score and the callback see all R * n_interpolations chains as one flat batch (R * N, *event_shape), row by
        row).
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


# ---- Figure 2 of Song & Ermon (2019): scores are learned only where the data is (notes §7) -----------------------

def _gmm_log_density(x):
    """log p(x) of the mixture at level 1, log sum_k w_k N(x; mu_k, I); x: (B, 2) -> (B,)."""
    means = torch.tensor(_GMM_MEANS, dtype=x.dtype, device=x.device)  # (K, 2)
    log_weights = torch.tensor(_GMM_WEIGHTS, dtype=x.dtype, device=x.device).log()  # (K,)
    return (log_weights - (x[:, None, :] - means).pow(2).sum(-1) / 2).logsumexp(dim=1) - math.log(2 * math.pi)


def _box_grid(n, half_width, dtype=torch.float32):
    """The n x n grid over [-half_width, half_width]^2, row by row (x1 varies fastest): (n * n, 2)."""
    ticks = torch.linspace(-half_width, half_width, n, dtype=dtype)
    x2, x1 = torch.meshgrid(ticks, ticks, indexing="ij")
    return torch.stack([x1, x2], dim=-1).reshape(-1, 2)


def figure2(n_steps=2000, sigma=0.1, batch_size=512, lr=3e-3, hidden=128, n_grid=20, low_density=1e-3, seed=0):
    """Figure 2 of [Song & Ermon 2019, Section 3.2.1] (notes §7, low density regions): a score network s_theta(x)
    without noise levels, trained on exact samples of p = 1/5 N((-5,-5), I) + 4/5 N((5,5), I), matches grad log p
    near the modes and not between them, because its objective, the Fisher divergence 1/2 E_p |s_theta - grad log
    p|^2, weighs each x by p(x).

    Training is plain denoising score matching (notes §4) at one small sigma, 1/2 E |s_theta(x + sigma z) +
    z/sigma|^2, whose minimiser grad log q_sigma is grad log p up to O(sigma^2) (the authors' toy runner used sliced
    score matching without noise; either leaves the region between the modes untrained); Adam with a learning rate
    decaying linearly to 0.
    The error 1/2 |s_theta - grad log p|^2 is averaged (a) under p, over 10^4 fresh samples; (b) uniformly over
    [-8, 8]^2 and (c) over its part where p < low_density * max p, both on a 161 x 161 grid.
    Returns {"points": (n_grid^2, 2) arrow positions, the centres of n_grid^2 tiles of [-8, 8]^2, "score":
    grad log p there, "learned": s_theta there, "s_theta": the network, "error_p", "error_box", "error_low": (a),
    (b), (c), "low_fraction": the fraction of the box where p < low_density * max p}.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the network's initialisation from the seed, the global RNG untouched
        torch.manual_seed(seed)
        s_theta = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
                                      torch.nn.SiLU(), torch.nn.Linear(hidden, 2))  # R^2 -> R^2, no sigma input
    optimizer = torch.optim.Adam(s_theta.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / max(n_steps, 1))
    for _ in range(n_steps):
        x = _gmm_sample(batch_size, g)  # (B, 2), exact samples of p
        z = torch.randn(x.shape, generator=g)  # (B, 2)
        loss = 0.5 * (s_theta(x + sigma * z) + z / sigma).pow(2).sum(1).mean()  # denoising score matching
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()

    with torch.no_grad():
        error = lambda x: 0.5 * (s_theta(x) - _gmm_score(x)).pow(2).sum(1)  # noqa: E731  (B,)
        box = _box_grid(161, 8.0)  # (161^2, 2)
        log_p_max = _gmm_log_density(torch.tensor(_GMM_MEANS)).max()  # at the heavy mode's centre
        low = _gmm_log_density(box) < log_p_max + math.log(low_density)  # (161^2,)
        error_box = error(box)
        points = _box_grid(n_grid, 8.0 * (1 - 1 / n_grid))  # the centres of n_grid x n_grid tiles of the box
        return {"points": points, "score": _gmm_score(points), "learned": s_theta(points), "s_theta": s_theta,
                "error_p": error(_gmm_sample(10_000, g)).mean().item(), "error_box": error_box.mean().item(),
                "error_low": error_box[low].mean().item(), "low_fraction": low.float().mean().item()}


# ---- The manifold hypothesis: data on a curve has no score off it (notes §7) --------------------------------------

def _circle(n_points, radius):
    """n_points equally spaced on the circle |x| = radius, float64: (n_points, 2)."""
    theta = torch.arange(n_points, dtype=torch.float64) * (2 * math.pi / n_points)
    return radius * torch.stack([theta.cos(), theta.sin()], dim=1)


def _curve_score(x, curve, sigma):
    """grad log q_sigma(x) for p uniform on the points y_j of `curve` (M, 2): q_sigma = 1/M sum_j N(x; y_j, sigma^2 I),
    so grad log q_sigma(x) = sum_j w_j (y_j - x) / sigma^2 with w = softmax_j(-|x - y_j|^2 / (2 sigma^2)).
    x: (B, 2) -> (B, 2). The logits drop the |x|^2 common to every j, and the softmax subtracts the largest, so
    points far from the curve, where every Gaussian underflows, still get their score."""
    logits = (x @ curve.T - curve.pow(2).sum(1) / 2) / sigma ** 2  # (B, M): -|x - y_j|^2 / 2 sigma^2, up to |x|^2
    return (logits.softmax(dim=1) @ curve - x) / sigma ** 2  # (B, 2)


def manifold_scores(sigmas=(0.5, 0.2, 0.1, 0.05), radius=2.0, n_curve=2000, n_grid=200, half_width=4.0):
    """The manifold hypothesis (notes §7; [Song & Ermon 2019, Section 3.1]): p uniform on the circle |x| = radius, a
    1-D curve in R^2, has no density in R^2 and no score off the curve, so score matching has nothing to match there.
    Its noised version q_sigma = p * N(0, sigma^2 I) (notes §8) has a score everywhere,

        grad log q_sigma(x) -> (nearest point of the curve - x) / sigma^2    as sigma -> 0,

    of size distance / sigma^2: it blows up off the curve as sigma -> 0. The curve is discretised into n_curve
    points (the quadrature of _curve_score). Returns {"points": the (n_grid^2, 2) grid on [-half_width,
    half_width]^2 (float64), "curve": the (n_curve, 2) points, "scores": {sigma: (n_grid^2, 2) score on the grid}}.
    """
    curve = _circle(n_curve, radius)
    points = _box_grid(n_grid, half_width, dtype=torch.float64)
    scores = {sigma: torch.empty_like(points) for sigma in sigmas}  # (n_grid^2, 2) each
    for sigma, score in scores.items():
        for chunk, out in zip(points.split(512), score.split(512)):  # (512, M) logits at a time
            out.copy_(_curve_score(chunk, curve, sigma))  # written in place: glibc then reuses the freed blocks
    return {"points": points, "curve": curve, "scores": scores}


# ---- python langevin.py: the three figures of notes §7 ---------------------------------------------------------

def _save(fig, out, **kwargs):
    """fig as a PNG at `out`, written whole or not at all: to a temporary file beside it, then renamed."""
    import os

    partial = f"{out}.partial"
    fig.savefig(partial, format="png", **kwargs)
    os.replace(partial, out)


def _plot_figure3(plt, out, n_samples, seed):
    """Figure 3: the samples of figure3(), with each panel's mode weights and per-mode variances printed."""
    panels = figure3(n_samples, seed)
    print(f"{n_samples} samples per panel; a sample belongs to the mode (-5,-5) when x1 + x2 < 0, else to (5,5)")
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
    _save(fig, out, dpi=120)
    print(f"saved {out}")


def _plot_figure2(plt, out, seed):
    """Figure 2: grad log p and s_theta as arrows at one scale over p in orange (darker: denser); the red curves
    p = 1e-3 max p enclose the regions where the two agree (the paper's red rectangles)."""
    import matplotlib.colors

    sigma, n_steps = 0.1, 2000
    result = figure2(n_steps=n_steps, sigma=sigma, seed=seed)
    print(f"s_theta without noise levels: {n_steps} steps of denoising score matching at sigma = {sigma:g} on exact "
          f"samples of p")
    print(f"  {'averaged':50s} {'1/2 |s_theta - grad log p|^2':>28s}")
    print(f"  {'under p (the Fisher divergence training minimises)':50s} {result['error_p']:28.3f}")
    print(f"  {'uniformly over [-8, 8]^2':50s} {result['error_box']:28.3f}")
    low = f"where p < 1e-3 max p ({100 * result['low_fraction']:.0f}% of the box)"
    print(f"  {low:50s} {result['error_low']:28.3f}")

    density = _gmm_log_density(_box_grid(400, 8.0)).exp().reshape(400, 400)  # (400, 400) pixels, rows along x2
    threshold = _gmm_log_density(torch.tensor(_GMM_MEANS)).exp().max().item() * 1e-3
    points, fields = result["points"], {r"$\nabla_x \log p(x)$, exact": result["score"],
                                        r"$s_\theta(x)$, learned without noise levels": result["learned"]}
    scale = result["score"].norm(dim=1).max().item()  # score per unit of length: the longest exact arrow is 1 long
    fig, axes = plt.subplots(1, 2, figsize=(11, 6.2), sharex=True, sharey=True, layout="constrained")
    for ax, (title, field) in zip(axes, fields.items()):
        ax.imshow(density, extent=(-8, 8, -8, 8), origin="lower", cmap="Oranges",
                  norm=matplotlib.colors.PowerNorm(0.5, vmin=0, vmax=density.max().item()))  # the light mode shows
        ax.contour(density, levels=[threshold], extent=(-8, 8, -8, 8), colors="red", linewidths=1.5,
                   linestyles="--")
        ax.quiver(points[:, 0], points[:, 1], field[:, 0], field[:, 1], angles="xy", scale_units="xy", scale=scale,
                  width=0.0035, color="black")
        ax.set_title(title, fontsize=13)
        ax.set_xlim(-8, 8)
        ax.set_ylim(-8, 8)
        ax.set_aspect("equal")
    fig.suptitle("Figure 2 of Song & Ermon (2019), notes §7: the score is learned only where the data is\n"
                 rf"$\frac{{1}}{{2}}|s_\theta - \nabla_x \log p|^2$ = {result['error_p']:.3f} under p, "
                 f"{result['error_low']:.1f} where p < 1e-3 max p (outside the red curves); "
                 "p = 1/5 N((-5,-5), I) + 4/5 N((5,5), I)", fontsize=12)
    _save(fig, out, dpi=120, bbox_inches="tight")  # constrained layout alone crops the tick labels
    print(f"saved {out}")


def _plot_manifold(plt, out, sigmas=(0.5, 0.2, 0.1, 0.05)):
    """The manifold hypothesis: the score of q_sigma for the largest and the smallest sigma, its direction as arrows
    over log10 of its size; the largest size on the grid printed for every sigma, against 1 / sigma^2."""
    import matplotlib.colors

    n_grid, half_width, radius = 200, 4.0, 2.0
    result = manifold_scores(sigmas, radius=radius, n_grid=n_grid, half_width=half_width)
    distance = math.hypot(half_width, half_width) - radius  # the grid's largest distance to the circle, at a corner
    print(f"p uniform on the circle |x| = {radius:g} ({len(result['curve'])} points), q_sigma = p * N(0, sigma^2 I), "
          f"on the {n_grid} x {n_grid} grid over [-{half_width:g}, {half_width:g}]^2:")
    print(f"  {'sigma':>6s} {'max |grad log q_sigma|':>24s} {'sigma^2 max |grad log q_sigma|':>32s}")
    for sigma, score in result["scores"].items():
        size = score.norm(dim=1).max().item()
        print(f"  {sigma:6.2f} {size:24.1f} {sigma ** 2 * size:32.3f}")
    print(f"  (distance / sigma^2 at the grid's corners, whose distance to the circle is {distance:.3f})")

    panels = {sigma: result["scores"][sigma].reshape(n_grid, n_grid, 2) for sigma in (max(sigmas), min(sigmas))}
    log_sizes = {sigma: score.norm(dim=-1).log10() for sigma, score in panels.items()}  # (n_grid, n_grid) each
    norm = matplotlib.colors.Normalize(vmin=-1, vmax=max(s.max().item() for s in log_sizes.values()))
    every = n_grid // 20  # 20 x 20 arrows, at the centres of 20 x 20 tiles
    arrows = result["points"].reshape(n_grid, n_grid, 2)[every // 2::every, every // 2::every].reshape(-1, 2)
    curve = torch.cat([result["curve"], result["curve"][:1]])  # (M + 1, 2), closed
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6), sharex=True, sharey=True, layout="constrained")
    for ax, (sigma, score) in zip(axes, panels.items()):
        image = ax.imshow(log_sizes[sigma], extent=(-half_width, half_width) * 2, origin="lower", cmap="viridis",
                          norm=norm)
        direction = score[every // 2::every, every // 2::every].reshape(-1, 2)
        direction = direction / direction.norm(dim=1, keepdim=True)  # unit arrows: the direction only
        ax.quiver(arrows[:, 0], arrows[:, 1], direction[:, 0], direction[:, 1], angles="xy", scale_units="xy",
                  scale=20 / (0.6 * 2 * half_width), width=0.004, color="white")
        ax.plot(curve[:, 0], curve[:, 1], color="red", linewidth=1.5)
        ax.set_title(rf"$\sigma$ = {sigma:g}: max $|\nabla_x \log q_\sigma|$ = {score.norm(dim=-1).max():.0f}",
                     fontsize=13)
        ax.set_xlim(-half_width, half_width)
        ax.set_ylim(-half_width, half_width)
        ax.set_aspect("equal")
    fig.colorbar(image, ax=axes, shrink=0.85, label=r"$\log_{10} |\nabla_x \log q_\sigma(x)|$")
    fig.suptitle(r"The manifold hypothesis, notes §7: p uniform on a circle (red) has no score off it; "
                 "\n" r"$q_\sigma = p * N(0, \sigma^2 I)$ has one everywhere: towards the circle (arrows), "
                 r"of size distance / $\sigma^2$", fontsize=12)
    _save(fig, out, dpi=120, bbox_inches="tight")  # constrained layout alone crops the tick labels
    print(f"saved {out}")


def main():
    import argparse
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(
        description="Redraw the three problems of notes §7 into OUT_DIR: gmm_figure3.png (Figure 3 of Song & Ermon "
                    "2019: Langevin mixes slowly between modes, annealing fixes it), gmm_score_fields.png (their "
                    "Figure 2: a score learned without noise levels is wrong where data is rare), manifold_scores.png "
                    "(data on a circle has no score off it; the score of its noised version blows up as sigma -> 0).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out-dir", default="figures", help="where to save the three PNGs")
    parser.add_argument("--n-samples", type=int, default=2000, help="samples per panel of Figure 3")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of Figure 3's samples, start and chains, and of Figure 2's training")
    args = parser.parse_args()
    if args.n_samples < 2:
        parser.exit(2, f"{parser.prog}: error: --n-samples must be >= 2, got {args.n_samples}\n")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        parser.exit(2, f"{parser.prog}: error: --out-dir {args.out_dir} cannot be made a folder ({e.strerror})\n")
    # Small 2-D problems: a second intra-op thread only adds a synchronisation per op, and stalls for seconds at a
    # time when other processes share the cores (Figure 2's training then took minutes instead of seconds).
    torch.set_num_threads(1)

    _plot_figure3(plt, os.path.join(args.out_dir, "gmm_figure3.png"), args.n_samples, args.seed)
    print()
    _plot_figure2(plt, os.path.join(args.out_dir, "gmm_score_fields.png"), args.seed)
    print()
    _plot_manifold(plt, os.path.join(args.out_dir, "manifold_scores.png"))


if __name__ == "__main__":
    main()
