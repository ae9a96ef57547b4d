"""Tests for sliced.py (notes §5): sliced score matching is an unbiased, cheaper estimate of the exact objective
E[tr(grad_x s) + 1/2 ||s||^2] of notes §3, for every kind of projection, with and without variance reduction.

Linear scores s(x) = A x + b on Gaussian data give closed forms for the estimate's mean and variance; for networks
the exact trace comes from the full Jacobian (torch.autograd.functional.jacobian). Tolerances are 5 standard
errors computed from the samples (plus float64 rounding, for cases where the estimate is exact).
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sliced import PROJECTIONS, sample_projections, sliced_score_matching_loss

DTYPE = torch.float64
VARIANTS = [(p, vr) for p in PROJECTIONS for vr in (False, True)]

floats = st.floats(-2.0, 2.0, allow_nan=False, allow_infinity=False)
seeds = st.integers(0, 2**32 - 1)
# (D,) vectors and (C, H, W) images alike; the event is flattened to D = C*H*W where the math needs a vector.
event_shapes = st.one_of(st.tuples(st.integers(1, 6)),
                         st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3)))
# The tests that run thousands of network evaluations leave out D = 1, where every layer is a matrix-vector product:
# MKL threads those at any size, and on a busy 2-core machine each then costs milliseconds. The closed-form tests
# cover D = 1.
network_event_shapes = event_shapes.filter(lambda shape: math.prod(shape) > 1)


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _tensor(draw, *shape, elements=floats):
    n = math.prod(shape)
    return torch.tensor(draw(st.lists(elements, min_size=n, max_size=n)), dtype=DTYPE).reshape(shape)


@st.composite
def linear_gaussian_cases(draw):
    """Data N(mean, cov) with event shape drawn, and a linear score s(x) = A x + b acting on the flattened x."""
    event_shape = draw(event_shapes)
    dim = math.prod(event_shape)
    mean, factor = _tensor(draw, dim), _tensor(draw, dim, dim)
    cov = factor @ factor.T + 0.1 * torch.eye(dim, dtype=DTYPE)
    return event_shape, mean, cov, _tensor(draw, dim, dim), _tensor(draw, dim), draw(seeds)


def _gaussian_sample(mean, cov, n, event_shape, gen):
    noise = torch.randn(n, mean.numel(), generator=gen, dtype=DTYPE)
    return (mean + noise @ torch.linalg.cholesky(cov).T).reshape(n, *event_shape)  # (n, *event_shape)


def _linear_score_fn(A, b):
    return lambda x: (x.flatten(1) @ A.T + b).reshape(x.shape)


def _quadratic_form_variance(M, projection):
    """Var(v^T M v) for symmetric M (..., D, D) and v ~ p_v: closed forms for the three projections."""
    dim = M.shape[-1]
    frobenius2 = M.pow(2).sum((-2, -1))
    if projection == "gaussian":
        return 2 * frobenius2
    if projection == "rademacher":  # v_j^2 = 1, so only the off-diagonal terms vary
        return 2 * (frobenius2 - torch.diagonal(M, dim1=-2, dim2=-1).pow(2).sum(-1))
    trace = torch.diagonal(M, dim1=-2, dim2=-1).sum(-1)  # sphere of radius sqrt(D)
    return 2 * (dim * frobenius2 - trace**2) / (dim + 2)


def _exact_objective(score_fn, x, create_graph=False):
    """tr(grad_x s(x)) + 1/2 ||s(x)||^2 per example (notes §3), the trace from the brute-force Jacobian."""
    batch, dim = x.shape[0], x[0].numel()
    jacobian = torch.autograd.functional.jacobian(score_fn, x, create_graph=create_graph)  # (B, *ev, B, *ev)
    trace = torch.einsum("ajaj->a", jacobian.reshape(batch, dim, batch, dim))  # (B,) diagonal blocks
    return trace + 0.5 * score_fn(x).pow(2).flatten(1).sum(1)


def _score_net(event_shape, seed):
    """A small seeded Softplus MLP in float64 from (B, *event_shape) to the same shape, images flattened inside."""
    torch.manual_seed(seed)
    dim = math.prod(event_shape)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(dim, 16), torch.nn.Softplus(),
                               torch.nn.Linear(16, dim), torch.nn.Unflatten(1, event_shape)).to(DTYPE)


def _repeat(x, n):
    """n copies of the batch stacked along the batch axis, copy k in rows k*B .. (k+1)*B - 1."""
    return x.repeat(n, *[1] * (x.dim() - 1))


def _assert_within(estimate, target, se, slack, what):
    assert (estimate - target).abs() <= 5 * se + slack, f"{what}: {estimate} vs {target}, 5 SE = {5 * se}"


@pytest.mark.parametrize("projection", PROJECTIONS)
@given(event_shape=event_shapes, seed=seeds)
def test_projections_have_identity_second_moment(projection, event_shape, seed):
    """E[v v^T] = I for all three p_v (what makes every variant unbiased); sphere: ||v|| = sqrt(D); Rademacher: +-1."""
    n, dim = 8192, math.prod(event_shape)
    v = sample_projections(torch.empty(n, *event_shape, dtype=DTYPE), projection, _generator(seed))
    assert v.shape == (n, *event_shape) and v.dtype == DTYPE
    v = v.reshape(n, dim)
    outer = v[:, :, None] * v[:, None, :]  # (n, D, D)
    se = outer.std(0) / math.sqrt(n)
    error = (outer.mean(0) - torch.eye(dim, dtype=DTYPE)).abs()
    assert (error <= 5 * se + 1e-12).all(), f"E[v v^T] - I = {error.max()} exceeds 5 SE"
    if projection == "sphere":
        assert ((v.norm(dim=1) - math.sqrt(dim)).abs() <= 1e-12 * dim).all()
    if projection == "rademacher":
        assert (v.abs() == 1).all()


@pytest.mark.parametrize("projection, variance_reduction", VARIANTS)
@given(case=linear_gaussian_cases())
def test_linear_score_matches_the_closed_form_mean_and_variance(projection, variance_reduction, case):
    """s = A x + b: each one-projection estimate minus tr(A) + 1/2 ||A x + b||^2 is v^T M v - tr(M) with
    M = sym(A) (SSM-VR) or M = sym(A) + 1/2 s s^T (SSM): mean zero, variance the quadratic form's closed form.
    Both are checked on the residuals divided by their closed-form SD given x, which have mean 0 and second moment
    1 whatever the spread of ||s||^2 over the batch (so the samples' standard errors can be trusted)."""
    event_shape, mean, cov, A, b, seed = case
    n, gen = 2048, _generator(seed)
    x = _gaussian_sample(mean, cov, n, event_shape, gen)
    estimate = sliced_score_matching_loss(_linear_score_fn(A, b), x, projection=projection,
                                          variance_reduction=variance_reduction, reduction="none", generator=gen)
    score = x.flatten(1) @ A.T + b  # (n, D)
    exact = torch.trace(A) + 0.5 * score.pow(2).sum(1)  # (n,)
    M = 0.5 * (A + A.T)  # (D, D) only the symmetric part enters v^T A v
    if not variance_reduction:
        M = M + 0.5 * score[:, :, None] * score[:, None, :]  # (n, D, D)
    variance = _quadratic_form_variance(M, projection)  # () or (n,)
    # Rounding slack: where the closed-form variance is 0 (D = 1 sphere or Rademacher) the estimate is exact.
    scale = variance.sqrt() + 1e-9 * (1 + exact.abs())  # (n,)
    z = (estimate - exact) / scale  # (n,) independent, mean 0, E[z^2] = variance / scale^2
    _assert_within(z.mean(), 0.0, z.std() / math.sqrt(n), 1e-3, "standardised mean of estimate - exact")
    _assert_within(z.pow(2).mean(), (variance / scale**2).mean(), z.pow(2).std() / math.sqrt(n), 1e-3,
                   "standardised variance of the estimate")


@pytest.mark.parametrize("projection, variance_reduction", VARIANTS)
@settings(max_examples=10)  # each case is a few thousand network evaluations
@given(event_shape=network_event_shapes, seed=seeds)
def test_unbiased_for_the_exact_objective_of_a_network(projection, variance_reduction, event_shape, seed):
    """A nonlinear network, vectors and images: n_projections directions per example average to the brute-force
    tr(grad_x s) + 1/2 ||s||^2 within 5 SE; n_projections stacks the copies along the batch axis."""
    batch, n = 3, 500
    score_fn = _score_net(event_shape, seed)
    x = torch.randn(batch, *event_shape, generator=_generator(seed), dtype=DTYPE)
    kwargs = dict(projection=projection, variance_reduction=variance_reduction, reduction="none")
    averaged = sliced_score_matching_loss(score_fn, x, n_projections=n, generator=_generator(seed), **kwargs)
    # The same directions, one per row of the stacked batch: the individual draws, for the standard error.
    draws = sliced_score_matching_loss(score_fn, _repeat(x, n), generator=_generator(seed), **kwargs)
    draws = draws.reshape(n, batch)  # (n, B)
    torch.testing.assert_close(averaged, draws.mean(0))
    exact = _exact_objective(score_fn, x)  # (B,)
    slack = 1e-9 * (1 + exact.abs().max())
    for i in range(batch):
        _assert_within(draws[:, i].mean(), exact[i], draws[:, i].std() / math.sqrt(n), slack, f"example {i}")


@pytest.mark.parametrize("projection", PROJECTIONS)
@settings(max_examples=10)  # each case is a few thousand network evaluations
@given(dim=st.integers(16, 32), seed=seeds)
def test_variance_reduction_lowers_the_variance(projection, dim, seed):
    """SSM-VR drops the noise of 1/2 (v^T s)^2. For a score near the data's (s = mu - x + a network, x ~ N(mu, I),
    Gaussian v) the variance ratio is about 4 / (D + 2), so it helps in high dimension (in D <= 2 it does not);
    here D >= 16 and the same directions serve both estimates, so the ratio must be well below 1/2."""
    batch, n = 4, 250
    gen = _generator(seed)
    mean = 2 * torch.rand(dim, generator=gen, dtype=DTYPE) - 1
    net = _score_net((dim,), seed)
    score_fn = lambda y: mean - y + net(y)  # noqa: E731
    x = _repeat(mean + torch.randn(batch, dim, generator=gen, dtype=DTYPE), n)  # (n*B, D)
    variances = [sliced_score_matching_loss(score_fn, x, projection=projection, variance_reduction=vr,
                                            reduction="none", generator=_generator(seed)).reshape(n, batch).var(0)
                 for vr in (False, True)]  # (B,) each: the spread over directions of each example's estimate
    plain, reduced = (v.sum() for v in variances)
    assert reduced < 0.5 * plain, f"variance with reduction {reduced} vs without {plain}"


@settings(max_examples=4)
@given(dim=st.integers(2, 4), projection=st.sampled_from(PROJECTIONS), data=st.data())
def test_minimising_ssm_vr_over_linear_scores_recovers_the_gaussian_score(dim, projection, data):
    """Adam on SSM-VR over s(x) = A x + b reaches the empirical optimum A = -S^{-1}, b = S^{-1} xbar (S the sample
    covariance) within half a sampling SE of that optimum, so the true score (-Sigma^{-1}, Sigma^{-1} mu) within
    5 + 1/2 sampling SEs. Sampling SEs (asymptotic, N samples): sqrt((P_jk^2 + P_jj P_kk) / N) for the precision
    P = Sigma^{-1}, and sqrt((P_jj (1 + mu^T P mu) + (P mu)_j^2) / N) for P mu."""
    n, n_steps = 500, 300
    mean = _tensor(data.draw, dim)
    factor = _tensor(data.draw, dim, dim, elements=st.floats(-1.0, 1.0))
    cov = factor @ factor.T + 0.5 * torch.eye(dim, dtype=DTYPE)
    gen = _generator(data.draw(seeds))
    x = _gaussian_sample(mean, cov, n, (dim,), gen)
    sample_cov = torch.cov(x.T, correction=0).reshape(dim, dim)
    A_best = -torch.linalg.inv(sample_cov)
    b_best = -A_best @ x.mean(0)
    precision = torch.linalg.inv(cov)
    se_A = ((precision**2 + torch.outer(precision.diag(), precision.diag())) / n).sqrt()
    se_b = ((precision.diag() * (1 + mean @ precision @ mean) + (precision @ mean) ** 2) / n).sqrt()

    A = torch.zeros(dim, dim, dtype=DTYPE, requires_grad=True)
    b = torch.zeros(dim, dtype=DTYPE, requires_grad=True)
    optimizer = torch.optim.Adam([A, b], lr=0.2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, n_steps)
    for _ in range(n_steps):
        loss = sliced_score_matching_loss(lambda y: y @ A.T + b, x, n_projections=8, projection=projection,
                                          variance_reduction=True, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    A, b = A.detach(), b.detach()
    assert ((A - A_best).abs() <= 0.5 * se_A).all(), f"A - A_best = {A - A_best}, SE {se_A}"
    assert ((b - b_best).abs() <= 0.5 * se_b).all(), f"b - b_best = {b - b_best}, SE {se_b}"
    assert ((A + precision).abs() <= 5.5 * se_A).all(), f"A + Sigma^-1 = {A + precision}, SE {se_A}"
    assert ((b - precision @ mean).abs() <= 5.5 * se_b).all(), f"b - Sigma^-1 mu = {b - precision @ mean}, SE {se_b}"


@pytest.mark.parametrize("variance_reduction", [False, True])
@settings(max_examples=5)
@given(event_shape=network_event_shapes, projection=st.sampled_from(PROJECTIONS), seed=seeds)
def test_parameter_gradient_is_unbiased_for_the_exact_objective(variance_reduction, event_shape, projection, seed):
    """Training works: the loss carries gradients to the parameters (through the Jacobian term too), and over seeded
    draws they average to the gradient of the exact objective within 5 SE, along random directions in parameter
    space (a linear functional of the gradient is unbiased if the gradient is; sums over all parameters are close
    to normal, where single entries of a 100-draw mean have heavy tails)."""
    batch, n_draws = 4, 100
    net = _score_net(event_shape, seed)
    x = torch.randn(batch, *event_shape, generator=_generator(seed), dtype=DTYPE)
    gen = _generator(seed)

    def gradient(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(net.parameters()))])

    exact = gradient(_exact_objective(net, x, create_graph=True).mean())  # (n_parameters,)
    directions = torch.randn(exact.numel(), 3, generator=gen, dtype=DTYPE)  # (n_parameters, 3)
    draws = torch.stack([gradient(sliced_score_matching_loss(net, x, n_projections=4, projection=projection,
                                                             variance_reduction=variance_reduction, generator=gen))
                         for _ in range(n_draws)]) @ directions  # (n_draws, 3)
    exact = exact @ directions  # (3,)
    slack = 1e-9 * (1 + exact.abs().max())  # D = 1 sphere / Rademacher: every draw is exact
    for k in range(3):
        _assert_within(draws[:, k].mean(), exact[k], draws[:, k].std() / math.sqrt(n_draws), slack, f"direction {k}")


@pytest.mark.parametrize("projection, variance_reduction", VARIANTS)
def test_seeded_generator_reproduces_the_loss_and_no_grad_evaluates(projection, variance_reduction):
    """The same seed gives the same value and another seed another; the mean is the mean of reduction="none";
    under no_grad the same value comes back without a graph."""
    net = _score_net((1, 4, 4), 0)
    x = torch.randn(5, 1, 4, 4, generator=_generator(1), dtype=DTYPE)

    def loss(seed, **kwargs):
        return sliced_score_matching_loss(net, x, n_projections=3, projection=projection,
                                          variance_reduction=variance_reduction, generator=_generator(seed), **kwargs)

    value = loss(7)
    assert value.dim() == 0 and value.requires_grad
    assert torch.equal(value, loss(7))
    assert not torch.equal(value, loss(8))
    per_example = loss(7, reduction="none")
    assert per_example.shape == (5,)
    torch.testing.assert_close(per_example.mean(), value)
    with torch.no_grad():
        evaluated = loss(7)
    assert not evaluated.requires_grad
    torch.testing.assert_close(evaluated, value.detach())


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_score_constant_in_x_has_no_jacobian_term(projection):
    """s(x) = c: the Jacobian is zero, so SSM-VR is 1/2 ||c||^2 exactly, whether c is a parameter or a constant."""
    x = torch.randn(6, 2, 3, generator=_generator(0), dtype=DTYPE)
    c = torch.randn(2, 3, generator=_generator(1), dtype=DTYPE)
    parameter = c.clone().requires_grad_(True)
    for score_fn in (lambda y: c.expand_as(y), lambda y: parameter.expand_as(y)):
        loss = sliced_score_matching_loss(score_fn, x, n_projections=2, projection=projection, variance_reduction=True)
        torch.testing.assert_close(loss, 0.5 * c.pow(2).sum())


def test_bad_input_raises_value_error():
    x = torch.randn(4, 3)
    score_fn = lambda y: -y  # noqa: E731
    with pytest.raises(ValueError, match="projection must be one of"):
        sliced_score_matching_loss(score_fn, x, projection="uniform")
    with pytest.raises(ValueError, match="projection must be one of"):
        sample_projections(x, "uniform")
    for n in (0, -2, 1.5):
        with pytest.raises(ValueError, match="n_projections must be an integer >= 1"):
            sliced_score_matching_loss(score_fn, x, n_projections=n)
    with pytest.raises(ValueError, match="must return a tensor of its input's shape"):
        sliced_score_matching_loss(lambda y: y[:, :2], x)
    with pytest.raises(ValueError, match="must return a tensor of its input's shape"):
        sliced_score_matching_loss(lambda y: y.flatten(1), torch.randn(4, 1, 2, 2))
    with pytest.raises(ValueError, match="reduction must be"):
        sliced_score_matching_loss(score_fn, x, reduction="sum")
    with pytest.raises(ValueError, match="at least one event dimension"):
        sliced_score_matching_loss(score_fn, torch.randn(4))
