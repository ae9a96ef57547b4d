"""sample.py's image tasks end to end on the CPU: inpainting held-out images under each mask and interpolation, from
a tiny MNIST-shaped run, and their one-line refusals; --fid through Inception (random weights), over every checkpoint,
and the digits' report. (Plain sampling is tested with train.py, in test_train.py.)"""
import gzip
import os

import numpy as np
import pytest
import torch

import quality
import sample as sample_py
from test_quality import LINEAR
from test_train import FAST, metrics, run, run_here_ok, sample, write_mnist_raw


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A 2-step MNIST run on files in the upstream IDX format (uncompressed: their md5 is not the published one)."""
    root = tmp_path_factory.mktemp("image_run")
    data_dir = root / "data"
    write_mnist_raw(data_dir, n=16)
    for path in (data_dir / "MNIST" / "raw").iterdir():
        with gzip.open(path) as f:
            (path.parent / path.name[:-3]).write_bytes(f.read())
        path.unlink()
    out = root / "run"
    run("--dataset", "mnist", "--data-dir", data_dir, "--out-dir", out, "--steps", 2, "--batch-size", 4,
        "--channels", 8, "--n-sigmas", 4, "--n-steps-each", 1, "--sample-every", 0, "--keep-every", 1,
        "--device", "cpu")
    return data_dir, out


@pytest.mark.parametrize("spec, hidden", [("right-half", 28 * 14), ("center", 14 * 14), ("random:0.3", 235)])
def test_inpaint_completes_held_out_images_and_keeps_the_known_pixels(image_run, tmp_path, monkeypatch, spec, hidden):
    data_dir, out = image_run
    args = ["--checkpoint", out / "checkpoint.pt", "--out-dir", tmp_path, "--inpaint", spec, "-n", 3,
            "--completions", 2, "--batch-size", 4, "--data-dir", data_dir, "--device", "cpu"]
    if spec == "right-half":  # one end to end, as a user runs it
        assert "inpaint: 100% 10/10" in sample(*args).stderr  # chunks of 4 + 2 chains, 4 levels x 1 step + denoise
    else:  # the others in this process, which saves an interpreter's start-up; one with the network in bf16
        bf16 = spec.startswith("random") and sample_py.runs.cpu_has_native_bf16()
        monkeypatch.setattr(sample_py.signal, "signal", lambda *a: None)  # leave pytest's SIGTERM handler
        dtypes = set()
        hook = torch.nn.modules.module.register_module_forward_hook(
            lambda module, inputs, output: dtypes.add(output.dtype) if isinstance(module, torch.nn.Conv2d) else None)
        try:
            sample_py.main([str(a) for a in args] + (["--precision", "bf16"] if bf16 else []))
        finally:
            hook.remove()
        assert dtypes == {torch.bfloat16 if bf16 else torch.float32}
    arrays = np.load(tmp_path / "inpainting.npz")
    originals, masks, completions = arrays["originals"], arrays["masks"], arrays["completions"]
    assert originals.shape == (3, 28, 28, 1) and masks.shape == (3, 28, 28) and completions.shape == (3, 2, 28, 28, 1)
    assert completions.dtype == originals.dtype == np.uint8 and masks.dtype == bool
    test_images = np.frombuffer((data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes(), np.uint8,
                                offset=16).reshape(16, 28, 28, 1)
    assert all(any(np.array_equal(o, t) for t in test_images) for o in originals)  # held-out images, not training
    assert len({o.tobytes() for o in originals}) == 3  # drawn without replacement
    assert (masks.reshape(3, -1).sum(1) == 28 * 28 - hidden).all()
    if spec == "right-half":
        assert masks[:, :, :14].all() and not masks[:, :, 14:].any()
    if spec == "center":
        assert not masks[:, 7:21, 7:21].any()
    known = np.broadcast_to(masks[:, None, :, :, None], completions.shape)
    assert np.array_equal(completions[known], np.broadcast_to(originals[:, None], completions.shape)[known])
    assert not np.array_equal(completions[:, 0], completions[:, 1])  # two completions, two chains
    assert (tmp_path / "inpainting.png").stat().st_size > 1000


def test_interpolate_writes_rows_of_chains(image_run, tmp_path, monkeypatch):
    _, out = image_run
    sample("--checkpoint", out / "checkpoint.pt", "--out-dir", tmp_path, "--interpolate", 5, "-n", 3,
           "--batch-size", 10, "--device", "cpu", "--seed", 4)
    chains = np.load(tmp_path / "interpolation.npz")["arr_0"]
    assert chains.shape == (3, 5, 28, 28, 1) and chains.dtype == np.uint8
    assert (tmp_path / "interpolation.png").stat().st_size > 1000
    again = tmp_path / "again"
    monkeypatch.setattr(sample_py.signal, "signal", lambda *a: None)  # leave pytest's SIGTERM handler
    sample_py.main(["--checkpoint", str(out / "checkpoint.pt"), "--out-dir", str(again), "--interpolate", "5",
                    "-n", "3", "--batch-size", "10", "--device", "cpu", "--seed", "4"])  # in this process
    assert np.array_equal(np.load(again / "interpolation.npz")["arr_0"], chains)  # seeded


def test_compile_compiles_the_evaluation_of_samples_and_of_the_image_tasks(image_run, tmp_path, monkeypatch):
    """--compile hands the network's evaluation to torch.compile, with static shapes, for plain samples and the image
    tasks alike. torch.compile is stood in for by the identity here (compiling takes minutes on a CPU; on a GPU
    tests/test_cuda.py compiles for real), so the output is the uncompiled one from the same seed."""
    data_dir, out = image_run
    monkeypatch.setattr(sample_py.signal, "signal", lambda *a: None)  # leave pytest's SIGTERM handler
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compiled.append(options) or fn)
    tasks = (([], "samples.npz", "arr_0"), (["--interpolate", "2"], "interpolation.npz", "arr_0"),
             (["--inpaint", "center", "--completions", "1", "--data-dir", str(data_dir)], "inpainting.npz",
              "completions"))
    for task, written, key in tasks:
        outputs = []
        for flag in ([], ["--compile"]):
            where = tmp_path / f"{written}{flag}"
            sample_py.main(["--checkpoint", str(out / "checkpoint.pt"), "--out-dir", str(where), "-n", "2",
                            "--device", "cpu", *task, *flag])
            outputs.append(np.load(where / written)[key])
        assert np.array_equal(*outputs)
    assert compiled == [{"dynamic": False}] * 3


def test_data_init_starts_from_held_out_images(image_run, tmp_path, monkeypatch, capsys):
    """--data-init hands held-out images, in [0, 1], to the sampler's init (ncsn.sample's data + sigma_1 noise is
    tested in test_ncsn.py)."""
    data_dir, out = image_run
    monkeypatch.setattr(sample_py.signal, "signal", lambda *a: None)  # leave pytest's SIGTERM handler
    inits, draw_samples = [], sample_py.runs.draw_samples
    monkeypatch.setattr(sample_py.runs, "draw_samples",
                        lambda *a, init=None, **k: inits.append(init) or draw_samples(*a, init=init, **k))
    sample_py.main(["--checkpoint", str(out / "checkpoint.pt"), "--out-dir", str(tmp_path), "--data-init", "-n", "5",
                    "--data-dir", str(data_dir), "--device", "cpu"])
    assert "from held-out images + sigma_1 noise" in capsys.readouterr().out
    assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (5, 28, 28, 1)
    test_images = np.frombuffer((data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes(), np.uint8,
                                offset=16).reshape(16, 1, 28, 28)
    (init,) = inits
    assert init.shape == (5, 1, 28, 28) and init.dtype == torch.float32
    starts = (init * 255).round().to(torch.uint8).numpy()
    assert all(any(np.array_equal(s, t) for t in test_images) for s in starts)
    assert "more images than the 16 held-out" in in_process(capsys, monkeypatch, "--out-dir", out, "--data-init",
                                                            "-n", 20, "--data-dir", data_dir, "--device", "cpu")


def test_masks_hide_what_they_say():
    g = torch.Generator().manual_seed(0)
    right = sample_py.make_masks("right-half", 0.5, 2, 7, 9, g)
    assert right.shape == (2, 1, 7, 9) and (right[..., :4] == 1).all() and (right[..., 4:] == 0).all()
    center = sample_py.make_masks("center", 0.5, 1, 8, 8, g)
    assert (center[0, 0, 2:6, 2:6] == 0).all() and center.sum() == 64 - 16
    random = sample_py.make_masks("random", 0.25, 50, 8, 8, g)
    assert ((1 - random).sum((1, 2, 3)) == 16).all()
    assert (1 - sample_py.make_masks("random", 0.001, 3, 8, 8, g)).sum() == 3  # at least one pixel hidden each
    assert sample_py.make_masks("random", 0.999, 3, 8, 8, g).sum() == 3  # and at least one left known
    assert len({tuple(m.flatten().tolist()) for m in random}) > 40  # each image its own pixels


def in_process(capsys, monkeypatch, *args):
    """sample.main(args) in this process (no interpreter start-up): its exit status and one-line stderr."""
    monkeypatch.setattr(sample_py.signal, "signal", lambda *a: None)  # leave pytest's own SIGTERM handler
    with pytest.raises(SystemExit) as exit_info:
        sample_py.main([str(a) for a in args])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code != 0 and len(lines) == 1, lines
    return lines[0]


def test_image_tasks_refuse_bad_input_in_one_line(image_run, tmp_path, capsys, monkeypatch):
    data_dir, out = image_run
    refuse = lambda *args: in_process(capsys, monkeypatch, "--out-dir", out, "--device", "cpu", *args)  # noqa: E731
    for spec in ("left-half", "random:1.5", "random:x", "center:0.3"):
        line = refuse("--inpaint", spec)
        assert "--inpaint" in line and spec in line
    assert "--interpolate must be >= 2" in refuse("--interpolate", 1)
    assert "give one" in refuse("--interpolate", 3, "--inpaint", "center")
    assert "give one" in refuse("--data-init", "--inpaint", "center")
    assert "more images than the 16 held-out" in refuse("--inpaint", "center", "-n", 17, "--data-dir", data_dir)
    assert "--completions goes with --inpaint" in refuse("--completions", 3)
    assert "cannot hold the outputs" in refuse("--out-dir", out / "checkpoint.pt", "--checkpoint",
                                               out / "checkpoint.pt", "--interpolate", 3)
    line = refuse("--inpaint", "center", "--data-dir", tmp_path / "empty")
    assert "t10k" in line and "--data-dir" in line
    toy = tmp_path / "gmm"
    run("--dataset", "gmm", "--out-dir", toy, "--steps", 2, "--sample-every", 0, *FAST)
    for task in (("--inpaint", "right-half"), ("--interpolate", 4), ("--data-init",)):
        line = in_process(capsys, monkeypatch, "--out-dir", toy, "--device", "cpu", *task)
        assert "need a run on images" in line and "gmm" in line


# ---- --fid -------------------------------------------------------------------------------------------------------

def scored(out_dir):
    """The lines of metrics.jsonl that sample.py --fid appended."""
    return [line for line in metrics(out_dir) if "fid" in line]


def no_network(*args, **kwargs):
    raise OSError("no network here")


def test_fid_through_inception_with_fid_weights_prints_and_records_a_line(image_run, random_inception, tmp_path,
                                                                            monkeypatch, capsys):
    """--fid --fid-weights: samples and training images through Inception (random weights that the test saved; any
    download fails), one line printed and appended to metrics.jsonl, the training images' features cached beside the
    data."""
    data_dir, out = image_run
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    run_images = sample_py.runs.run_images  # 4 training images, not 16: Inception is slow on a CPU
    monkeypatch.setattr(sample_py.runs, "run_images", lambda *a, **k: run_images(*a, **k)[:4])
    monkeypatch.setattr(sample_py.signal, "signal", lambda *a: None)  # leave pytest's SIGTERM handler
    sample_py.main([str(a) for a in ("--checkpoint", out / "checkpoint.pt", "--out-dir", tmp_path, "-n", 2, "--fid",
                                     "--fid-weights", random_inception, "--data-dir", data_dir, "--device", "cpu")])
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FID ")]
    assert line.endswith(": 2 samples at step 2 against the 4 training images, in Inception features")
    (record,) = scored(tmp_path)
    assert (record["n"], record["step"], record["reference"], record["features"], record["is"]) == (
        2, 2, 4, "inception-v3-compat", None)  # no Inception Score for grey images
    assert record["checkpoint"] == str((out / "checkpoint.pt").resolve())
    assert np.isfinite(record["fid"]) and np.isfinite(record["kid"]) and f"FID {record['fid']:.2f}," in line
    (cached,) = (data_dir / ".ncsn-cache").glob("mnist-train-*-inception-v3-compat-features-2048.pt")
    assert torch.load(cached).shape == (4, 2048)  # the pool features of the 4 training images


def test_fid_without_weights_or_network_is_refused_before_sampling(image_run, tmp_path, monkeypatch, capsys):
    _, out = image_run
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty cache
    line = in_process(capsys, monkeypatch, "--checkpoint", out / "checkpoint.pt", "--out-dir", tmp_path, "--fid",
                      "--data-dir", tmp_path / "nothing here", "--device", "cpu")  # the weights are checked first
    assert "could not be downloaded" in line and "--fid-weights PATH" in line
    assert not (tmp_path / "samples.npz").exists()
    assert "go with --fid" in in_process(capsys, monkeypatch, "--out-dir", out, "--baselines")
    assert "does not go with --inpaint" in in_process(capsys, monkeypatch, "--out-dir", out, "--fid", "--inpaint",
                                                      "center")
    assert "does not go with --baselines or --data-init" in in_process(capsys, monkeypatch, "--out-dir", out, "--fid",
                                                                      "--every-checkpoint", "--data-init")


def test_every_checkpoint_scores_each_step_once_and_names_the_best(image_run, tmp_path, monkeypatch, capsys):
    """The run kept checkpoint_0000001.pt and checkpoint_0000002.pt (--keep-every 1); checkpoint.pt is step 2 again.
    Scored in the test's linear features, as Inception's would be."""
    data_dir, out = image_run
    monkeypatch.setattr(quality, "INCEPTION", LINEAR)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")  # a file, as --fid-weights must name; the linear features read nothing
    drawn = []
    draw_samples = sample_py.runs.draw_samples
    monkeypatch.setattr(sample_py.runs, "draw_samples", lambda *a, **k: drawn.append(a[0]) or draw_samples(*a, **k))
    monkeypatch.setattr(sample_py.signal, "signal", lambda *a: None)  # leave pytest's SIGTERM handler
    sample_py.main([str(a) for a in ("--out-dir", out, "-n", 3, "--fid", "--every-checkpoint", "--fid-weights",
                                     weights, "--data-dir", data_dir, "--device", "cpu")])
    records = scored(out)
    assert [(r["step"], os.path.basename(r["checkpoint"])) for r in records] == [
        (1, "checkpoint_0000001.pt"), (2, "checkpoint_0000002.pt")]
    assert len(drawn) == 2 and drawn[0] is not drawn[1]
    best = min(records, key=lambda r: r["fid"])
    assert f"best: {os.path.join(out, os.path.basename(best['checkpoint']))} (step {best['step']})" in \
        capsys.readouterr().out


def test_digits_are_scored_beside_held_out_and_gaussian_digits(tmp_path, monkeypatch, capsys):
    """--fid --baselines on a digits run: the digit classifier's features; three rows, the held-out floor nearer to no
    training digit than itself; class shares that add up; quality.png."""
    out = tmp_path / "digits"
    run_here_ok("--dataset", "digits", "--out-dir", out, "--steps", 2, "--channels", 8, "--n-sigmas", 4,
                "--n-steps-each", 1, "--sample-every", 0, "--device", "cpu")
    train = quality.train_digit_classifier
    monkeypatch.setattr(quality, "train_digit_classifier", lambda *a, **k: train(*a, **dict(k, steps=100)))
    monkeypatch.setattr(sample_py.signal, "signal", lambda *a: None)  # leave pytest's SIGTERM handler
    sample_py.main(["--out-dir", str(out), "-n", "40", "--fid", "--baselines", "--device", "cpu"])
    text = capsys.readouterr().out
    assert "in a digit classifier's features (" in text and "right on the held-out digits)" in text
    rows = {line[:16].strip(): line[16:].split() for line in text.splitlines()
            if line.startswith(("samples ", "held-out images ", "Gaussian fit "))}  # name: n, FID, KID, ...
    assert rows.keys() == {"samples", "held-out images", "Gaussian fit"}
    assert rows["held-out images"][4] == "0.0%"  # by definition: the nearest held-out digit sets the bound
    for row in rows.values():
        assert row[0] == "40" and 98 <= sum(map(int, row[-10:])) <= 102  # class shares in whole percent
    (record,) = scored(out)
    assert (record["features"], record["reference"], record["n"]) == ("digits-classifier", 1500, 40)
    assert (out / "quality.png").stat().st_size > 5000
