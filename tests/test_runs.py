"""runs.py and what a run survives: SIGTERM and Ctrl-C stop at a checkpoint and resume exactly, kill -9 resumes with
exact logs, one run per out-dir, an out-dir proven usable before any work, checkpoints that prove their integrity
(CRC-32, finite weights that fit their config), a crash's leftovers removed, and each fault said in one line."""
import errno
import json
import os
import queue
import signal
import subprocess
import sys
import threading

import pytest
import torch

import runs
from test_train import FAST, ROOT, assert_one_line_error, metrics, run, run_here, run_here_ok

COMMON = ["--dataset", "gmm", "--log-every", 10, "--sample-every", 25, "--ckpt-every", 0,
          *[a for a in FAST if a != "--log-every" and a != "10"]]


class Background:
    """A command in the background whose stdout and stderr are read by threads (so that no pipe fills up), with a
    timeout on every wait, killed at the end of the with-block whatever happened."""

    def __init__(self, *command):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        self.process = subprocess.Popen([sys.executable, *map(str, command)], cwd=ROOT, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines, self.out, self.err = queue.Queue(), [], []
        self.readers = [threading.Thread(target=self._read, args=(stream, kept, queue_), daemon=True)
                        for stream, kept, queue_ in ((self.process.stdout, self.out, self.lines),
                                                     (self.process.stderr, self.err, None))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, kept, lines):
        for line in stream:
            kept.append(line)
            if lines is not None:
                lines.put(line)
        if lines is not None:
            lines.put(None)

    def wait_for_line(self, prefix, timeout=120):
        """Block until stdout has a line starting with prefix; returns it."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line starting with {prefix!r} in {timeout} s") from None
            if line is None:
                raise AssertionError(f"the command ended before printing {prefix!r}: {''.join(self.err)}")
            if line.startswith(prefix):
                return line

    def finish(self, timeout=120):
        """Wait for the end; returns (status, stdout, stderr)."""
        status = self.process.wait(timeout=timeout)
        for reader in self.readers:
            reader.join(timeout)
        return status, "".join(self.out), "".join(self.err)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def train_in_background(*args):
    return Background("train.py", *args)


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
    with train_in_background("--out-dir", stopped, "--steps", 10 ** 6, *COMMON) as first:
        first.wait_for_line("step 10:")
        if signum == signal.SIGTERM:
            busy = run("--out-dir", stopped, "--steps", 10, *COMMON, check=False)
            assert_one_line_error(busy, "is in use by another run", f"PID {first.process.pid} on ")
        first.process.send_signal(signum)
        status, _, err = first.finish()
    assert status == 128 + signum, err
    lines = [line for line in err.splitlines() if line.startswith("stopped at step")]
    assert len(lines) == 1 and "run the same command to resume" in lines[0] and "Traceback" not in err, err
    step = torch.load(stopped / "checkpoint.pt", weights_only=True)["step"]
    assert lines[0].startswith(f"stopped at step {step} by {signal.Signals(signum).name}")
    if signum == signal.SIGINT:
        return  # what follows a stop does not depend on the signal that asked for it
    total = step + 37  # on, past a metrics line, a sample figure and the stop's unfinished interval
    resumed = run("--out-dir", stopped, "--steps", total, *COMMON)
    assert f"at step {step}" in resumed.stdout
    run("--out-dir", whole, "--steps", total, *COMMON)
    assert_same_run(stopped, whole)


def test_a_figure_that_a_signal_abandons_is_owed_by_the_checkpoint_and_drawn_on_resume(tmp_path, monkeypatch):
    """The race of the test above, made certain: SIGTERM arrives while the figure of step 25 is drawn. The run stops at
    step 25 with a checkpoint that owes the figure, and the resumed run draws it before going on, so that it is the
    run that was never stopped, quality line of step 25 included."""
    import train
    abandon = train.abandon_if_stopping

    def signal_midway(done, total):
        if done == 3:
            train.STOP["signal"] = signal.SIGTERM  # what on_signal records
        abandon(done, total)

    monkeypatch.setattr(train, "abandon_if_stopping", signal_midway)
    monkeypatch.setitem(train.STOP, "signal", 0)
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    result = run_here("--out-dir", stopped, "--steps", 40, *COMMON)
    assert result.returncode == 128 + signal.SIGTERM and "stopped at step 25 by SIGTERM" in result.stderr
    ckpt = torch.load(stopped / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 25 and ckpt["figure_owed"] and not any("mmd" in line for line in metrics(stopped))
    train.STOP["signal"] = 0
    monkeypatch.setattr(train, "abandon_if_stopping", abandon)
    run_here_ok("--out-dir", stopped, "--steps", 40, *COMMON)
    run_here_ok("--out-dir", whole, "--steps", 40, *COMMON)
    assert_same_run(stopped, whole)
    assert [line["step"] for line in metrics(whole) if "mmd" in line] == [25, 40]


def test_the_unlogged_losses_of_a_checkpoint_carry_over(tmp_path):
    """A run of 15 steps with metrics every 10 ends with the losses of steps 11-15 in its checkpoint; extended to 30,
    its line at step 20 covers steps 11-20, as in a run of 30 steps in one go (no sample figures here: the one at
    the end of the 15 steps would be a figure the run of 30 does not draw)."""
    common = [a for a in COMMON if a not in ("--sample-every", 25)] + ["--sample-every", 0]
    run("--out-dir", tmp_path / "extended", "--steps", 15, *common)
    interval = torch.load(tmp_path / "extended" / "checkpoint.pt", weights_only=True)["interval"]
    assert len(interval) == 1 and interval[0]["losses"].shape == (5,)
    run("--out-dir", tmp_path / "extended", "--steps", 30, *common)
    run("--out-dir", tmp_path / "whole", "--steps", 30, *common)
    assert_same_run(tmp_path / "extended", tmp_path / "whole")


def test_kill_9_resumes_from_the_last_checkpoint_with_exact_logs(tmp_path):
    """kill -9 after a checkpoint: metrics.jsonl is cut back to the checkpoint's step on resume, so that the lines
    written after it (and a line cut short) do not come twice, and the run ends as if never killed. Before any
    checkpoint, a kill leaves lines that the next run drops."""
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    # Checkpoints every 20 steps; no sample figures (the kill can come hundreds of steps in, and the signal test
    # above checks the figures' numbers).
    common = ["--dataset", "gmm", "--log-every", 10, "--sample-every", 0, "--ckpt-every", 20,
              *[a for a in FAST if a != "--log-every" and a != "10"]]
    with train_in_background("--out-dir", killed, "--steps", 10 ** 6, *common) as first:
        first.wait_for_line("step 30:")  # a metrics line after the checkpoint at step 20
        first.process.kill()
        first.finish()
    step = torch.load(killed / "checkpoint.pt", weights_only=True)["step"]
    with open(killed / "metrics.jsonl", "a") as f:  # lines beyond the checkpoint, whenever the kill came
        f.write(json.dumps({"step": step + 1, "loss": 0.5}) + "\n" + '{"step": 99999, "loss": 0.')
    total = step + 45
    run("--out-dir", killed, "--steps", total, *common)
    run("--out-dir", whole, "--steps", total, *common)
    assert_same_run(killed, whole)
    os.remove(killed / "checkpoint.pt")  # as if the kill had come before the first checkpoint
    fresh = run("--out-dir", killed, "--steps", 10, *common)
    assert "metrics.jsonl held the lines of an earlier run without a checkpoint" in fresh.stdout
    assert [line["step"] for line in metrics(killed)] == [10]


def test_out_dir_problems_are_found_before_any_work(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    assert_one_line_error(run_here("--out-dir", a_file, "--steps", 5, *FAST), "is a file")
    assert_one_line_error(run_here("--out-dir", a_file / "below", "--steps", 5, *FAST), "is a file")
    if os.path.isdir("/sys"):  # a folder even root cannot write in
        assert_one_line_error(run_here("--out-dir", "/sys/no-such-run", "--steps", 5, *FAST), "cannot be written")


def test_leftovers_of_a_crash_are_removed_and_a_stale_lock_is_taken_over(tmp_path):
    """A process that locked the out-dir and was killed mid-save leaves its lock (released by the kernel) and its
    temporary file: the next run takes the lock over and removes that file, and nothing else."""
    out = tmp_path / "run"
    crash = ("import os, sys, runs; lock = runs.prepare_out_dir(sys.argv[1]); "
             "open(runs._partial_name(os.path.join(sys.argv[1], 'checkpoint.pt')), 'wb').write(b'half a file'); "
             "print(runs._partial_name(os.path.join(sys.argv[1], 'checkpoint.pt')), flush=True); "
             "os.kill(os.getpid(), 9)")
    with Background("-c", crash, out) as crashed:
        leftover = crashed.wait_for_line("/").strip()
        status, _, _ = crashed.finish()
    assert status == -signal.SIGKILL and os.path.exists(leftover)
    assert f"PID {crashed.process.pid} on " in (out / "run.lock").read_text()
    for name in ("results.tmp2", ".samples.npz.partial-otherhost-1"):  # a user's file; another machine's
        (out / name).write_text("mine")
    run("--out-dir", out, "--steps", 5, "--sample-every", 0, *FAST)
    assert not os.path.exists(leftover)
    assert all((out / name).read_text() == "mine" for name in ("results.tmp2", ".samples.npz.partial-otherhost-1"))
    assert (out / "run.lock").read_text().startswith("PID ") and str(crashed.process.pid) not in (
        out / "run.lock").read_text()


def test_damaged_or_foreign_checkpoints_are_refused_in_one_line_and_left_alone(tmp_path):
    """Empty, truncated, one byte changed inside a tensor's data (the zip's CRC-32 catches it), non-finite weights,
    weights that do not fit their config: train.py and sample.py refuse each in one line, and the file stays as it
    was; so does train.py a readable file that is no checkpoint of its, and a checkpoint of another dataset."""
    out = tmp_path / "run"
    run_here_ok("--dataset", "gmm", "--out-dir", out, "--steps", 5, "--sample-every", 0, *FAST)
    good = (out / "checkpoint.pt").read_bytes()
    assert_one_line_error(run_here("--dataset", "swissroll", "--out-dir", out, "--steps", 5, *FAST),
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
    damages = {"empty": (b"", "corrupt"), "truncated": (good[:len(good) // 2], "corrupt"),
               "a byte changed": (bytes(flipped), "CRC-32"),
               "not finite": ((tmp_path / "nan.pt").read_bytes(), "not finite"),
               "misfit": ((tmp_path / "misfit.pt").read_bytes(), "do not fit the network its config describes")}
    for name, (damaged, fragment) in damages.items():  # runs.load_checkpoint, which both scripts call
        (tmp_path / "damaged.pt").write_bytes(damaged)
        with pytest.raises(runs.RunError, match=fragment) as error:
            runs.load_checkpoint(tmp_path / "damaged.pt", "cpu")
        assert "\n" not in str(error.value), name
    # The scripts turn that error into one line, and the file stays as it was.
    for script, (damaged, fragment) in (("train.py", damages["a byte changed"]), ("sample.py", damages["empty"])):
        (out / "checkpoint.pt").write_bytes(damaged)
        args = ("--out-dir", out, "--steps", 10, *FAST) if script == "train.py" else ("--out-dir", out, "--device",
                                                                                      "cpu")
        assert_one_line_error(run_here(*args, script=script), fragment)
        assert (out / "checkpoint.pt").read_bytes() == damaged
    torch.save({"model": {}}, out / "checkpoint.pt")  # readable, but not a checkpoint of train.py
    assert_one_line_error(run_here("--out-dir", out, "--steps", 10, *FAST), "not a checkpoint of train.py")


def test_what_a_run_refuses_or_says(tmp_path):
    """--steps below the checkpoint's step; a fresh run that diverges has no checkpoint to speak of; sample.py's
    sampler flags are applied and said, and samples that diverge are not written. (In this process: no interpreter
    start-up per run.)"""
    out = tmp_path / "run"
    run_here_ok("--dataset", "gmm", "--out-dir", out, "--steps", 20, "--sample-every", 0, *FAST)
    assert_one_line_error(run_here("--out-dir", out, "--steps", 10, *FAST), "--steps 10 is below", "20")
    fresh = run_here("--dataset", "gmm", "--out-dir", tmp_path / "fresh", "--steps", 30, "--lr", "1e30",
                     "--sample-every", 0, *FAST)
    assert_one_line_error(fresh, "loss is not finite", "no checkpoint was written")
    said = run_here_ok("--out-dir", out, "-n", 8, "--device", "cpu", "--n-steps-each", 2, "--step-size", 2e-5,
                       script="sample.py")
    assert "8 levels x 2 steps of 2e-05" in said.stdout
    assert "n_steps_each 4 -> 2; step_size 1e-05 -> 2e-05" in said.stdout
    os.remove(out / "samples.npz")
    diverged = run_here("--out-dir", out, "-n", 8, "--device", "cpu", "--step-size", 1e6, script="sample.py")
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


def test_sigterm_under_torchrun_stops_every_rank_after_the_same_step_and_resumes_exactly(tmp_path):
    """torchrun forwards SIGTERM to its workers; they agree on the step (an all-reduce per step), write one
    checkpoint with both ranks' streams and unlogged losses, and end with identical weights; torchrun itself then
    exits with status 1. Resumed under torchrun, the run equals one that was never stopped."""
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    with Background(*launch, "--out-dir", stopped, "--steps", 10 ** 6, *COMMON) as first:
        first.wait_for_line("step 10:")
        first.process.send_signal(signal.SIGTERM)
        status, out, err = first.finish()
    ckpt = torch.load(stopped / "checkpoint.pt", weights_only=True)
    assert status == 1 and len(ckpt["rng"]) == len(ckpt["interval"]) == 2
    assert f"stopped at step {ckpt['step']} by SIGTERM" in err and err.count("stopped at step") == 1, err
    assert "parameters and EMA agree on all 2 ranks" in out
    total = ckpt["step"] + 23
    for out_dir in (stopped, whole):
        with Background(*launch, "--out-dir", out_dir, "--steps", total, *COMMON) as rerun:
            status, _, err = rerun.finish(timeout=300)
        assert status == 0, err
    assert_same_run(stopped, whole)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary_one(tmp_path):
    """runs.save_atomic when the disk fills up in the middle of torch.save (which reports it as a RuntimeError): a
    one-line RunError, the old file as it was, nothing left beside it."""
    path = tmp_path / "checkpoint.pt"
    runs.save_atomic(lambda f: f.write(b"the good one"), path)

    class FullDisk:
        def __init__(self, f):
            self.f, self.room = f, 5000

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(data)
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    with pytest.raises(runs.RunError, match="could not write") as error:
        runs.save_atomic(lambda f: torch.save({"w": torch.randn(100_000)}, FullDisk(f)), path)
    assert "\n" not in str(error.value)
    assert path.read_bytes() == b"the good one" and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_errors_print_once_under_torchrun(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", "--out-dir", str(tmp_path / "ddp"), "--sigma-max", "0.001", *map(str, FAST)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("train.py: error")]
    assert ours == ["train.py: error: --sigma-max (0.001) must be larger than --sigma-min (0.01)"], result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU can have cuda:1")
def test_a_missing_device_is_named_as_asked_for():
    with pytest.raises(runs.RunError, match="--device cuda:1 was asked for but no CUDA GPU is visible"):
        runs.pick_device("cuda:1")


def test_the_loss_curve_plots_the_logged_losses_and_skips_the_rest(tmp_path, monkeypatch):
    """loss.png from metrics.jsonl: the training and held-out losses of the lines that have them, in step order;
    quality lines, a line cut short by a crash and a missing file are no trouble."""
    assert runs.save_loss_curve(tmp_path) is None  # nothing logged yet
    lines = [{"step": 10, "loss": 3.0, "heldout_loss": 4.0}, {"step": 15, "fid": 9.0, "n": 64},
             {"step": 20, "loss": 2.0}, {"step": 30, "loss": 1.5, "heldout_loss": 2.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 40, "lo')
    plotted = []
    plt = runs._pyplot()
    plot = plt.Axes.plot
    monkeypatch.setattr(plt.Axes, "plot", lambda self, x, y, **k: plotted.append((list(x), list(y))) or plot(
        self, x, y, **k))
    assert runs.save_loss_curve(tmp_path) == str(tmp_path / "loss.png")
    assert plotted == [([10, 20, 30], [3.0, 2.0, 1.5]), ([10, 30], [4.0, 2.5])]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
