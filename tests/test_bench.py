"""bench.py's figures, called as functions: section 2's sliced estimates (notes §5) are unbiased and variance reduction
lowers their variance for every projection kind and number of projections; the settings bench.py times are
train.py's presets."""
import torch

import bench
import train


def test_bench_presets_are_train_presets():
    """bench.py copies the presets it times (nothing imports train.py); they must be the ones train.py trains with."""
    for copied, preset in ((bench.CIFAR10, train.PRESETS["cifar10"]), (bench.GMM, train.PRESETS["gmm"])):
        assert copied == {key: preset[key] for key in copied}


def test_sliced_section_shows_unbiased_estimates_and_variance_reduction():
    rows, notes = bench.bench_sliced_variance(torch.device("cpu"), quick=True)
    # 2 dimensions x 3 numbers of projections x 3 projection kinds x (without, with VR).
    assert len(rows) == 36 and notes
    variance = {(r["D"], r["projection"], r["n_projections"], r["VR"]): r["variance"] for r in rows}
    assert len(variance) == 36
    for row in rows:
        # Every projection kind has E[v v^T] = I, so every variant is unbiased for the exact value: the mean of the
        # seeded draws lies within 5 of its standard errors.
        assert abs(row["bias / SE"]) < 5, row
        gaussian = variance[row["D"], "gaussian", row["n_projections"], "no"]
        torch.testing.assert_close(row["variance / gaussian no-VR"], row["variance"] / gaussian)
    for (dim, projection, n_projections, vr), value in variance.items():
        if vr == "yes":
            # SSM-VR replaces 1/2 (v^T s)^2 by its expectation 1/2 ||s||^2: with ||s||^2 of order D this removes a
            # variance of order ||s||^4 and keeps one of order ||A||_F^2, so the variance falls far below the plain one.
            assert value < 0.2 * variance[dim, projection, n_projections, "no"], (dim, projection, n_projections)
        if n_projections > 1:
            # n independent directions average n independent estimates: the variance falls about n-fold (here at
            # least n/2-fold, far outside the sampling error of 200 draws).
            single = variance[dim, projection, 1, vr]
            assert value < 2 * single / n_projections, (dim, projection, n_projections, vr)
