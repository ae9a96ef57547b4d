"""train.py end to end, on the CPU: the toy run, exact resume, the image loaders behind it, the sampling mode,
the objectives and switches, several processes under torchrun, and one-line errors for bad input."""
import gzip
import json
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--device", "cpu", "--batch-size", "64", "--n-sigmas", "8", "--n-steps-each", "4", "--log-every", "10"]


def run(*args, check=True, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


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
    assert set(ckpt) == {"model", "ema", "optimizer", "step", "config", "rng"} and ckpt["step"] == 200
    assert ckpt["config"]["dataset"] == "gmm" and len(ckpt["config"]["sigmas"]) == 8


def test_resume_is_exact(tmp_path):
    """N steps, stop, N more gives bit-identical weights, EMA and optimiser state to 2N steps in one go."""
    common = ["--dataset", "gmm", "--sample-every", 0, "--ckpt-every", 0, *FAST]
    run("--out-dir", tmp_path / "once", "--steps", 40, *common)
    run("--out-dir", tmp_path / "twice", "--steps", 20, *common)
    second = run("--out-dir", tmp_path / "twice", "--steps", 40, *common)
    assert f"resuming from {tmp_path / 'twice' / 'checkpoint.pt'} at step 20" in second.stdout
    a = torch.load(tmp_path / "once" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "twice" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 40
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resuming"
    for p, q in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(p[k], q[k]) for k in p)
    assert not (tmp_path / "twice" / "samples").exists()  # --sample-every 0: no sampling, not even at the end


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


@pytest.mark.parametrize("dataset", ["cifar10", "mnist"])
def test_image_sets_train_and_sample_mode_writes_uint8_npz(tmp_path, dataset, monkeypatch):
    """The U-Net path: data found on disk (no download), a few steps, a grid PNG, then --sample N."""
    data_dir = tmp_path / "data"
    write_cifar_folder(data_dir) if dataset == "cifar10" else write_mnist_raw(data_dir)
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
    result = run("--out-dir", out, "--sample", 6, "--sample-batch-size", 4, "--device", "cpu")
    samples = np.load(out / "samples.npz")["arr_0"]
    shape = (6, 32, 32, 3) if dataset == "cifar10" else (6, 28, 28, 1)
    assert samples.dtype == np.uint8 and samples.shape == shape, result.stdout
    assert (out / "samples.png").exists()


def test_sample_mode_on_2d_data_writes_float_points(tmp_path):
    out = tmp_path / "swiss"
    run("--dataset", "swissroll", "--out-dir", out, "--steps", 10, "--sample-every", 0, *FAST)
    run("--out-dir", out, "--sample", 50, "--sample-batch-size", 20, "--device", "cpu")
    samples = np.load(out / "samples.npz")["arr_0"]
    assert samples.shape == (50, 2) and samples.dtype == np.float32 and np.isfinite(samples).all()


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


def test_compile_with_a_second_order_objective_says_why_and_runs_uncompiled(tmp_path):
    out = tmp_path / "ssm"
    result = run("--dataset", "gmm", "--objective", "ssm", "--compile", "--out-dir", out, "--steps", 10,
                 "--sample-every", 0, *FAST)
    assert "--compile cannot differentiate twice" in result.stderr and "running uncompiled" in result.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 10


def test_compile_switch_on_cpu_works_or_says_why(tmp_path):
    out = tmp_path / "compiled"
    result = run("--dataset", "gmm", "--compile", "--out-dir", out, "--steps", 10, "--sample-every", 0, *FAST,
                 check=False, timeout=600)
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode == 0:
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert not any(k.startswith("_orig_mod") for k in ckpt["model"])  # loadable without compile
    else:
        assert "compile" in result.stderr


def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", "--dataset", "gmm", "--out-dir", str(out), "--steps", "10",
                             "--sample-every", "0", "--ckpt-every", "5", *FAST],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parameters and EMA agree on all 2 ranks" in result.stdout
    assert os.listdir(out) == ["checkpoint.pt", "metrics.jsonl"] or sorted(os.listdir(out)) == [
        "checkpoint.pt", "metrics.jsonl"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 10 and len(ckpt["rng"]) == 2
    assert len([r for r in metrics(out) if "loss" in r]) == 1  # rank 0 alone logs


def test_bad_input_gives_one_line_errors(tmp_path):
    assert_one_line_error(run("--dataset", "imagenet", check=False), "--dataset")
    assert_one_line_error(run("--steps", "-3", check=False), "--steps")
    assert_one_line_error(run("--lr", "0", check=False), "--lr")
    assert_one_line_error(run("--steps", "ten", check=False), "--steps")
    assert_one_line_error(run("--dataset", "cifar10", "--objective", "exact", check=False), "exact")
    assert_one_line_error(run("--out-dir", tmp_path / "nothing", "--sample", 4, check=False), "no checkpoint")
    assert_one_line_error(run("--dataset", "gmm", "--sigma-max", "0.001", "--out-dir", tmp_path / "s", check=False),
                          "sigma")


def test_corrupt_or_foreign_checkpoint_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "run"
    run("--dataset", "gmm", "--out-dir", out, "--steps", 5, "--sample-every", 0, *FAST)
    good = (out / "checkpoint.pt").read_bytes()
    assert_one_line_error(run("--dataset", "swissroll", "--out-dir", out, "--steps", 5, *FAST, check=False),
                          "different dataset")
    (out / "checkpoint.pt").write_bytes(good[: len(good) // 2])
    truncated = (out / "checkpoint.pt").read_bytes()
    assert_one_line_error(run("--dataset", "gmm", "--out-dir", out, "--steps", 10, *FAST, check=False),
                          "checkpoint", "corrupt")
    assert (out / "checkpoint.pt").read_bytes() == truncated
    assert_one_line_error(run("--out-dir", out, "--sample", 4, "--device", "cpu", check=False), "corrupt")
    torch.save({"model": {}}, out / "checkpoint.pt")  # readable, but not a checkpoint of train.py
    assert_one_line_error(run("--dataset", "gmm", "--out-dir", out, "--steps", 10, *FAST, check=False),
                          "not a checkpoint of train.py")


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


def test_non_finite_loss_stops_before_overwriting_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    run("--dataset", "gmm", "--out-dir", out, "--steps", 10, "--sample-every", 0, *FAST)
    good = (out / "checkpoint.pt").read_bytes()
    # An absurd learning rate drives the weights, then the loss, to inf/nan within a few steps.
    result = run("--dataset", "gmm", "--out-dir", out, "--steps", 30, "--lr", "1e30", "--sample-every", 0,
                 "--ckpt-every", 15, *FAST, check=False)
    assert_one_line_error(result, "loss is not finite", "at step")
    assert (out / "checkpoint.pt").read_bytes() == good
