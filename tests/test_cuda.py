"""On a CUDA GPU only (skipped elsewhere): the paths that the CPU tests reach only uncaptured or in another kernel.
The captured sampling chain, attention on the fused kernels, train.py with its CUDA switches (channels_last, TF32,
fused Adam, bf16), a resume, and the pinned-host data path. Run with `python -m pytest tests/test_cuda.py`."""
import json

import numpy as np
import pytest
import torch

import ncsn
from test_train import run_here_ok, write_cifar_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CHAIN = dict(sigmas=ncsn.geometric_sigmas(1.0, 0.1, 3), n_steps_each=3, step_size=1e-2, data_range=(-5.0, 5.0))


def small_net():
    """A small NCSN with attention (at 4×4) and non-zero weights everywhere, on the GPU."""
    torch.manual_seed(0)
    model = ncsn.NCSN(3, channels=32, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                      image_size=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the zero-initialised output layers would hide the network
    return model.cuda()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_captured_chain_is_the_plain_chain(precision, monkeypatch, capsys):
    """cuda_graph (sample's default on CUDA) captures every batch shape (chunks of 4, 4, 2: two captures, no note)
    and replays the same kernels: the samples are the uncaptured chain's to fp32 rounding, from the same seed."""
    model = small_net()
    builds = []
    build = ncsn._static_network
    monkeypatch.setattr(ncsn, "_static_network", lambda network, x, sigma, capture: (
        lambda built: builds.append((tuple(x.shape), built[1])) or built)(build(network, x, sigma, capture)))
    draw = lambda graph: ncsn.sample(model, (10, 3, 8, 8), **CHAIN, batch_size=4, precision=precision,  # noqa: E731
                                     cuda_graph=graph, generator=torch.Generator("cuda").manual_seed(1))
    plain = draw(False)
    captured = draw(None)
    assert builds == [((4, 3, 8, 8), True), ((2, 3, 8, 8), True)]
    assert "note" not in capsys.readouterr().err
    assert plain.isfinite().all() and plain.std() > 0.1
    torch.testing.assert_close(captured, plain, rtol=1e-4, atol=1e-4)


def test_the_compiled_captured_chain_is_the_plain_chain_to_rounding():
    """compile=True: the evaluation through torch.compile (channels_last by default), then captured. Inductor's
    fused kernels round differently from the eager ones, so in fp32 the samples agree to 1e-3, not bit for bit."""
    model = small_net()
    draw = lambda compile: ncsn.sample(model, (8, 3, 8, 8), **CHAIN, compile=compile,  # noqa: E731
                                       generator=torch.Generator("cuda").manual_seed(1))
    plain = draw(False)
    torch.testing.assert_close(draw(True), plain, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("precision, backend", [("bf16", "FLASH_ATTENTION"), ("fp32", "EFFICIENT_ATTENTION")])
def test_attention_runs_on_the_fused_kernels_on_cuda(layout, precision, backend):
    """Flash attention (bf16) and memory-efficient attention (fp32) accept ncsn.Attention's q, k, v in either layout,
    restricted to that one backend, and agree with the math kernel in the same precision."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    attention = ncsn.Attention(128).cuda()  # two heads of 64
    torch.nn.init.normal_(attention.out.weight, std=0.1)
    x = torch.randn(4, 128, 16, 16, device="cuda").contiguous(memory_format=layout)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        with sdpa_kernel([SDPBackend.MATH]):
            expected = attention(x).float()
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            fused = attention(x).float()
    tolerance = 2e-2 if precision == "bf16" else 1e-4
    torch.testing.assert_close(fused, expected, rtol=tolerance, atol=tolerance)
    assert (fused - x).abs().max() > 0.1


def losses(out_dir):
    with open(out_dir / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_train_py_on_cuda_resumes_and_reads_pinned_host_data_in_step(tmp_path):
    """train.py --device cuda (channels_last, TF32, fused Adam): 6 steps in one go; 3 then a resume to 6; and 6 with
    the data in pinned host memory. All three log the same losses, to the rounding of cuDNN's autotuned kernels (a
    wrong RNG state or another batch would move a loss by its sampling spread, tens of percent at batch 8)."""
    write_cifar_folder(tmp_path / "data", n=64)
    common = ["--dataset", "cifar10", "--data-dir", tmp_path / "data", "--device", "cuda", "--batch-size", 8,
              "--channels", 16, "--n-sigmas", 10, "--n-steps-each", 1, "--log-every", 1, "--sample-every", 0]
    run_here_ok(*common, "--out-dir", tmp_path / "once", "--steps", 6)
    run_here_ok(*common, "--out-dir", tmp_path / "resumed", "--steps", 3)
    run_here_ok(*common, "--out-dir", tmp_path / "resumed", "--steps", 6)
    run_here_ok(*common, "--out-dir", tmp_path / "host", "--steps", 6, "--data-on", "host")
    once = losses(tmp_path / "once")
    assert sorted(once) == [1, 2, 3, 4, 5, 6]
    for other in ("resumed", "host"):
        theirs = losses(tmp_path / other)
        assert sorted(theirs) == sorted(once)
        assert [theirs[s] for s in once] == pytest.approx([once[s] for s in once], rel=1e-3), other
    ckpt = torch.load(tmp_path / "once" / "checkpoint.pt", weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["fused"] is True


def test_train_py_compiled_on_cuda_replays_cuda_graphs_and_resumes_exactly(tmp_path):
    """train.py --compile on one GPU (torch.compile's reduce-overhead mode): its graphs are compiled and none is
    skipped for CUDA graphs; 6 steps in one go log the same losses as 3 then a resume to 6, dropout on (its random
    numbers inside the graphs come from the CUDA generator's state, which the checkpoint keeps), with sample figures
    drawn between the steps."""
    from torch._dynamo.utils import counters

    write_cifar_folder(tmp_path / "data", n=64)
    common = ["--dataset", "cifar10", "--data-dir", tmp_path / "data", "--device", "cuda", "--batch-size", 8,
              "--channels", 16, "--n-sigmas", 10, "--n-steps-each", 1, "--log-every", 1, "--sample-every", 3,
              "--precision", "bf16", "--compile"]
    counters.clear()
    run_here_ok(*common, "--out-dir", tmp_path / "once", "--steps", 6)
    assert counters["stats"]["unique_graphs"] > 0 and counters["inductor"]["cudagraph_skips"] == 0, dict(counters)
    run_here_ok(*common, "--out-dir", tmp_path / "resumed", "--steps", 3)
    run_here_ok(*common, "--out-dir", tmp_path / "resumed", "--steps", 6)
    once, resumed = losses(tmp_path / "once"), losses(tmp_path / "resumed")
    assert sorted(once) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for out in ("once", "resumed"):  # the sample figures, whose chains capture graphs of their own between the steps
        assert all((tmp_path / out / "samples" / f"step_000000{s}.png").exists() for s in (3, 6)), out
    assert [resumed[s] for s in once] == pytest.approx([once[s] for s in once], rel=1e-3)


def test_train_py_and_sample_py_in_bf16_on_cuda(tmp_path):
    """--precision bf16 on CUDA: training draws its sample figure, and sample.py --precision bf16 (captured chain)
    writes finite uint8 images."""
    write_cifar_folder(tmp_path / "data", n=64)
    out = tmp_path / "run"
    run_here_ok("--dataset", "cifar10", "--data-dir", tmp_path / "data", "--out-dir", out, "--device", "cuda",
                "--steps", 4, "--batch-size", 8, "--channels", 16, "--n-sigmas", 10, "--n-steps-each", 2,
                "--precision", "bf16", "--sample-every", 4)
    assert (out / "samples" / "step_0000004.png").exists()
    result = run_here_ok("--out-dir", out, "-n", 10, "--batch-size", 4, "--device", "cuda", "--precision", "bf16",
                         script="sample.py")
    assert "note" not in result.stderr, result.stderr
    samples = np.load(out / "samples.npz")["arr_0"]
    assert samples.dtype == np.uint8 and samples.shape == (10, 32, 32, 3) and samples.std() > 0


def test_the_time_breakdown_counts_each_kernel_once_on_cuda():
    """bench.op_profile on the GPU: eager operators carry the time of the kernels they launch (the matrix product
    first, as its operator or its kernel), and a compiled function's kernels are counted once, not again as the
    labelled region around the graph's call, so the shares of either profile sum to at most 100% and the device time
    fits in the call's time."""
    import bench

    a = torch.randn(4096, 4096, device="cuda")
    for fn in (lambda: (a @ a).relu_(), torch.compile(lambda: (a @ a).relu() + 1)):
        rows, device_ms, wall_ms = bench.op_profile(fn, torch.device("cuda"), top=6)
        shares = [float(row["share"].rstrip("%")) for row in rows]
        assert sum(shares) <= 100.5 and shares[0] > 50, rows
        assert not any(row["operator"].startswith("## ") for row in rows), rows
        assert 0 < device_ms <= 1.05 * wall_ms
    eager, _, _ = bench.op_profile(lambda: (a @ a).relu_(), torch.device("cuda"), top=2)
    # the product's operator, or its cuBLAS kernel (gemm, nvjet, ... by the library's naming) where the profiler links
    # that kernel to no operator (seen with torch 2.11 + CUDA 13: op_profile then lists the kernels themselves)
    top = eager[0]["operator"]
    assert top == "aten::mm" or not (top.startswith("aten::") or "relu" in top or "clamp" in top), eager
