"""quality.py: FID and KID through torch-fidelity against their closed forms, in the space of a small linear feature
extractor registered for the tests; the real Inception path on random weights that the test saves (nothing is
downloaded); the digit classifier, the Gaussian baseline and the distance to the nearest training image."""
import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from hypothesis import given, settings, strategies as st
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

import data
import quality

LINEAR = "test-linear-8"


def linear_map(d):
    """The fixed (d, 8) matrix of the test features, one per input size d."""
    return torch.randn(d, 8, generator=torch.Generator().manual_seed(d), dtype=torch.float64)


def linear_features(images):
    """The test features in float64: the channel mean of uint8 images (N, C, H, W) in [0, 1], times linear_map."""
    x = images.double().mean(1).flatten(1) / 255  # (N, H W)
    return x @ linear_map(x.shape[1])  # (N, 8)


class LinearFeatures(FeatureExtractorBase):
    """linear_features in torch-fidelity's float32, as its one feature "8"."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list():
        return ("8",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "8"

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):
        return (linear_features(x).float(),)


if LINEAR not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(LINEAR, LinearFeatures)


def frechet(a, b):
    """The Frechet distance between Gaussians fitted to the rows of a and b, in float64 with scipy's sqrtm."""
    a, b = a.numpy(), b.numpy()
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def images(n, seed, shape=(1, 6, 6), low=0, high=256):
    return torch.randint(low, high, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@settings(max_examples=6, deadline=None)
@given(n=st.integers(12, 60), m=st.integers(12, 60), shift=st.integers(0, 100), seed=st.integers(0, 2 ** 16))
def test_fid_is_the_closed_form_frechet_distance_and_zero_for_a_set_with_itself(n, m, shift, seed):
    a, b = images(n, seed), images(m, seed + 1, low=shift)
    result = quality.fidelity(a, b, features=LINEAR, progress=False)
    expected = frechet(linear_features(a), linear_features(b))
    assert result["fid"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert result["is"] is None  # IS only in Inception's space
    assert abs(quality.fidelity(a, a, features=LINEAR, progress=False)["fid"]) < 1e-6


def test_kid_is_unbiased_for_one_law_and_positive_for_two():
    """KID's mean over 40 draws of two sets from one law is 0 within 5 standard errors; for two laws apart it is
    positive by more than 5."""
    same = [quality.fidelity(images(40, 2 * k), images(40, 2 * k + 1), features=LINEAR, progress=False)["kid"]
            for k in range(40)]
    apart = [quality.fidelity(images(40, 2 * k), images(40, 2 * k + 1, low=60), features=LINEAR,
                              progress=False)["kid"] for k in range(5)]
    standard_error = np.std(same, ddof=1) / np.sqrt(len(same))
    assert abs(np.mean(same)) < 5 * standard_error
    assert np.mean(apart) > 5 * standard_error + abs(np.mean(same))


def test_fewer_than_two_images_are_refused_in_one_line():
    with pytest.raises(quality.QualityError, match="at least 2 images"):
        quality.fidelity(images(1, 0), images(5, 1), features=LINEAR, progress=False)


def test_without_weights_or_a_network_the_error_is_one_line_naming_fid_weights(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise OSError("no network here")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache
    with pytest.raises(quality.QualityError, match="--fid-weights PATH") as error:
        quality.inception_weights()
    assert "\n" not in str(error.value) and "no network here" in str(error.value)
    with pytest.raises(quality.QualityError, match="is not a file"):
        quality.inception_weights(str(tmp_path / "missing.pth"))


def test_the_digit_classifier_reads_held_out_digits():
    images, labels = data.load_digits(train=True, labels=True)
    held_out, held_out_labels = data.load_digits(train=False, labels=True)
    assert images.shape == (1500, 1, 8, 8) and labels.shape == (1500,) and set(labels.tolist()) == set(range(10))
    net = quality.train_digit_classifier(images, labels, steps=300)
    assert (quality.classify(net, held_out) == held_out_labels).float().mean() > 0.95


def test_gaussian_fit_samples_have_the_references_mean_and_covariance():
    """Away from the pixel range's ends (no clamping), the draws' mean and covariance are the reference's within 5
    standard errors of each entry."""
    g = torch.Generator().manual_seed(0)
    root = 0.06 * torch.randn(4, 4, generator=g, dtype=torch.float64)
    reference = ((0.5 + torch.randn(3000, 4, generator=g, dtype=torch.float64) @ root.T).clamp(0, 1) * 255).round()
    reference = reference.to(torch.uint8).reshape(3000, 1, 2, 2)
    draws = quality.gaussian_fit_samples(reference, 6000, g)
    assert draws.shape == (6000, 1, 2, 2) and draws.dtype == torch.uint8
    x, y = reference.flatten(1).double() / 255, draws.flatten(1).double() / 255
    var = x.var(0)
    assert ((y.mean(0) - x.mean(0)).abs() < 5 * (var / len(y) + var / len(x)).sqrt()).all()
    cov_x, cov_y = torch.cov(x.T), torch.cov(y.T)
    se = ((torch.outer(var, var) + cov_x ** 2) * (1 / len(x) + 1 / len(y))).sqrt()
    assert ((cov_y - cov_x).abs() < 5 * se).all()


def test_nearest_distances_are_brute_force_and_zero_for_a_copy():
    reference, queries = images(50, 0, shape=(1, 3, 3)), images(7, 1, shape=(1, 3, 3))
    queries[3] = reference[17]
    d = quality.nearest_distances(queries, reference, batch_size=3)
    brute = torch.cdist(queries.flatten(1).double() / 255, reference.flatten(1).double() / 255).min(1).values
    assert torch.allclose(d.double(), brute, atol=1e-6) and d[3] == 0
