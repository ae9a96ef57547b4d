"""Shared test settings: hypothesis is derandomised in CI (the same examples on every run) and has no deadline,
since a first call into torch can take longer than hypothesis's default budget. The tests run small ops (tiny
networks, 2-D chains), where a second intra-op thread only adds a synchronisation per op: one thread. And one
shared fixture: Inception weights that the tests make themselves (nothing can be downloaded)."""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=25, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory):
    """A randomly initialised Inception state dict in torch-fidelity's layout, saved as a weights file would be (for
    sample.py --fid-weights in test_sample.py)."""
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.save({}, path)
    load_state_dict = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, state_dict: None  # keep the random initialisation
    try:
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    finally:
        FeatureExtractorInceptionV3.load_state_dict = load_state_dict
    torch.save(net.state_dict(), path)
    return path
