"""Denoising score matching: notes §4, after [Vincent 2011] "A connection between score matching and denoising
autoencoders", Neural Computation 23(7).

Perturb the data with Gaussian noise, x~ = x + sigma z with z ~ N(0, I). The perturbation kernel
q_sigma(x~ | x) = N(x~; x, sigma^2 I) has a known score, grad log q_sigma(x~ | x) = -(x~ - x) / sigma^2 = -z / sigma,
and Vincent (2011) shows that regressing onto it matches the score of the noisy marginal
q_sigma(x~) = ∫ p(x) N(x~; x, sigma^2 I) dx up to a constant that does not depend on the model:

    1/2 E_{q_sigma(x~)} || s(x~) - grad log q_sigma(x~) ||^2
        = 1/2 E_{p(x) q_sigma(x~ | x)} || s(x~) + (x~ - x) / sigma^2 ||^2 + const.             (notes §4)

The right-hand side needs one forward pass of s and no Jacobian, unlike exact score matching (notes §3). Its
minimiser is the score of the *noisy* density, close to the data score only when sigma is small; ncsn.py (notes §8)
trains one network across many sigmas to get both a small bias and well-covered space.

`python denoising.py` fits a small MLP to a 2-D Gaussian and prints its Fisher divergence to the noisy score.
"""
import math

import torch


def _expand_like(sigma, x):
    """Reshape a per-example sigma of shape (B,) to (B, 1, ..., 1), so it broadcasts against x of any x.dim()."""
    return sigma.reshape(-1, *[1] * (x.dim() - 1))


def denoising_score_matching_loss(score_fn, x, sigma, noise=None, reduction="mean", generator=None):
    """Denoising score matching, notes §4 [Vincent 2011]: 1/2 E || s(x + sigma z) + z / sigma ||^2.

    score_fn: maps x~ of shape (B, *event_shape) to a score of the same shape; called once, on x + sigma * noise.
    x: clean data, (B, *event_shape).
    sigma: noise level > 0: a Python float, a 0-d tensor, or a tensor of shape (B,) with one level per example.
    noise: the standard normal z, shaped like x; drawn with torch.randn(generator=generator) when None.
    reduction: "mean" gives the batch mean (0-d); "none" gives the per-example loss (B,). The squared norm is
        summed over the event dimensions, as in the notes' || . ||^2.

    A noise-conditional model s(x~, sigma) trains through this function by closing over its level:
    `denoising_score_matching_loss(lambda y: model(y, sigma), x, sigma)` with sigma of shape (B,) is how ncsn.py
    builds the loss l(theta; sigma) of notes §8 on this one. Scaling the per-example loss by sigma^2 gives
    sigma^2 * loss = 1/2 E || sigma s + z ||^2, the lambda(sigma) = sigma^2 weighting of notes §8, whose target z
    has unit scale at every level.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension, shape (B, *event_shape), got a 0-d tensor")
    if isinstance(sigma, torch.Tensor):
        if sigma.shape not in ((), (x.shape[0],)):
            raise ValueError(f"sigma must be a float or a tensor of shape () or ({x.shape[0]},), "
                             f"got shape {tuple(sigma.shape)}")
        sigma = sigma.to(dtype=x.dtype, device=x.device)
        # Checked where it is free: on an accelerator the check would cost a host sync per training step, and the
        # levels there come from a validated sigmas tensor (ncsn.py). `sigma < inf` also rejects NaN.
        if sigma.device.type == "cpu" and not bool(((sigma > 0) & (sigma < math.inf)).all()):
            raise ValueError(f"sigma must be > 0 and finite, got values in [{sigma.min().item():g}, "
                             f"{sigma.max().item():g}]")
        if sigma.dim() == 1:
            sigma = _expand_like(sigma, x)  # (B, 1, ..., 1)
    else:
        sigma = float(sigma)
        if not 0 < sigma < math.inf:
            raise ValueError(f"sigma must be > 0 and finite, got {sigma}")

    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)  # z ~ N(0, I)
    elif noise.shape != x.shape:
        raise ValueError(f"noise must have the shape of x, {tuple(x.shape)}, got {tuple(noise.shape)}")

    score = score_fn(x + sigma * noise)  # one forward pass at x~ = x + sigma z; no Jacobian
    if not isinstance(score, torch.Tensor) or score.shape != x.shape:
        got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
        raise ValueError(f"score_fn must return a tensor shaped like its input, {tuple(x.shape)}, got {got}")
    # s(x~) - grad log q_sigma(x~ | x), since that conditional score is -(x~ - x) / sigma^2 = -z / sigma.
    residual = score + noise / sigma
    loss = 0.5 * residual.pow(2).reshape(x.shape[0], -1).sum(dim=1)  # (B,)
    return loss.mean() if reduction == "mean" else loss


if __name__ == "__main__":
    # Fit an MLP score model with DSM at one sigma to N(mu, cov). The noisy density is q_sigma = N(mu, cov + sigma^2 I),
    # so its score -(x~ - mu) P with P = (cov + sigma^2 I)^-1 is known and the Fisher divergence can be measured.
    torch.set_num_threads(1)  # the tensors are tiny: extra threads cost more in overhead than they save
    torch.manual_seed(0)
    mu, cov, sigma = torch.tensor([1.0, -0.5]), torch.tensor([[1.0, 0.8], [0.8, 1.0]]), 0.5
    data = torch.distributions.MultivariateNormal(mu, cov)
    precision = torch.linalg.inv(cov + sigma**2 * torch.eye(2))  # P, (2, 2)
    model = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Softplus(), torch.nn.Linear(64, 64),
                                torch.nn.Softplus(), torch.nn.Linear(64, 2))

    x_test, noise_test = data.sample((200_000,)), torch.randn(200_000, 2)  # one fixed evaluation set
    x_noisy = x_test + sigma * noise_test

    def fisher_divergence():  # 1/2 || s - grad log q_sigma ||^2 per example of the noisy evaluation set, (N,)
        with torch.no_grad():
            return 0.5 * (model(x_noisy) + (x_noisy - mu) @ precision).pow(2).sum(dim=1)

    print(f"DSM at sigma = {sigma} on N(mu, cov) in 2-D; Fisher divergence to the noisy score N(mu, cov + sigma^2 I)")
    print(f"  before training: {fisher_divergence().mean():.4f}")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(500):
        loss = denoising_score_matching_loss(model, data.sample((512,)), sigma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    print(f"  after 500 Adam steps: {fisher_divergence().mean():.4f}")
    # Vincent's identity: DSM = Fisher divergence + 1/2 (D / sigma^2 - tr P), whatever the model.
    with torch.no_grad():
        dsm = denoising_score_matching_loss(model, x_test, sigma, noise=noise_test, reduction="none")  # (N,)
    gap = dsm - fisher_divergence()  # (N,)
    print(f"  DSM - Fisher divergence = {gap.mean():.3f} +- {gap.std() / len(gap) ** 0.5:.3f} (standard error); "
          f"1/2 (D / sigma^2 - tr P) = {0.5 * (2 / sigma**2 - precision.trace()):.3f}")
