"""Tests for denoising.py (notes §4, [Vincent 2011]): Vincent's identity and the minimiser on Gaussian data, where the
noisy density q_sigma = N(mu, C) with C = cov + sigma^2 I and its score -P (x~ - mu), P = C^-1, are known in closed
form; then the loss's invariances (reduction, per-example sigma, event shape, noise and generator), gradients and
input checks.

Closed forms used below, for a linear score model s(x) = A x + b, x ~ N(mu, cov), z ~ N(0, I), x~ = x + sigma z:
    A x~ + b + z / sigma = A (x - mu) + (sigma A + I / sigma) z + (A mu + b), three independent terms, so
    DSM(A, b) = 1/2 [tr(A cov A^T) + tr((sigma A + I / sigma)(sigma A + I / sigma)^T) + |A mu + b|^2]
              = 1/2 [tr(A C A^T) + 2 tr(A) + D / sigma^2 + |A mu + b|^2],
    FD(A, b)  = 1/2 E_{x~ ~ N(mu, C)} |(A + P)(x~ - mu) + A mu + b|^2 = 1/2 [tr((A + P) C (A + P)^T) + |A mu + b|^2],
and DSM - FD = 1/2 (D / sigma^2 - tr P) for every (A, b): Vincent's identity.
"""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from denoising import denoising_score_matching_loss

N = 4000  # samples per Monte Carlo check; the tolerances below are 5 standard errors at this size


def _tensor(draw, *shape, bound):
    """A float64 tensor of the given shape with entries drawn by hypothesis from [-bound, bound]."""
    n = math.prod(shape)
    values = draw(st.lists(st.floats(-bound, bound), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float64).reshape(shape)


@st.composite
def gaussian_problems(draw):
    """Data N(mu, cov) in D = 1..6 dimensions (cov SPD), a noise level sigma, and two linear score models (A, b)."""
    dim = draw(st.integers(1, 6))
    mu = _tensor(draw, dim, bound=3.0)
    factor = _tensor(draw, dim, dim, bound=1.0)
    cov = factor @ factor.T + draw(st.floats(0.1, 1.0)) * torch.eye(dim, dtype=torch.float64)
    sigma = draw(st.floats(0.1, 2.0))
    models = [(_tensor(draw, dim, dim, bound=2.0), _tensor(draw, dim, bound=2.0)) for _ in range(2)]
    return mu, cov, sigma, models


def _linear(A, b):
    return lambda y: y @ A.T + b  # s(y) = A y + b, row-wise on (B, D)


def _sample(mu, cov, n, generator):
    """x ~ N(mu, cov), (n, D), and the standard normal noise z, (n, D)."""
    x = mu + torch.randn(n, len(mu), generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    return x, torch.randn(n, len(mu), generator=generator, dtype=torch.float64)


def _noisy_precision(cov, sigma):
    return torch.linalg.inv(cov + sigma**2 * torch.eye(len(cov), dtype=torch.float64))  # P = (cov + sigma^2 I)^-1


@given(gaussian_problems())
def test_vincent_identity_with_common_random_numbers(problem):
    # DSM(A, b) - FD(A, b) does not depend on (A, b): on the same x and z, the change in DSM between two models equals
    # the change in the Fisher divergence to the noisy score, up to Monte Carlo error. Sharing the samples cancels
    # the large common term 1/2 |z / sigma|^2, leaving only the part that the identity is about.
    mu, cov, sigma, ((A1, b1), (A2, b2)) = problem
    x, noise = _sample(mu, cov, N, torch.Generator().manual_seed(0))
    x_noisy = x + sigma * noise
    P = _noisy_precision(cov, sigma)

    def fisher(A, b):  # 1/2 |s(x~) - grad log q_sigma(x~)|^2 per example, (N,)
        return 0.5 * (_linear(A, b)(x_noisy) + (x_noisy - mu) @ P).pow(2).sum(dim=1)

    def dsm(A, b):
        return denoising_score_matching_loss(_linear(A, b), x, sigma, noise=noise, reduction="none")  # (N,)

    d = (dsm(A1, b1) - dsm(A2, b2)) - (fisher(A1, b1) - fisher(A2, b2))  # (N,), mean zero by the identity
    assert d.mean().abs() <= 5 * d.std() / math.sqrt(N) + 1e-9


@given(gaussian_problems())
def test_dsm_matches_its_closed_form_expectation(problem):
    # The Monte Carlo DSM (noise drawn from the generator) agrees with the analytic expectation derived above, whose
    # difference from the analytic Fisher divergence is Vincent's constant 1/2 (D / sigma^2 - tr P).
    mu, cov, sigma, ((A, b), _) = problem
    dim, I = len(mu), torch.eye(len(mu), dtype=torch.float64)
    C, P = cov + sigma**2 * I, _noisy_precision(cov, sigma)
    m = A @ mu + b
    dsm_exact = 0.5 * (torch.trace(A @ C @ A.T) + 2 * torch.trace(A) + dim / sigma**2 + m @ m)
    fisher_exact = 0.5 * (torch.trace((A + P) @ C @ (A + P).T) + m @ m)
    torch.testing.assert_close(dsm_exact - fisher_exact, 0.5 * (dim / sigma**2 - torch.trace(P)), rtol=1e-9, atol=1e-9)

    generator = torch.Generator().manual_seed(1)
    x, _ = _sample(mu, cov, N, generator)
    per_example = denoising_score_matching_loss(_linear(A, b), x, sigma, reduction="none", generator=generator)
    assert (per_example.mean() - dsm_exact).abs() <= 5 * per_example.std() / math.sqrt(N)


@given(gaussian_problems())
def test_minimiser_over_linear_models_is_the_noisy_score(problem):
    # Among linear models the minimiser of DSM is the score of q_sigma = N(mu, C): A = -P, b = P mu. DSM is quadratic
    # in theta = (A, b), so one Newton step from zero on the implementation itself lands exactly on the minimiser of
    # the sample loss, which is the least-squares regression of -z / sigma on [x~, 1].
    mu, cov, sigma, _ = problem
    dim = len(mu)
    x, noise = _sample(mu, cov, N, torch.Generator().manual_seed(2))
    P = _noisy_precision(cov, sigma)

    def loss(theta):  # theta = (vec A, b), (D * D + D,)
        A, b = theta[: dim * dim].reshape(dim, dim), theta[dim * dim:]
        return denoising_score_matching_loss(_linear(A, b), x, sigma, noise=noise)

    theta0 = torch.zeros(dim * dim + dim, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(theta0), theta0)
    hessian = torch.autograd.functional.hessian(loss, theta0.detach(), vectorize=True)  # (D * D + D, D * D + D)
    theta = -torch.linalg.solve(hessian, grad)
    A, b = theta[: dim * dim].reshape(dim, dim), theta[dim * dim:]

    # Standard errors of the least-squares coefficients: y = -z / sigma given x~ is exactly linear-Gaussian with
    # constant covariance, so Cov(coefficients of output j) = (X^T X)^-1 * residual variance of output j.
    features = torch.cat([x + sigma * noise, torch.ones(N, 1, dtype=torch.float64)], dim=1)  # (N, D + 1)
    residuals = -noise / sigma - features @ torch.cat([A.T, b[None]], dim=0)  # (N, D)
    residual_var = residuals.pow(2).sum(dim=0) / (N - dim - 1)  # (D,)
    xtx_inv_diag = torch.linalg.inv(features.T @ features).diagonal()  # (D + 1,)
    se = (residual_var[:, None] * xtx_inv_diag[None]).sqrt()  # (D, D + 1): row j = output j, column k = input k
    assert ((A + P).abs() <= 5 * se[:, :dim]).all(), (A, -P)
    assert ((b - P @ mu).abs() <= 5 * se[:, dim]).all(), (b, P @ mu)


@st.composite
def batch_cases(draw):
    """A batch size, an event shape of 0..3 dimensions (covering (D,) vectors and (C, H, W) images), per-example
    sigmas, and a seed for the data, the noise and a nonlinear score model that acts on each example alone."""
    batch = draw(st.integers(1, 5))
    event_shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
    sigmas = draw(st.lists(st.floats(0.05, 3.0), min_size=batch, max_size=batch))
    return batch, event_shape, torch.tensor(sigmas, dtype=torch.float64), draw(st.integers(0, 2**16))


def _case(batch, event_shape, seed):
    """x and noise of shape (B, *event_shape), and a score model given both as a flat (B, D) map and in event shape."""
    generator = torch.Generator().manual_seed(seed)
    dim = math.prod(event_shape)
    x = torch.randn(batch, *event_shape, generator=generator, dtype=torch.float64)
    noise = torch.randn(batch, *event_shape, generator=generator, dtype=torch.float64)
    W = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    c = torch.randn(dim, generator=generator, dtype=torch.float64)

    def score_flat(y):  # (B, D) -> (B, D)
        return torch.tanh(y @ W.T + c) - y

    def score(y):  # (B, *event_shape) -> same, through the flat map
        return score_flat(y.reshape(len(y), -1)).reshape(y.shape)

    return x, noise, score, score_flat


@given(batch_cases())
def test_reduction_and_per_example_sigma(case):
    # sigma of shape (B,) gives each example the loss it gets alone with its own scalar sigma (float or 0-d tensor),
    # and reduction="mean" is the mean of reduction="none".
    batch, event_shape, sigmas, seed = case
    x, noise, score, _ = _case(batch, event_shape, seed)
    per_example = denoising_score_matching_loss(score, x, sigmas, noise=noise, reduction="none")
    assert per_example.shape == (batch,)
    torch.testing.assert_close(denoising_score_matching_loss(score, x, sigmas, noise=noise), per_example.mean())
    for i in range(batch):
        for sigma in (float(sigmas[i]), sigmas[i]):  # a Python float and a 0-d tensor
            alone = denoising_score_matching_loss(score, x[i:i + 1], sigma, noise=noise[i:i + 1], reduction="none")
            torch.testing.assert_close(alone, per_example[i:i + 1], rtol=1e-12, atol=1e-12)


@given(batch_cases())
def test_event_shape_does_not_matter(case):
    # (B, *event_shape) input, (B, C, H, W) images included, gives the loss of the flattened (B, D) input under the
    # flattened score: the squared norm runs over all event dimensions.
    batch, event_shape, sigmas, seed = case
    x, noise, score, score_flat = _case(batch, event_shape, seed)
    shaped = denoising_score_matching_loss(score, x, sigmas, noise=noise, reduction="none")
    flat = denoising_score_matching_loss(score_flat, x.reshape(batch, -1), sigmas, noise=noise.reshape(batch, -1),
                                         reduction="none")
    torch.testing.assert_close(shaped, flat, rtol=1e-12, atol=1e-12)


def test_noise_and_generator_fix_the_value():
    x, noise, score, _ = _case(6, (2, 3, 3), seed=0)
    # Given noise, the global random state plays no part.
    torch.manual_seed(1)
    first = denoising_score_matching_loss(score, x, 0.3, noise=noise)
    torch.manual_seed(2)
    assert torch.equal(first, denoising_score_matching_loss(score, x, 0.3, noise=noise))

    # Without noise, z is torch.randn drawn from the generator: one seed, one value; another seed, another value.
    def with_seed(seed):
        return denoising_score_matching_loss(score, x, 0.3, generator=torch.Generator().manual_seed(seed))

    drawn = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    assert torch.equal(with_seed(3), with_seed(3))
    assert torch.equal(with_seed(3), denoising_score_matching_loss(score, x, 0.3, noise=drawn))
    assert not torch.equal(with_seed(3), with_seed(4))


def test_gradients_flow_to_parameters():
    # Every parameter of a network gets a finite, nonzero gradient through the single forward pass...
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Softplus(), torch.nn.Linear(16, 3))
    denoising_score_matching_loss(model, torch.randn(32, 3), torch.rand(32) + 0.1).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name

    # ...and for a linear model it is the least-squares gradient: with r = A x~ + b + z / sigma per example,
    # d/dA = mean(r x~^T), d/db = mean(r).
    generator = torch.Generator().manual_seed(0)
    x, noise = (torch.randn(64, 3, generator=generator, dtype=torch.float64) for _ in range(2))
    A = torch.randn(3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=generator, dtype=torch.float64, requires_grad=True)
    sigma = 0.7
    denoising_score_matching_loss(_linear(A, b), x, sigma, noise=noise).backward()
    x_noisy = x + sigma * noise
    r = x_noisy @ A.detach().T + b.detach() + noise / sigma  # (64, 3)
    torch.testing.assert_close(A.grad, r.T @ x_noisy / len(x))
    torch.testing.assert_close(b.grad, r.mean(dim=0))


@pytest.mark.parametrize("kwargs, message", [
    (dict(sigma=0.0), "sigma must be > 0"),
    (dict(sigma=-0.1), "sigma must be > 0"),
    (dict(sigma=float("nan")), "sigma must be > 0"),
    (dict(sigma=torch.tensor(0.0)), "sigma must be > 0"),
    (dict(sigma=torch.tensor([0.5, 1.0, -1.0, 0.2])), "sigma must be > 0"),
    (dict(sigma=torch.tensor([0.5, 1.0, float("inf"), 0.2])), "sigma must be > 0"),
    (dict(sigma=torch.full((4, 1), 0.5)), r"sigma must be a float or a tensor of shape \(\) or \(4,\)"),
    (dict(sigma=torch.full((3,), 0.5)), r"sigma must be a float or a tensor of shape \(\) or \(4,\)"),
    (dict(sigma=0.5, noise=torch.randn(4, 3)), "noise must have the shape of x"),
    (dict(sigma=0.5, score_fn=lambda y: y.sum(dim=1)), "score_fn must return a tensor shaped like its input"),
    (dict(sigma=0.5, reduction="sum"), "reduction must be 'mean' or 'none'"),
])
def test_bad_input_raises(kwargs, message):
    kwargs = dict(score_fn=lambda y: -y, x=torch.randn(4, 2)) | kwargs
    with pytest.raises(ValueError, match=message):
        denoising_score_matching_loss(**kwargs)
