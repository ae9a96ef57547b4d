"""Shared test settings: hypothesis is derandomised in CI (the same examples on every run) and has no deadline,
since a first call into torch can take longer than hypothesis's default budget. The tests run small ops (tiny
networks, 2-D chains), where a second intra-op thread only adds a synchronisation per op: one thread."""
import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=25, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

torch.set_num_threads(1)
