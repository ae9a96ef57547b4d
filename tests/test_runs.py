"""runs.py and what a run survives: SIGTERM and Ctrl-C stop at a checkpoint and resume exactly, kill -9 resumes with
exact logs, one run per out-dir, an out-dir proven usable before any work, checkpoints that prove their integrity
(CRC-32, finite weights that fit their config), a crash's leftovers removed, and each fault said in one line."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import runs
from test_train import FAST, ROOT, assert_one_line_error, metrics, run, sample

COMMON = ["--dataset", "gmm", "--log-every", 10, "--sample-every", 25, "--ckpt-every", 0,
          *[a for a in FAST if a != "--log-every" and a != "10"]]


def start(*args):
    """train.py in the background, its stdout a pipe read line by line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "train.py", *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_line(process, prefix, timeout=120):
    """Read the process's stdout up to a line that starts with prefix; returns that line."""
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        if line.startswith(prefix):
            return line
        assert time.monotonic() < deadline, f"no line starting with {prefix!r} in {timeout} s"
    raise AssertionError(f"train.py ended before printing {prefix!r}: {process.stderr.read()}")


def without_timing(lines):
    return [{k: v for k, v in line.items() if k != "images_per_s"} for line in lines]


def assert_same_run(a, b):
    """Two out-dirs hold the same run: every tensor of the checkpoints and every number of metrics.jsonl (but the
    timing) agree exactly."""
    ckpt_a, ckpt_b = (torch.load(out / "checkpoint.pt", weights_only=True) for out in (a, b))
    assert ckpt_a["step"] == ckpt_b["step"] and ckpt_a["config"] == ckpt_b["config"]
    for key in ("model", "ema"):
        for name, tensor in ckpt_a[key].items():
            assert torch.equal(tensor, ckpt_b[key][name]), f"{key}.{name}"
    for p, q in zip(ckpt_a["optimizer"]["state"].values(), ckpt_b["optimizer"]["state"].values()):
        assert all(torch.equal(p[k], q[k]) for k in p)
    assert without_timing(metrics(a)) == without_timing(metrics(b))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_at_a_checkpoint_and_the_resumed_run_is_the_uninterrupted_one(tmp_path, signum):
    """SIGTERM (preemption) or Ctrl-C mid-run: the step is finished, a checkpoint written, one line says so, the exit
    status is 128 + the signal. Resumed to T steps, it equals a run of T steps that was never stopped: weights, EMA,
    optimiser, and every loss and quality line of metrics.jsonl. A second run on the busy out-dir is refused."""
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    process = start("--out-dir", stopped, "--steps", 10 ** 6, *COMMON)
    wait_for_line(process, "step 10:")
    if signum == signal.SIGTERM:
        busy = run("--out-dir", stopped, "--steps", 10, *COMMON, check=False)
        assert_one_line_error(busy, "is in use by another run", f"PID {process.pid} on ")
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    lines = [line for line in err.splitlines() if line.startswith("stopped at step")]
    assert len(lines) == 1 and "run the same command to resume" in lines[0] and "Traceback" not in err, err
    step = torch.load(stopped / "checkpoint.pt", weights_only=True)["step"]
    assert lines[0].startswith(f"stopped at step {step} by {signal.Signals(signum).name}")
    total = step + 37  # on, past a metrics line, a sample figure and the stop's unfinished interval
    resumed = run("--out-dir", stopped, "--steps", total, *COMMON)
    assert f"at step {step}" in resumed.stdout
    run("--out-dir", whole, "--steps", total, *COMMON)
    assert_same_run(stopped, whole)


def test_kill_9_resumes_from_the_last_checkpoint_with_exact_logs(tmp_path):
    """kill -9 after a checkpoint: metrics.jsonl is cut back to the checkpoint's step on resume, so that the lines
    written after it (and a line cut short) do not come twice, and the run ends as if never killed."""
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    common = [*COMMON[:COMMON.index("--ckpt-every")], "--ckpt-every", 20, *COMMON[COMMON.index("--ckpt-every") + 2:]]
    process = start("--out-dir", killed, "--steps", 10 ** 6, *common)
    wait_for_line(process, "step 30:")  # a metrics line after the checkpoint at step 20
    process.kill()
    process.communicate(timeout=60)
    step = torch.load(killed / "checkpoint.pt", weights_only=True)["step"]
    assert max(line["step"] for line in metrics(killed)) > step  # lines beyond the checkpoint, to be cut
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": 99999, "loss": 0.')  # a line the kill cut short
    total = step + 45
    run("--out-dir", killed, "--steps", total, *common)
    run("--out-dir", whole, "--steps", total, *common)
    assert_same_run(killed, whole)


def test_out_dir_problems_are_found_before_any_work(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    assert_one_line_error(run("--out-dir", a_file, "--steps", 5, *FAST, check=False), "is a file")
    assert_one_line_error(run("--out-dir", a_file / "below", "--steps", 5, *FAST, check=False), "is a file")
    if os.path.isdir("/sys"):  # a folder even root cannot write in
        assert_one_line_error(run("--out-dir", "/sys/no-such-run", "--steps", 5, *FAST, check=False),
                              "cannot be written")


def test_leftovers_of_a_crash_are_removed_and_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    leftovers = [out / "checkpoint.pt.tmp4242", out / "samples" / "step_0000010.png.tmp77"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    (out / "run.lock").write_text("PID 4242 on a machine that crashed\n")  # no process holds it any more
    (out / "notes.txt").write_text("mine")
    run("--out-dir", out, "--steps", 5, "--sample-every", 0, *FAST)
    assert not any(path.exists() for path in leftovers)
    assert (out / "notes.txt").read_text() == "mine"  # nothing else is touched
    assert (out / "run.lock").read_text().startswith("PID ")


def test_damaged_or_foreign_checkpoints_are_refused_in_one_line_and_left_alone(tmp_path):
    """Empty, truncated, one byte changed inside a tensor's data (the zip's CRC-32 catches it), non-finite weights,
    weights that do not fit their config: train.py and sample.py refuse each in one line, and the file stays as it
    was; so does train.py a readable file that is no checkpoint of its, and a checkpoint of another dataset."""
    out = tmp_path / "run"
    run("--dataset", "gmm", "--out-dir", out, "--steps", 5, "--sample-every", 0, *FAST)
    good = (out / "checkpoint.pt").read_bytes()
    assert_one_line_error(run("--dataset", "swissroll", "--out-dir", out, "--steps", 5, *FAST, check=False),
                          "different dataset")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    weight = ckpt["ema"]["net.0.weight"]
    start_of_data = good.find(weight.numpy().tobytes())
    assert start_of_data > 0
    flipped = bytearray(good)
    flipped[start_of_data + 5] ^= 0x40
    ckpt["ema"]["net.0.weight"][0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    ckpt["ema"]["net.0.weight"][0, 0] = 0.0
    ckpt["config"]["architecture"]["hidden"] = 64  # the weights are the preset's width, 128
    torch.save(ckpt, tmp_path / "misfit.pt")
    for damaged, fragment in ((b"", "corrupt"), (good[:len(good) // 2], "corrupt"), (bytes(flipped), "CRC-32"),
                              ((tmp_path / "nan.pt").read_bytes(), "not finite"),
                              ((tmp_path / "misfit.pt").read_bytes(), "do not fit the network its config describes")):
        (out / "checkpoint.pt").write_bytes(damaged)
        assert_one_line_error(run("--out-dir", out, "--steps", 10, *FAST, check=False), fragment)
        assert_one_line_error(sample("--out-dir", out, "-n", 4, "--device", "cpu", check=False), fragment)
        assert (out / "checkpoint.pt").read_bytes() == damaged
    torch.save({"model": {}}, out / "checkpoint.pt")  # readable, but not a checkpoint of train.py
    assert_one_line_error(run("--out-dir", out, "--steps", 10, *FAST, check=False), "not a checkpoint of train.py")


def test_what_a_run_refuses_or_says(tmp_path):
    """--steps below the checkpoint's step; a fresh run that diverges has no checkpoint to speak of; sample.py's
    sampler flags are applied and said, and samples that diverge are not written."""
    out = tmp_path / "run"
    run("--dataset", "gmm", "--out-dir", out, "--steps", 20, "--sample-every", 0, *FAST)
    assert_one_line_error(run("--out-dir", out, "--steps", 10, *FAST, check=False), "--steps 10 is below", "20")
    fresh = run("--dataset", "gmm", "--out-dir", tmp_path / "fresh", "--steps", 30, "--lr", "1e30",
                "--sample-every", 0, *FAST, check=False)
    assert_one_line_error(fresh, "loss is not finite", "no checkpoint was written")
    said = sample("--out-dir", out, "-n", 8, "--device", "cpu", "--n-steps-each", 2, "--step-size", 2e-5)
    assert "8 levels x 2 steps of 2e-05" in said.stdout and "n_steps_each 4 -> 2; step_size 1e-05 -> 2e-05" in said.stdout
    os.remove(out / "samples.npz")
    diverged = sample("--out-dir", out, "-n", 8, "--device", "cpu", "--step-size", 1e6, check=False)
    last = diverged.stderr.strip().splitlines()[-1]  # after the sampling's progress lines
    assert diverged.returncode == 1 and "Traceback" not in diverged.stderr
    assert last.startswith("sample.py: error: 8 of the 8 samples are not finite") and "nothing was written" in last
    assert not (out / "samples.npz").exists()


def test_cut_metrics_keeps_the_lines_up_to_the_step(tmp_path):
    """runs.cut_metrics on its own: lines after the step and unreadable lines go, the rest stays in order."""
    lines = [{"step": 10, "loss": 1.0}, {"step": 20, "mmd": 0.5}, {"step": 20, "loss": 0.9}, {"step": 30}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 40, "lo')
    runs.cut_metrics(tmp_path, 20)
    assert metrics(tmp_path) == lines[:3]


def test_every_unet_width_builds_and_runs():
    """--channels of any value: GroupNorm's group count divides every width (9 channels: one group of 9)."""
    import ncsn

    for channels in range(1, 40):
        model = ncsn.NCSN(1, channels=channels, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                          dropout=0.0, image_size=8)
        assert model(torch.rand(2, 1, 8, 8), 1.0).shape == (2, 1, 8, 8)


def test_sigterm_under_torchrun_stops_every_rank_after_the_same_step(tmp_path):
    """torchrun forwards SIGTERM to its workers; they agree on the step (an all-reduce per step), write one
    checkpoint with both ranks' streams, and still end with identical weights."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                "train.py", "--out-dir", str(out), "--steps", str(10 ** 6), *map(str, COMMON)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(process, "step 10:")
    process.send_signal(signal.SIGTERM)
    out_text, err = process.communicate(timeout=120)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(ckpt["rng"]) == len(ckpt["interval"]) == 2
    assert f"stopped at step {ckpt['step']} by SIGTERM" in err and err.count("stopped at step") == 1, err
    assert "parameters and EMA agree on all 2 ranks" in out_text


def test_a_failed_write_leaves_the_previous_file_and_no_temporary_one(tmp_path):
    """runs.save_atomic when the disk fills up mid-write: a one-line RunError, the old file as it was, nothing
    left beside it."""
    path = tmp_path / "checkpoint.pt"
    runs.save_atomic(lambda f: f.write(b"the good one"), path)

    def disk_full(f):
        f.write(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(runs.RunError, match="No space left on device"):
        runs.save_atomic(disk_full, path)
    assert path.read_bytes() == b"the good one" and os.listdir(tmp_path) == ["checkpoint.pt"]
