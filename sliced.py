"""Sliced score matching, with three kinds of random projection and variance reduction (notes §5).

Paper: Y. Song, S. Garg, J. Shi and S. Ermon, "Sliced score matching: a scalable approach to density and score
estimation", UAI 2019.

Exact score matching (notes §3) needs tr(grad_x s_theta(x)), i.e. D backward passes. Sliced score matching
compares the scores only along random directions v ~ p_v with E[v v^T] = I,

    1/2 E_v E_p ( v^T s_theta(x) - v^T grad_x log p(x) )^2,                    (sliced Fisher divergence)

and integrating by parts again [Song et al. 2019, Thm 1] removes the unknown data score:

    J_SSM(theta) = E_v E_p[ v^T grad_x s_theta(x) v + 1/2 (v^T s_theta(x))^2 ] + const.          (SSM)

Since E[v v^T] = I, E_v[1/2 (v^T s)^2] = 1/2 ||s||^2 exactly, so that term can be replaced by its expectation
(SSM-VR, variance reduction), and E_v[v^T (grad_x s) v] = tr(grad_x s): every variant below is an unbiased
estimate of the exact objective E_p[tr(grad_x s) + 1/2 ||s||^2] of notes §3.

p_v: "gaussian" N(0, I); "rademacher" (independent +-1 entries); "sphere" (uniform on the sphere of radius
sqrt(D), not 1, so that E[v v^T] = I). D = prod(event_shape): an image (C, H, W) is one D-vector.

Cost: v^T (grad_x s) v = v^T grad_x (v^T s), a vector-Jacobian product, so one forward pass (over all
n_projections copies of the batch at once) and one extra backward pass, whatever D is.

Run `python sliced.py` for a demo of a few seconds: an MLP score fitted to a 2-D Gaussian with SSM-VR.
"""
import math

import torch

PROJECTIONS = ("gaussian", "rademacher", "sphere")


def _expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-example tensor (B,) to broadcast against x (B, *event_shape)."""
    return t.reshape(-1, *[1] * (x.dim() - 1))


def sample_projections(x: torch.Tensor, projection: str = "gaussian", generator=None) -> torch.Tensor:
    """Directions v ~ p_v with E[v v^T] = I (notes §5), one per example, shaped, typed and placed like x."""
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if projection == "rademacher":
        v = torch.randint(0, 2, x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return v.mul_(2).sub_(1)  # {0, 1} -> {-1, +1}
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if projection == "sphere":
        # A normalised Gaussian is uniform on the unit sphere; radius sqrt(D) makes E[v v^T] = I.
        dim = x[0].numel()
        v = v.mul_(_expand_like(math.sqrt(dim) / torch.linalg.vector_norm(v.flatten(1), dim=1), v))
    return v


def sliced_score_matching_loss(score_fn, x: torch.Tensor, n_projections: int = 1, projection: str = "gaussian",
                               variance_reduction: bool = False, reduction: str = "mean",
                               generator=None) -> torch.Tensor:
    """J_SSM = E_v E_p[v^T grad_x s(x) v + 1/2 (v^T s(x))^2] (notes §5; Song et al. 2019, Thm 1), or SSM-VR.

    score_fn: maps x of shape (B, *event_shape) to a score of the same shape; the score of example i must depend
        on x_i alone (it is called once on all n_projections copies of the batch, stacked along the batch axis).
    n_projections: directions v per example; the estimate for each example is the mean over its directions.
    projection: p_v, one of "gaussian", "rademacher", "sphere" (radius sqrt(D)); all have E[v v^T] = I.
    variance_reduction: replace 1/2 (v^T s)^2 by its expectation 1/2 ||s||^2 (SSM-VR).
    generator: a torch.Generator on x's device for the directions, for reproducible losses.
    x is treated as data (detached). Differentiable in the parameters of score_fn when grad mode is on; under
    torch.no_grad() it still evaluates, without a graph. Returns a 0-d tensor, or (B,) for reduction="none".
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if isinstance(n_projections, bool) or not isinstance(n_projections, int) or n_projections < 1:
        raise ValueError(f"n_projections must be an integer >= 1, got {n_projections!r}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, *event_shape) with at least one event dimension, got {tuple(x.shape)}")

    batch, event_dims = x.shape[0], tuple(range(1, x.dim()))
    create_graph = torch.is_grad_enabled()  # a graph to the parameters only when someone can use it
    with torch.enable_grad():  # grad_x is needed even when the caller evaluates under no_grad
        # All projections in one forward pass: copy k of the batch is rows k*B .. (k+1)*B - 1. For n_projections = 1
        # expand + reshape is a view, not a copy.
        xs = x.detach().unsqueeze(0).expand(n_projections, *x.shape).reshape(-1, *x.shape[1:])  # (n*B, *event)
        xs.requires_grad_(True)
        v = sample_projections(xs, projection, generator)  # (n*B, *event)
        score = score_fn(xs)  # (n*B, *event)
        if not isinstance(score, torch.Tensor) or score.shape != xs.shape:
            got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
            raise ValueError(f"score_fn(x) must return a tensor of its input's shape {tuple(xs.shape)}, got {got}")
        score_v = (score * v).sum(event_dims)  # (n*B,)  v^T s
        if score.requires_grad:
            # grad_x (v^T s) = (grad_x s)^T v, one backward pass for every example and direction at once;
            # materialize_grads: a score that depends on parameters but not on x has a zero Jacobian.
            (grad_score_v,) = torch.autograd.grad(score_v.sum(), xs, create_graph=create_graph,
                                                  materialize_grads=True)  # (n*B, *event)
            jacobian_vv = (grad_score_v * v).sum(event_dims)  # (n*B,)  v^T (grad_x s) v
        else:  # a score that ignores x and every parameter
            jacobian_vv = torch.zeros_like(score_v)
    if not create_graph:
        score, score_v = score.detach(), score_v.detach()
    if variance_reduction:
        second = 0.5 * score.pow(2).sum(event_dims)  # (n*B,)  E_v[1/2 (v^T s)^2] = 1/2 ||s||^2
    else:
        second = 0.5 * score_v.pow(2)  # (n*B,)
    per_example = (jacobian_vv + second).reshape(n_projections, batch).mean(0)  # (B,) mean over directions
    return per_example.mean() if reduction == "mean" else per_example


# ---------------------------------------------------------------------------------------------------------------
# Demo: fit an MLP score to a correlated 2-D Gaussian with SSM-VR, and watch the Fisher divergence.
# ---------------------------------------------------------------------------------------------------------------

def _demo(n_steps: int = 500, batch_size: int = 256, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mean = torch.tensor([1.0, -1.0])
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]])
    chol, precision = torch.linalg.cholesky(cov), torch.linalg.inv(cov)

    def sample(n):
        return mean + torch.randn(n, 2, generator=gen) @ chol.T  # (n, 2)

    def fisher(score_fn, x):
        # 1/2 E||s(x) - grad log p(x)||^2 with the Gaussian score grad log p(x) = -Sigma^{-1} (x - mu).
        return 0.5 * (score_fn(x) + (x - mean) @ precision).pow(2).sum(1).mean().item()

    model = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Softplus(), torch.nn.Linear(64, 64),
                                torch.nn.Softplus(), torch.nn.Linear(64, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    # Decaying the step size averages out the noise of the one-projection gradient at the end of training.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, n_steps)
    x_eval = sample(10_000)
    with torch.no_grad():
        before = fisher(model, x_eval)
    for _ in range(n_steps):
        loss = sliced_score_matching_loss(model, sample(batch_size), variance_reduction=True, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        after = fisher(model, x_eval)
    print(f"2-D Gaussian (mean (1, -1), unit variances, correlation 0.8); MLP score, SSM-VR with one Gaussian "
          f"projection, {n_steps} Adam steps of batch {batch_size} (cosine step size)")
    print(f"Fisher divergence to the true score: before {before:.4f}  after {after:.4f}")


if __name__ == "__main__":
    _demo()
