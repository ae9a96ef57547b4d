"""Performance figures of the project, measured in one run and printed as markdown tables (notes §3-§10).

    python bench.py                    # every section; under three minutes on 2 CPU cores, larger settings on a GPU
    python bench.py --quick            # smaller settings, under thirty seconds on a CPU
    python bench.py --sections 1,4 --json bench.json

1. Cost of one training step against the dimension D: exact score matching (notes §3, Hyvärinen 2005, Thm 1; D
   backward passes), sliced score matching with and without variance reduction (notes §5, Song et al. 2019) and
   denoising score matching (notes §4, Vincent 2011), each as a ratio to DSM at the same D.
2. The variance of the sliced estimate against the exact value E[tr(grad_x s) + 1/2 ||s||^2] on a Gaussian with a
   linear score s(x) = A x + b, where the exact value is tr(A) + 1/2 mean ||A x + b||^2 (notes §5).
3. Annealed Langevin dynamics (notes §9, Song & Ermon 2019 Algorithm 1): the sampler's time over that of the same
   number of bare score evaluations.
4. The NCSN U-Net at the CIFAR-10 preset (notes §8, §10), beside NCSNv2's published network: training images/s in
   train.py's layout, memory, FLOPs, share of the GPU's bf16 peak, and attention's share of the step's time beside its
   share of the FLOPs (on a CPU, with the rates of its matrix products and of its convolutions).
5. Sampling the CIFAR-10 preset's full annealed chain (L T + 1 = 232 * 5 + 1 evaluations), images/s, in fp32, bf16,
   and on a GPU with CUDA graphs and torch.compile, with the time 50,000 samples would take.
6. The toy objectives table: DSM, SSM-VR and exact score matching through ncsn.ncsn_loss on the notes' two-mode
   mixture, with the Fisher divergence of each trained model to the true noisy score.
7. Where the U-Net's time goes: the operators with the most time of their own (torch.profiler) in one sampling
   evaluation and one training step.

Machines are noisy, so every comparison is a ratio of interleaved measurements (A B A B ..., medians) taken in the
same run; a comparison whose rounds disagree (the max/min of its per-round ratios above AGREEMENT; where it is judged
over five rounds or more, leaving out the highest and the lowest, as the median does) is timed for more rounds, within
a bound, and each row says how many it took. Timings use time.perf_counter, with the device synchronised around each
timed call on CUDA. OpenMP's threads wait passively (OMP_WAIT_POLICY=PASSIVE, set before torch loads OpenMP) unless
the environment or --omp-wait active says otherwise: a thread that spins while it waits for a partner that another
process has descheduled made small steps up to 100x slower on a shared 2-core machine.
"""
import os
import sys


def omp_wait_policy(argv, environ):
    """(OMP_WAIT_POLICY for this run, why): --omp-wait passive|active in argv, else the environment's, else PASSIVE."""
    for i, arg in enumerate(argv):
        value = arg.partition("=")[2] if arg.startswith("--omp-wait=") else \
            argv[i + 1] if arg == "--omp-wait" and i + 1 < len(argv) else None
        if value in ("passive", "active"):
            return value.upper(), "--omp-wait"
    if environ.get("OMP_WAIT_POLICY"):
        return environ["OMP_WAIT_POLICY"], "from the environment"
    return "PASSIVE", "bench.py's default"


# OpenMP reads its waiting policy once, when torch loads it: it is set here, before `import torch`. Imported (by the
# tests), bench.py changes nothing and reports what the importing process had.
if __name__ == "__main__":
    OMP_WAIT = omp_wait_policy(sys.argv[1:], os.environ)
    os.environ["OMP_WAIT_POLICY"] = OMP_WAIT[0]
else:
    OMP_WAIT = (os.environ.get("OMP_WAIT_POLICY", "unset"), "as the importing process had it")

import argparse
import contextlib
import copy
import ctypes
import itertools
import json
import math
import platform
import re
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import ncsn
import runs
from denoising import denoising_score_matching_loss
from langevin import annealed_langevin_dynamics
from score_matching import score_matching_loss
from sliced import sliced_score_matching_loss

# train.py's presets (notes' reference table), copied because nothing imports train.py (tests/test_bench.py checks
# that they agree).
# NCSNv2 CIFAR-10: sigmas 50 -> 0.01 in L = 232 levels, T = 5 steps each, final denoising step; their step 6.2e-6
# (for x + eps s + sqrt(2 eps) z) is 1.24e-5 in the notes' §9 update x + eps/2 s + sqrt(eps) z used here.
CIFAR10 = dict(sigma_max=50.0, sigma_min=0.01, n_sigmas=232, n_steps_each=5, step_size=1.24e-5, batch_size=128)
# The two-mode mixture: sigmas 20 -> 0.01 in 30 levels, T = 50, step size 1e-5, Adam 1e-3, batch 512, MLP of 128.
GMM = dict(sigma_max=20.0, sigma_min=0.01, n_sigmas=30, n_steps_each=50, step_size=1e-5, lr=1e-3, batch_size=512,
           hidden=128)

# NCSNv2's CIFAR-10 network as published (Song & Ermon 2020): parameters and GFLOPs per 32x32 image forward;
# section 4 sets ours beside it.
NCSNV2_CIFAR10 = {"M parameters": 29.7, "GFLOPs / image": 19.8}

# Dense bf16 peaks (TFLOP/s, without sparsity) by device name; the first matching pattern wins.
BF16_PEAK_TFLOPS = ((r"H100.*PCIe", 756), (r"H100.*NVL", 835), (r"H100", 989), (r"H200.*NVL", 835), (r"H200", 989),
                    (r"A100", 312), (r"\bL4\b", 121), (r"RTX 4090", 165))


# ---- Timing ---------------------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    """Seconds taken by one call of fn, the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved_rounds(fns, device, warmup=1):
    """Rounds of timings of the fns in fns (a dict), {name: seconds} each, A B C then C B A, ..., after `warmup`
    untimed calls of each: every other round runs in reverse order, so that no variant always follows the same one.
    Endless: the caller stops when it has enough."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    for round_ in itertools.count():
        yield {name: _timed(fns[name], device) for name in (names if round_ % 2 == 0 else names[::-1])}


def _medians(rounds):
    return {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}


def interleaved_medians(fns, device, repeats, warmup=1, budget_s=math.inf):
    """Median seconds per call of each fn in fns (a dict), over interleaved rounds (interleaved_rounds) after warmup.

    Stops after `repeats` rounds, or after two once the rounds have taken budget_s seconds. Returns ({name: median
    seconds}, rounds timed).
    """
    times, start = [], time.perf_counter()
    for round_ in interleaved_rounds(fns, device, warmup):
        times.append(round_)
        if len(times) >= repeats or (len(times) >= 2 and time.perf_counter() - start > budget_s):
            return _medians(times), len(times)


# A comparison is timed for more rounds while the max/min of its per-round ratios exceeds this: one disturbed round
# (another process took a core mid-call) moves a ratio by far more than two undisturbed rounds differ. Where a
# comparison is judged over five rounds or more, the highest and lowest ratio are left out: one such round leaves
# their median alone.
AGREEMENT = 1.15
# Rounds over which section 4 takes attention's share of the step's time (fewer where its time budget runs out).
ATTENTION_ROUNDS = 15


def ratio_spread(rounds, reference, trim=0):
    """The largest max/min, over the fns other than `reference`, of their per-round time ratios to it (1 if none),
    leaving out each one's `trim` highest and `trim` lowest ratios."""
    ratios = [sorted(r[name] / r[reference] for r in rounds) for name in rounds[0] if name != reference]
    return max((r[len(r) - 1 - trim] / r[trim] for r in ratios), default=1.0)


def agreeing_medians(fns, device, rounds, max_rounds, budget_s=math.inf, warmup=1, spread=AGREEMENT):
    """Median seconds per call of each fn in fns over `rounds` consecutive interleaved rounds whose time ratios to the
    first fn agree: each ratio's max/min over them at most `spread`, leaving out its highest and lowest where `rounds`
    is five or more (their median ignores one outlying round, and so does the check). While the last `rounds`
    rounds disagree, one more is timed, up to max_rounds, or until budget_s has passed after the first `rounds`; then
    the medians are of every round timed. Returns ({name: median seconds}, {"timed", "used": rounds the medians are
    of, "spread": their ratio_spread, "trim": ratios left out at each end, "agreed", "limit": spread}, [per-round
    {name: seconds} the medians are of])."""
    if not 1 <= rounds <= max_rounds:
        raise ValueError(f"need 1 <= rounds <= max_rounds, got {rounds} and {max_rounds}")
    reference, trim = next(iter(fns)), 1 if rounds >= 5 else 0
    times, start = [], time.perf_counter()
    for round_ in interleaved_rounds(fns, device, warmup):
        times.append(round_)
        window = times[-rounds:]
        agreed = len(window) == rounds and ratio_spread(window, reference, trim) <= spread
        if not agreed and len(times) < max_rounds and (len(times) < rounds or time.perf_counter() - start <= budget_s):
            continue
        used = window if agreed else times
        info = dict(timed=len(times), used=len(used), spread=ratio_spread(used, reference, trim), trim=trim,
                    agreed=agreed, limit=spread)
        return _medians(used), info, used


def _calls(fn, calls):
    """fn as one callable that calls it `calls` times and drops each result (kept until the end, large results would
    make every call fault in fresh memory, and the time would be the allocator's)."""
    def run():
        for _ in range(calls):
            fn()
    return run


def repeated(fns, device, round_s):
    """The fns in fns (a dict) wrapped so that one call of each makes `calls` calls of it, `calls` the fewest with
    which the quickest (its best of three calls timed here) lasts round_s: a round of calls of a few milliseconds is
    then long enough that one hiccup of the machine (an interrupt, another process's time slice) moves its ratios by
    little. Returns (the wrapped fns, calls); divide their times by calls."""
    quickest = min(_timed(fn, device) for fn in fns.values() for _ in range(3))
    calls = max(1, math.ceil(round_s / quickest)) if quickest > 0 else 1
    return {name: _calls(fn, calls) for name, fn in fns.items()}, calls


def agreement_note(info):
    """A table cell: how many rounds a comparison took, and whether they agreed (agreeing_medians)."""
    ratios = f"the middle {info['used'] - 2 * info['trim']} ratios" if info["trim"] else "ratios"
    if info["agreed"]:
        return (f"median of {info['used']} rounds, {ratios} within {info['spread']:.3f}"
                + (f" (agreed after {info['timed']} rounds)" if info["timed"] > info["used"] else ""))
    return (f"median of {info['timed']} rounds; {ratios} still spread {info['spread']:.2f} > {info['limit']} at the "
            "round or time limit")


def _proc_status_mib(field):
    """A memory field of /proc/self/status ("VmRSS": resident now, "VmHWM": its peak) in MiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s*(\d+) kB", f.read(), re.MULTILINE).group(1)) / 1024


def _measure_peak_memory(fn, device):
    """Peak memory (MiB) of one call of fn: CUDA's peak allocation, or on the CPU the rise of the resident set over
    what it was before the call (None where Linux's peak-RSS reset, /proc/self/clear_refs, isn't available)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc: hand freed heap memory back, so earlier steps don't hide this one's
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS, so the call's own peak shows
        before = _proc_status_mib("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    return _proc_status_mib("VmHWM") - before


# ---- Small pieces -----------------------------------------------------------------------------------------------

def _mlp(dim, hidden, seed=0):
    """The score model of section 1: D -> hidden -> hidden -> D with Softplus; a given seed gives given weights."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Softplus(), torch.nn.Linear(hidden, hidden),
                               torch.nn.Softplus(), torch.nn.Linear(hidden, dim))


def _training_step(model, loss_fn):
    """One step: loss, backward, Adam step; returns the callable that takes it."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def autocast(device, precision):
    """bf16 autocast for the network's forward pass; the loss and the EMA stay in fp32 (as train.py's)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def _error_summary(error):
    """An exception as "Type: first line of its message", for a table cell."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:160] if lines else ''}"


def device_name(device):
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_peak_tflops(name):
    """Dense bf16 peak of a known GPU by name, or None."""
    for pattern, peak in BF16_PEAK_TFLOPS:
        if re.search(pattern, name):
            return peak
    return None


# ---- 1. Cost of one training step against D -------------------------------------------------------------------

def bench_step_cost(device, quick):
    """Cost of one step (loss, backward, Adam) of exact SM (notes §3), SSM, SSM-VR (§5) and DSM (§4) against D."""
    gpu = device.type == "cuda"
    dims = (2, 64, 784) if quick else (2, 64, 784, 3072)
    batch, hidden = (256 if gpu else 64), 256
    # Exact SM is timed at every D <= 64 (at most 64 backward passes); beyond, it is skipped where its step estimated
    # from the largest D it was timed at is longer: D / D_prev times that time, the ratio of the numbers of backward
    # passes, a lower bound since each pass costs more at a larger D.
    exact_limit_s = 0.3 if quick else (10.0 if gpu else 3.0)
    objectives = {
        "dsm": lambda model, x: denoising_score_matching_loss(model, x, 0.1),
        "ssm": lambda model, x: sliced_score_matching_loss(model, x, n_projections=1, projection="gaussian"),
        "ssm-vr": lambda model, x: sliced_score_matching_loss(model, x, variance_reduction=True),
        "exact (vectorised)": lambda model, x: score_matching_loss(model, x, trace="vectorized"),
        "exact (loop)": lambda model, x: score_matching_loss(model, x, trace="loop"),
    }
    rows, notes, timed_at = [], [], {}  # timed_at[objective] = (D, seconds): the largest D it was timed at
    for dim in dims:
        x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(dim)).to(device)  # (B, D)
        steps, skipped = {}, {}
        for name, loss_fn in objectives.items():
            if name.startswith("exact") and dim > 64:
                estimate = timed_at[name][1] * dim / timed_at[name][0]  # D backward passes per step
                if estimate > exact_limit_s:
                    skipped[name] = (f"skipped (est. ≥ {estimate:.3g} s: D / {timed_at[name][0]} × the time at "
                                     f"D = {timed_at[name][0]})")
                    continue
            model = _mlp(dim, hidden).to(device)
            steps[name] = _training_step(model, lambda model=model, loss_fn=loss_fn: loss_fn(model, x))
        # The warmup, timed: an exact step far slower than the limit is reported once and not repeated.
        first = {name: _timed(step, device) for name, step in steps.items()}
        cold = {name: first[name] for name in steps if name.startswith("exact") and first[name] > 2 * exact_limit_s}
        # Two interleaved groups: the cheap objectives among themselves (the ratio that matters, SSM / DSM, must not
        # share rounds with steps 100x longer, after which the next step runs on cold caches), then exact SM.
        # The cheap ones must agree (their ratios to DSM are the goal's): more rounds while they don't. A round
        # takes each of them several times, for 50 ms: in one call of a few ms, a single hiccup of the machine moved
        # a ratio by more than AGREEMENT, and 60 rounds could pass without 9 agreeing in a row.
        cheap, calls = repeated({n: f for n, f in steps.items() if not n.startswith("exact")}, device, 0.05)
        medians, agreement, _ = agreeing_medians(cheap, device, warmup=0, rounds=5 if quick else 9,
                                                 max_rounds=30 if quick else 60, budget_s=1.0 if quick else 8.0)
        medians = {name: seconds / calls for name, seconds in medians.items()}
        exact = {n: f for n, f in steps.items() if n.startswith("exact") and n not in cold}
        exact_medians, exact_rounds = interleaved_medians(exact, device, warmup=0, repeats=9 if quick else 15,
                                                          budget_s=1.0 if quick else 8.0) if exact else ({}, 0)
        medians.update(exact_medians)
        for name in objectives:
            if name in skipped:
                rows.append({"D": dim, "objective": name, "ms / step": None, "time / DSM": None, "note": skipped[name]})
                continue
            seconds = medians.get(name, cold.get(name))
            timed_at[name] = (dim, seconds)
            note = f"one cold step (over 2 × {exact_limit_s:g} s), not repeated" if name in cold else \
                f"median of {exact_rounds}" if name.startswith("exact") else \
                f"{calls} steps a round; {agreement_note(agreement)}"
            rows.append({"D": dim, "objective": name, "ms / step": 1e3 * seconds,
                         "time / DSM": seconds / medians["dsm"], "note": note})
    ratio = {(r["D"], r["objective"]): r["time / DSM"] for r in rows}
    notes.append(f"MLP D-{hidden}-{hidden}-D (Softplus), batch {batch}; a step is loss + backward + Adam step; "
                 f"interleaved rounds, median; dsm, ssm and ssm-vr take several steps a round (about 50 ms of the "
                 f"quickest), and are timed until {AGREEMENT} bounds the max/min of their per-round ratios to dsm (the "
                 "highest and lowest left out), or a limit is reached (the note says which).")
    for name in ("exact (vectorised)", "ssm-vr"):
        trend = ", ".join(f"{ratio[dim, name]:.3g} at D = {dim}" for dim in dims if ratio[dim, name] is not None)
        notes.append(f"{name} / DSM: {trend}.")
    notes.append(f"SSM-VR / DSM at D = 784: {ratio[784, 'ssm-vr']:.2f} (goal ≤ 2.5)")
    return rows, notes


# ---- 2. Variance of the sliced estimate ------------------------------------------------------------------------

def _linear_score_problem(dim, n_points, device, seed=0):
    """A linear score s(x) = A x + b and a fixed batch x ~ N(mu, Sigma) (float64), with the exact loss on the batch."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    A = torch.randn(dim, dim, generator=g, **f64) / math.sqrt(dim) - torch.eye(dim, **f64)  # (D, D), not symmetric
    b = 0.3 * torch.randn(dim, generator=g, **f64)
    mu = torch.randn(dim, generator=g, **f64)
    chol = torch.eye(dim, **f64) + 0.3 * torch.randn(dim, dim, generator=g, **f64).tril(-1) / math.sqrt(dim)
    x = mu + torch.randn(n_points, dim, generator=g, **f64) @ chol.T  # (N, D), Sigma = chol chol^T
    A, b, x = A.to(device), b.to(device), x.to(device)
    exact = (torch.trace(A) + 0.5 * (x @ A.T + b).pow(2).sum(1).mean()).item()  # tr(A) + 1/2 mean ||A x + b||^2
    return (lambda y: y @ A.T + b), x, exact


def bench_sliced_variance(device, quick):
    """Bias and variance of the sliced estimate (notes §5) of E[tr(grad s) + 1/2 ||s||^2] on one fixed batch."""
    n_points, n_draws = (32, 200) if quick else (32, 600)
    rows = []
    for dim in (16, 64):
        score_fn, x, exact = _linear_score_problem(dim, n_points, device)
        for n_projections in (1, 4, 16):
            variance_of = {}
            for projection in ("gaussian", "rademacher", "sphere"):
                for variance_reduction in (False, True):
                    # n_draws independent draws at once: the batch stacked n_draws times, one direction per row,
                    # in chunks of about 4M numbers; each draw's estimate is the mean over its copy of the batch.
                    g = torch.Generator(device).manual_seed(1)
                    chunk = max(1, 2 ** 22 // (n_projections * n_points * dim))
                    estimates = []
                    for start in range(0, n_draws, chunk):
                        k = min(chunk, n_draws - start)
                        per_example = sliced_score_matching_loss(
                            score_fn, x.repeat(k, 1), n_projections=n_projections, projection=projection,
                            variance_reduction=variance_reduction, reduction="none", generator=g)  # (k * N,)
                        estimates.append(per_example.reshape(k, n_points).mean(1))  # (k,)
                    estimates = torch.cat(estimates)  # (n_draws,)
                    variance = estimates.var().item()
                    variance_of[projection, variance_reduction] = variance
                    rows.append({"D": dim, "projection": projection, "VR": "yes" if variance_reduction else "no",
                                 "n_projections": n_projections,
                                 "bias / SE": (estimates.mean().item() - exact) / math.sqrt(variance / n_draws),
                                 "variance": variance,
                                 "variance / gaussian no-VR": variance / variance_of["gaussian", False]})
    notes = [f"s(x) = A x + b on {n_points} fixed points x ~ N(mu, Sigma), float64; {n_draws} seeded draws of the "
             f"directions per row; exact value tr(A) + 1/2 mean ||A x + b||^2; bias in standard errors of the mean "
             f"(|bias / SE| < 5 expected of an unbiased estimator); the ratio is to gaussian no-VR at the same D "
             f"and n_projections."]
    return rows, notes


# ---- 3. Sampler overhead ---------------------------------------------------------------------------------------

def bench_sampler_overhead(device, quick):
    """Annealed Langevin dynamics (notes §9, Algorithm 1): its time over that of as many bare score evaluations."""
    gpu = device.type == "cuda"
    torch.manual_seed(0)
    small_unet = ncsn.NCSN(channels=32, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0)
    cases = [
        ("small NCSN (32 ch, 2 levels)", small_unet, (128 if gpu else 4 if quick else 8, 3, 32, 32), 4 if quick else 10,
         2 if quick else (5 if gpu else 2)),
        (f"MLPScoreNet(2, hidden={GMM['hidden']})", ncsn.MLPScoreNet(2, hidden=GMM["hidden"]),
         (GMM["batch_size"], 2), GMM["n_sigmas"], 5 if quick else GMM["n_steps_each"]),
    ]
    rows = []
    for name, model, shape, n_sigmas, n_steps_each in cases:
        model = model.to(device).eval()
        sigmas = ncsn.geometric_sigmas(1.0, 0.01, n_sigmas)
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
        n_evals = n_sigmas * n_steps_each + 1  # + the final denoising step
        sigma = torch.full(shape[:1], 0.1, device=device)  # (B,)
        generator = torch.Generator(device).manual_seed(0)

        def sampler():
            annealed_langevin_dynamics(model, x, sigmas, 1e-5, n_steps_each, generator=generator)

        @torch.no_grad()
        def bare():
            for _ in range(n_evals):
                model(x, sigma)

        with torch.no_grad():
            model(x, sigma)  # warmup: one evaluation, rather than a whole chain of each
        # The goal's ratio: timed until the sampler / bare ratios of `rounds` consecutive rounds agree.
        medians, agreement, _ = agreeing_medians({"bare": bare, "sampler": sampler}, device, warmup=0,
                                                 rounds=3 if quick else 5, max_rounds=8 if quick else 20,
                                                 budget_s=3.0 if quick else 15.0)
        rows.append({"model": name, "x": "×".join(map(str, shape)), "evaluations": n_evals,
                     "sampler ms": 1e3 * medians["sampler"], "bare ms": 1e3 * medians["bare"],
                     "overhead": medians["sampler"] / medians["bare"], "goal": "≤ 1.15",
                     "note": agreement_note(agreement)})
    notes = ["overhead = annealed Langevin time / time of the same number of bare model calls under no_grad on inputs "
             f"of the same shape; interleaved, median; timed until the per-round ratios of consecutive rounds agree "
             f"within {AGREEMENT} (max/min{'' if quick else ', the highest and lowest left out'}), or a limit is "
             "reached (the note says which)."]
    return rows, notes


# ---- 4. The NCSN U-Net at the CIFAR-10 preset -----------------------------------------------------------------

def training_layout(device):
    """The memory format train.py trains the U-Net and its batches in (its image_layout, copied): channels_last on
    CUDA, the default on a CPU."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def gflops_per_image(model, shape, device):
    """The network's forward cost for one input of `shape`, in GFLOPs (2 per multiply-add; torch's FlopCounterMode),
    counted as train.py's gflops_per_image (copied): in eval mode, on zeros at sigma = 1, attention on the math kernel
    (FlopCounterMode has no formula for the CPU's flash kernel, and would miss attention's two matmuls there)."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), \
            FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *shape, device=device), torch.ones(1, device=device))
    model.train(was_training)
    return counter.get_total_flops() / 1e9


def without_attention(model):
    """A copy of an ncsn.NCSN with every self-attention layer (ncsn.Attention, a residual branch) replaced by the
    identity, the rest (weights, layout) unchanged: attention's share of a cost is 1 - the copy's / the network's."""
    ablated = copy.deepcopy(model)
    for module in list(ablated.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ncsn.Attention):
                setattr(module, name, torch.nn.Identity())
    return ablated


def attention_product_rates(model, shape, batch, device, calls=20):
    """The rates, in fp32 and in the same run, of the two kinds of work in the network's first attention layer at
    batch `batch`: its matrix products (q k^T per image and head, torch.matmul on (batch * heads, H*W, C/heads)
    tensors: a BLAS's batched GEMM, MKL on an x86 CPU) and its qkv 1x1 convolution (channels_last, as the layer runs
    it: oneDNN on a CPU). Attention's share of the step's time can only come near its share of the FLOPs where the two
    run at similar rates. Forward only, each timed as `calls` calls, interleaved (interleaved_medians).

    Returns {"shape": (batch * heads, H*W, C/heads), "qkv input": (batch, C, H, W), "matmul GFLOP/s", "1x1 conv
    GFLOP/s"}, the FLOPs of each counted by FlopCounterMode; None where the network has no attention."""
    layer = next((m for m in model.modules() if isinstance(m, ncsn.Attention)), None)
    if layer is None:
        return None
    inputs = []
    hook = layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0].shape))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *shape, device=device), torch.ones(1, device=device))
    model.train(was_training)
    hook.remove()
    _, channels, height, width = inputs[0]
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(batch * layer.heads, height * width, channels // layer.heads, generator=generator).to(device)
            for _ in range(2))
    x = torch.randn(batch, channels, height, width, generator=generator).to(device, memory_format=torch.channels_last)
    weight, bias = (t.detach().float() for t in (layer.qkv.weight, layer.qkv.bias))
    ops = {"matmul": lambda: q @ k.transpose(1, 2), "1x1 conv": lambda: torch.nn.functional.conv2d(x, weight, bias)}
    flops = {}
    for name, op in ops.items():
        with FlopCounterMode(display=False) as counter:
            op()
        flops[name] = counter.get_total_flops()
    with torch.no_grad():
        medians, _ = interleaved_medians({name: _calls(op, calls) for name, op in ops.items()}, device, repeats=7)
    return {"shape": tuple(q.shape), "qkv input": tuple(x.shape),
            **{f"{name} GFLOP/s": calls * flops[name] / medians[name] / 1e9 for name in ops}}


def unet_training_step(net, module, precision, x, sigmas, generator, trainers):
    """train.py's step on the batch x: ncsn_loss (DSM) with autocast around the network only (the loss in fp32),
    backward, Adam (fused, as train.py's on cuda and cpu), the EMA; returns the callable that takes it.

    net: the module, or a compiled or wrapped form of it; module: the plain module, whose Adam and EMA are made once
    and kept in trainers {module: (Adam, EMA)}, so that the variants of one network share them as one run would."""
    if module not in trainers:
        trainers[module] = torch.optim.Adam(module.parameters(), lr=1e-4, fused=True), ncsn.EMA(module, 0.999)
    optimizer, ema = trainers[module]

    def score_fn(y, sigma):
        with autocast(x.device, precision):
            return net(y, sigma).float()

    def step():
        if net is not module:  # compiled: with CUDA graphs, a new step, as in train.py (uncompiled, no inductor import)
            torch.compiler.cudagraph_mark_step_begin()
        loss = ncsn.ncsn_loss(score_fn, x, sigmas, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(module)

    return step


def unet_settings(device, quick, compile_on_cpu=False, batch=None):
    """What section 4 runs on `device`: the batch and train.py's layout, the variants {name: (precision, compile
    mode)} (mode None: uncompiled), those skipped {name: why}, and the variant that attention's share is timed in
    (train.py's precision there). On a GPU: the preset's batch of 128 in channels_last, fp32, bf16, bf16 + compile
    and bf16 + compile with CUDA graphs (train.py --compile on one GPU), attention in bf16; on a CPU a small batch in
    the default layout, fp32 and bf16, compile only with --compile-on-cpu, attention in fp32."""
    gpu = device.type == "cuda"
    variants, skipped = {"fp32": ("fp32", None), "bf16 autocast": ("bf16", None)}, {}
    if gpu:
        variants["bf16 autocast + compile"] = ("bf16", "default")
        variants["bf16 autocast + compile + CUDA graphs"] = ("bf16", "reduce-overhead")
    elif compile_on_cpu and not quick:
        variants["fp32 + compile"] = ("fp32", "default")
    else:
        skipped["fp32 + compile"] = "skipped on the CPU: compiling takes minutes (--compile-on-cpu runs it)"
    return dict(gpu=gpu, batch=batch or (CIFAR10["batch_size"] if gpu else (1 if quick else 4)),
                layout=training_layout(device), variants=variants, skipped=skipped,
                attention_variant="bf16 autocast" if gpu else "fp32")


def bench_unet(device, quick, compile_on_cpu=False, batch=None, model=None, settings=None):
    """Training throughput of ncsn.NCSN() (notes §8, §10) at the CIFAR-10 preset beside NCSNv2's published network:
    fp32, bf16 autocast, compile, the share of the GPU's bf16 peak, and attention's share of the step's time beside
    its share of the FLOPs.

    model: the network (default: ncsn.NCSN(), seeded); settings: unet_settings(...) (default: this device's). The
    tests pass a small network and a GPU's settings, which runs the GPU rows' code on a CPU.
    """
    settings = settings or unet_settings(device, quick, compile_on_cpu, batch)
    gpu, batch, layout = settings["gpu"], settings["batch"], settings["layout"]
    if model is None:
        torch.manual_seed(0)
        model = ncsn.NCSN()
    model = model.to(device, memory_format=layout)  # as train.py: the network in its training layout, ...
    shape = (3, 32, 32)
    sigmas = ncsn.geometric_sigmas(CIFAR10["sigma_max"], CIFAR10["sigma_min"], CIFAR10["n_sigmas"]).to(device)
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    x = x.contiguous(memory_format=layout)  # ... and its batches
    generator = torch.Generator(device).manual_seed(0)

    trainers = {}  # one Adam and one EMA per network, shared by its variants, as in one training run

    def training_step(net, module, precision):
        return unet_training_step(net, module, precision, x, sigmas, generator, trainers)

    # The variants of our network; one step before any memory is measured, so that Adam's state exists for each.
    steps, failed = {}, dict(settings["skipped"])
    for name, (precision, mode) in settings["variants"].items():
        steps[name] = training_step(torch.compile(model, mode=mode) if mode else model, model, precision)
    for name, step in list(steps.items())[:1]:
        step()
    memory = {}
    for name in list(steps):  # the first call of each is also its warmup (with compile, its compiling)
        try:
            memory[name] = _measure_peak_memory(steps[name], device)
            if settings["variants"][name][1] == "reduce-overhead":
                steps[name]()  # CUDA graph trees record at the second call and replay from the third
        except Exception as error:  # torch.compile's failures are many and varied; report, don't crash
            failed[name] = f"failed: {_error_summary(error)}"
            del steps[name]
    # The same network without attention, timed in the same rounds: attention's share of the step.
    attention_variant = settings["attention_variant"] if settings["attention_variant"] in steps else "fp32"
    ablated = without_attention(model)
    steps["without attention"] = training_step(ablated, ablated, settings["variants"][attention_variant][0])
    steps["without attention"]()  # its warmup
    medians, agreement, rounds = agreeing_medians(steps, device, warmup=0, rounds=2 if quick else 3,
                                                  max_rounds=4 if quick else 8,
                                                  budget_s=4.0 if quick else (30.0 if gpu else 20.0))

    peak = bf16_peak_tflops(device_name(device)) if gpu else None
    n_params = {"ours": sum(p.numel() for p in model.parameters()),
                "without attention": sum(p.numel() for p in ablated.parameters())}
    gflops = {"ours": gflops_per_image(model, shape, device), "without attention": gflops_per_image(ablated, shape,
                                                                                                   device)}
    # Attention's share is a difference of a few percent between two steps, which one disturbed round moves by as
    # much: the two alone are timed for more rounds, and the share is the median over all of them.
    pair = {name: steps[name] for name in (attention_variant, "without attention")}
    pair_rounds, more, start = list(rounds), interleaved_rounds(pair, device, warmup=0), time.perf_counter()
    while len(pair_rounds) < (6 if quick else ATTENTION_ROUNDS) and time.perf_counter() - start < (10 if quick else 40):
        pair_rounds.append(next(more))
    time_shares = sorted(1 - r["without attention"] / r[attention_variant] for r in pair_rounds)
    time_share, flop_share = statistics.median(time_shares), 1 - gflops["without attention"] / gflops["ours"]
    quartiles = statistics.quantiles(time_shares, n=4, method="inclusive")  # the section's rounds: at least 2
    attention = (f"attention: {time_share:.1%} of the step's time (median of {len(time_shares)} rounds, the middle "
                 f"half {quartiles[0]:.1%} to {quartiles[2]:.1%}), {flop_share:.1%} of its FLOPs; goal on a CPU: "
                 "time ≤ FLOPs + 1 point, "
                 + ("met" if time_share <= flop_share + 0.01 else "not met"))
    columns = ("network", "precision", "batch", "M parameters", "GFLOPs / image", "ms / step", "images / s",
               "time / fp32", "peak memory MiB", "TFLOP/s", "share of bf16 peak", "note")
    rows = [dict(dict.fromkeys(columns), network="NCSNv2 (published)", **NCSNV2_CIFAR10,
                 note="Song & Ermon 2020, CIFAR-10 network as published")]
    for name in [*settings["variants"], *settings["skipped"], "without attention"]:
        ablation = name == "without attention"
        network, precision = ("ours without attention", attention_variant) if ablation else ("ours", name)
        cost = {"M parameters": n_params[name if ablation else "ours"] / 1e6,
                "GFLOPs / image": gflops[name if ablation else "ours"]}
        if name not in medians:
            rows.append({"network": network, "precision": precision, "batch": batch, **cost, "note": failed[name]})
            continue
        images_per_s = batch / medians[name]
        achieved = 3 * cost["GFLOPs / image"] * images_per_s / 1e3  # TFLOP/s: forward + backward ≈ 3 forwards
        rows.append({"network": network, "precision": precision, "batch": batch, **cost,
                     "ms / step": 1e3 * medians[name], "images / s": images_per_s,
                     "time / fp32": medians[name] / medians["fp32"], "peak memory MiB": memory.get(name),
                     "TFLOP/s": achieved,
                     "share of bf16 peak": (f"{achieved / peak:.1%}" if peak else "unknown") if gpu else "n/a",
                     "note": attention if ablation else agreement_note(agreement)})
    where = "channels_last, as train.py on CUDA" if layout == torch.channels_last else \
        "the default layout, as train.py on a CPU"
    notes = [f"ours: ncsn.NCSN() default, {n_params['ours'] / 1e6:.2f} M parameters, {gflops['ours']:.2f} GFLOPs per "
             f"32×32×3 image forward (FlopCounterMode, batch 1, eval mode, as train.py counts it); network and batch "
             f"in {where}; a step is train.py's: ncsn_loss (DSM), backward, fused Adam, EMA update, train mode.",
             f"ours / NCSNv2: {n_params['ours'] / 1e6 / NCSNV2_CIFAR10['M parameters']:.2f}× the parameters, "
             f"{gflops['ours'] / NCSNV2_CIFAR10['GFLOPs / image']:.2f}× the FLOPs per image.",
             "achieved TFLOP/s = 3 × forward FLOPs × images/s (forward + backward ≈ 3 forwards); share of bf16 "
             "peak = that over the GPU's dense bf16 peak.",
             "peak memory: " + ("torch.cuda.max_memory_allocated over one step." if device.type == "cuda" else
                                "the rise of the resident set (VmHWM - VmRSS of /proc/self/status) over one step.") +
             " The step measured is each variant's first (fp32's second, after the one that creates Adam's state; "
             "with compile, it includes compiling).",
             f"ours without attention: every ncsn.Attention replaced by the identity, in {attention_variant}, timed "
             f"in the same rounds and then in rounds of the two alone; attention's share = 1 - its time / ours per "
             f"round (median over them all), and 1 - its FLOPs / ours. {attention[0].upper()}{attention[1:]}."]
    if gpu:
        notes.append(f"dense bf16 peak of this GPU: {peak} TFLOP/s." if peak else
                     "dense bf16 peak unknown for this GPU.")
        graphs = "bf16 autocast + compile + CUDA graphs"
        if graphs in medians:
            share = next(r["share of bf16 peak"] for r in rows if r["precision"] == graphs)
            notes.append(f"{graphs} is train.py --precision bf16 --compile on one GPU (torch.compile's "
                         f"reduce-overhead mode): {share} of the bf16 peak (goal: >= 35%)"
                         + (f", {medians['bf16 autocast + compile'] / medians[graphs]:.2f}x the compiled step without "
                            "CUDA graphs." if "bf16 autocast + compile" in medians else "."))
    else:
        notes.insert(0, f"on the CPU at batch {batch}" + ("." if batch == CIFAR10["batch_size"] else
                                                          f", not the preset's {CIFAR10['batch_size']} "
                                                          "(--unet-batch 128 runs it: minutes on a CPU)."))
        rates = attention_product_rates(model, shape, batch, device)
        if rates:
            (b, n, d), blas = rates["shape"], "MKL" if torch.backends.mkl.is_available() else "the BLAS"
            dnn = "oneDNN" if torch.backends.mkldnn.is_available() else "ATen's own kernel"
            matmul, conv = rates["matmul GFLOP/s"], rates["1x1 conv GFLOP/s"]
            notes.append(f"attention's share of the time can only come near its share of the FLOPs where its two "
                         f"kinds of work run at similar rates. In fp32, its matrix products q k^T ({b} x {n}x{d} by "
                         f"{d}x{n}, torch.matmul: {blas}) ran at {matmul:.0f} GFLOP/s, and its qkv 1x1 convolution "
                         f"(input {'x'.join(map(str, rates['qkv input']))}, channels_last: {dnn}) at {conv:.0f}, "
                         f"{conv / matmul:.2f}x as fast (forward only, same run).")
        notes.append("this CPU has native bf16: train.py --precision bf16 runs bf16 autocast on it." if
                     runs.cpu_has_native_bf16() else "this CPU has no native bf16: the bf16 row is emulated bf16, and "
                     "train.py --precision bf16 trains in fp32 on it.")
    return rows, notes


# ---- 5. Sampling the CIFAR-10 preset ---------------------------------------------------------------------------

COMPILED = "bf16 + compile + CUDA graphs"  # sample.py --precision bf16 --compile on a GPU


def bench_sampling(device, quick):
    """Images/s of the CIFAR-10 preset's annealed chain (notes §9; NCSNv2: L = 232, T = 5, final denoising), in fp32
    and in bf16 (ncsn.sample's precision: the network in bf16 autocast, the chain in fp32), and on a GPU also with
    CUDA graphs, uncompiled and compiled; with the time that 50,000 samples (FID's protocol) would take."""
    gpu = device.type == "cuda"
    # sample.py draws 500 chains at a time by default; on a CPU a batch of 32 is near the per-image speed of larger
    # ones (--unet-batch does not apply here), where a batch of 8 understated bf16's gain over fp32
    batch = 500 if gpu else (2 if quick else 32)
    torch.manual_seed(0)
    model = ncsn.NCSN().to(device).eval()
    sigmas = ncsn.geometric_sigmas(CIFAR10["sigma_max"], CIFAR10["sigma_min"], CIFAR10["n_sigmas"])
    n_steps_each = CIFAR10["n_steps_each"]
    full_chain = len(sigmas) * n_steps_each + 1
    # The evaluations timed: the first level(s) of the chain; the whole chain is that many times longer.
    n_levels = (2 if quick else 10) if gpu else 1
    n_evals = n_levels * n_steps_each
    generator = torch.Generator(device).manual_seed(0)
    bf16 = gpu or runs.cpu_has_native_bf16()  # emulated bf16 is slower than fp32: not a row worth timing
    # name: (precision, CUDA graphs, torch.compile, channels_last (None: ncsn.sample's default), batch)
    variants = {"fp32": ("fp32", False, False, None, batch)}
    if bf16:
        variants["bf16"] = ("bf16", False, False, None, batch)
    if gpu:
        variants["bf16 + CUDA graphs"] = ("bf16", True, False, None, batch)
        variants[COMPILED] = ("bf16", True, True, None, batch)  # sample.py --precision bf16 --compile
        if not quick:  # its alternatives: the default layout, and a larger batch
            variants[COMPILED + ", default layout"] = ("bf16", True, True, False, batch)
            variants[COMPILED + ", batch 1000"] = ("bf16", True, True, None, 1000)

    def chain(score_fn, levels, steps_each, batch):
        """ncsn.sample's chunk: a uniform prior draw and the annealed chain, on score_fn (built once per variant, as
        one sample call builds it: its compiling and capture happen in the warmup, not in the rounds timed)."""
        @torch.no_grad()
        def run():
            x = torch.rand((batch, 3, 32, 32), generator=generator, device=device)
            annealed_langevin_dynamics(score_fn, x, sigmas[:levels], CIFAR10["step_size"], steps_each, denoise=False,
                                       generator=generator)
        return run

    networks, compile_s, failed = {}, None, {}
    for name, (precision, graph, compiled, channels_last, size) in variants.items():  # warmup: capture, compiling
        networks[name] = ncsn.chain_network(model, device, True, precision, channels_last, graph, compiled)
        start = time.perf_counter()
        try:
            chain(networks[name], 1, 2, size)()
        except Exception as error:  # torch.compile's failures are many and varied; report, don't crash
            failed[name] = f"failed: {_error_summary(error)}"
            del networks[name]
            continue
        if name == COMPILED:
            compile_s = time.perf_counter() - start
    fns = {name: chain(network, n_levels, n_steps_each, variants[name][-1]) for name, network in networks.items()}
    medians, info, _ = agreeing_medians(fns, device, rounds=2, max_rounds=5,
                                        budget_s=120, warmup=0)
    rows = []
    for name in networks:
        size = variants[name][-1]
        per_eval = medians[name] / n_evals
        chain_s = per_eval * full_chain
        rows.append({"variant": name, "batch": size, "ms / evaluation": 1e3 * per_eval, "full chain s": chain_s,
                     "images / s": size / chain_s, "50,000 images min": 50_000 / (size / chain_s) / 60,
                     "time / fp32": medians[name] / size / (medians["fp32"] / batch),
                     "note": f"{n_evals} evaluations timed; " + agreement_note(info)})
    rows += [{"variant": name, "batch": variants[name][-1], "note": why} for name, why in failed.items()]
    notes = [f"ncsn.NCSN() default in eval mode, ncsn.sample's chain (ncsn.chain_network, each variant's built once, "
             f"as one sample call builds it) with the preset: sigmas {CIFAR10['sigma_max']:g} -> "
             f"{CIFAR10['sigma_min']:g} in {len(sigmas)} levels, T = {n_steps_each}, final denoising: "
             f"{full_chain} evaluations per chain, extrapolated from the first {n_levels} level(s); time / fp32 per "
             f"image."]
    if "bf16" in variants:
        notes.append(f"bf16 / fp32 speed-up {medians['fp32'] / medians['bf16']:.2f}"
                     + ("" if gpu else " (goal on a CPU with native bf16: >= 1.7)"))
    if gpu and COMPILED in medians:
        minutes = next(r for r in rows if r["variant"] == COMPILED)["50,000 images min"]
        graphs, compiled = medians["bf16 + CUDA graphs"], medians[COMPILED]
        notes.append(f"50,000 samples with bf16 + compile + CUDA graphs: {minutes:.1f} min on this card (goal on one "
                     f"H100: <= 30); in bf16, CUDA graphs / none {medians['bf16'] / graphs:.2f}x, compile + CUDA "
                     f"graphs / CUDA graphs {graphs / compiled:.2f}x; its warm-up, compiling (unless an earlier "
                     f"section compiled the same graph) and capturing, took {compile_s:.0f} s once (sample.py "
                     "--compile)")
        per_image = {name: medians[name] / variants[name][-1] for name in medians}
        notes += [f"{name}: {per_image[COMPILED] / per_image[name]:.2f}x the speed of {COMPILED} per image"
                  for name in medians if name.startswith(COMPILED + ", ")]
    elif not gpu:
        notes.append(f"on the CPU at batch {batch}, not 500" + ("" if bf16 else "; this CPU has no native bf16, so "
                                                                 "bf16 (which would be emulated) is not timed"))
    return rows, notes


# ---- 7. Where the U-Net's time goes ------------------------------------------------------------------------------

def _self_time_us(event, device):
    """An operator's (or kernel's) own time in microseconds: on the GPU, the device time of the kernels it launched
    itself; on a CPU, its CPU time less that of the operators it called."""
    if device.type == "cuda":
        total = getattr(event, "self_device_time_total", None)  # torch >= 2.4; self_cuda_time_total before
        return total if total is not None else event.self_cuda_time_total
    return event.self_cpu_time_total


def op_profile(fn, device, top):
    """One call of fn under torch.profiler, after an unprofiled one: the `top` operators by their own time on the
    device that computes (the GPU's kernels, or the CPU), as (rows, device ms, wall ms). An operator's share is of the
    device's total; wall ms is one call's time without the profiler, the median of three (on a GPU, when it exceeds
    the device time, the GPU waited for the host to launch its kernels). Where the profile attributes no kernels to
    aten operators (a compiled graph launches its own), the kernels themselves are the rows."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    wall_ms = 1e3 * statistics.median(_timed(fn, device) for _ in range(3))  # the first call is also a warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    events = prof.key_averages()
    host_us = sum(e.self_cpu_time_total for e in events if e.device_type == DeviceType.CPU)
    if device.type == "cuda":  # the kernels, not the GPU-side spans of labelled regions, which would count them twice
        kernels = [e for e in events if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)]
        device_us = sum(_self_time_us(e, device) for e in kernels)
        ops = [e for e in events if e.device_type == DeviceType.CPU and _self_time_us(e, device) > 0]
        attributed = sum(_self_time_us(e, device) for e in ops)
        chosen = ops if abs(attributed - device_us) <= 0.05 * device_us else kernels
    else:
        device_us, chosen = host_us, [e for e in events if e.device_type == DeviceType.CPU]
    chosen = sorted(chosen, key=lambda e: _self_time_us(e, device), reverse=True)[:top]
    rows = [{"operator": e.key if len(e.key) <= 60 else e.key[:57] + "...", "calls": e.count,
             "ms": _self_time_us(e, device) / 1e3, "share": f"{_self_time_us(e, device) / device_us:.1%}"}
            for e in chosen]
    return rows, device_us / 1e3, wall_ms


def bench_time_breakdown(device, quick):
    """Where the default U-Net's time goes (notes §8, §9), by operator: one sampling evaluation as sample.py runs it
    (bf16 where the device has it, uncompiled; on a GPU also compiled) and one training step as train.py takes it
    (its layout and precision; on a GPU also compiled, without the CUDA graphs that would hide its kernels: their
    device time is what the captured step could take at best). The table that tells a memory- or launch-bound
    network from a compute-bound one."""
    gpu = device.type == "cuda"
    bf16 = gpu or runs.cpu_has_native_bf16()
    precision = "bf16" if bf16 else "fp32"
    top = 5 if quick else 8
    torch.manual_seed(0)
    model = ncsn.NCSN().to(device).eval()
    batch = 500 if gpu else (2 if quick else 8)
    x = torch.rand(batch, 3, 32, 32, device=device)
    sigma = torch.full((batch,), 0.5, device=device)
    profiles = {f"sampling evaluation, {precision}, batch {batch}": (False, None)}
    if gpu:
        profiles[f"sampling evaluation, {precision} + compile, batch {batch}"] = (True, None)
    train_batch = CIFAR10["batch_size"] if gpu else (1 if quick else 4)
    profiles[f"training step, {precision}, batch {train_batch}"] = (False, "train")
    if gpu:
        profiles[f"training step, {precision} + compile, batch {train_batch}"] = (True, "train")
    rows, notes = [], []
    for name, (compiled, kind) in profiles.items():
        if kind == "train":  # train.py's layout, batch and noise levels
            layout = training_layout(device)
            module = copy.deepcopy(model).train().to(memory_format=layout)
            batch_x = torch.rand(train_batch, 3, 32, 32, device=device).contiguous(memory_format=layout)
            sigmas = ncsn.geometric_sigmas(CIFAR10["sigma_max"], CIFAR10["sigma_min"], CIFAR10["n_sigmas"])
            step = unet_training_step(torch.compile(module) if compiled else module, module, precision, batch_x,
                                      sigmas.to(device), torch.Generator(device).manual_seed(0), {})
        else:
            score_fn = ncsn.chain_network(model, device, True, precision, cuda_graph=False, compile=compiled)

            @torch.no_grad()
            def step():
                score_fn(x, sigma)
        try:
            table, device_ms, wall_ms = op_profile(step, device, top)
        except Exception as error:  # torch.compile's failures are many and varied; report, don't crash
            notes.append(f"{name}: failed: {_error_summary(error)}")
            continue
        rows += [{"profile": name, **row} for row in table]
        notes.append(f"{name}: {wall_ms:.1f} ms a call; " + (f"the GPU's kernels ran for {device_ms:.1f} ms of it"
                                                               if gpu else f"{device_ms:.1f} ms profiled"))
    notes.append("rows: the operators (aten, or a compiled graph's kernels) with the most time of their own, the "
                 "kernels they launched on a GPU; share of the profile's device time. One call profiled, after three "
                 "unprofiled ones whose median is the call's time; CUDA graphs off, so that every kernel shows.")
    return rows, notes


# ---- 6. The toy objectives table -------------------------------------------------------------------------------

def bench_toy_objectives(device, quick):
    """DSM, SSM-VR and exact SM via ncsn.ncsn_loss (notes §3-§5, §8) on the two-mode mixture: cost and accuracy."""
    n_steps, n_eval = (200, 2000) if quick else (1500, 10_000)
    sigmas = ncsn.geometric_sigmas(GMM["sigma_max"], GMM["sigma_min"], GMM["n_sigmas"]).to(device)
    objectives = ("dsm", "ssm", "exact")
    models, steps = {}, {}
    for objective in objectives:
        torch.manual_seed(0)  # the same initial weights for every objective
        model = models[objective] = ncsn.MLPScoreNet(2, hidden=GMM["hidden"]).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=GMM["lr"])
        data_generator = torch.Generator(device).manual_seed(1)  # the same batches for every objective
        loss_generator = torch.Generator(device).manual_seed(2)

        def step(model=model, optimizer=optimizer, objective=objective, data_generator=data_generator,
                 loss_generator=loss_generator):
            x = data.sample_gmm(GMM["batch_size"], generator=data_generator, device=device)  # (B, 2)
            loss = ncsn.ncsn_loss(model, x, sigmas, objective=objective, generator=loss_generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        steps[objective] = step
    # The training runs themselves, interleaved step by step: the median step time of each is its cost.
    medians, _ = interleaved_medians(steps, device, repeats=n_steps, warmup=0)

    # A fixed held-out set of noisy points at every level (and at sigma = 1, not itself a level).
    g = torch.Generator(device).manual_seed(3)
    x = data.sample_gmm(n_eval, generator=g, device=device)  # (N, 2)
    eval_sigmas = sigmas.tolist() + [1.0]
    noise = torch.randn(len(eval_sigmas), n_eval, 2, generator=g, device=device)  # (L + 1, N, 2)
    rows = []
    for objective in objectives:
        fisher = []  # raw Fisher divergence 1/2 E||s(x~, sigma) - grad log q_sigma(x~)||^2 at each evaluation level
        with torch.no_grad():
            for sigma_value, z in zip(eval_sigmas, noise):
                sigma = torch.full((n_eval,), sigma_value, device=device)  # (N,)
                x_noisy = x + sigma_value * z  # x~ ~ q_sigma
                error = models[objective](x_noisy, sigma) - data.gmm_noisy_score(x_noisy, sigma)  # (N, 2)
                fisher.append(0.5 * error.pow(2).sum(1).mean().item())
        weighted = statistics.fmean(s ** 2 * f for s, f in zip(eval_sigmas[:-1], fisher[:-1]))
        rows.append({"objective": objective, "ms / step": 1e3 * medians[objective],
                     "time / DSM": medians[objective] / medians["dsm"], "σ²-weighted Fisher": weighted,
                     "Fisher σ=20": fisher[0], "Fisher σ=1": fisher[-1], "Fisher σ=0.01": fisher[-2]})
    notes = [f"ncsn.MLPScoreNet(2, hidden={GMM['hidden']}) trained {n_steps} steps per objective (the same seed, "
             f"batches and initial weights), batch {GMM['batch_size']}, Adam {GMM['lr']:g}, sigmas geometric "
             f"{GMM['sigma_max']:g} -> {GMM['sigma_min']:g} in {GMM['n_sigmas']} levels (the gmm preset); ssm is "
             f"SSM-VR with one Gaussian projection.",
             f"Fisher divergence to the true noisy score data.gmm_noisy_score on {n_eval} fixed held-out noisy points "
             f"per level: σ²-weighted = mean over the {GMM['n_sigmas']} levels of "
             f"1/2 E||σ s(x~, σ) - σ ∇log q_σ(x~)||²; raw at σ = 20, 1, 0.01."]
    return rows, notes


# ---- Output ----------------------------------------------------------------------------------------------------

def _format(value):
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1e-3 or magnitude == 0:
        return f"{value:.3g}" if magnitude < 1 else f"{value:.2f}"
    return f"{value:.2e}"


def markdown_table(rows):
    """A markdown table with the union of the rows' keys as columns, in order of first appearance."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_format(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


SECTIONS = {
    1: ("Cost of one training step against the dimension D", bench_step_cost),
    2: ("Variance of the sliced estimate against the exact value on a Gaussian", bench_sliced_variance),
    3: ("Sampler overhead of annealed Langevin dynamics", bench_sampler_overhead),
    4: ("The NCSN U-Net at the CIFAR-10 preset", bench_unet),
    5: ("Sampling the CIFAR-10 preset's annealed chain", bench_sampling),
    6: ("Toy objectives on the two-mode mixture", bench_toy_objectives),
    7: ("Where the U-Net's time goes", bench_time_breakdown),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Performance figures of the project, as markdown tables.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller settings (under thirty seconds on a CPU)")
    p.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    p.add_argument("--sections", default=",".join(map(str, SECTIONS)), help="comma-separated sections to run")
    p.add_argument("--device", default="auto", help="auto picks cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--omp-wait", choices=["passive", "active"], default=None,
                   help="OpenMP's OMP_WAIT_POLICY for this run: passive threads sleep while they wait, active ones "
                        "spin (default: the environment's OMP_WAIT_POLICY, else passive)")
    p.add_argument("--compile-on-cpu", action="store_true", help="also time torch.compile in section 4 on a CPU")
    p.add_argument("--unet-batch", type=int, default=None,
                   help="batch of section 4 (default: the preset's 128 on a GPU, 4 on a CPU, 1 with --quick)")
    args = p.parse_args(argv)
    try:
        args.sections = [int(s) for s in args.sections.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sections must be comma-separated numbers from {list(SECTIONS)}, got {args.sections!r}")
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown or not args.sections:
        p.error(f"--sections must name sections among {list(SECTIONS)}, got {args.sections or 'none'}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            sys.exit(f"bench.py: error: --device must be auto, cpu or cuda[:N], got {args.device!r}")
        if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
            sys.exit(f"bench.py: error: --device {args.device} is not available here (cpu or cuda[:N] when present)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":  # as train.py: TF32 for fp32 matmuls and convolutions
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    header = {"device": f"{device.type} ({device_name(device)})", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "OMP_WAIT_POLICY": OMP_WAIT[0], "OMP_WAIT_POLICY source": OMP_WAIT[1],
              "load average": os.getloadavg()[0], "quick": args.quick, "python": platform.python_version()}
    print(f"# bench.py{' --quick' if args.quick else ''}: {header['device']}, torch {header['torch']}, "
          f"{header['threads']} threads, OMP_WAIT_POLICY={OMP_WAIT[0]} ({OMP_WAIT[1]}), load average "
          f"{header['load average']:.2f} at start")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if (device.type == "cpu" and header["threads"] > 1 and header["load average"] + header["threads"] > cores
            and OMP_WAIT[0].upper() != "PASSIVE"):
        # Measured here: with a load of 2-3 on 2 cores, OpenMP threads that spin while waiting for a descheduled
        # partner made small steps up to 100x slower; passive waiting or one thread removed the slowdown.
        print(f"warning: load average {header['load average']:.2f} on {cores} cores: where other processes are busy, "
              f"torch's threads that spin while they wait contend with them and can slow small operations many times "
              f"over (--omp-wait passive or --threads 1 avoids it)")
    results = {"header": header, "sections": {}}
    for number in args.sections:
        title, bench = SECTIONS[number]
        section_start = time.perf_counter()
        kwargs = {"compile_on_cpu": args.compile_on_cpu, "batch": args.unet_batch} if number == 4 else {}
        rows, notes = bench(device, args.quick, **kwargs)
        seconds = time.perf_counter() - section_start
        print(f"\n## {number}. {title}\n\n{markdown_table(rows)}\n")
        for note in notes:
            print(f"- {note}")
        print(f"- section time {seconds:.1f} s")
        sys.stdout.flush()
        results["sections"][str(number)] = {"title": title, "rows": rows, "notes": notes, "seconds": seconds}
    header["total seconds"] = time.perf_counter() - start
    header["load average at end"] = os.getloadavg()[0]
    print(f"\ntotal {header['total seconds']:.1f} s; load average {header['load average at end']:.2f} at end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, ensure_ascii=False)


if __name__ == "__main__":
    main()
