"""Tests for ncsn.py (notes §8-§10): the networks' shapes, invariances, size and cost; the NCSN loss against its
closed form on Gaussians; the EMA arithmetic; NCSNv2's recommended settings; the sampler, and a trained 2-D model
that recovers the mode weights of the notes' two-mode mixture."""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ncsn
from langevin import annealed_langevin_dynamics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reset(model):
    """Default (non-zero) initialisation of every conv and linear layer, so that the outputs are not all 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
    return model


def _tiny(in_channels, size, **kw):
    mults = (1, 2) if size == 8 else (1, 2, 2)  # 28 -> 14 -> 7, 32 -> 16 -> 8
    return ncsn.NCSN(in_channels, channels=16, channel_mults=mults, num_res_blocks=1, attn_resolutions=(size // 2,),
                     dropout=0.1, image_size=size, **kw)


class GaussianOracle:
    """The exact noisy score of N(mean, cov): grad log q_sigma(x) = -(cov + sigma^2 I)^-1 (x - mean), sigma (B,)."""

    def __init__(self, mean, cov):
        self.mean, (self.eigvals, self.eigvecs) = mean, torch.linalg.eigh(cov)

    def __call__(self, x, sigma):
        y = (x - self.mean) @ self.eigvecs  # (B, D) in the eigenbasis of cov
        return -(y / (self.eigvals + sigma.reshape(-1, 1) ** 2)) @ self.eigvecs.T  # (B, D)


# ---- networks ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [8, 28, 32])
def test_ncsn_shapes_finite_and_per_example(in_channels, size):
    torch.manual_seed(0)
    model = _reset(_tiny(in_channels, size)).eval()
    x = torch.rand(3, in_channels, size, size)
    sigma = torch.tensor([1e-3, 1.0, 100.0])  # any sigma > 0, far outside a training range too
    out = model(x, sigma)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # Technique 3 keeps sigma * score on the unit scale of its target -z, at every sigma.
    scaled = out * sigma.reshape(-1, 1, 1, 1)  # sigma * score
    assert (scaled.std(dim=(1, 2, 3)) < 10).all()
    # GroupNorm normalises each example alone: example i's score depends on x_i only (sliced.py relies on it).
    torch.testing.assert_close(model(x[:2], sigma[:2]) * sigma[:2].reshape(-1, 1, 1, 1), scaled[:2],
                               rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_technique_3_as_written_is_the_unconditional_network():
    """NCSNv2 technique 3, s(x, sigma) = net(x) / sigma: with conditional=False, sigma * s(x, sigma) does not depend
    on sigma; the default also feeds log sigma into every block (NCSN++), so there it does."""
    x, sigmas = torch.rand(2, 3, 8, 8), [1e-3, 0.3, 50.0]
    torch.manual_seed(0)
    conditional = _reset(_tiny(3, 8)).eval()
    scaled = [conditional(x, s) * s for s in sigmas]
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(scaled, scaled[1:]))
    torch.manual_seed(0)
    unconditional = _reset(_tiny(3, 8, conditional=False)).eval()
    scaled = [unconditional(x, s) * s for s in sigmas]
    assert scaled[0].abs().mean() > 1e-3  # not trivially zero
    for other in scaled[1:]:
        torch.testing.assert_close(other, scaled[0], rtol=1e-5, atol=1e-6)
    # the unconditional network is the conditional one without the embedding MLP and the per-block projections
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    embedding = n_params(conditional.embed) + sum(n_params(m.embed) for m in conditional.modules()
                                                  if isinstance(m, ncsn.ResBlock))
    assert n_params(unconditional) == n_params(conditional) - embedding
    # and a float, a 0-d tensor and a (B,) tensor are the same sigma
    torch.testing.assert_close(conditional(x, 0.3), conditional(x, torch.tensor(0.3)))
    torch.testing.assert_close(conditional(x, 0.3), conditional(x, torch.full((2,), 0.3)))


def test_unet_levels_attend_where_asked_and_skip_connections_pair_up():
    """Per-level structure: num_res_blocks layers down and one more up per level, attention after exactly the blocks
    at attn_resolutions (plus the middle), and every up layer eats one skip of the down path."""
    model = ncsn.NCSN(3, channels=16, channel_mults=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0,
                      image_size=32)
    assert [len(level["layers"]) for level in model.down] == [2, 2, 2]
    assert [len(level["layers"]) for level in model.up] == [3, 3, 3]
    attends = lambda level: [isinstance(layer["attention"], ncsn.Attention) for layer in level["layers"]]  # noqa: E731
    assert [attends(level) for level in model.down] == [[False] * 2, [True] * 2, [False] * 2]  # 32, 16, 8
    assert [attends(level) for level in model.up] == [[False] * 3, [True] * 3, [False] * 3]  # 8, 16, 32
    n_skips = 1 + sum(len(level["layers"]) for level in model.down) + model.n_down
    assert n_skips == sum(len(level["layers"]) for level in model.up)


def test_ncsn_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    model = _reset(_tiny(3, 32)).eval()
    x, sigma = torch.rand(2, 3, 32, 32), torch.tensor([0.1, 2.0])
    ref = model(x, sigma)
    model_cl = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model_cl(x.to(memory_format=torch.channels_last), sigma), ref, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, sigma)
    assert out.dtype == torch.float32  # the division by sigma happens in fp32
    assert (out - ref).norm() < 0.05 * ref.norm()  # bf16 keeps about 3 significant digits


def test_default_ncsn_size_and_cost():
    """The default is sized like NCSNv2's CIFAR-10 model (29.7 M) and costs at most 13 GFLOPs per 32x32 image."""
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        model = ncsn.NCSN()
        x = torch.empty(1, 3, 32, 32)
        n_params = sum(p.numel() for p in model.parameters())
        with FlopCounterMode(display=False) as counter:
            model(x, torch.ones(1))
    assert 30e6 <= n_params <= 40e6
    assert counter.get_total_flops() <= 13e9  # flop_counter counts 2 FLOPs per multiply-add


def test_mlp_score_net_shapes_and_scaling():
    torch.manual_seed(0)
    model = _reset(ncsn.MLPScoreNet(3, hidden=32, n_layers=3))
    x = torch.randn(5, 3)
    out = model(x, torch.tensor([1e-3, 0.1, 1.0, 10.0, 1e3]))
    assert out.shape == (5, 3) and torch.isfinite(out).all()
    nn.init.zeros_(model.net[0].weight[:, 3:])  # cut the sigma features: only the division by sigma is left
    torch.testing.assert_close(model(x, 0.01) * 0.01, model(x, 7.0) * 7.0)


def test_bad_inputs():
    model = ncsn.NCSN(3, channels=16, channel_mults=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.rand(2, 3, 30, 30), 1.0)
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        model(torch.rand(2, 1, 32, 32), 1.0)
    with pytest.raises(ValueError, match="sigma must be"):
        model(torch.rand(2, 3, 32, 32), torch.ones(3))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        model(torch.rand(2, 3, 32, 32), 0.0)
    with pytest.raises(ValueError, match="attn_resolutions"):
        ncsn.NCSN(channel_mults=(1, 2, 2), attn_resolutions=(14,))  # 14 is a level size of 28, not of 32
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        ncsn.MLPScoreNet(2)(torch.randn(4, 3), 1.0)
    x, not_descending = torch.randn(4, 2), torch.tensor([1.0, 2.0, 0.5])
    with pytest.raises(ValueError, match="descending"):
        ncsn.ncsn_loss(ncsn.MLPScoreNet(2), x, not_descending)
    with pytest.raises(ValueError, match="descending"):
        ncsn.sample(ncsn.MLPScoreNet(2), (4, 2), not_descending, 1, 0.1)
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16'\), got 'fp16'"):
        ncsn.sample(ncsn.MLPScoreNet(2), (4, 2), [1.0, 0.5], 1, 0.1, precision="fp16")
    with pytest.raises(ValueError, match=r"channels_last needs image samples \(N, C, H, W\)"):
        ncsn.sample(ncsn.MLPScoreNet(2), (4, 2), [1.0, 0.5], 1, 0.1, channels_last=True)
    with pytest.raises(ValueError, match="objective"):
        ncsn.ncsn_loss(ncsn.MLPScoreNet(2), x, torch.tensor([1.0, 0.5]), objective="hyvarinen")
    with pytest.raises(ValueError, match="sigma_max > sigma_min"):
        ncsn.geometric_sigmas(0.1, 1.0, 5)
    with pytest.raises(ValueError, match="n >= 2"):
        ncsn.geometric_sigmas(1.0, 0.1, 1)
    with pytest.raises(ValueError, match="dim >= 5"):
        ncsn.sigma_ratio(2)
    with pytest.raises(ValueError, match="floating"):
        ncsn.recommended_sigmas(torch.zeros(10, 1, 4, 4, dtype=torch.uint8))


# ---- the NCSN loss on Gaussian data: closed forms (notes §8) -------------------------------------------------

gaussian_cases = dict(
    dim=st.integers(1, 5), seed=st.integers(0, 2**16),
    sigma_max=st.floats(1.0, 3.0), sigma_min=st.floats(0.05, 0.5), n_sigmas=st.integers(2, 8))


def _gaussian_case(dim, seed, sigma_max, sigma_min, n_sigmas):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    cov = a @ a.T / dim + 0.2 * torch.eye(dim, dtype=torch.float64)
    mean = torch.randn(dim, generator=g, dtype=torch.float64)
    x = mean + torch.randn(20_000, dim, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    sigmas = ncsn.geometric_sigmas(sigma_max, sigma_min, n_sigmas, dtype=torch.float64)
    return g, mean, cov, x, sigmas


def _mean_and_se(values):
    return values.mean().item(), values.std().item() / math.sqrt(len(values))


@given(**gaussian_cases)
def test_dsm_loss_of_the_exact_score_is_its_closed_form_minimum(dim, seed, sigma_max, sigma_min, n_sigmas):
    """E[ncsn_loss] at the true noisy score = 1/2 E_sigma[D - sigma^2 tr((Sigma + sigma^2 I)^-1)], levels uniform;
    an oracle for a wrong covariance and mean scores higher by exactly 1/2 E_sigma[sigma^2 E||s' - s||^2]."""
    g, mean, cov, x, sigmas = _gaussian_case(dim, seed, sigma_max, sigma_min, n_sigmas)
    oracle = GaussianOracle(mean, cov)
    levels = torch.randint(len(sigmas), (len(x),), generator=g)
    noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
    loss = ncsn.ncsn_loss(oracle, x, sigmas, reduction="none", levels=levels, noise=noise)
    lam, var = torch.linalg.eigvalsh(cov), sigmas[:, None] ** 2  # (D,), (L, 1)
    minimum = 0.5 * (dim - (var / (lam + var)).sum(1)).mean().item()
    value, se = _mean_and_se(loss)
    assert abs(value - minimum) < 5 * se

    # Another model: the oracle of N(mean + delta, 1.5 cov). Paired with the same levels and noise.
    delta = torch.ones(dim, dtype=x.dtype)
    wrong = ncsn.ncsn_loss(GaussianOracle(mean + delta, 1.5 * cov), x, sigmas, reduction="none", levels=levels,
                           noise=noise)
    # s' - s = -(A' - A)(x~ - mean) + A' delta with A = (cov + sigma^2 I)^-1, A' = (1.5 cov + sigma^2 I)^-1,
    # both diagonal in cov's eigenbasis; x~ - mean ~ N(0, cov + sigma^2 I).
    a, a_wrong = 1 / (lam + var), 1 / (1.5 * lam + var)  # (L, D)
    delta_eig = delta @ torch.linalg.eigh(cov).eigenvectors  # (D,)
    gap = 0.5 * (var[:, 0] * ((a_wrong - a) ** 2 * (lam + var) + a_wrong ** 2 * delta_eig ** 2).sum(1)).mean().item()
    diff, se_diff = _mean_and_se(wrong - loss)
    assert abs(diff - gap) < 5 * se_diff
    assert gap > 0  # the true score is the strict minimiser
    if gap > 10 * se_diff:  # and where the gap is well above the noise, the paired estimate shows it
        assert diff > 5 * se_diff


@pytest.mark.parametrize("objective", ["ssm", "exact"])
@settings(max_examples=10)
@given(**gaussian_cases)
def test_score_matching_loss_of_the_exact_score_is_its_closed_form(objective, dim, seed, sigma_max, sigma_min,
                                                                   n_sigmas):
    """objective="ssm" (sliced, 2 projections) or "exact" at the true noisy score s = -A (x~ - mean),
    A = (Sigma + sigma^2 I)^-1: sigma^2 (tr grad s + 1/2 |s|^2) has mean sigma^2 (-tr A + 1/2 tr A), levels uniform."""
    g, mean, cov, x, sigmas = _gaussian_case(dim, seed, sigma_max, sigma_min, n_sigmas)
    loss = ncsn.ncsn_loss(GaussianOracle(mean, cov), x, sigmas, objective=objective, reduction="none",
                          n_projections=2, generator=g)
    lam, var = torch.linalg.eigvalsh(cov), sigmas[:, None] ** 2
    expected = -0.5 * (var[:, 0] * (1 / (lam + var)).sum(1)).mean().item()
    value, se = _mean_and_se(loss)
    assert abs(value - expected) < 5 * se


@pytest.mark.parametrize("objective", ["dsm", "ssm"])
def test_loss_at_initialisation_is_half_noise_norm(objective):
    """The zero-initialised output gives s = 0, so sigma^2 * 1/2 |0 + z / sigma|^2 = 1/2 |z|^2 at every level
    (and SSM's sigma^2 (tr grad 0 + 0) = 0)."""
    torch.manual_seed(0)
    sigmas = ncsn.geometric_sigmas(50.0, 0.01, 20)
    for model, x in [(_tiny(3, 8), torch.rand(6, 3, 8, 8)), (ncsn.MLPScoreNet(2), torch.randn(6, 2))]:
        noise = torch.randn_like(x)
        loss = ncsn.ncsn_loss(model, x, sigmas, objective=objective, reduction="none", noise=noise)
        expected = 0.5 * noise.pow(2).flatten(1).sum(1) if objective == "dsm" else torch.zeros(6)
        torch.testing.assert_close(loss, expected)
        levels = torch.randint(20, (6,))
        mean = ncsn.ncsn_loss(model, x, sigmas, objective=objective, levels=levels, noise=noise)
        assert mean.dim() == 0
        torch.testing.assert_close(mean, ncsn.ncsn_loss(model, x, sigmas, objective=objective, reduction="none",
                                                        levels=levels, noise=noise).mean())


# ---- the EMA (notes §10) -------------------------------------------------------------------------------------

def test_ema_follows_the_hand_formula_and_round_trips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()  # parameters and buffers, float and long
    decay = 0.9
    ema = ncsn.EMA(model, decay=decay)
    expected = {k: v.clone() for k, v in model.state_dict().items()}  # e_0 = theta_0
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 3, dtype=torch.float64))  # moves BatchNorm's running statistics and its step counter
        ema.update(model)
        for k, v in model.state_dict().items():
            expected[k] = decay * expected[k] + (1 - decay) * v if v.is_floating_point() else v.clone()
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-12, atol=1e-12)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    # a separate copy: changing the model leaves the average alone
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert torch.equal(ema.module[0].weight, before)
    # state_dict round trip, into another EMA and into a bare model
    other = ncsn.EMA(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double(), decay=decay)
    other.load_state_dict(ema.state_dict())
    bare = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    bare.load_state_dict(ema.state_dict())
    for k, v in ema.state_dict().items():
        assert torch.equal(other.state_dict()[k], v) and torch.equal(bare.state_dict()[k], v)


# ---- noise levels and NCSNv2's recommendations (notes §10) ---------------------------------------------------

@given(sigma_max=st.floats(0.1, 100.0), ratio=st.floats(1.5, 1e4), n=st.integers(2, 300))
def test_geometric_sigmas(sigma_max, ratio, n):
    sigmas = ncsn.geometric_sigmas(sigma_max, sigma_max / ratio, n, dtype=torch.float64)
    assert sigmas.shape == (n,) and sigmas[0] == sigma_max and sigmas[-1] == sigma_max / ratio
    steps = sigmas[:-1] / sigmas[1:]
    torch.testing.assert_close(steps, torch.full_like(steps, ratio ** (1 / (n - 1))), rtol=1e-10, atol=0)
    assert ncsn.geometric_sigmas(0.5, 0.5, 1).tolist() == [0.5]  # a single level is allowed


@given(dim=st.integers(5, 100_000))
def test_sigma_ratio_solves_technique_2(dim):
    gamma = ncsn.sigma_ratio(dim)
    phi = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))  # noqa: E731
    a = math.sqrt(2 * dim)
    assert abs(phi(a * (gamma - 1) + 3 * gamma) - phi(a * (gamma - 1) - 3 * gamma) - 0.5) < 1e-9


def test_recommended_values_match_the_published_cifar10_settings():
    """Notes §10: gamma = 1.0398 for D = 3072; f's minimiser is 6.2e-6 for 50 -> 0.01 in 232 levels with T = 5,
    f = 1.055 there. f is NCSNv2's, for the update x + eps s + sqrt(2 eps) z; this repository's update (notes §9)
    halves the step, so the step it returns is twice that: 1.24e-5."""
    assert abs(ncsn.sigma_ratio(3072) - 1.0398) < 1e-3
    sigmas = ncsn.geometric_sigmas(50.0, 0.01, 232)
    step_size = ncsn.recommended_step_size(sigmas, 5, 3072)
    assert abs(step_size / (2 * 6.2e-6) - 1) < 0.03
    gamma, last = (50.0 / 0.01) ** (1 / 231), 0.01 ** 2

    def f(eps):  # the notes' formula, as written there, in NCSNv2's step convention
        c = 2 * eps / (last - last * (1 - eps / last) ** 2)
        return (1 - eps / last) ** (2 * 5) * (gamma ** 2 - c) + c

    eps = step_size / 2
    assert abs(f(eps) - 1.055) < 1e-3
    assert f(eps) < min(f(0.98 * eps), f(1.02 * eps))  # a minimum of |f - 1| (f > 1 throughout)


def test_recommended_step_size_is_in_the_samplers_convention():
    """Technique 4 tied to the sampler: on q = N(0, sigma_L^2 I) at the last level, with the exact score and no noise,
    T annealed Langevin steps of the returned eps contract x by (1 - u)^T, u = f's minimiser eps' / sigma_L^2, exactly
    as NCSNv2's x + eps' s + sqrt(2 eps') z does (the contraction that f's (1 - eps'/sigma_L^2)^(2T) squares)."""
    sigmas, T = ncsn.geometric_sigmas(50.0, 0.01, 232, dtype=torch.float64), 5
    step_size = ncsn.recommended_step_size(sigmas, T)
    last = float(sigmas[-1])
    x0 = torch.ones(3, 2, dtype=torch.float64)
    x = annealed_langevin_dynamics(lambda y, s: -y / last ** 2, x0, sigmas[-1:], step_size, T, denoise=False,
                                   noise=torch.zeros(T, 3, 2, dtype=torch.float64))
    u = (step_size / 2) / last ** 2  # NCSNv2's eps' over sigma_L^2
    torch.testing.assert_close(x, x0 * (1 - u) ** T, rtol=1e-12, atol=0)


@pytest.mark.parametrize("batch_size", [7, 64, 1000])
def test_max_pairwise_distance_by_blocks_equals_cdist(batch_size):
    x = torch.randn(150, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full = torch.cdist(x.flatten(1), x.flatten(1)).max().item()
    assert ncsn.max_pairwise_distance(x, batch_size=batch_size) == pytest.approx(full, rel=1e-12)


@pytest.mark.parametrize("batch_size", [3, 7, 1000])
def test_max_pairwise_distance_of_uint8_images_is_in_pixel_units(batch_size):
    """uint8 images, converted block by block, give the distance of their float values: / 255 that of x / 255."""
    images = torch.randint(0, 256, (23, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    full = torch.cdist(images.flatten(1).double(), images.flatten(1).double()).max().item()
    assert ncsn.max_pairwise_distance(images, batch_size=batch_size) == pytest.approx(full, rel=1e-6)
    assert ncsn.max_pairwise_distance(images.float() / 255, batch_size=batch_size) == pytest.approx(full / 255,
                                                                                                     rel=1e-6)


def test_recommended_sigmas_on_the_corners_of_a_cube():
    """Corners of the cube {0, s}^8: the largest distance is the diagonal s sqrt(8) (technique 1); the number of
    levels is the fewest with a ratio no larger than gamma(8) (technique 2)."""
    side, dim = 3.0, 8
    corners = side * torch.cartesian_prod(*[torch.tensor([0.0, 1.0])] * dim)  # (256, 8)
    sigmas = ncsn.recommended_sigmas(corners[torch.randperm(256)], sigma_min=0.01, batch_size=50)
    assert sigmas[0].item() == pytest.approx(side * math.sqrt(dim), rel=1e-6)
    assert sigmas[-1].item() == pytest.approx(0.01, rel=1e-6)
    assert (sigmas[1:] < sigmas[:-1]).all()
    gamma, span = ncsn.sigma_ratio(dim), sigmas[0].item() / 0.01
    n = len(sigmas)
    assert span ** (1 / (n - 1)) <= gamma < span ** (1 / (n - 2))
    # a subset can only underestimate the largest distance
    assert ncsn.recommended_sigmas(corners, max_points=10, generator=torch.Generator().manual_seed(0))[0] <= sigmas[0]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_attention_runs_on_a_fused_kernel_in_either_layout_and_agrees_with_the_math_kernel(layout):
    """q, k and v reach scaled_dot_product_attention with each head's channels contiguous whatever the memory format,
    so a fused kernel accepts them (restricted to flash attention, which refuses any other stride), and the output is
    the math kernel's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    attention = ncsn.Attention(128)  # two heads of 64
    torch.nn.init.normal_(attention.out.weight, std=0.1)  # the zero-initialised output would hide everything
    x = torch.randn(2, 128, 8, 8).contiguous(memory_format=layout)
    with sdpa_kernel([SDPBackend.MATH]):
        expected = attention(x)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        fused = attention(x)
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)
    assert (fused - x).abs().max() > 0.1  # the attention did something
    assert fused.is_contiguous(memory_format=layout)  # the block runs in channels_last, the output keeps x's layout


# ---- the sampler (notes §9) ----------------------------------------------------------------------------------

def test_sample_gaussian_oracle_matches_ula_and_tweedie():
    """From the exact score of N(mean, diag(lam)): at the last level the chain's stationary variance is
    1 / (a (1 - eps a / 4)) with a = 1 / (lam + sigma_L^2) (unadjusted Langevin at step eps), and the denoising step
    x + sigma_L^2 s(x) scales the deviation from the mean by 1 - sigma_L^2 a."""
    mean, lam = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([1.0, 0.5], dtype=torch.float64)
    oracle = GaussianOracle(mean, torch.diag(lam))
    sigmas = ncsn.geometric_sigmas(8.0, 0.5, 5, dtype=torch.float64)
    step_size, n = 0.1, 4000
    x = ncsn.sample(oracle, (n, 2), sigmas, 100, step_size, generator=torch.Generator().manual_seed(0),
                    data_range=(-20.0, 20.0), batch_size=1500)
    assert x.shape == (n, 2) and x.dtype == torch.float64
    a = 1 / (lam + 0.25)
    var = (1 - 0.25 * a) ** 2 / (a * (1 - step_size * a / 4))
    assert ((x.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()
    assert ((x.var(0) - var).abs() < 5 * var * math.sqrt(2 / n)).all()


def test_sample_from_data_starts_at_data_plus_sigma_1_noise():
    """init: the first level's input is the data plus N(0, sigma_1^2) noise (NCSNv2 data_init), chunk by chunk: its
    per-point mean is the data and its variance sigma_1^2, so the cloud has the data's mean and variance + sigma_1^2."""
    first = []

    def score_fn(x, sigma):
        if not first:
            first.append(x.clone())
        return torch.zeros_like(x)

    g = torch.Generator().manual_seed(0)
    data = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    data += torch.tensor([3.0, -1.0, 0.0], dtype=torch.float64)
    sigmas = torch.tensor([1.5, 0.3], dtype=torch.float64)
    ncsn.sample(score_fn, data.shape, sigmas, 1, 1e-3, generator=g, data_range=(-50.0, 50.0), init=data)
    noise = first[0] - data  # the first chunk is the whole batch here
    n = len(data)
    assert (noise.mean(0).abs() < 5 * 1.5 / math.sqrt(n)).all()
    assert ((noise.var(0) - 1.5 ** 2).abs() < 5 * 1.5 ** 2 * math.sqrt(2 / n)).all()
    assert (noise[:, 0] * noise[:, 1]).mean().abs() < 5 * 1.5 ** 2 / math.sqrt(n)  # independent coordinates
    chunked = []
    tiny = torch.tensor([1e-3, 1e-4], dtype=torch.float64)  # so that each start sits on its own data point
    ncsn.sample(lambda x, s: chunked.append(x.clone()) or torch.zeros_like(x), (10, 3), tiny, 1, 1e-9,
                data_range=(-50.0, 50.0), init=data[:10], batch_size=4, generator=torch.Generator().manual_seed(1))
    starts = torch.cat([chunked[0], chunked[3], chunked[6]])  # 3 evaluations per chunk: 2 levels + denoise
    assert starts.shape == (10, 3) and ((starts - data[:10]).abs() < 6e-3).all()  # chunk by chunk, in order
    with pytest.raises(ValueError, match="init must have the samples' shape"):
        ncsn.sample(score_fn, (5, 3), sigmas, 1, 1e-3, init=data[:4])


def test_sample_range_shape_determinism_and_mode():
    torch.manual_seed(0)
    model = _reset(_tiny(1, 8))
    model.train()
    modes = []
    model.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    sigmas = ncsn.geometric_sigmas(1.0, 0.1, 3)
    draw = lambda: ncsn.sample(model, (5, 1, 8, 8), sigmas, 2, 1e-3, batch_size=2,  # noqa: E731
                               generator=torch.Generator().manual_seed(1), progress=True)
    x = draw()
    assert x.shape == (5, 1, 8, 8) and x.min() >= 0 and x.max() <= 1
    assert x.min() == 0 or x.max() == 1  # the untrained score throws points outside: only the output is clamped
    assert torch.equal(draw(), x)  # seeded
    assert model.training and modes and not any(modes)  # eval while sampling, training mode restored
    assert not ncsn.sample(model, (2, 1, 8, 8), sigmas, 1, 1e-3).requires_grad


def test_sample_returns_nan_for_chains_that_diverge_and_stops_when_its_callback_raises():
    """A chain that blows up comes back NaN, not clamped onto the box's edge where it would pass for a sample; the
    callback sees every network evaluation, (done, total), and an exception it raises ends the sampling."""
    sigmas = ncsn.geometric_sigmas(1.0, 0.1, 3)
    first_row = torch.tensor([[True], [False]])
    x = ncsn.sample(lambda y, s: torch.where(first_row, 1e38, -y), (2, 2), sigmas, 2, 1.0, data_range=(-1.0, 1.0))
    assert x[0].isnan().all()  # inf, or inf - inf along the way: NaN either way, never the edge +-1
    assert x[1].isfinite().all() and x[1].abs().max() <= 1  # the chain that stayed finite, clamped as before
    seen = []
    ncsn.sample(lambda y, s: -y, (4, 2), sigmas, 2, 1e-3, batch_size=2, callback=lambda done, total: seen.append(
        (done, total)), data_range=(-1.0, 1.0))
    assert seen == [(k, 2 * (3 * 2 + 1)) for k in range(1, 15)]

    class Enough(Exception):
        pass

    def stop_at_5(done, total):
        if done == 5:
            raise Enough

    calls = []
    with pytest.raises(Enough):
        ncsn.sample(lambda y, s: calls.append(1) or -y, (2, 2), sigmas, 2, 1e-3, callback=stop_at_5)
    assert len(calls) == 5



def _probe_net():
    """A small NCSN with non-zero weights, and what its forward passes saw: the dtype of its input (what the chain
    hands it) and the dtype and layout of its convolutions' outputs (conv_in's and the residual blocks' first)."""
    torch.manual_seed(0)
    model = _reset(ncsn.NCSN(1, channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                             image_size=8))
    seen = {"input": set(), "conv": set()}
    layout = lambda t: "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else "contiguous"  # noqa
    model.register_forward_pre_hook(lambda m, args: seen["input"].add(args[0].dtype))
    for conv in [model.conv_in] + [m.conv1 for m in model.modules() if isinstance(m, ncsn.ResBlock)]:
        conv.register_forward_hook(lambda m, args, out: seen["conv"].add((out.dtype, layout(out))))
    return model, seen


SMALL_CHAIN = dict(sigmas=ncsn.geometric_sigmas(1.0, 0.1, 3), n_steps_each=2, step_size=1e-2, denoise=False,
                   data_range=(-5.0, 5.0))


def test_sample_in_bf16_runs_the_network_in_bf16_and_stays_within_its_rounding_of_fp32():
    """precision="bf16": the convolutions compute in bf16 while the chain hands the network fp32 and returns fp32;
    the caller's model is unchanged. With the same noise the two chains differ only by the network's rounding:
    x_T = x_0 + sum_t alpha_t/2 s_t + noise, so |x_T^bf16 - x_T^fp32| <= sum_t alpha_t/2 |s_t^bf16 - s_t^fp32| as
    long as alpha |ds/dx| << 1 (here alpha <= 1, |ds/dx| ~ 0.1); bf16 keeps 8 significant bits, and a score through
    the network's ~10 roundings of 2^-9 is off by about 2^-8 of its size, so the bound is 4 * 2^-8 times the drift
    sum_t alpha_t/2 |s_t| of the fp32 chain (measured: about 1 * 2^-8)."""
    model, seen = _probe_net()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    scores = []  # (B,) norm of the score at every evaluation of the fp32 chain
    hook = model.register_forward_hook(lambda m, args, out: scores.append(out.flatten(1).norm(dim=1)))
    x32 = ncsn.sample(model, (4, 1, 8, 8), **SMALL_CHAIN, generator=torch.Generator().manual_seed(1))
    hook.remove()
    assert seen["conv"] == {(torch.float32, "contiguous")}  # the default layout: the CPU's default
    seen["input"].clear(), seen["conv"].clear()
    xbf = ncsn.sample(model, (4, 1, 8, 8), **SMALL_CHAIN, precision="bf16", generator=torch.Generator().manual_seed(1))
    assert seen["input"] == {torch.float32} and seen["conv"] == {(torch.bfloat16, "contiguous")}
    assert xbf.dtype == torch.float32
    assert all(torch.equal(t, before[name]) and t.dtype == before[name].dtype and t.is_contiguous()
               for name, t in model.state_dict().items())  # the caller's model: same values, dtype and layout
    sigmas, eps = SMALL_CHAIN["sigmas"], SMALL_CHAIN["step_size"]
    alphas = [eps * float(s / sigmas[-1]) ** 2 for s in sigmas for _ in range(SMALL_CHAIN["n_steps_each"])]
    drift = sum(alpha / 2 * s for alpha, s in zip(alphas, scores))  # (B,)
    gap = (xbf - x32).flatten(1).norm(dim=1)  # (B,)
    assert (gap <= 4 * 2 ** -8 * drift).all(), gap / drift
    assert (gap >= 2 ** -12 * drift).all(), gap / drift  # bf16's rounding is there: fp32's would be ~2^-20


def test_sample_in_channels_last_is_the_contiguous_chain_up_to_fp32_rounding():
    """channels_last changes only the network's memory layout (and so its convolutions' summation order): the chain
    draws the same noise in the same order, and the samples agree to fp32 rounding; the model is left contiguous."""
    model, seen = _probe_net()
    draw = lambda layout: ncsn.sample(model, (4, 1, 8, 8), **SMALL_CHAIN, channels_last=layout,  # noqa: E731
                                      generator=torch.Generator().manual_seed(1))
    contiguous = draw(False)
    assert seen["conv"] == {(torch.float32, "contiguous")}
    seen["conv"].clear()
    channels_last = draw(True)
    assert seen["conv"] == {(torch.float32, "channels_last")}
    torch.testing.assert_close(channels_last, contiguous, rtol=1e-5, atol=1e-5)
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.parametrize("precision, channels_last", [("fp32", False), ("bf16", True)])
def test_sample_through_the_cuda_graph_builder_is_the_plain_chain_bit_for_bit(precision, channels_last, monkeypatch):
    """cuda_graph=True off CUDA runs the graph path uncaptured: the network reads fixed buffers that every step copies
    x and sigma into, built anew when the batch shape changes (chunks of 2, 2, 1: two builds). The samples are the
    plain chain's, bit for bit, in either precision and layout."""
    model, _ = _probe_net()
    builds = []
    build = ncsn._static_network
    monkeypatch.setattr(ncsn, "_static_network", lambda network, x, sigma, capture: builds.append(
        (tuple(x.shape), capture)) or build(network, x, sigma, capture))
    draw = lambda graph: ncsn.sample(model, (5, 1, 8, 8), **SMALL_CHAIN, batch_size=2, precision=precision,  # noqa
                                     channels_last=channels_last, cuda_graph=graph,
                                     generator=torch.Generator().manual_seed(1))
    plain = draw(False)
    assert builds == []
    assert torch.equal(draw(True), plain)
    assert builds == [((2, 1, 8, 8), False), ((1, 1, 8, 8), False)]


def test_compile_hands_the_evaluation_to_torch_compile_once_per_call_in_static_shapes(monkeypatch):
    """compile=True: the evaluation (score_network's, under the fixed buffers of cuda_graph) goes through
    torch.compile once per sample call with dynamic=False, one static graph per batch shape, and the chain runs on
    what it returns: every evaluation of the 2 + 2 + 1 chunks (3 levels x 2 steps each), each shape's from its fixed
    input buffer. Off CUDA the layout stays
    the default one. torch.compile is stood in for by a counting identity (compiling takes minutes on a CPU; on a GPU
    tests/test_cuda.py compiles for real)."""
    model, seen = _probe_net()
    options, evaluations = [], []

    def compile_(fn, **kwargs):
        options.append(kwargs)
        return lambda x, sigma: evaluations.append((len(x), x.data_ptr())) or fn(x, sigma)

    monkeypatch.setattr(torch, "compile", compile_)
    draw = lambda compile: ncsn.sample(model, (5, 1, 8, 8), **SMALL_CHAIN, batch_size=2, compile=compile,  # noqa
                                       cuda_graph=True, generator=torch.Generator().manual_seed(1))
    plain = draw(False)
    assert options == [] and evaluations == []
    seen["conv"].clear()
    assert torch.equal(draw(True), plain)
    assert options == [{"dynamic": False}]
    assert [n for n, _ in evaluations] == [2] * 6 + [2] * 6 + [1] * 6
    # inside the fixed buffers: each batch shape's evaluations all read one input buffer (the graph's)
    assert len({ptr for n, ptr in evaluations[:12]}) == 1 and len({ptr for n, ptr in evaluations[12:]}) == 1
    assert seen["conv"] == {(torch.float32, "contiguous")}


def test_a_failed_cuda_graph_capture_samples_without_it_after_one_note(capsys):
    """Where capture fails (here: CPU tensors), the chain runs the plain evaluation, with a single note on stderr
    for all the batch shapes that follow."""
    model, _ = _probe_net()
    network = ncsn.score_network(model, "fp32", False)
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    run = lambda score_fn, x: annealed_langevin_dynamics(score_fn, x, [1.0, 0.5], 1e-2, 1,  # noqa: E731
                                                         generator=torch.Generator().manual_seed(1))
    graphed = ncsn._per_batch_shape(network, capture=True)
    assert torch.equal(run(graphed, x), run(network, x))
    assert torch.equal(run(graphed, x[:1]), run(network, x[:1]))  # a new shape, no second attempt
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("note: CUDA graph capture failed (") and \
        notes[0].endswith("sampling without CUDA graphs")

# ---- end to end: the two-mode mixture of notes §7 ------------------------------------------------------------

def test_trained_mlp_recovers_the_mode_weights():
    """Train MLPScoreNet with ncsn_loss on 1/5 N((-5,-5), I) + 4/5 N((5,5), I) with the toy sigmas (20 -> 1, L = 10),
    sample with annealed Langevin from the EMA weights: the weight of the (5, 5) mode is 0.8 within 5 binomial
    standard errors plus 0.04 for what 600 training steps leave of the model error."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    def data(n):
        upper = torch.rand(n, generator=g) < 0.8
        return torch.where(upper[:, None], 5.0, -5.0) + torch.randn(n, 2, generator=g)  # (n, 2)

    model = ncsn.MLPScoreNet(2, hidden=64)
    ema = ncsn.EMA(model, decay=0.99)
    sigmas = ncsn.geometric_sigmas(20.0, 1.0, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(600):
        loss = ncsn.ncsn_loss(model, data(512), sigmas, generator=g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(model)
    n = 1000
    x = ncsn.sample(ema.module, (n, 2), sigmas, 50, 0.1, generator=g, data_range=(-8.0, 8.0))
    weight = (x.sum(1) > 0).double().mean().item()
    assert abs(weight - 0.8) < 5 * math.sqrt(0.8 * 0.2 / n) + 0.04


# ---- copyable: ncsn.py needs only denoising.py and langevin.py -----------------------------------------------

COPIED_ALONE = """
import sys, torch, ncsn
torch.manual_seed(0)
sigmas = ncsn.geometric_sigmas(20.0, 0.5, 6)
model, x = ncsn.MLPScoreNet(2, hidden=32), torch.randn(64, 2) * 3
ema, optimizer = ncsn.EMA(model, decay=0.9), torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(30):
    loss = ncsn.ncsn_loss(model, x, sigmas)
    optimizer.zero_grad(); loss.backward(); optimizer.step(); ema.update(model)
net = ncsn.NCSN(1, channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8)
ncsn.ncsn_loss(net, torch.rand(2, 1, 8, 8), sigmas).backward()
samples = ncsn.sample(ema.module, (16, 2), sigmas, 3, 1e-3, data_range=(-8.0, 8.0))
images = ncsn.sample(net, (2, 1, 8, 8), sigmas, 1, 1e-3)
assert samples.shape == (16, 2) and images.shape == (2, 1, 8, 8) and torch.isfinite(samples).all()
assert "sliced" not in sys.modules and "score_matching" not in sys.modules
print(sorted(m for m in sys.modules if m in ("ncsn", "denoising", "langevin", "sliced", "score_matching")))
"""


def test_ncsn_denoising_and_langevin_copied_alone_train_and_sample(tmp_path):
    """The module docstring's promise: the three files in an empty folder train (DSM) and sample; sliced.py and
    score_matching.py are imported only by the objectives that use them."""
    for name in ("ncsn.py", "denoising.py", "langevin.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", COPIED_ALONE], cwd=tmp_path, env=dict(env, OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['denoising', 'langevin', 'ncsn']"
    missing = subprocess.run([sys.executable, "-c", "import torch, ncsn; ncsn.ncsn_loss(ncsn.MLPScoreNet(2), "
                              "torch.randn(4, 2), [1.0, 0.5], objective='ssm')"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert "No module named 'sliced'" in missing.stderr  # what the ssm objective needs, named when it is missing
