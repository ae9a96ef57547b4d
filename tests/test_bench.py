"""bench.py's section 2 (notes §5) as printed: the sliced estimates are unbiased and variance reduction lowers their
variance, for every projection kind and number of projections."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _printed_rows(stdout):
    """The rows of the first markdown table in stdout, as dicts of strings keyed by the header."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def test_sliced_section_shows_unbiased_estimates_and_variance_reduction():
    result = subprocess.run([sys.executable, "bench.py", "--quick", "--sections", "2"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = _printed_rows(result.stdout)
    # 2 dimensions x 3 projection kinds x 2 (with and without VR) x 3 numbers of projections.
    assert len(rows) == 36
    ratio, variance = {}, {}
    for row in rows:
        key = (row["D"], row["projection"], row["n_projections"], row["VR"])
        ratio[key], variance[key] = float(row["variance / gaussian no-VR"]), float(row["variance"])
        # Every projection kind has E[v v^T] = I, so every variant is unbiased for the exact value: the mean of the
        # seeded draws lies within 5 of its standard errors.
        assert abs(float(row["bias / SE"])) < 5, row
    for (*case, vr), value in ratio.items():
        case = tuple(case)  # (D, projection, n_projections)
        if vr == "yes":
            # SSM-VR replaces 1/2 (v^T s)^2 by its expectation 1/2 ||s||^2: with ||s||^2 of order D this removes a
            # variance of order ||s||^4 and keeps one of order ||A||_F^2, so the variance falls far below the plain one.
            assert value < ratio[(*case, "no")], case
            assert variance[(*case, "yes")] < 0.2 * variance[(*case, "no")], case
        elif case[1] == "gaussian":
            assert value == 1.0, case
