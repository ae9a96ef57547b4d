"""Tests for score_matching.py (notes §3): exact score matching against closed forms on Gaussians, against a
brute-force Jacobian, against finite differences, and the identity that links it to the Fisher divergence."""
import pytest
import torch
from hypothesis import given, strategies as st

from score_matching import fisher_divergence, score_matching_loss

TRACES = ("loop", "vectorized")
dims = st.integers(1, 5)
floats = st.floats(-1.5, 1.5)


@st.composite
def gaussians(draw, dim):
    """(mu, Sigma) in float64 with Sigma = L L^T + 0.3 I, so Sigma is SPD and not too ill-conditioned."""
    mu = torch.tensor(draw(st.lists(floats, min_size=dim, max_size=dim)), dtype=torch.float64)
    L = torch.tensor(draw(st.lists(floats, min_size=dim * dim, max_size=dim * dim)), dtype=torch.float64)
    L = L.reshape(dim, dim)
    return mu, L @ L.T + 0.3 * torch.eye(dim, dtype=torch.float64)


@st.composite
def linear_scores(draw, dim):
    """(A, b) of a linear score model s(x) = A x + b."""
    A = torch.tensor(draw(st.lists(floats, min_size=dim * dim, max_size=dim * dim)), dtype=torch.float64)
    b = torch.tensor(draw(st.lists(floats, min_size=dim, max_size=dim)), dtype=torch.float64)
    return A.reshape(dim, dim), b


@st.composite
def gaussian_problems(draw):
    """A Gaussian N(mu, Sigma), a linear score model (A, b) and a seed for sampling, all in the same dimension."""
    dim = draw(dims)
    mu, Sigma = draw(gaussians(dim))
    A, b = draw(linear_scores(dim))
    return mu, Sigma, A, b, draw(st.integers(0, 2**31 - 1))


def sample_gaussian(mu, Sigma, n, seed):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, mu.numel(), generator=gen, dtype=torch.float64)
    return mu + noise @ torch.linalg.cholesky(Sigma).T  # (n, D)


def brute_force_trace(net, x):
    """tr(grad_x s(x_i)) per example from the full Jacobian of each example, by torch.func.jacrev."""
    jac = torch.func.vmap(torch.func.jacrev(lambda xi: net(xi[None])[0]))(x)  # (B, *event, *event)
    dim = x[0].numel()
    return jac.reshape(x.shape[0], dim, dim).diagonal(dim1=1, dim2=2).sum(-1)  # (B,)


def exact_trace(net, x, **kwargs):
    """The trace inside score_matching_loss, recovered by subtracting its 1/2 ||s||^2 term."""
    per_example = score_matching_loss(net, x, reduction="none", **kwargs)
    return per_example - 0.5 * net(x).pow(2).flatten(1).sum(1)


def mlp(dim, hidden, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Softplus(), torch.nn.Linear(hidden, hidden),
                               torch.nn.Tanh(), torch.nn.Linear(hidden, dim)).double()


def conv_net(channels, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(channels, 4, 3, padding=1), torch.nn.SiLU(),
                               torch.nn.Conv2d(4, channels, 3, padding=1)).double()


# --- the exact loss on linear scores: closed form -----------------------------------------------------------------

@given(problem=gaussian_problems(), batch=st.integers(1, 16), trace=st.sampled_from(TRACES))
def test_linear_score_loss_equals_closed_form(problem, batch, trace):
    # For s(x) = A x + b the Jacobian is A everywhere, so the loss is tr(A) + 1/2 ||A x + b||^2 example by example.
    mu, Sigma, A, b, seed = problem
    x = sample_gaussian(mu, Sigma, batch, seed)
    score = x @ A.T + b  # (B, D)
    expected = torch.diagonal(A).sum() + 0.5 * score.pow(2).sum(1)  # (B,)
    loss = score_matching_loss(lambda y: y @ A.T + b, x, reduction="none", trace=trace)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(score_matching_loss(lambda y: y @ A.T + b, x, trace=trace), expected.mean(),
                               rtol=1e-12, atol=1e-12)


# --- the exact trace against a brute-force Jacobian ----------------------------------------------------------------

@given(dim=st.integers(1, 9), batch=st.integers(1, 6), hidden=st.integers(2, 12), chunk=st.integers(1, 11),
       seed=st.integers(0, 10_000))
def test_trace_matches_brute_force_jacobian_on_mlp(dim, batch, hidden, chunk, seed):
    net = mlp(dim, hidden, seed)
    x = torch.randn(batch, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    expected = brute_force_trace(net, x)
    torch.testing.assert_close(exact_trace(net, x, trace="loop"), expected, rtol=1e-10, atol=1e-10)
    # chunk sizes that do not divide D, and that exceed it, must give the same trace
    torch.testing.assert_close(exact_trace(net, x, trace="vectorized", chunk_size=chunk), expected,
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(exact_trace(net, x, trace="auto"), expected, rtol=1e-10, atol=1e-10)


@given(batch=st.integers(1, 3), channels=st.integers(1, 2), height=st.integers(1, 4), width=st.integers(1, 4),
       chunk=st.integers(1, 7), seed=st.integers(0, 10_000))
def test_trace_matches_brute_force_jacobian_on_images(batch, channels, height, width, chunk, seed):
    net = conv_net(channels, seed)
    x = torch.randn(batch, channels, height, width, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))
    expected = brute_force_trace(net, x)
    loop = exact_trace(net, x, trace="loop")
    vectorized = exact_trace(net, x, trace="vectorized", chunk_size=chunk)
    torch.testing.assert_close(loop, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(vectorized, expected, rtol=1e-10, atol=1e-10)
    assert score_matching_loss(net, x, reduction="none").shape == (batch,)


def test_trace_ignores_requires_grad_of_x_and_leaves_it_alone():
    # x may come in requiring grad (or not); the loss differentiates a copy and never writes x.grad.
    net = mlp(3, 8, 0)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    for trace in TRACES:
        score_matching_loss(net, x, trace=trace).backward()
        assert x.grad is None
        torch.testing.assert_close(exact_trace(net, x.detach(), trace=trace), brute_force_trace(net, x.detach()))


@pytest.mark.parametrize("trace", TRACES)
def test_no_grad_evaluates_the_same_loss_without_a_graph(trace):
    net = mlp(4, 8, 1)
    x = torch.randn(6, 4, dtype=torch.float64)
    with_graph = score_matching_loss(net, x, trace=trace)
    with torch.no_grad():
        without = score_matching_loss(net, x, trace=trace)
    assert with_graph.requires_grad and not without.requires_grad
    torch.testing.assert_close(without, with_graph.detach(), rtol=1e-12, atol=1e-12)


# --- gradients with respect to the parameters ----------------------------------------------------------------------

@given(problem=gaussian_problems(), batch=st.integers(1, 16), trace=st.sampled_from(TRACES))
def test_parameter_gradient_of_linear_score_matches_closed_form(problem, batch, trace):
    # d/dA [tr(A) + 1/2 mean ||A x + b||^2] = I + mean (A x + b) x^T and d/db = mean (A x + b). The identity comes
    # from the trace alone, so a trace computed without a graph to the parameters would miss it.
    mu, Sigma, A0, b0, seed = problem
    x = sample_gaussian(mu, Sigma, batch, seed)
    A, b = A0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    score_matching_loss(lambda y: y @ A.T + b, x, trace=trace).backward()
    score = x @ A0.T + b0  # (B, D)
    torch.testing.assert_close(A.grad, torch.eye(len(b0), dtype=torch.float64) + score.T @ x / batch,
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b.grad, score.mean(0), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("trace", TRACES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parameter_gradient_of_nonlinear_net_matches_finite_difference(trace, seed):
    # A central difference of the loss along a random direction in parameter space equals <grad, direction>.
    net = mlp(3, 6, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 3, dtype=torch.float64, generator=gen)
    params = list(net.parameters())
    direction = [torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in params]
    grads = torch.autograd.grad(score_matching_loss(net, x, trace=trace), params)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))

    def loss_at(step):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(step * d)
            value = score_matching_loss(net, x, trace=trace)
            for p, d in zip(params, direction):
                p.sub_(step * d)
        return value

    h = 1e-5
    numeric = (loss_at(h) - loss_at(-h)) / (2 * h)  # error O(h^2) ~ 1e-10 times the third derivative
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-7)


def test_parameter_gradient_matches_brute_force_on_images():
    # The gradient through the vmapped trace equals the gradient through a jacrev trace of the same conv net.
    net = conv_net(2, 3)
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    params = list(net.parameters())
    brute = (brute_force_trace(net, x) + 0.5 * net(x).pow(2).flatten(1).sum(1)).mean()
    expected = torch.autograd.grad(brute, params)
    for trace, chunk in (("loop", None), ("vectorized", 5)):
        got = torch.autograd.grad(score_matching_loss(net, x, trace=trace, chunk_size=chunk), params)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


# --- Fisher divergence ---------------------------------------------------------------------------------------------

@given(problem=gaussian_problems(), batch=st.integers(1, 16))
def test_fisher_divergence_closed_form_for_linear_scores(problem, batch):
    # With true score -P (x - mu), P = Sigma^-1: s - true = (A + P) x + b - P mu.
    mu, Sigma, A, b, seed = problem
    P = torch.linalg.inv(Sigma)
    x = sample_gaussian(mu, Sigma, batch, seed)
    expected = 0.5 * (x @ (A + P).T + b - P @ mu).pow(2).sum(1)  # (B,)
    got = fisher_divergence(lambda y: y @ A.T + b, x, lambda y: -(y - mu) @ P, reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fisher_divergence(lambda y: y @ A.T + b, x, lambda y: -(y - mu) @ P),
                               expected.mean(), rtol=1e-10, atol=1e-10)


@given(problem=gaussian_problems(), trace=st.sampled_from(TRACES))
def test_score_matching_minus_fisher_divergence_is_the_data_constant(problem, trace):
    # Hyvärinen 2005, Thm 1: E[SM] = FD - 1/2 E||grad log p||^2 for every model; for N(mu, Sigma) the constant is
    # -1/2 E||P (x - mu)||^2 = -1/2 tr(P). Per example, SM - FD = tr(A) + s . true - 1/2 ||true||^2, whose mean
    # must match within 5 standard errors estimated from the same samples; a trace that were dropped, doubled or
    # detached from x would shift that mean by tr(A).
    mu, Sigma, A, b, seed = problem
    P = torch.linalg.inv(Sigma)
    x = sample_gaussian(mu, Sigma, 4000, seed)
    score_fn, true_score_fn = (lambda y: y @ A.T + b), (lambda y: -(y - mu) @ P)
    gap = score_matching_loss(score_fn, x, reduction="none", trace=trace) - fisher_divergence(
        score_fn, x, true_score_fn, reduction="none")  # (n,)
    standard_error = gap.std() / gap.numel() ** 0.5
    assert abs(gap.mean() + 0.5 * torch.trace(P)) < 5 * standard_error


# --- minimising the exact loss recovers the true score ------------------------------------------------------------

@given(dim=st.integers(1, 3), data=st.data())
def test_minimising_the_loss_over_linear_scores_recovers_the_gaussian_score(dim, data):
    # Over s(x) = A x + b the loss tr(A) + 1/2 mean ||A x + b||^2 is a convex quadratic whose minimiser on a sample
    # with mean m and (1/n-normalised) covariance S is A = -S^-1, b = S^-1 m; it estimates the true score
    # A = -P, b = P mu, P = Sigma^-1, within sampling error.
    mu, Sigma = data.draw(gaussians(dim))
    seed = data.draw(st.integers(0, 2**31 - 1))
    n = 4000
    x = sample_gaussian(mu, Sigma, n, seed)
    A = torch.zeros(dim, dim, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([A, b], lr=1, max_iter=100, tolerance_grad=1e-12, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = score_matching_loss(lambda y: y @ A.T + b, x, trace="vectorized")
        loss.backward()
        return loss

    optimizer.step(closure)
    m = x.mean(0)
    S_inv = torch.linalg.inv((x - m).T @ (x - m) / n)
    torch.testing.assert_close(A.detach(), -S_inv, rtol=1e-6, atol=1e-6)  # the minimiser on this sample
    torch.testing.assert_close(b.detach(), S_inv @ m, rtol=1e-6, atol=1e-6)

    # Delta method: Cov(P_hat_ij, P_hat_kl) = (P_ik P_jl + P_il P_jk) / n; b_hat = P_hat m with m independent of
    # P_hat, so Var(b_hat_i) = (P_ii (1 + mu^T P mu) + (P mu)_i^2) / n.
    P = torch.linalg.inv(Sigma)
    se_A = ((torch.outer(P.diagonal(), P.diagonal()) + P**2) / n).sqrt()
    se_b = ((P.diagonal() * (1 + mu @ P @ mu) + (P @ mu) ** 2) / n).sqrt()
    assert ((A.detach() + P).abs() < 5 * se_A).all()
    assert ((b.detach() - P @ mu).abs() < 5 * se_b).all()


# --- bad input -----------------------------------------------------------------------------------------------------

def test_bad_input_raises_clear_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"shape \(4, 3\), got \(4, 2\)"):
        score_matching_loss(lambda y: y[:, :2], x, trace="loop")
    with pytest.raises(ValueError, match=r"shape \(4, 3\), got \(4, 2\)"):
        score_matching_loss(lambda y: y[:, :2], x, trace="vectorized")
    with pytest.raises(ValueError, match=r"trace must be one of .*got 'exact'"):
        score_matching_loss(lambda y: -y, x, trace="exact")
    with pytest.raises(ValueError, match=r"chunk_size must be .*>= 1.*got 0"):
        score_matching_loss(lambda y: -y, x, chunk_size=0)
    with pytest.raises(ValueError, match=r"reduction must be .*got 'sum'"):
        score_matching_loss(lambda y: -y, x, reduction="sum")
    with pytest.raises(ValueError, match=r"at least one event dimension, got \(4,\)"):
        score_matching_loss(lambda y: -y, torch.randn(4))
    with pytest.raises(ValueError, match=r"score_fn\(x\) must return .*shape \(4, 3\), got \(4, 2\)"):
        fisher_divergence(lambda y: y[:, :2], x, lambda y: -y)
    with pytest.raises(ValueError, match=r"true_score_fn\(x\) must return .*shape \(4, 3\), got \(3,\)"):
        fisher_divergence(lambda y: -y, x, lambda y: y[0])
