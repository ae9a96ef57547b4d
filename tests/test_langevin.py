"""Tests for langevin.py (notes §6, §7, §9): closed forms of Langevin dynamics on Gaussians, mode weights of the
two-mode mixture `gmm` and Figure 3, the learned score of Figure 2, the noised score of data on a circle (Bessel
closed form and its sigma -> 0 limit), Tweedie's denoising step, inpainting as exact conditioning, interpolation's
noise, and the samplers' contract (seeds, shapes, callbacks, bad input)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from langevin import (_curve_score, _gmm_sample, _gmm_score, _mode_statistics, annealed_langevin_dynamics,
                      annealed_langevin_inpainting, annealed_langevin_interpolation, figure2, figure3,
                      langevin_dynamics, manifold_scores)

f64 = torch.float64


def _expand_like(sigma, x):
    """Reshape a per-example (B,) tensor so it broadcasts against x of shape (B, *event_shape)."""
    return sigma.reshape(-1, *[1] * (x.dim() - 1))


def _gaussian_noisy_score(mu, s):
    """Exact score of q_sigma = N(mu, (s^2 + sigma^2) I), the data N(mu, s^2 I) convolved with N(0, sigma^2 I)."""
    return lambda x, sigma: -(x - mu) / (s ** 2 + _expand_like(sigma, x) ** 2)


@st.composite
def gaussians(draw, max_dim=4):
    """A mean and an SPD covariance in D = 1..max_dim dimensions, eigenvalues in [c, c + D], c in [0.5, 1]."""
    d = draw(st.integers(1, max_dim))
    mu = torch.tensor(draw(st.lists(st.floats(-3, 3), min_size=d, max_size=d)), dtype=f64)
    a = torch.tensor(draw(st.lists(st.floats(-1, 1), min_size=d * d, max_size=d * d)), dtype=f64).reshape(d, d)
    cov = a @ a.T / d + draw(st.floats(0.5, 1.0)) * torch.eye(d, dtype=f64)  # condition number at most 9
    return mu, cov


# ---- §6: unadjusted Langevin on Gaussians ---------------------------------------------------------------------

@given(s=st.floats(0.3, 3.0), mu=st.floats(-3, 3), contraction=st.floats(0.2, 0.6))
def test_langevin_reaches_ula_stationary_variance_on_1d_gaussian(s, mu, contraction):
    # On N(mu, s^2), x <- x + (eps/2)(-(x - mu)/s^2) + sqrt(eps) z is the AR(1) recursion with a = 1 - eps/(2 s^2):
    # stationary N(mu, eps / (1 - a^2)), which the doubled-step convention (x + eps s + sqrt(2 eps) z) misses.
    step_size = 2 * contraction * s ** 2
    a = 1 - contraction
    n_steps = math.ceil(math.log(1e-10) / (2 * math.log(a)))  # a^(2T) < 1e-10: the start is forgotten
    n = 10_000
    x0 = torch.zeros(n, 1, dtype=f64)
    x = langevin_dynamics(lambda y: -(y - mu) / s ** 2, x0, step_size, n_steps,
                          generator=torch.Generator().manual_seed(0))
    var = step_size / (1 - a ** 2)
    assert abs(x.mean().item() - mu) < 5 * math.sqrt(var / n)
    assert abs(x.var().item() - var) < 5 * var * math.sqrt(2 / (n - 1))


@given(s=st.floats(0.3, 3.0), step_size=st.floats(1e-3, 2.0), n_steps=st.integers(0, 8))
def test_langevin_step_is_the_notes_update(s, step_size, n_steps):
    # With a linear score and given noise the whole chain has a closed form:
    # x_T = a^T x_0 + sqrt(eps) sum_t a^(T-1-t) z_t, a = 1 - eps / (2 s^2).
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(16, 3, generator=g, dtype=f64)
    noise = torch.randn(n_steps, 16, 3, generator=g, dtype=f64)
    x = langevin_dynamics(lambda y: -y / s ** 2, x0, step_size, n_steps, noise=noise)
    a = 1 - step_size / (2 * s ** 2)
    expected = a ** n_steps * x0 + math.sqrt(step_size) * sum(a ** (n_steps - 1 - t) * noise[t] for t in range(n_steps))
    torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-10)


@given(gaussian=gaussians(), relative_step=st.floats(0.5, 1.5))
def test_langevin_matches_ula_stationary_law_of_multivariate_gaussian(gaussian, relative_step):
    # On N(mu, Sigma) the chain is x - mu <- M (x - mu) + sqrt(eps) z with M = I - (eps/2) Sigma^-1: its stationary
    # law is N(mu, C), C solving the discrete Lyapunov equation C = M C M^T + eps I.
    mu, cov = gaussian
    d = len(mu)
    precision = torch.linalg.inv(cov)
    step_size = relative_step * torch.linalg.eigvalsh(cov).min().item()
    m = torch.eye(d, dtype=f64) - step_size / 2 * precision
    c = torch.linalg.solve(torch.eye(d * d, dtype=f64) - torch.kron(m, m),
                           step_size * torch.eye(d, dtype=f64).reshape(-1)).reshape(d, d)  # row-major vec
    rho = torch.linalg.eigvalsh(m).abs().max().item()
    n_steps = math.ceil(math.log(1e-8) / (2 * math.log(rho)))  # rho^(2T) < 1e-8: the start is forgotten
    n = 4000
    x = langevin_dynamics(lambda y: -(y - mu) @ precision, mu.expand(n, d), step_size, n_steps,
                          generator=torch.Generator().manual_seed(2))
    mean_se = (torch.diagonal(c) / n).sqrt()
    assert ((x.mean(0) - mu).abs() < 5 * mean_se).all()
    cov_se = ((torch.diagonal(c)[:, None] * torch.diagonal(c)[None, :] + c ** 2) / n).sqrt()
    assert ((torch.cov(x.T).reshape(d, d) - c).abs() < 5 * cov_se).all()


# ---- §9: annealed Langevin dynamics ---------------------------------------------------------------------------

@st.composite
def geometric_sigmas(draw):
    n_levels = draw(st.integers(1, 4))
    sigma_max, ratio = draw(st.floats(0.5, 5.0)), draw(st.floats(0.3, 0.8))
    return [sigma_max * ratio ** i for i in range(n_levels)]


@given(s=st.floats(0.3, 2.0), mu=st.floats(-2, 2), start=st.floats(-5, 5), sigmas=geometric_sigmas(),
       relative_step=st.floats(0.05, 1.0), n_steps_each=st.integers(0, 6), denoise=st.booleans())
def test_annealed_langevin_matches_closed_form_on_gaussian(s, mu, start, sigmas, relative_step, n_steps_each, denoise):
    # With the exact noisy score of N(mu, s^2), every step is affine in x, so the chains stay Gaussian: at level i,
    # alpha_i = step_size sigma_i^2 / sigma_L^2 and a_i = 1 - alpha_i / (2 (s^2 + sigma_i^2)) move the mean and variance
    # by m - mu <- a_i (m - mu), v <- a_i^2 v + alpha_i; the denoising step scales x - mu by s^2 / (s^2 + sigma_L^2).
    step_size = relative_step * sigmas[-1] ** 2
    mean, var = start, 0.0
    for sigma in sigmas:
        alpha = step_size * sigma ** 2 / sigmas[-1] ** 2
        a = 1 - alpha / (2 * (s ** 2 + sigma ** 2))
        for _ in range(n_steps_each):
            mean, var = mu + a * (mean - mu), a ** 2 * var + alpha
    if denoise:
        b = s ** 2 / (s ** 2 + sigmas[-1] ** 2)
        mean, var = mu + b * (mean - mu), b ** 2 * var

    x0 = torch.full((4000, 2), start, dtype=f64)
    x = annealed_langevin_dynamics(_gaussian_noisy_score(mu, s), x0, torch.tensor(sigmas, dtype=f64), step_size,
                                   n_steps_each, denoise=denoise, generator=torch.Generator().manual_seed(3)).flatten()
    n = x.numel()  # the two coordinates are independent chains
    assert abs(x.mean().item() - mean) <= 5 * math.sqrt(var / n) + 1e-9
    assert abs(x.var().item() - var) <= 5 * var * math.sqrt(2 / (n - 1)) + 1e-9


def _gmm_log_density(x, sigma):
    """log q(x) up to a constant at the authors' annealed level 1/5 N((-5,-5), sigma^2 I) + 4/5 N((5,5), sigma^2 I)."""
    means = torch.tensor([[-5.0, -5.0], [5.0, 5.0]], dtype=x.dtype)
    var = _expand_like(sigma, x) ** 2  # (B, 1)
    log_n = -((x[:, None, :] - means) ** 2).sum(-1) / (2 * var) - torch.log(var)  # (B, 2); 2-D Gaussian log-density
    return torch.logsumexp(log_n + torch.tensor([0.2, 0.8], dtype=x.dtype).log(), dim=1)  # (B,)


def _gmm_autograd_score(x, sigma):
    """grad_x log q(x) by autograd, independent of any closed form."""
    with torch.enable_grad():
        y = x.detach().clone().requires_grad_()
        return torch.autograd.grad(_gmm_log_density(y, sigma).sum(), y)[0]


def test_figure_score_is_the_gradient_of_the_gmm_log_density():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 2, generator=g, dtype=f64) * 8  # near both modes, between them, and far out
    sigma = 0.5 + torch.rand(512, generator=g, dtype=f64) * 20
    torch.testing.assert_close(_gmm_score(x, sigma), _gmm_autograd_score(x, sigma))
    torch.testing.assert_close(_gmm_score(x), _gmm_autograd_score(x, torch.ones(512, dtype=f64)))  # level 1 is p


def test_authors_level_is_the_data_convolved_with_noise():
    """The authors' level sigma >= 1 is p * N(0, (sigma^2 - 1) I): its score is data.py's noisy score of p at the
    noise level sqrt(sigma^2 - 1) (a closed form written independently, for notes §8's q_sigma)."""
    from data import gmm_noisy_score

    g = torch.Generator().manual_seed(7)
    x = torch.randn(256, 2, generator=g, dtype=f64) * 8
    sigma = 1 + torch.rand(256, generator=g, dtype=f64) * 19
    torch.testing.assert_close(_gmm_score(x, sigma), gmm_noisy_score(x, (sigma ** 2 - 1).sqrt()))


def test_annealed_langevin_recovers_mode_weights_and_langevin_does_not():
    # Notes §7: inside each mode the score ignores the weights, so plain Langevin keeps the uniform start's
    # roughly even split, while annealing through large sigmas, where the modes overlap, restores 1/5 : 4/5.
    # Ten levels and a finite T leave a small bias in the weights (about 0.02 here, 1.4 standard errors at n = 1000).
    # The score is the figure's closed form, checked against autograd above.
    n, n_steps_each, step_size = 1000, 30, 0.5
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(n, 2, generator=g) * 16 - 8  # uniform on [-8, 8]^2
    sigmas = torch.logspace(math.log10(20.0), 0.0, 10)  # the paper's toy levels, 20 -> 1
    annealed = annealed_langevin_dynamics(_gmm_score, x0, sigmas, step_size, n_steps_each, denoise=False,
                                          generator=g)
    # The same number of score evaluations, at the step annealing ends with.
    plain = langevin_dynamics(_gmm_score, x0, step_size, len(sigmas) * n_steps_each, generator=g)
    weight, se = 0.2, math.sqrt(0.2 * 0.8 / n)  # binomial standard error of the fraction in the small mode
    assert abs((annealed.sum(1) < 0).float().mean().item() - weight) < 5 * se
    assert (plain.sum(1) < 0).float().mean().item() - weight > 5 * se


def test_figure3_panel_c_has_the_weights_and_unit_variance_modes():
    """`python langevin.py`'s panels, seeded as it is: (c) at weights 0.2 / 0.8 within 0.03 and every per-mode
    coordinate variance 1 within 0.1 (its last level is p itself, and ULA at step 0.1 on a unit Gaussian has variance
    1 / (1 - 0.1/4) = 1.026). (a) is exact and (b) samples p's modes too: their variances are 1.026 or 1 within five
    standard errors of a sample variance, sqrt(2 / (n_k - 1)); (b) keeps the even split of its uniform start."""
    panels = figure3(n_samples=2000, seed=0)
    for title, x in panels.items():
        (w_low, var_low), (w_high, var_high) = _mode_statistics(x)
        assert abs(w_low + w_high - 1) < 1e-6
        n_low = round(w_low * len(x))
        for n_k, variances in ((n_low, var_low), (len(x) - n_low, var_high)):
            tolerance = 0.1 if title.startswith("(c)") else 0.026 + 5 * math.sqrt(2 / (n_k - 1))
            assert all(abs(v - 1) < tolerance for v in variances), (title, variances)
        if title.startswith("(b)"):
            assert w_low - 0.2 > 5 * math.sqrt(0.2 * 0.8 / len(x)), title
        else:
            assert abs(w_low - 0.2) < 0.03 and abs(w_high - 0.8) < 0.03, (title, w_low, w_high)


# ---- §7: Figure 2 (scores are learned only where the data is) and the manifold hypothesis ----------------------

def test_figure2_learns_the_score_under_p_and_not_where_p_is_small():
    # Under p the true score has 1/2 E_p |grad log p|^2 = 1/2 E|z|^2 = 1 (unit-variance modes): a 400-step network
    # gets within a fifth of that, yet misses by over 20 times its error under p where p < 1e-3 max p. The box average
    # splits into the low-density part and the rest, so it is at least low_fraction * error_low.
    result = figure2(n_steps=400, hidden=64, batch_size=256, lr=1e-2, seed=0)
    assert result["error_p"] < 0.2
    assert result["error_low"] > 20 * result["error_p"]
    assert result["error_box"] >= result["low_fraction"] * result["error_low"] - 1e-6
    assert 0.5 < result["low_fraction"] < 0.9  # two disks of radius ~3.5 around the modes: 28% of the box
    torch.testing.assert_close(result["score"], _gmm_score(result["points"]))
    with torch.no_grad():
        torch.testing.assert_close(result["learned"], result["s_theta"](result["points"]))
        x = _gmm_sample(20_000, torch.Generator().manual_seed(1))  # an independent estimate of the error under p
        error = 0.5 * (result["s_theta"](x) - _gmm_score(x)).pow(2).sum(1)
    assert abs(error.mean().item() - result["error_p"]) < 5 * error.std().item() * math.sqrt(1 / 20_000 + 1 / 10_000)
    untrained = figure2(n_steps=0, hidden=64, seed=0)
    assert untrained["error_p"] > 5 * result["error_p"]  # the training, not the initialisation, fits the modes


def test_figure2_seed_fixes_the_network_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first, again, other = (figure2(n_steps=20, hidden=16, batch_size=32, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first["learned"], again["learned"]) and first["error_p"] == again["error_p"]
    assert not torch.allclose(first["learned"], other["learned"])


def test_curve_score_is_the_gradient_of_the_log_quadrature_density():
    # Any point set y_j: log q_sigma(x) = logsumexp_j(-|x - y_j|^2 / 2 sigma^2) + const, differentiated by autograd,
    # at points on and off the curve: at sigma = 0.05 most of them are so far that every Gaussian underflows.
    g = torch.Generator().manual_seed(0)
    curve = torch.randn(300, 2, generator=g, dtype=f64) * torch.tensor([2.0, 0.5], dtype=f64)
    x = (torch.rand(256, 2, generator=g, dtype=f64) * 8 - 4).requires_grad_()
    for sigma in (1.0, 0.3, 0.05):
        log_q = (-(x[:, None, :] - curve).pow(2).sum(-1) / (2 * sigma ** 2)).logsumexp(dim=1)  # (B,)
        torch.testing.assert_close(_curve_score(x.detach(), curve, sigma), torch.autograd.grad(log_q.sum(), x)[0])


def test_circle_score_is_the_bessel_closed_form():
    # p uniform on |y| = R: q_sigma(x) = exp(-(r^2 + R^2) / 2 sigma^2) I_0(r R / sigma^2) / (2 pi sigma^2), r = |x|, so
    # grad log q_sigma = x/r (R I_1(z) / I_0(z) - r) / sigma^2 with z = r R / sigma^2: radial. 2000 points on the circle
    # integrate it to rounding error (the trapezoid rule on a periodic integrand converges exponentially).
    radius = 2.0
    result = manifold_scores(sigmas=(1.0, 0.5, 0.1, 0.02), radius=radius, n_grid=16, half_width=4.0)
    x = result["points"]
    r = x.norm(dim=1, keepdim=True)  # (B, 1)
    for sigma, score in result["scores"].items():
        z = r * radius / sigma ** 2
        exact = x / r * (radius * torch.special.i1e(z) / torch.special.i0e(z) - r) / sigma ** 2
        torch.testing.assert_close(score, exact, rtol=1e-9, atol=1e-9)


def test_circle_score_tends_to_nearest_point_minus_x_over_sigma_squared():
    # Off the curve, sigma^2 grad log q_sigma(x) -> nearest point - x, with a gap sigma^2 / (2 r) (the circle's
    # curvature, from I_1 / I_0 = 1 - 1/(2z) + ...); so |grad log q_sigma| grows like distance / sigma^2, and the grid's
    # largest score sits at its corners, sqrt(32) - 2 from the circle.
    radius = 2.0
    result = manifold_scores(sigmas=(0.2, 0.1, 0.05, 0.02), radius=radius, n_grid=20, half_width=4.0)
    x = result["points"]
    r = x.norm(dim=1, keepdim=True)  # (B, 1), every grid point at r >= 0.29
    nearest = radius * x / r
    for sigma, score in result["scores"].items():
        gap = (sigma ** 2 * score - (nearest - x)).norm(dim=1, keepdim=True)
        assert (gap <= sigma ** 2 / r).all(), sigma
        cross = x[:, 0] * score[:, 1] - x[:, 1] * score[:, 0]  # radial: x and the score are parallel
        assert (cross.abs() <= 1e-9 * (r[:, 0] * score.norm(dim=1) + 1)).all(), sigma
        largest = score.norm(dim=1).max().item()
        assert abs(sigma ** 2 * largest - (math.sqrt(32) - radius)) <= sigma ** 2, sigma


# ---- Tweedie's denoising step (Song & Ermon 2020) -------------------------------------------------------------

def test_denoising_step_is_x_plus_sigma_last_squared_times_score():
    def score_fn(x, sigma):  # nonlinear and sigma-dependent, so a wrong sigma or a wrong power shows
        return torch.sin(x) / _expand_like(sigma, x) + x ** 2

    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 3, 4, 4, generator=g, dtype=f64)
    sigmas = [2.0, 0.7, 0.3]
    out = annealed_langevin_dynamics(score_fn, x, sigmas, 0.5, 0, denoise=True, generator=g)
    sigma_last = torch.full((8,), sigmas[-1], dtype=f64)
    torch.testing.assert_close(out, x + sigmas[-1] ** 2 * score_fn(x, sigma_last), rtol=1e-12, atol=1e-12)


@given(gaussian=gaussians(), sigmas=geometric_sigmas())
def test_denoising_with_exact_score_is_posterior_mean_on_gaussian(gaussian, sigmas):
    # Tweedie: for x = x_0 + sigma z with x_0 ~ N(mu, Sigma), x + sigma^2 grad log q_sigma(x) = E[x_0 | x]
    # = Sigma (Sigma + sigma^2 I)^-1 (x - mu) + mu.
    mu, cov = gaussian
    d = len(mu)

    def score_fn(x, sigma):  # grad log N(x; mu, Sigma + sigma^2 I), per example
        noisy_cov = cov + sigma.reshape(-1, 1, 1) ** 2 * torch.eye(d, dtype=f64)  # (B, D, D)
        return -torch.linalg.solve(noisy_cov, x - mu)

    x = mu + 3 * torch.randn(64, d, generator=torch.Generator().manual_seed(7), dtype=f64)
    out = annealed_langevin_dynamics(score_fn, x, sigmas, 0.1, 0, denoise=True)
    noisy_cov = cov + sigmas[-1] ** 2 * torch.eye(d, dtype=f64)
    posterior_mean = torch.linalg.solve(noisy_cov, x - mu, left=False) @ cov + mu  # (x - mu)^T (Sigma + s^2 I)^-1 Sigma
    torch.testing.assert_close(out, posterior_mean, rtol=1e-9, atol=1e-9)


# ---- the samplers' contract -----------------------------------------------------------------------------------

def _decay(x, sigma):
    return -x / (1 + _expand_like(sigma, x) ** 2)


def _run(kind, x, seed=None, **kwargs):
    g = None if seed is None else torch.Generator().manual_seed(seed)
    if kind == "langevin":
        return langevin_dynamics(lambda y: -y, x, 0.1, 7, generator=g, **kwargs)
    return annealed_langevin_dynamics(_decay, x, [3.0, 1.0, 0.3], 0.01, 3, generator=g, **kwargs)


@pytest.mark.parametrize("kind", ["langevin", "annealed"])
def test_seed_fixes_samples_and_input_is_untouched(kind):
    x = torch.randn(32, 5)
    before = x.clone()
    first, again, other = _run(kind, x, seed=0), _run(kind, x, seed=0), _run(kind, x, seed=1)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert torch.equal(x, before)


@pytest.mark.parametrize("kind", ["langevin", "annealed"])
def test_image_batches_evolve_like_flattened_vectors(kind):
    # The update is elementwise given the score, so (B, C, H, W) chains equal their flattened (B, D) twins
    # when the same seed draws the same noise.
    x = torch.randn(4, 3, 8, 8, dtype=f64)
    image = _run(kind, x, seed=8)
    flat = _run(kind, x.flatten(1), seed=8)
    assert image.shape == x.shape and image.dtype == f64
    torch.testing.assert_close(image.flatten(1), flat, rtol=0, atol=0)


def test_score_sees_each_level_as_a_batch_of_sigmas():
    seen = []

    def score_fn(x, sigma):
        seen.append(sigma.clone())
        return -x

    x = torch.randn(6, 2)
    sigmas, n_steps_each = [4.0, 2.0, 1.0], 3
    annealed_langevin_dynamics(score_fn, x, torch.tensor(sigmas), 0.01, n_steps_each, denoise=True)
    expected = [s for s in sigmas for _ in range(n_steps_each)] + [sigmas[-1]]
    assert [tuple(s.shape) for s in seen] == [(6,)] * len(expected)
    assert [s.unique().tolist() for s in seen] == [[s] for s in expected]


@pytest.mark.parametrize("denoise", [True, False])
def test_callback_sees_every_step(denoise):
    calls = []
    x = torch.randn(5, 2)
    out = annealed_langevin_dynamics(_decay, x, [2.0, 1.0], 0.1, 4, denoise=denoise,
                                     callback=lambda step, y: calls.append((step, y.clone())))
    assert [step for step, _ in calls] == list(range(2 * 4 + denoise))
    assert torch.equal(calls[-1][1], out)
    calls.clear()
    out = langevin_dynamics(lambda y: -y, x, 0.1, 6, callback=lambda step, y: calls.append((step, y.clone())))
    assert [step for step, _ in calls] == list(range(6))
    assert torch.equal(calls[-1][1], out)


def test_zero_steps_return_a_copy_of_the_input():
    x = torch.randn(4, 3)
    out = langevin_dynamics(lambda y: -y, x, 0.1, 0)
    out_annealed = annealed_langevin_dynamics(_decay, x, [1.0], 0.1, 0, denoise=False)
    assert torch.equal(out, x) and torch.equal(out_annealed, x)
    out.add_(1.0)
    assert not torch.equal(out, x)


@pytest.mark.parametrize("sigmas, match", [
    ([0.5, 1.0], "strictly descending"),
    ([1.0, 1.0], "strictly descending"),
    ([1.0, 0.0], "> 0"),
    ([1.0, -0.1], "> 0"),
    ([], "at least one"),
    (torch.ones(2, 2), "1-D"),
])
def test_bad_sigmas_raise(sigmas, match):
    with pytest.raises(ValueError, match=match):
        annealed_langevin_dynamics(_decay, torch.zeros(2, 2), sigmas, 0.1, 1)


@pytest.mark.parametrize("step_size", [0.0, -0.1, float("nan")])
def test_bad_step_size_raises(step_size):
    with pytest.raises(ValueError, match="step_size"):
        langevin_dynamics(lambda y: -y, torch.zeros(2, 2), step_size, 1)
    with pytest.raises(ValueError, match="step_size"):
        annealed_langevin_dynamics(_decay, torch.zeros(2, 2), [1.0], step_size, 1)


def test_negative_steps_and_bad_noise_raise():
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="n_steps must be >= 0"):
        langevin_dynamics(lambda y: -y, x, 0.1, -1)
    with pytest.raises(ValueError, match="n_steps_each must be >= 0"):
        annealed_langevin_dynamics(_decay, x, [1.0], 0.1, -1)
    with pytest.raises(ValueError, match="noise must have shape"):
        langevin_dynamics(lambda y: -y, x, 0.1, 3, noise=torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="noise must have shape"):
        annealed_langevin_dynamics(_decay, x, [2.0, 1.0], 0.1, 3, noise=torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="either generator or noise"):
        langevin_dynamics(lambda y: -y, x, 0.1, 1, generator=torch.Generator(), noise=torch.zeros(1, 2, 2))


# ---- inpainting: annealed Langevin with the known entries re-noised before every update -------------------------

@st.composite
def conditionings(draw):
    """N(mu, Sigma) in D = 4..8 dimensions (Sigma = Q diag(lambda) Q^T, a random rotation, lambda in [0.5, 1.5]), a
    mask with 1..D-1 known coordinates, and their known values within 2 standard deviations of the mean."""
    d = draw(st.integers(4, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=f64))
    cov = q @ torch.diag(0.5 + torch.rand(d, generator=g, dtype=f64)) @ q.T
    mu = 2 * torch.randn(d, generator=g, dtype=f64)
    mask = torch.zeros(d, dtype=f64)
    mask[torch.randperm(d, generator=g)[:draw(st.integers(1, d - 1))]] = 1.0
    known = mu + 2 * torch.randn(d, generator=g, dtype=f64)  # read only where mask == 1
    return mu, cov, mask, known


def _gaussian_noisy_score_full(mu, cov):
    """Exact score of q_sigma = N(mu, Sigma + sigma^2 I): -(x - mu) (Sigma + sigma^2 I)^-1, one inverse per level."""
    precisions = {}

    def score_fn(x, sigma):
        level = float(sigma[0])
        if level not in precisions:
            precisions[level] = torch.linalg.inv(cov + level ** 2 * torch.eye(len(mu), dtype=cov.dtype))
        return -(x - mu) @ precisions[level]

    return score_fn


def _geometric(sigma_max, sigma_min, n):
    """n geometric levels from sigma_max down to sigma_min, float64."""
    return torch.logspace(math.log10(sigma_max), math.log10(sigma_min), n, dtype=f64)


@settings(max_examples=8)
@given(problem=conditionings(), denoise=st.booleans())
def test_inpainting_draws_the_gaussian_conditional(problem, denoise):
    # The free coordinates u given the known k of N(mu, Sigma) are N(mu_u + S_uk S_kk^-1 (known_k - mu_k),
    # S_uu - S_uk S_kk^-1 S_ku). Levels 0.14 -> 0.01 with step 0.01 at the last: the chain mixes at the middle level
    # (18 e-folds in its slowest direction) and the last two levels move the law by O(sigma^2) and ULA's bias
    # alpha lambda / 4 = 0.5%, both well inside 5 standard errors of 2000 chains.
    mu, cov, mask, known = problem
    k, u = mask.bool(), ~mask.bool()
    mean = mu[u] + cov[u][:, k] @ torch.linalg.solve(cov[k][:, k], known[k] - mu[k])
    var = cov[u][:, u] - cov[u][:, k] @ torch.linalg.solve(cov[k][:, k], cov[k][:, u])
    n = 2000
    g = torch.Generator().manual_seed(0)
    start = 3 * torch.randn(n, len(mu), generator=g, dtype=f64)
    sigmas = _geometric(0.14, 0.01, 3)
    x = annealed_langevin_inpainting(_gaussian_noisy_score_full(mu, cov), start, known, mask, sigmas, 0.01, 400,
                                     denoise=denoise, generator=g)
    assert torch.equal(x[:, k], known[k].expand(n, -1))  # the known coordinates exactly, not a noisy draw
    free = x[:, u]
    assert ((free.mean(0) - mean).abs() <= 5 * (var.diagonal() / n).sqrt()).all()
    se = ((torch.outer(var.diagonal(), var.diagonal()) + var ** 2) / n).sqrt()  # of each entry of a sample covariance
    assert ((torch.cov(free.T) - var).abs() <= 5 * se).all()


def _gmm_noisy_score(x, sigma):
    """Exact score of q_sigma = p * N(0, sigma^2 I): the authors' level sqrt(1 + sigma^2) (unit-variance modes)."""
    return _gmm_score(x, (1 + sigma ** 2).sqrt())


def test_inpainting_one_coordinate_of_the_mixture_picks_its_mode():
    # Knowing x1 = -5 (the light mode's centre) leaves p(x2 | x1) = N(-5, 1) up to e^-50: every chain must end in the
    # light mode, which unconditional annealed sampling gives only a fifth of them.
    n = 2000
    g = torch.Generator().manual_seed(0)
    start = torch.rand(n, 2, generator=g) * 16 - 8  # uniform on [-8, 8]^2, as the sampler's prior
    known, mask = torch.tensor([-5.0, 0.0]), torch.tensor([1.0, 0.0])
    sigmas = _geometric(20.0, 0.1, 10).float()
    x = annealed_langevin_inpainting(_gmm_noisy_score, start, known, mask, sigmas, 1e-3, 100, generator=g)
    assert (x[:, 0] == -5.0).all()
    assert (x[:, 1] < 0).all()
    assert abs(x[:, 1].mean().item() + 5) < 5 * x[:, 1].std().item() / math.sqrt(n)
    free = annealed_langevin_dynamics(_gmm_noisy_score, start, sigmas, 1e-3, 100, generator=g)
    assert 0.1 < (free.sum(1) < 0).float().mean().item() < 0.4  # without the known x1: about a fifth, never all


def test_inpainting_re_noises_the_known_entries_before_every_update():
    # What the score sees at update t: known + sigma_i noise[t, 0] where mask == 1; the free entries carry on.
    seen = []

    def score_fn(x, sigma):
        seen.append((x.clone(), sigma.clone()))
        return -x

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g)
    known, mask = torch.randn(3, 2, 4, 4, generator=g), (torch.rand(3, 1, 4, 4, generator=g) < 0.5).float()
    sigmas, n_steps_each = [1.0, 0.5], 2
    noise = torch.randn(len(sigmas) * n_steps_each + 1, 2, *x.shape, generator=g)
    out = annealed_langevin_inpainting(score_fn, x, known, mask, sigmas, 0.1, n_steps_each, noise=noise)
    levels = [1.0, 1.0, 0.5, 0.5, 0.5]  # the last: the denoising step, at sigma_L
    assert len(seen) == len(levels)
    m = mask.expand_as(x).bool()
    for t, ((y, sigma), level) in enumerate(zip(seen, levels)):
        assert sigma.tolist() == [level] * 3
        torch.testing.assert_close(y[m], (known + level * noise[t, 0])[m], rtol=0, atol=1e-6)
    # the free entries of the last input, moved by Tweedie's step: y + sigma_L^2 (-y)
    torch.testing.assert_close(out[~m], (seen[-1][0] * (1 - 0.5 ** 2))[~m])
    assert torch.equal(out[m], known[m])


@pytest.mark.parametrize("denoise", [True, False])
def test_inpainting_with_nothing_known_is_the_plain_chain(denoise):
    # mask 0 everywhere: the same updates, step sizes, denoising and callback steps as annealed_langevin_dynamics
    # driven by the Langevin half of the noise, bit for bit.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, generator=g, dtype=f64)
    sigmas, n_steps_each = [3.0, 1.0, 0.3], 4
    noise = torch.randn(len(sigmas) * n_steps_each + denoise, 2, *x.shape, generator=g, dtype=f64)
    calls, plain_calls = [], []
    out = annealed_langevin_inpainting(_decay, x, torch.zeros_like(x), torch.zeros(1, 3), sigmas, 0.02, n_steps_each,
                                       denoise=denoise, noise=noise, callback=lambda t, y: calls.append(t))
    plain = annealed_langevin_dynamics(_decay, x, sigmas, 0.02, n_steps_each, denoise=denoise,
                                       noise=noise[:len(sigmas) * n_steps_each, 1],
                                       callback=lambda t, y: plain_calls.append(t))
    assert torch.equal(out, plain) and calls == plain_calls


def test_inpainting_mask_per_pixel_equals_the_mask_per_channel_and_pixel():
    g = torch.Generator().manual_seed(1)
    x, known = torch.rand(2, 3, 6, 6, generator=g), torch.rand(2, 3, 6, 6, generator=g)
    pixel_mask = torch.zeros(1, 1, 6, 6)
    pixel_mask[..., :3] = 1  # the papers' mask: the left half known, the right half drawn
    run = lambda mask: annealed_langevin_inpainting(_decay, x, known, mask, [1.0, 0.3], 0.01, 3,  # noqa: E731
                                                    generator=torch.Generator().manual_seed(2))
    out = run(pixel_mask)
    assert torch.equal(out, run(pixel_mask.expand(2, 3, 6, 6).clone()))
    assert torch.equal(out, run(pixel_mask.bool()))
    assert torch.equal(out[..., :3], known[..., :3]) and not torch.equal(out[..., 3:], known[..., 3:])


@pytest.mark.parametrize("mask, match", [
    (torch.full((2, 3), 0.5), "only 0"),
    (torch.ones(3, 2), "does not broadcast"),
    (torch.ones(2, 2, 3), "does not broadcast"),
])
def test_inpainting_refuses_bad_masks(mask, match):
    with pytest.raises(ValueError, match=match):
        annealed_langevin_inpainting(_decay, torch.zeros(2, 3), torch.zeros(2, 3), mask, [1.0], 0.1, 1)
    with pytest.raises(ValueError, match="noise must have shape"):
        annealed_langevin_inpainting(_decay, torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), [1.0], 0.1, 2,
                                     noise=torch.zeros(2, 2, 3))


# ---- interpolation: chains that share a start and mix two noise streams ----------------------------------------

def test_interpolation_ends_are_the_two_plain_chains_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g)
    sigmas, n_steps_each = [2.0, 1.0, 0.5], 4
    noise = torch.randn(len(sigmas) * n_steps_each, 2, *x.shape, generator=g)
    out = annealed_langevin_interpolation(_decay, x, sigmas, 0.05, n_steps_each, 5, noise=noise)
    assert out.shape == (3, 5, 2, 4, 4)
    assert torch.equal(out[:, 0], annealed_langevin_dynamics(_decay, x, sigmas, 0.05, n_steps_each, noise=noise[:, 0]))
    assert torch.equal(out[:, -1], annealed_langevin_dynamics(_decay, x, sigmas, 0.05, n_steps_each,
                                                              noise=noise[:, 1]))
    still = annealed_langevin_interpolation(_decay, x, sigmas, 0.05, 0, 4, denoise=False)  # no step: the starts
    assert torch.equal(still, x.unsqueeze(1).expand(-1, 4, -1, -1, -1))


def test_interpolation_noise_is_standard_with_correlation_cos_of_the_angle_between_chains():
    # With a zero score a chain moves by sum_t sqrt(alpha_t) (cos a z_p,t + sin a z_q,t): N(0, sum alpha) for every a,
    # and two chains of a row at angles a, b have correlation cos(a) cos(b) + sin(a) sin(b) = cos(a - b).
    n_rows, n_interpolations = 4000, 4
    x = torch.zeros(n_rows, 1, dtype=f64)
    sigmas, n_steps_each, step_size = [2.0, 1.0], 3, 0.1
    out = annealed_langevin_interpolation(lambda y, sigma: torch.zeros_like(y), x, sigmas, step_size, n_steps_each,
                                          n_interpolations, generator=torch.Generator().manual_seed(0))[..., 0]
    total = n_steps_each * sum(step_size * s ** 2 / sigmas[-1] ** 2 for s in sigmas)  # sum of alpha_t
    angles = torch.linspace(0, math.pi / 2, n_interpolations, dtype=f64)
    expected = torch.cos(angles[:, None] - angles[None, :])  # (N, N)
    corr = torch.corrcoef(out.T)
    assert ((out.var(0) - total).abs() <= 5 * total * math.sqrt(2 / (n_rows - 1))).all()
    assert ((corr - expected).abs() <= 5 * (1 - expected ** 2) / math.sqrt(n_rows) + 1e-9).all()


def test_interpolation_refuses_a_single_chain_and_bad_noise():
    with pytest.raises(ValueError, match="n_interpolations must be >= 2"):
        annealed_langevin_interpolation(_decay, torch.zeros(2, 3), [1.0], 0.1, 1, 1)
    with pytest.raises(ValueError, match="noise must have shape"):
        annealed_langevin_interpolation(_decay, torch.zeros(2, 3), [1.0], 0.1, 2, 3, noise=torch.zeros(2, 2, 3))
