"""train.py and sample.py end to end, on the CPU: the toy run, the image loaders behind it, the objectives and
switches, several processes under torchrun, one-line errors for bad input, and train() as a flat story."""
import ast
import contextlib
import gc
import gzip
import importlib
import io
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--device", "cpu", "--batch-size", "64", "--n-sigmas", "8", "--n-steps-each", "4", "--log-every", "10"]


def run(*args, check=True, timeout=300, script="train.py"):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


def sample(*args, check=True):
    return run(*args, check=check, script="sample.py")


def run_here_ok(*args, script="train.py"):
    """run_here, which must succeed."""
    result = run_here(*args, script=script)
    assert result.returncode == 0, f"{script} {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result


def run_here(*args, script="train.py"):
    """The script's main(args) in this process, as run(..., check=False) would report it: for refusals, which need no
    interpreter start-up of their own. Signal handlers are restored afterwards."""
    module = importlib.import_module(script[:-len(".py")])
    out, err = io.StringIO(), io.StringIO()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        # What the script held, its out-dir's lock above all, is freed when its process ends; here an error's
        # traceback cycle keeps it until the garbage collector runs, which it does now.
        gc.collect()
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_gmm_end_to_end_loss_falls_and_writes_samples_and_checkpoint(tmp_path):
    out = tmp_path / "gmm"
    result = run("--dataset", "gmm", "--out-dir", out, "--steps", 200, "--sample-every", 200, *FAST)
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 20
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses
    assert (out / "samples" / "step_0000200.png").stat().st_size > 1000
    quality = [r for r in metrics(out) if "mmd" in r][-1]
    assert set(quality) >= {"step", "mmd", "mode_weights"} and any(k.startswith("fisher@") for k in quality)
    assert abs(sum(quality["mode_weights"]) + quality["diverged"] - 1) < 1e-6
    assert "mode_weights" in result.stdout + result.stderr
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(ckpt) == {"model", "ema", "optimizer", "step", "config", "rng", "interval", "figure_owed"}
    assert ckpt["step"] == 200 and ckpt["figure_owed"] is False
    assert ckpt["config"]["dataset"] == "gmm" and len(ckpt["config"]["sigmas"]) == 8


def write_cifar_folder(root, n=4):
    """A tiny cifar-10-batches-py/ in the upstream format: protocol-2 pickles with byte-string keys."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": [0] * n,
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane"] * 10}, f, protocol=2)


def write_mnist_raw(root, n=16):
    """The four MNIST IDX files, gzipped as upstream, in <root>/MNIST/raw/."""
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">4I", 0x803, n, 28, 28) + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">2I", 0x801, n) + bytes(n))


@pytest.mark.parametrize("dataset", ["cifar10", "mnist", "digits"])
def test_image_sets_train_and_sample_py_writes_uint8_npz(tmp_path, dataset):
    """The U-Net path: data found on disk (no download), or scikit-learn's digits (no data folder at all), a few
    steps, a grid PNG, then sample.py -n N."""
    data_dir = tmp_path / "data"
    if dataset == "cifar10":
        write_cifar_folder(data_dir)
    elif dataset == "mnist":
        write_mnist_raw(data_dir)
    # The md5 of the fake MNIST .gz files is not the published one, so the loader must not be asked to check it:
    # uncompressed IDX files are what the test leaves for MNIST.
    if dataset == "mnist":
        for path in (data_dir / "MNIST" / "raw").iterdir():
            with gzip.open(path) as f:
                (path.parent / path.name[:-3]).write_bytes(f.read())
            path.unlink()
    out = tmp_path / "run"
    run("--dataset", dataset, "--data-dir", data_dir, "--out-dir", out, "--steps", 2, "--batch-size", 4,
        "--channels", 8, "--n-sigmas", 4, "--n-steps-each", 1, "--sample-every", 2, "--device", "cpu")
    assert (out / "samples" / "step_0000002.png").exists()
    result = run_here_ok("--out-dir", out, "-n", 6, "--batch-size", 4, "--device", "cpu", script="sample.py")
    samples = np.load(out / "samples.npz")["arr_0"]
    shape = {"cifar10": (6, 32, 32, 3), "mnist": (6, 28, 28, 1), "digits": (6, 8, 8, 1)}[dataset]
    assert samples.dtype == np.uint8 and samples.shape == shape, result.stdout
    assert (out / "samples.png").exists()
    if dataset == "digits":
        assert not data_dir.exists()  # nothing read from or written to --data-dir
        import data
        import ncsn
        config = torch.load(out / "checkpoint.pt", weights_only=True)["config"]
        assert config["shape"] == [1, 8, 8] and config["architecture"]["image_size"] == 8
        # Technique 1 over the 1500 training digits in [0, 1]: the run read data.load_digits(train=True).
        sigma_1 = ncsn.max_pairwise_distance(data.load_digits(train=True).float() / 255)
        assert config["sigmas"][0] == pytest.approx(sigma_1, rel=1e-6)


def test_flips_follow_the_preset_and_a_run_of_an_earlier_train_py_flips_cifar10_only():
    """Random horizontal flips suit photographs (CIFAR-10, faces, churches), not digits (a mirrored 2 is no digit)."""
    import train
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    assert {name: preset["flip"] for name, preset in train.PRESETS.items() if name in train.IMAGE_SETS} == dict(
        cifar10=True, mnist=False, digits=False, celeba=True, church=True, ffhq=True, folder=False)
    source = lambda config: train.data_source(dict(shape=[1, 8, 8], **config), images, torch.device("cpu"),  # noqa
                                              "auto", is_main=False)
    for dataset, flip in (("cifar10", True), ("mnist", False), ("digits", False)):  # configs without "flip"
        assert source(dict(dataset=dataset)).flip == flip, dataset
    assert source(dict(dataset="folder", flip=True)).flip and not source(dict(dataset="cifar10", flip=False)).flip


def test_sample_py_on_2d_data_writes_float_points_from_the_ema_weights(tmp_path):
    """sample.py draws from the EMA weights with the checkpoint's sampler: the same seed gives the samples of
    ncsn.sample run by hand on the EMA network, and a --checkpoint elsewhere writes into --out-dir."""
    out = tmp_path / "swiss"
    run("--dataset", "swissroll", "--out-dir", out, "--steps", 10, "--sample-every", 0, "--ema-decay", "0.5", *FAST)
    run_here_ok("--out-dir", out, "-n", 50, "--batch-size", 20, "--device", "cpu", "--seed", 3, script="sample.py")
    samples = np.load(out / "samples.npz")["arr_0"]
    assert samples.shape == (50, 2) and samples.dtype == np.float32 and np.isfinite(samples).all()
    import ncsn
    import runs
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    config = ckpt["config"]
    for weights, same in (("ema", True), ("model", False)):  # decay 0.5 over 10 steps: the two differ
        model = ncsn.MLPScoreNet(2, hidden=config["architecture"]["hidden"])
        model.load_state_dict(ckpt[weights])
        by_hand = ncsn.sample(model, (50, 2), config["sigmas"], config["n_steps_each"], config["step_size"],
                              generator=torch.Generator().manual_seed(3), data_range=config["data_range"],
                              batch_size=20)
        assert np.array_equal(by_hand.numpy(), samples) == same, weights
        assert runs.build_model(config).load_state_dict(ckpt[weights])  # the config describes this network
    elsewhere = tmp_path / "elsewhere"
    run_here_ok("--checkpoint", out / "checkpoint.pt", "--out-dir", elsewhere, "-n", 50, "--batch-size", 20,
                "--device", "cpu", "--seed", 3, script="sample.py")
    assert np.array_equal(np.load(elsewhere / "samples.npz")["arr_0"], samples)


def test_sample_py_in_a_log_prints_progress_lines_not_a_bar(tmp_path):
    """Where stderr is not a terminal, the wait shows as plain lines (no carriage returns)."""
    out = tmp_path / "gmm"
    run("--dataset", "gmm", "--out-dir", out, "--steps", 5, "--sample-every", 0, *FAST)
    assert not (out / "samples").exists()  # --sample-every 0: no sampling, not even at the end
    result = sample("--out-dir", out, "-n", 10, "--device", "cpu")
    assert "\r" not in result.stderr
    assert "10 samples against as many fresh points: mmd" in result.stdout and "mode_weights" in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("sample:")]
    assert lines and lines[-1].startswith("sample: 100% 33/33"), result.stderr  # 8 levels x 4 steps + denoise


def test_sample_py_bad_input_gives_one_line_errors(tmp_path):
    assert_one_line_error(run_here("--out-dir", tmp_path / "nothing", "-n", 4, script="sample.py"), "no checkpoint")
    assert_one_line_error(run_here("-n", 4, script="sample.py"), "--out-dir", "--checkpoint")
    assert_one_line_error(run_here("--out-dir", tmp_path, "-n", 0, script="sample.py"), "-n")
    assert_one_line_error(run_here("--out-dir", tmp_path, "--device", "tpu", script="sample.py"), "no checkpoint")
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert_one_line_error(run_here("--out-dir", tmp_path, "--device", "cpu", script="sample.py"), "checkpoint",
                          "corrupt")
    assert_one_line_error(run_here("--out-dir", tmp_path, "--device", "tpu", script="sample.py"), "--device")


@pytest.mark.parametrize("objective", ["ssm", "exact"])
def test_each_objective_trains_on_gmm(tmp_path, objective):
    out = tmp_path / objective
    run("--dataset", "gmm", "--objective", objective, "--out-dir", out, "--steps", 150, "--sample-every", 0, *FAST)
    losses = [r["loss"] for r in metrics(out)]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses


def test_bf16_switch_on_cpu_trains(tmp_path):
    out = tmp_path / "bf16"
    run("--dataset", "gmm", "--precision", "bf16", "--out-dir", out, "--steps", 20, "--sample-every", 0, *FAST)
    assert all(np.isfinite(r["loss"]) for r in metrics(out))


def cpu_flags():
    """The CPU's feature flags as Linux lists them (/proc/cpuinfo), or None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(re.search(r"^(?:flags|Features)\s*:(.*)$", f.read(), re.MULTILINE).group(1).split())
    except (OSError, AttributeError):
        return None


def test_native_bf16_is_read_from_the_cpu():
    """runs.cpu_has_native_bf16 (train.py's and sample.py's test) agrees with the flags the kernel reports: avx512_bf16
    or amx_bf16 on x86, bf16 on Arm (Linux's names; AVX10 CPUs list avx512_bf16 too)."""
    flags = cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags to check against")
    assert runs.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16", "bf16", "svebf16"})


def linear_output_dtypes(*args):
    """Run train.py's main(args) in-process; the dtypes of every nn.Linear output the run computed (its network's)."""
    seen = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: seen.add(output.dtype) if isinstance(module, torch.nn.Linear) else None)
    try:
        return run_here_ok(*args), seen
    finally:
        hook.remove()


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_runs_in_bf16_with_native_bf16_else_in_fp32_with_a_note(tmp_path, monkeypatch, native):
    """--precision bf16 on a CPU: the network's layers compute in bf16 where the CPU has bf16 arithmetic; where it
    would only be emulated (slower than fp32), the run says so in one line and trains in fp32. The checkpoint keeps
    the bf16 asked for, which a machine with bf16 honours on resume."""
    monkeypatch.setattr(runs, "cpu_has_native_bf16", lambda: native)
    out = tmp_path / "run"
    result, dtypes = linear_output_dtypes("--dataset", "gmm", "--precision", "bf16", "--out-dir", out, "--steps", 3,
                                          "--sample-every", 0, *FAST)
    assert dtypes == ({torch.bfloat16} if native else {torch.float32})
    notes = [line for line in result.stderr.splitlines() if "native bf16" in line]
    assert len(notes) == (0 if native else 1) and (native or "training in fp32" in notes[0]), result.stderr
    assert ("bf16 autocast" if native else ", fp32,") in result.stdout
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["precision"] == "bf16"


def test_adam_is_fused_on_cuda_and_cpu_and_its_state_moves_between_fused_and_unfused(capsys):
    """train.adam is fused on cuda and cpu (torch's default elsewhere). A checkpoint's Adam state loads into either
    kind (load_optimizer keeps this run's kind): a fused run resumed fused continues bit for bit, and across kinds the
    continuation is the uninterrupted run's to float rounding, with a note."""
    import train
    config = dict(lr=1e-2, adam_eps=1e-8)
    fused = {kind: train.adam(torch.nn.Linear(2, 2), config, torch.device(kind)).param_groups[0]["fused"]
             for kind in ("cuda", "cpu", "mps")}
    assert fused == {"cuda": True, "cpu": True, "mps": None}

    def steps(model, optimizer, n, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            loss = model(torch.randn(64, 3, generator=g)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    def trained(first, then):  # 5 steps with one kind, through a checkpoint, 5 with the other
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
        optimizer = train.adam(model, config, torch.device(first))
        steps(model, optimizer, 5, seed=1)
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        resumed = train.adam(model, config, torch.device(then))
        train.load_optimizer(resumed, torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), rank=0)
        assert resumed.param_groups[0]["fused"] == fused[then]  # this run's kind, not the checkpoint's
        assert all(state["step"] == 5 for state in resumed.state.values())
        steps(model, resumed, 5, seed=2)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    whole = trained("cpu", "cpu")
    capsys.readouterr()
    assert torch.equal(trained("cpu", "cpu"), whole) and "note" not in capsys.readouterr().out
    for first, then in (("cpu", "mps"), ("mps", "cpu")):
        torch.testing.assert_close(trained(first, then), whole, rtol=1e-5, atol=1e-6)
        assert "continuation matches to float rounding" in capsys.readouterr().out


def test_compile_with_a_second_order_objective_says_why_and_runs_uncompiled(tmp_path):
    out = tmp_path / "ssm"
    result = run("--dataset", "gmm", "--objective", "ssm", "--compile", "--out-dir", out, "--steps", 10,
                 "--sample-every", 0, *FAST)
    assert "--compile cannot differentiate twice" in result.stderr and "running uncompiled" in result.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 10


def test_compile_switch_on_cpu_trains_like_eager(tmp_path):
    """--compile runs (compiled, or eagerly where a graph cannot be compiled: torch._dynamo's suppress_errors) and
    takes the same steps as an eager run: the weights agree to float rounding, and the checkpoint loads without it."""
    common = ["--dataset", "gmm", "--steps", 10, "--sample-every", 0, *FAST]
    result = run("--compile", "--out-dir", tmp_path / "compiled", *common, timeout=600)
    assert "Traceback" not in result.stderr, result.stderr
    run("--out-dir", tmp_path / "eager", *common)
    compiled = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=True)
    eager = torch.load(tmp_path / "eager" / "checkpoint.pt", weights_only=True)
    assert compiled["model"].keys() == eager["model"].keys()  # no _orig_mod. prefix: loadable without compile
    for name, tensor in eager["model"].items():
        torch.testing.assert_close(compiled["model"][name], tensor, rtol=1e-4, atol=1e-5)


def test_compile_on_one_gpu_replays_cuda_graphs_and_marks_each_call_a_new_step(monkeypatch):
    """--compile's mode: reduce-overhead (CUDA graphs) in one CUDA process only, and then each network call begins a
    new cudagraph-trees step (tests/test_cuda.py runs it on a GPU); the default mode under DDP and off CUDA."""
    import train
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert train.compile_mode(cuda, 1) == "reduce-overhead"
    assert train.compile_mode(cuda, 2) is None and train.compile_mode(cpu, 1) is None
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(len(marks)))
    net = train.each_call_a_new_step(lambda x, sigma: x * sigma)
    assert net(torch.tensor(2.0), torch.tensor(3.0)) == 6.0 and net(torch.tensor(1.0), torch.tensor(1.0)) == 1.0
    assert marks == [0, 1]


def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", "--dataset", "gmm", "--out-dir", str(out), "--steps", "10",
                             "--sample-every", "0", "--ckpt-every", "5", *FAST],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parameters and EMA agree on all 2 ranks" in result.stdout
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "metrics.jsonl", "run.lock"]  # rank 0 alone writes
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 10 and len(ckpt["rng"]) == 2
    assert len([r for r in metrics(out) if "loss" in r]) == 1  # rank 0 alone logs


def test_bad_input_gives_one_line_errors(tmp_path):
    assert_one_line_error(run_here("--dataset", "imagenet"), "--dataset")
    assert_one_line_error(run_here("--steps", "-3"), "--steps")
    assert_one_line_error(run_here("--lr", "0"), "--lr")
    assert_one_line_error(run_here("--steps", "ten"), "--steps")
    assert_one_line_error(run_here("--dataset", "cifar10", "--objective", "exact", "--out-dir", tmp_path / "c"),
                          "exact", "D = 3072")
    assert_one_line_error(run_here("--dataset", "digits", "--objective", "exact", "--out-dir", tmp_path / "d"),
                          "exact", "D = 64 for digits")
    assert_one_line_error(run_here("--sample", 4), "python sample.py")  # sampling moved there
    assert_one_line_error(run_here("--sample", 4, "--sample-batch-size", 2), "-n 4 --batch-size 2")
    assert_one_line_error(run_here("--sample-ev", 4), "unrecognized arguments")  # no abbreviations
    assert_one_line_error(run_here("--dataset", "gmm", "--sigma-max", "0.001", "--out-dir", tmp_path / "s"),
                          "sigma")


def test_resume_keeps_the_runs_settings_unless_a_flag_changes_them(tmp_path):
    out = tmp_path / "run"
    run("--dataset", "swissroll", "--out-dir", out, "--steps", 10, "--lr", "3e-4", "--ema-decay", "0.5",
        "--objective", "ssm", "--sample-every", 0, *FAST)
    # Only --out-dir and --steps: dataset, objective, batch, lr, sigmas and EMA decay come from the checkpoint.
    result = run("--out-dir", out, "--steps", 20, "--device", "cpu", "--lr", "1e-4")
    assert f"resuming from {out / 'checkpoint.pt'} at step 10" in result.stdout
    assert "lr 0.0003 -> 0.0001" in result.stdout and "steps 10 -> 20" in result.stdout
    config = torch.load(out / "checkpoint.pt", weights_only=True)["config"]
    assert (config["dataset"], config["objective"], config["batch_size"], config["ema_decay"]) == (
        "swissroll", "ssm", 64, 0.5)
    assert config["lr"] == 1e-4 and len(config["sigmas"]) == 8 and config["steps"] == 20


def test_the_same_command_again_resumes_although_its_levels_are_recomputed(tmp_path):
    """Rerunning a run's own command with more --steps resumes it: the levels that --n-sigmas recomputes from the
    checkpoint's float32 endpoints (here sigma_min 0.01) differ from the saved ones in the last bit only, which is no
    change of the run; another --n-sigmas is one."""
    write_cifar_folder(tmp_path / "data", n=8)
    command = ["--dataset", "cifar10", "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "run", "--device",
               "cpu", "--batch-size", 2, "--channels", 8, "--n-sigmas", 10, "--n-steps-each", 1, "--sample-every", 0]
    run_here_ok(*command, "--steps", 1)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["config"]["sigmas"]
    import ncsn
    assert ncsn.geometric_sigmas(saved[0], saved[-1], 10).tolist() != saved  # the last bit does move
    result = run_here_ok(*command, "--steps", 2)
    assert "at step 1" in result.stdout
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["config"]["sigmas"] == saved
    changed = [a if a != 10 else 11 for a in command]
    assert_one_line_error(run_here(*changed, "--steps", 3), "was trained with a different sigmas")


def test_warmup_and_grad_clip_are_kept_by_the_checkpoint_and_resume_exactly(tmp_path):
    """--warmup W raises the logged lr as lr (step + 1) / W; --grad-clip and --warmup live in the checkpoint's config,
    and a run extended from its checkpoint ends with the weights of the same run made in one go."""
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    settings = ["--dataset", "gmm", "--sample-every", 0, "--warmup", 10, "--grad-clip", "0.5", "--lr", "1e-3", *FAST]
    run("--out-dir", whole, "--steps", 20, *settings, "--log-every", 1)  # the last --log-every counts
    run("--out-dir", halves, "--steps", 5, *settings)  # stopped in the middle of the warm-up
    run_here_ok("--out-dir", halves, "--steps", 20, "--device", "cpu")  # the rest from the checkpoint, in-process
    lrs = [r["lr"] for r in metrics(whole) if "lr" in r]  # step k (1-based) ran at 1e-3 min(1, k / 10)
    assert lrs == pytest.approx([1e-4 * k for k in range(1, 11)] + [1e-3] * 10)
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (whole, halves))
    assert (a["config"]["grad_clip"], a["config"]["warmup"]) == (b["config"]["grad_clip"], b["config"]["warmup"]) \
        == (0.5, 10)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_grad_clip_bounds_the_global_norm_and_zero_leaves_gradients_alone():
    import train
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    config = dict(lr=0.0, warmup=0, grad_clip=0.25)
    for clip, expected in ((0.25, 0.25), (0.0, None)):
        model.zero_grad()
        (model(torch.ones(2, 4)) * 10).sum().backward()
        before = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        train.optimizer_step(optimizer, model, dict(config, grad_clip=clip), step=0)
        after = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        assert before > 1
        assert float(after) == pytest.approx(float(expected or before), rel=1e-5)
    assert [train.learning_rate(dict(lr=2.0, warmup=4), s) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


@pytest.mark.parametrize("name, theirs, ratio", [("cifar10", 6.2e-6, 1.0), ("celeba", 3.3e-6, 1.0),
                                                 ("church", 4.9e-6, 2.12), ("ffhq", 9e-7, 1.0)])
def test_preset_steps_are_the_published_ones_doubled_against_technique_4(name, theirs, ratio):
    """NCSNv2's configs step x + eps s + sqrt(2 eps) z; the notes' update x + eps/2 s + sqrt(eps) z needs twice their
    number. Technique 4 on their sigmas and T, in the notes' convention, lands within 3% of it for CIFAR-10, CelebA and
    FFHQ; LSUN church's published step is 2.12 times technique 4's (so in their code too: its config departs from
    their own technique)."""
    import ncsn
    import train
    preset = train.PRESETS[name]
    assert preset["step_size"] == pytest.approx(2 * theirs, rel=1e-12)
    sigmas = ncsn.geometric_sigmas(preset["sigma_max"], preset["sigma_min"], preset["n_sigmas"], dtype=torch.float64)
    technique_4 = ncsn.recommended_step_size(sigmas.tolist(), preset["n_steps_each"])
    assert preset["step_size"] / technique_4 == pytest.approx(ratio, rel=0.03)


def test_unet_for_a_resolution_halves_to_8x8_and_attends_at_16():
    import train
    folder = train.PRESETS["folder"]
    for size, levels in ((32, 4), (64, 4), (128, 5), (256, 6)):
        mults, attention = train.unet_for(size, folder)
        assert len(mults) == levels and size >> (levels - 1) in (4, 8) and attention == [16]
    assert train.unet_for(8, folder) == ([1, 2], [])  # 8 -> 4, too small for attention at 16
    assert train.unet_for(28, folder) == ([1, 2, 2], [])  # 28 -> 14 -> 7
    assert train.unet_for(64, train.PRESETS["cifar10"]) == ([1, 2, 2, 2], [16])  # a preset's own U-Net is kept
    with pytest.raises(train.RunError, match="--image-size 96"):
        train.unet_for(96, folder)


def test_a_folder_of_pictures_trains_resumes_and_its_held_out_slice_is_inpainted(tmp_path):
    """--dataset folder: pictures of any size in nested folders, decoded once (cached), a U-Net for the resolution,
    the folder's settings in the checkpoint; the held-out images never train; a resume keeps the settings, refuses to
    change the images, finds a moved folder and refuses one whose files changed; sample.py inpaints the images
    train.py held out."""
    from PIL import Image

    import data
    import ncsn
    pictures = tmp_path / "pictures"
    rng = np.random.default_rng(0)
    for i in range(24):
        folder = pictures / ("a" if i % 2 else "b") / ("deeper" if i % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        size = (20 + i % 4, 17 + i % 3)  # (width, height), none square
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(
            folder / f"p{i}.{'png' if i % 2 else 'jpg'}")
    (pictures / "notes.txt").write_text("not a picture")
    out = tmp_path / "run"
    settings = ["--image-size", 16, "--held-out", 4, "--channels", 8, "--n-sigmas", 4, "--n-steps-each", 1,
                "--sample-every", 0, "--device", "cpu"]
    result = run("--dataset", "folder", "--data-dir", pictures, "--out-dir", out, "--steps", 2, *settings)
    assert f"folder from {pictures} (16x16, 4 held out)" in result.stdout and "GFLOPs per image" in result.stdout
    config = torch.load(out / "checkpoint.pt", weights_only=True)["config"]
    assert config["data"] == dict(path=str(pictures), image_size=16, crop=None, grayscale=None, held_out=4,
                                  files=data.folder_fingerprint(data.image_files(pictures)))
    training = data.load_folder(pictures, 16, held_out=4, progress=False)  # 20: the held-out 4 never train
    sigma_1 = ncsn.max_pairwise_distance(training.float() / 255)
    assert len(training) == 20 and config["sigmas"][0] == pytest.approx(sigma_1, rel=1e-5)
    assert config["shape"] == [3, 16, 16] and config["architecture"]["channel_mults"] == [1, 2, 2]
    assert not config["flip"] and (pictures / data.FOLDER_CACHE).is_dir()
    result = run_here_ok("--out-dir", out, "--steps", 3, "--device", "cpu")  # the folder's settings from the checkpoint
    assert "resuming from" in result.stdout and "loaded 24 images" in result.stderr + result.stdout
    assert_one_line_error(run_here("--out-dir", out, "--steps", 4, "--image-size", 8, "--device", "cpu"),
                          "--image-size", "another --out-dir")
    sample("--out-dir", out, "--inpaint", "right-half", "-n", 4, "--completions", 1, "--device", "cpu")
    originals = np.load(out / "inpainting.npz")["originals"]
    held_out = data.load_folder(pictures, 16, held_out=4, train=False, progress=False).permute(0, 2, 3, 1).numpy()
    assert sorted(o.tobytes() for o in originals) == sorted(h.tobytes() for h in held_out)
    moved = tmp_path / "moved"
    pictures.rename(moved)  # a folder that moved is found with --data-dir; one whose files changed is refused
    result = run_here_ok("--out-dir", out, "--steps", 4, "--data-dir", moved, "--device", "cpu")
    assert f"read from {moved} now" in result.stdout
    (moved / "b" / "extra.png").write_bytes((moved / "a" / "p1.png").read_bytes())
    assert_one_line_error(run_here("--out-dir", out, "--steps", 5, "--data-dir", moved, "--device", "cpu"),
                          "added to or removed from", "held-out")
    assert_one_line_error(run_here("--out-dir", out, "--inpaint", "center", "--data-dir", moved, "--device", "cpu",
                                   script="sample.py"), "held-out")


def test_a_checkpoint_without_the_newer_settings_resumes_with_their_old_values(tmp_path):
    """A checkpoint of a train.py before warm-up, clipping, Adam's eps, flips and folders resumes as it ran."""
    out = tmp_path / "old"
    run("--dataset", "gmm", "--out-dir", out, "--steps", 3, "--sample-every", 0, *FAST)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    for key in ("grad_clip", "warmup", "adam_eps", "flip", "data", "keep_every"):
        del ckpt["config"][key]
    torch.save(ckpt, out / "checkpoint.pt")
    assert "resuming from" in run_here_ok("--out-dir", out, "--steps", 5, "--device", "cpu").stdout
    config = torch.load(out / "checkpoint.pt", weights_only=True)["config"]
    assert (config["grad_clip"], config["warmup"], config["adam_eps"], config["flip"], config["keep_every"]) == (
        0.0, 0, 1e-8, False, 0)


def test_image_folder_flags_are_refused_before_any_decoding_where_they_cannot_apply(tmp_path, capsys, monkeypatch):
    import train
    monkeypatch.setattr(train.signal, "signal", lambda *a: None)  # leave pytest's own signal handlers
    for argv, says in ((["--dataset", "folder"], "--data-dir"),
                       (["--dataset", "gmm", "--image-size", "32", "--out-dir", str(tmp_path / "g")], "image folders")):
        with pytest.raises(SystemExit) as exit_info:  # in this process: no interpreter start-up
            train.main(argv)
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_info.value.code != 0 and len(lines) == 1 and says in lines[0], lines
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("--dataset", "folder", "--data-dir", empty, "--image-size", 96, "--out-dir",
                              tmp_path / "a", check=False), "--image-size 96")
    assert not (empty / ".ncsn-cache").exists()
    (empty / "one.png").write_bytes(b"not decoded")
    assert_one_line_error(run("--dataset", "folder", "--data-dir", empty, "--held-out", 0, "--out-dir", tmp_path / "b",
                              check=False), "fewer than 2 of the 1 images")


def test_metrics_carry_the_ema_models_loss_on_fixed_held_out_images(tmp_path):
    """Image runs log the EMA network's NCSN loss on held-out images (the 297 held-out digits here) at fixed levels and
    noise: the number in metrics.jsonl is that of the checkpoint's EMA weights, recomputed by hand."""
    import data
    import runs
    import train
    out = tmp_path / "digits"
    run("--dataset", "digits", "--out-dir", out, "--steps", 4, "--log-every", 2, "--channels", 8, "--n-steps-each", 1,
        "--sample-every", 0, "--device", "cpu")
    lines = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in lines] == [2, 4] and all("heldout_loss" in r for r in lines)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    model = runs.build_model(ckpt["config"])
    model.load_state_dict(ckpt["ema"])
    band_of_level, band_names = train.sigma_bands(ckpt["config"]["sigmas"], torch.device("cpu"))
    heldout = train.heldout_set(ckpt["config"], None, torch.device("cpu"), band_of_level, band_names)
    pixels = (heldout["x"] * 255).round().to(torch.uint8)
    assert sorted(p.numpy().tobytes() for p in pixels) == sorted(
        p.numpy().tobytes() for p in data.load_digits(train=False))  # all 297 held-out digits, no training one
    by_hand = train.heldout_loss(model, heldout)
    assert by_hand["heldout_loss"] == pytest.approx(lines[-1]["heldout_loss"], rel=1e-5)
    assert by_hand["heldout_loss_per_sigma_band"] == pytest.approx(lines[-1]["heldout_loss_per_sigma_band"], rel=1e-5)
    assert lines[0]["heldout_loss"] != lines[1]["heldout_loss"]  # the EMA moved between the two lines


def test_keep_every_keeps_snapshots_that_resume_to_the_same_run(tmp_path):
    """--keep-every K: checkpoint_NNNNNNN.pt every K steps beside checkpoint.pt (whatever --ckpt-every says), each a
    whole checkpoint of its step: resumed elsewhere, the snapshot of step 4 ends where the run itself ended."""
    import shutil
    out, again = tmp_path / "run", tmp_path / "again"
    run("--dataset", "gmm", "--out-dir", out, "--steps", 6, "--keep-every", 2, "--ckpt-every", 0, "--sample-every", 0,
        *FAST)
    assert sorted(p.name for p in out.glob("checkpoint*.pt")) == [
        "checkpoint.pt", "checkpoint_0000002.pt", "checkpoint_0000004.pt", "checkpoint_0000006.pt"]
    assert [torch.load(out / f"checkpoint_{s:07d}.pt", weights_only=True)["step"] for s in (2, 4, 6)] == [2, 4, 6]
    again.mkdir()
    shutil.copy(out / "checkpoint_0000004.pt", again / "checkpoint.pt")
    run_here_ok("--out-dir", again, "--steps", 6, "--device", "cpu")
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (out, again))
    assert all(torch.equal(a[key][k], b[key][k]) for key in ("model", "ema") for k in a[key])
    assert sorted(p.name for p in again.glob("checkpoint_*.pt")) == ["checkpoint_0000006.pt"]  # kept on resume


def test_non_finite_loss_stops_before_overwriting_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    run("--dataset", "gmm", "--out-dir", out, "--steps", 10, "--sample-every", 0, *FAST)
    good = (out / "checkpoint.pt").read_bytes()
    # An absurd learning rate drives the weights, then the loss, to inf/nan within a few steps.
    result = run("--dataset", "gmm", "--out-dir", out, "--steps", 30, "--lr", "1e30", "--sample-every", 0,
                 "--ckpt-every", 15, *FAST, check=False)
    assert_one_line_error(result, "loss is not finite", "at step")
    assert (out / "checkpoint.pt").read_bytes() == good


def test_train_is_a_flat_story():
    """train() reads top to bottom: about 90 lines, no nested function or lambda, and args is never written to."""
    tree = ast.parse(open(os.path.join(ROOT, "train.py")).read())
    train = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 100
    nested = [n for n in ast.walk(train) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    assert nested == [train]
    for function in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name != "parse_args"):
        written = [n for n in ast.walk(function) if isinstance(n, (ast.Attribute,)) and isinstance(n.ctx, ast.Store)
                   and isinstance(n.value, ast.Name) and n.value.id == "args"]
        assert not written, f"{function.name} writes args.{written[0].attr}"


def test_sample_py_help_lists_the_sampling_options():
    """Every option of the sampling mode that train.py had (--sample N, --sample-batch-size, --seed, --device,
    --out-dir) has its place in sample.py, with --checkpoint beside them."""
    help_text = run("--help", script="sample.py").stdout
    for flag in ("--out-dir", "--checkpoint", "-n N", "--batch-size", "--seed", "--device"):
        assert flag in help_text, flag


def old_unet_name(name, num_res_blocks):
    """The name an earlier train.py gave a U-Net parameter: one flat list of modules per path (a level's blocks,
    then its resampling conv as `.conv`), each block's attention inside it, the middle as mid.0 (with attention)
    and mid.1."""
    layer = re.fullmatch(r"(down|up)\.(\d+)\.layers\.(\d+)\.(block|attention)\.(.+)", name)
    resample = re.fullmatch(r"(down|up)\.(\d+)\.resample\.(?:1\.)?(weight|bias)", name)
    if layer or resample:
        path, level = (layer or resample).group(1), int((layer or resample).group(2))
        per_level = num_res_blocks + (1 if path == "down" else 2)  # the level's blocks and its resampling conv
        if resample:
            return f"{path}.{level * per_level + per_level - 1}.conv.{resample.group(3)}"
        block, part, rest = int(layer.group(3)), layer.group(4), layer.group(5)
        return f"{path}.{level * per_level + block}." + ("attention." if part == "attention" else "") + rest
    for new, old in (("mid_block1.", "mid.0."), ("mid_attention.", "mid.0.attention."), ("mid_block2.", "mid.1.")):
        if name.startswith(new):
            return old + name[len(new):]
    return name


def test_checkpoint_of_the_earlier_layout_resumes_exactly_and_samples(tmp_path):
    """A checkpoint as the earlier train.py wrote it (config["model"], the flat U-Net names, parameters in the same
    order) resumes to the same weights as the same checkpoint in today's layout, and sample.py draws from it."""
    data_dir = tmp_path / "data"
    write_cifar_folder(data_dir)
    common = ["--data-dir", data_dir, "--batch-size", 4, "--channels", 8, "--n-sigmas", 4, "--n-steps-each", 1,
              "--sample-every", 0, "--device", "cpu"]
    new, old = tmp_path / "new", tmp_path / "old"
    run("--dataset", "cifar10", "--out-dir", new, "--steps", 2, *common)
    ckpt = torch.load(new / "checkpoint.pt", weights_only=True)
    config = dict(ckpt["config"])
    config["model"] = config.pop("architecture")
    n_blocks = config["model"]["num_res_blocks"]
    renamed = {key: {old_unet_name(name, n_blocks): t for name, t in ckpt[key].items()} for key in ("model", "ema")}
    assert renamed["model"].keys() != ckpt["model"].keys() and "mid.0.attention.qkv.weight" in renamed["model"]
    old.mkdir()
    torch.save(dict(ckpt, config=config, **renamed), old / "checkpoint.pt")
    for out in (new, old):
        run("--out-dir", out, "--steps", 4, *common)
    a, b = (torch.load(out / "checkpoint.pt", weights_only=True) for out in (new, old))
    assert b["config"] == a["config"] and "architecture" in b["config"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(t, b[key][name]) for name, t in a[key].items()), key
    torch.save(dict(ckpt, config=config, **renamed), old / "checkpoint.pt")
    sample("--out-dir", old, "-n", 2, "--device", "cpu")
    assert np.load(old / "samples.npz")["arr_0"].shape == (2, 32, 32, 3)
