"""bench.py's figures, called as functions: section 2's sliced estimates (notes §5) are unbiased and variance reduction
lowers their variance for every projection kind and number of projections; the settings bench.py times are
train.py's presets, and its copies of train.py's layout, FLOP count and bf16 test are train.py's; a comparison whose
rounds disagree is timed again, and from five rounds on one outlying round does not count (on a fake clock); short
calls are repeated into rounds of a set length; OpenMP waits passively by default; section 4 runs the GPU's rows (on
a CPU, with a small U-Net) in train.py's layout, beside NCSNv2's published network, with independent counts, and the
CPU's rows with the rates of attention's products and convolution, whose shapes and FLOPs are checked by hand.
No timing is asserted."""
import ast
import weakref

import pytest
import torch

import bench
import ncsn
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


def fake_clock(monkeypatch):
    """bench._timed made deterministic: a fake timed function returns the seconds it "took"; the calls are logged."""
    calls = []

    def timed(fn, device):
        calls.append(fn.__name__)
        return fn()

    monkeypatch.setattr(bench, "_timed", timed)
    return calls


def scripted(name, seconds):
    """A fake timed function that takes the given seconds, one after the other."""
    it = iter(seconds)
    fn = lambda: next(it)  # noqa: E731
    fn.__name__ = name
    return fn


def test_a_comparison_is_timed_until_its_rounds_agree(monkeypatch):
    """agreeing_medians: rounds interleave A B, B A, ...; a disturbed round (B took 5x) makes the ratios of the last
    three disagree (max/min > 1.15), so more rounds are timed until three consecutive ones agree, whose medians are
    reported; without agreement it stops at max_rounds (or the time budget) with the medians of every round."""
    cpu = torch.device("cpu")
    calls = fake_clock(monkeypatch)
    fns = {"a": scripted("a", [1.0] * 10), "b": scripted("b", [2.0, 10.0, 2.0, 2.1, 2.0, 2.0])}
    medians, info, rounds = bench.agreeing_medians(fns, cpu, rounds=3, max_rounds=10, warmup=0)
    assert calls[:4] == ["a", "b", "b", "a"]  # every other round reversed
    assert info == dict(timed=5, used=3, spread=pytest.approx(1.05), trim=0, agreed=True, limit=bench.AGREEMENT)
    assert medians == {"a": 1.0, "b": 2.0} and [r["b"] for r in rounds] == [2.0, 2.1, 2.0]
    assert "median of 3 rounds" in bench.agreement_note(info) and "after 5 rounds" in bench.agreement_note(info)

    alternating = {"a": scripted("a", [1.0] * 20), "b": scripted("b", [1.0, 2.0] * 10)}
    medians, info, _ = bench.agreeing_medians(alternating, cpu, rounds=3, max_rounds=6, warmup=0)
    assert info == dict(timed=6, used=6, spread=2.0, trim=0, agreed=False, limit=bench.AGREEMENT)
    assert medians["b"] == 1.5
    assert "still spread 2.00 > 1.15" in bench.agreement_note(info)
    spent = {"a": scripted("a", [1.0] * 20), "b": scripted("b", [1.0, 2.0] * 10)}
    assert bench.agreeing_medians(spent, cpu, rounds=3, max_rounds=6, warmup=0, budget_s=-1)[1]["timed"] == 3
    one = bench.agreeing_medians({"a": scripted("a", [1.0])}, cpu, rounds=1, max_rounds=1, warmup=0)
    assert one[1]["agreed"] and one[1]["spread"] == 1.0
    with pytest.raises(ValueError, match="rounds <= max_rounds"):
        bench.agreeing_medians(fns, cpu, rounds=4, max_rounds=3)

    # From five rounds on, each ratio's highest and lowest are left out: one disturbed round of five (b took 5x)
    # leaves the median alone and passes; two (one high, one low) do too; two high ones do not.
    one_out = {"a": scripted("a", [1.0] * 5), "b": scripted("b", [2.0, 10.0, 2.0, 2.1, 2.0])}
    medians, info, _ = bench.agreeing_medians(one_out, cpu, rounds=5, max_rounds=10, warmup=0)
    assert (info["timed"], info["trim"], info["agreed"], medians["b"]) == (5, 1, True, 2.0)
    assert info["spread"] == pytest.approx(1.05) and "the middle 3 ratios within 1.050" in bench.agreement_note(info)
    both_ends = {"a": scripted("a", [1.0] * 5), "b": scripted("b", [2.0, 10.0, 2.0, 0.5, 2.0])}
    assert bench.agreeing_medians(both_ends, cpu, rounds=5, max_rounds=5, warmup=0)[1]["agreed"]
    two_high = {"a": scripted("a", [1.0] * 5), "b": scripted("b", [2.0, 10.0, 2.0, 10.0, 2.0])}
    medians, info, _ = bench.agreeing_medians(two_high, cpu, rounds=5, max_rounds=5, warmup=0)
    assert not info["agreed"] and info["spread"] == 5.0
    assert "the middle 3 ratios still spread 5.00" in bench.agreement_note(info)


def test_short_calls_are_repeated_until_a_round_of_the_quickest_lasts_long_enough(monkeypatch):
    """repeated: from the best of three timed calls of each (2 ms and 3 ms here, on the fake clock), a round of 50 ms
    takes 25 calls of each, and one call of a wrapped fn makes them, dropping each result before the next call."""
    calls = fake_clock(monkeypatch)
    counts, alive = {"a": 0, "b": 0}, []

    class Result(float):
        pass

    def fake(name, seconds):
        def fn():
            alive.append(sum(ref() is not None for ref in results))  # earlier results still held when this one starts
            counts[name] += 1
            result = Result(seconds)
            results.append(weakref.ref(result))
            return result
        fn.__name__ = name
        return fn

    results = []
    wrapped, n = bench.repeated({"a": fake("a", 0.002), "b": fake("b", 0.003)}, torch.device("cpu"), 0.05)
    assert n == 25 and calls == ["a"] * 3 + ["b"] * 3 and counts == {"a": 3, "b": 3}
    alive.clear()
    wrapped["b"]()
    assert counts == {"a": 3, "b": 28} and alive == [0] * 25
    assert bench.repeated({"a": fake("a", 0.2)}, torch.device("cpu"), 0.05)[1] == 1


def test_section_1_gives_the_time_of_one_step_where_a_round_repeats_them(monkeypatch):
    """bench_step_cost: the cheap objectives' round medians are of `calls` steps, so their ms / step is a median over
    calls; exact SM, timed a step a round, is not divided (fake timings: no step is run)."""
    monkeypatch.setattr(bench, "_timed", lambda fn, device: 0.001)
    monkeypatch.setattr(bench, "repeated", lambda fns, device, round_s: (fns, 10))
    per_round = {"dsm": 0.5, "ssm": 0.8, "ssm-vr": 0.9}
    info = dict(timed=5, used=5, spread=1.0, trim=1, agreed=True, limit=bench.AGREEMENT)
    monkeypatch.setattr(bench, "agreeing_medians", lambda fns, device, **kw: ({n: per_round[n] for n in fns}, info, []))
    monkeypatch.setattr(bench, "interleaved_medians", lambda fns, device, **kw: ({n: 0.05 for n in fns}, 9))
    rows, _ = bench.bench_step_cost(torch.device("cpu"), quick=True)
    at_2 = {row["objective"]: row for row in rows if row["D"] == 2}
    assert [at_2[n]["ms / step"] for n in per_round] == pytest.approx([50.0, 80.0, 90.0])
    assert at_2["ssm-vr"]["time / DSM"] == pytest.approx(1.8) and at_2["dsm"]["note"].startswith("10 steps a round")
    assert at_2["exact (loop)"]["ms / step"] == pytest.approx(50.0) and at_2["exact (loop)"]["time / DSM"] == 1.0


def test_openmp_waits_passively_unless_the_environment_or_the_flag_says_otherwise():
    """omp_wait_policy: --omp-wait over the environment's OMP_WAIT_POLICY over PASSIVE; bench.py sets it, run as a
    script only, before its first `import torch` (OpenMP reads it when torch loads it)."""
    assert bench.omp_wait_policy([], {}) == ("PASSIVE", "bench.py's default")
    assert bench.omp_wait_policy(["--quick"], {"OMP_WAIT_POLICY": "ACTIVE"}) == ("ACTIVE", "from the environment")
    assert bench.omp_wait_policy(["--omp-wait", "active"], {"OMP_WAIT_POLICY": "PASSIVE"})[0] == "ACTIVE"
    assert bench.omp_wait_policy(["--omp-wait=passive"], {"OMP_WAIT_POLICY": "ACTIVE"}) == ("PASSIVE", "--omp-wait")
    assert bench.parse_args(["--omp-wait", "active"]).omp_wait == "active"
    tree = ast.parse(open(bench.__file__).read())
    first_torch = next(node.lineno for node in tree.body if isinstance(node, ast.Import)
                       and any(alias.name == "torch" for alias in node.names))
    guard = next(node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test))
    assert guard.lineno < first_torch and "os.environ['OMP_WAIT_POLICY'] = " in ast.unparse(guard.body)


def test_bench_copies_of_train_helpers_agree_with_train():
    """The layout and the FLOP count that section 4 copies from train.py are train.py's."""
    for kind in ("cpu", "cuda"):
        assert bench.training_layout(torch.device(kind)) == train.image_layout(torch.device(kind))
    model = small_unet()
    assert bench.gflops_per_image(model, (3, 32, 32), torch.device("cpu")) == train.gflops_per_image(
        model, {"shape": [3, 32, 32]}, torch.device("cpu"))


def small_unet():
    torch.manual_seed(0)
    return ncsn.NCSN(channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0)


def counted_gflops(model):
    """FLOPs of one 3x32x32 forward, counted by hand (2 per multiply-add): every convolution and linear layer from
    its output's size, and each attention's two matmuls, q k^T and (softmax) v, 2 N^2 C each for N = H W positions."""
    flops = []

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            flops.append(2 * output.numel() * module.in_channels // module.groups * kh * kw)
        elif isinstance(module, torch.nn.Linear):
            flops.append(2 * output.numel() * module.in_features)
        elif isinstance(module, ncsn.Attention):
            _, c, h, w = inputs[0].shape
            flops.append(2 * 2 * (h * w) ** 2 * c)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32), torch.ones(1))
    for handle in handles:
        handle.remove()
    return sum(flops) / 1e9


def test_unet_section_runs_the_gpu_rows_in_train_layout_beside_ncsnv2(monkeypatch):
    """Section 4 with a GPU's settings (batch 128, channels_last, fp32 / bf16 / bf16 + compile with and without CUDA
    graphs, attention in bf16), run on the CPU with a small U-Net at batch 1 and without compiling: the network sees
    train.py's layout; the NCSNv2 anchor row is the published 29.7 M / 19.8 GFLOPs; ours are counted independently
    (parameters one by one, FLOPs by hand); attention's FLOP share is its own layers'; share of peak = 3 x FLOPs x
    images/s over the bf16 peak."""
    gpu = bench.unet_settings(torch.device("cuda"), quick=False)
    assert (gpu["batch"], gpu["layout"], gpu["attention_variant"]) == (128, torch.channels_last, "bf16 autocast")
    assert gpu["variants"] == {"fp32": ("fp32", None), "bf16 autocast": ("bf16", None),
                               "bf16 autocast + compile": ("bf16", "default"),
                               "bf16 autocast + compile + CUDA graphs": ("bf16", "reduce-overhead")}
    assert bench.unet_settings(torch.device("cpu"), quick=True)["layout"] == torch.contiguous_format
    monkeypatch.setattr(bench, "device_name", lambda device: "NVIDIA H100 80GB HBM3")  # its peak: 989 TFLOP/s
    model, batches = small_unet(), []
    model.register_forward_pre_hook(lambda module, args: batches.append(args[0]) if module.training else None)
    without_compile = {k: v for k, v in gpu["variants"].items() if not v[1]}
    rows, notes = bench.bench_unet(torch.device("cpu"), quick=True, model=model,
                                   settings=dict(gpu, batch=1, variants=without_compile))
    assert batches and all(x.is_contiguous(memory_format=torch.channels_last) for x in batches)  # the training steps'
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    anchor, ours, bf16, ablated = rows
    assert (anchor["network"], anchor["M parameters"], anchor["GFLOPs / image"]) == ("NCSNv2 (published)", 29.7, 19.8)
    reference = small_unet()
    attention = [m for m in reference.modules() if isinstance(m, ncsn.Attention)]
    n_attention = sum(p.numel() for m in attention for p in m.parameters())
    assert round(ours["M parameters"] * 1e6) == sum(p.numel() for p in reference.parameters())
    assert round(ablated["M parameters"] * 1e6) == sum(p.numel() for p in reference.parameters()) - n_attention
    assert ours["GFLOPs / image"] == pytest.approx(counted_gflops(reference), rel=1e-9)
    assert ablated["GFLOPs / image"] == pytest.approx(counted_gflops(bench.without_attention(reference)), rel=1e-9)
    assert ablated["precision"] == "bf16 autocast" and "of its FLOPs" in ablated["note"]
    flop_share = 1 - ablated["GFLOPs / image"] / ours["GFLOPs / image"]
    assert f"{flop_share:.1%} of its FLOPs" in ablated["note"] and "channels_last" in " ".join(notes)
    for row in (ours, bf16, ablated):
        achieved = 3 * row["GFLOPs / image"] * row["images / s"] / 1e3
        assert row["TFLOP/s"] == pytest.approx(achieved) and row["share of bf16 peak"] == f"{achieved / 989:.1%}"


def test_attention_rates_time_the_first_attention_layers_products_and_convolution(monkeypatch):
    """The CPU note's rates are of the network's first attention layer at the bench's batch: q k^T per image and head
    (2 N^2 d FLOPs each, N = H W positions, d = C / heads) and the qkv 1x1 convolution (2 N C 3C per image), over
    the seconds of `calls` calls (a fake clock here); no attention, no rates."""
    seconds = {"matmul": 0.5, "1x1 conv": 0.25}
    monkeypatch.setattr(bench, "interleaved_medians", lambda fns, device, repeats: (seconds, repeats))
    batch, calls = 3, 20
    for model, channels, heads in ((small_unet(), 32, 1),
                                   (ncsn.NCSN(channels=64, channel_mults=(1, 2), num_res_blocks=1), 128, 2)):
        rates = bench.attention_product_rates(model, (3, 32, 32), batch, torch.device("cpu"), calls=calls)
        n, d = 16 * 16, channels // heads
        assert rates["shape"] == (batch * heads, n, d) and rates["qkv input"] == (batch, channels, 16, 16)
        assert rates["matmul GFLOP/s"] == pytest.approx(calls * 2 * batch * heads * n * n * d / 0.5 / 1e9)
        assert rates["1x1 conv GFLOP/s"] == pytest.approx(calls * 2 * batch * n * channels * 3 * channels / 0.25 / 1e9)
    assert bench.attention_product_rates(bench.without_attention(small_unet()), (3, 32, 32), batch,
                                         torch.device("cpu")) is None


def test_unet_section_on_a_cpu_runs_the_default_layout_and_says_how_fast_attentions_products_ran():
    """Section 4 with this CPU's settings (a small U-Net here): fp32 and bf16 in the default layout, compiling
    skipped, attention's share in fp32, and a note with the rates of attention's products and qkv convolution."""
    model, batches = small_unet(), []
    model.register_forward_pre_hook(lambda module, args: batches.append(args[0]) if module.training else None)
    rows, notes = bench.bench_unet(torch.device("cpu"), quick=True, model=model)
    assert batches and all(x.is_contiguous() for x in batches)
    assert [(row["network"], row["precision"]) for row in rows[1:]] == [
        ("ours", "fp32"), ("ours", "bf16 autocast"), ("ours", "fp32 + compile"), ("ours without attention", "fp32")]
    assert rows[3]["note"].startswith("skipped on the CPU")
    assert "(median of 6 rounds, the middle half" in rows[4]["note"]
    rates = [note for note in notes if "products q k^T" in note]
    assert len(rates) == 1 and "products q k^T (1 x 256x32 by 32x256" in rates[0] and "input 1x32x16x16" in rates[0]


def test_the_time_breakdown_ranks_operators_by_their_own_time():
    """Section 7's op_profile: a call spending nearly all its time in one large matrix product (and a little in a
    small addition) lists aten::mm first with most of the time, shares of the one device total that sum to at most
    100%, and the rows in descending order; one call's operators only (the unprofiled calls before it are not)."""
    a, b = torch.randn(600, 600), torch.randn(600, 600)
    c = torch.randn(8)

    def fn():
        for _ in range(3):
            a @ b
        c + 1

    rows, device_ms, wall_ms = bench.op_profile(fn, torch.device("cpu"), top=5)
    assert rows[0]["operator"] == "aten::mm" and rows[0]["calls"] == 3
    shares = [float(row["share"].rstrip("%")) for row in rows]
    assert shares[0] > 50 and sum(shares) <= 100.5
    assert [row["ms"] for row in rows] == sorted((row["ms"] for row in rows), reverse=True)
    assert device_ms >= sum(row["ms"] for row in rows) and wall_ms > 0
    assert {row["operator"] for row in rows} >= {"aten::mm", "aten::add"}
