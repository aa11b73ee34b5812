"""`hessian-cli train` end to end: each optimizer, refusals, Ctrl-C and exact resume, analyze/show
reading what train writes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from cli_runner import PADDED_TEXTS, exit_code, one_sentence, run

from hessian_cli.engine.dense import dense_hessian
from hessian_cli.specs import analysis_batches, build_model, load_checkpoint, load_data
from hessian_cli.specs.losses import cross_entropy
from hessian_cli.storage import read_metrics

TINY = [
    "--model", "mlp", "--model-kwargs", '{"hidden": [8]}', "--data", "synthetic:16:3:96",
    "--batch-size", "16", "--eig-every", "4",
]  # fmt: skip
PLAIN = TINY[:-2]  # without --eig-every, which only Eigen-SAM reads
REPO = Path(__file__).resolve().parents[1]


def test_a_quoted_tilde_in_out_keeps_the_run_in_one_home_directory(capsys, monkeypatch, tmp_path):
    """--out '~/runs' (a tilde the shell left as it was) wrote config.json and metrics.h5 into
    a folder named '~' where train ran, and the checkpoints into $HOME/runs: a run split in two."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "train", *PLAIN, "--max-steps", "1", "--out", "~/runs", "-q")
    assert code == 0, err
    assert not (tmp_path / "~").exists()
    held = tmp_path / "home" / "runs"
    assert (held / "config.json").is_file() and (held / "metrics.h5").is_file()
    assert [p.name for p in (held / "checkpoints").iterdir()] == ["step0000001.pt"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A whole Eigen-SAM run with tracking, made through the CLI."""
    out = tmp_path_factory.mktemp("runs") / "e1"
    assert exit_code("train", *TINY, "--epochs", "2", "--track-every", "5", "--out", out) == 0
    return out


@pytest.mark.parametrize(
    "extra",
    [
        ["--optimizer", "sgd"],
        ["--optimizer", "sam", "--schedule", "constant"],
        ["--optimizer", "eigensam", "--base-optimizer", "adamw", "--lr", "0.01"],
    ],
    ids=["sgd", "sam", "eigensam-adamw"],
)
def test_each_optimizer_trains_a_few_steps(capsys, tmp_path, extra):
    out = tmp_path / "run"
    code, stdout, _ = run(
        capsys, "train", *PLAIN, *extra, "--epochs", "2", "--max-steps", "7", "--out", out
    )
    assert code == 0, stdout
    assert "stopped (--max-steps) at step 7 of 12" in " ".join(stdout.split())
    assert "Epochs" in stdout  # the epoch table
    assert (out / "checkpoints" / "step0000007.pt").is_file() and (out / "metrics.h5").is_file()
    assert json.loads((out / "config.json").read_text())["config"]["optimizer"] == extra[1]
    first = _root_attrs(out / "metrics.h5")
    assert (
        first["command_line"].startswith("hessian-cli train ")
        and "--max-steps 7" in first["command_line"]
    )
    code, stdout, _ = run(capsys, "train", "--resume", out, "--quiet")
    assert code == 0 and stdout == ""
    resumed = _root_attrs(out / "metrics.h5")  # the command that last wrote it, since when
    assert resumed["command_line"] == f"hessian-cli train --resume {out} --quiet"
    assert resumed["created"] == first["created"]
    assert (out / "checkpoints" / "final.pt").is_file()
    code, stdout, _ = run(capsys, "train", "--resume", out)
    assert code == 0 and "already finished" in stdout


def test_optimizers_are_taken_as_papers_write_them(capsys, tmp_path):
    """ "Eigen-SAM" was refused as an unknown optimizer: use eigensam, sam, sgd."""
    out = tmp_path / "run"
    args = ("--optimizer", "Eigen-SAM", "--base-optimizer", "AdamW", "--lr", "0.01")
    code, stdout, _ = run(capsys, "train", *TINY, *args, "--max-steps", "1", "--out", out)
    assert code == 0, stdout
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["optimizer"], config["base_optimizer"]) == ("eigensam", "adamw")


def test_every_option_of_fixed_words_takes_them_in_any_case(capsys, tmp_path):
    """--schedule Cosine, --loss CE and --device CPU were refused where --optimizer SGD was
    taken."""
    out = tmp_path / "run"
    args = ("--schedule", "Cosine", "--loss", "CE", "--device", "CPU", "--max-steps", "0")
    code, stdout, err = run(capsys, "train", *TINY, *args, "--out", out)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["schedule"], config["loss"]) == ("cosine", "ce")


def test_a_log_gets_a_line_per_epoch_with_that_epochs_own_lambda_max(capsys, tmp_path):
    """No live bar into a pipe (it printed nothing until the end, cut to 80 columns); an epoch
    with no lambda_max tracked in it shows none, not an earlier epoch's."""
    out = tmp_path / "run"
    args = ("train", *TINY, "--epochs", "3", "--track-every", "8", "--out", out)
    code, stdout, _ = run(capsys, *args)
    assert code == 0
    track = read_metrics(out / "metrics.h5")["track"]  # steps 0, 8, 16 and the final 18
    lam = dict(zip(track["step"].tolist(), track["lambda_max"].tolist(), strict=True))
    lines = [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 3 and lines[0].startswith("epoch 1/3, train loss ")
    assert "λmax" not in lines[0]  # 6 steps per epoch: none tracked in steps 1-6
    # The last epoch's line shows the final measurement, as the table does (it showed step 16).
    assert f"λmax {lam[8]:.4g} (" in lines[1] and f"λmax {lam[18]:.4g} (" in lines[2]
    table = {row.split()[1]: row.split()[-5] for row in stdout.splitlines() if row[:1] == "│"}
    assert table == {"1": "—", "2": f"{lam[8]:.4g}", "3": f"{lam[18]:.4g}"}
    # The time shown is the steps' alone, as recorded (it read as the epoch's, "seconds").
    seconds = read_metrics(out / "metrics.h5")["epochs"]["seconds"]
    assert [line[line.rindex("(") :] for line in lines] == [
        f"(step time {s:.1f} s)" for s in seconds
    ]
    assert "step time" in stdout and f"{seconds[-1]:.2f} s │" in stdout


def test_finished_run_reads_back_everywhere(capsys, finished_run):
    """analyze needs no flags on a train checkpoint; show reads metrics.h5."""
    final = finished_run / "checkpoints" / "final.pt"
    raw = torch.load(final, weights_only=True)
    assert raw["hessian_cli"]["step"] == 12 and raw["hessian_cli"]["optimizer"] == "eigensam"
    code, out, err = run(capsys, "analyze", final, "--top-k", "2", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["provenance"]["model"] == "mlp" and report["provenance"]["step"] == 12
    assert len(report["eigen"]["eigenvalues"]) == 2
    code, out, err = run(capsys, "analyze", finished_run, "--top-k", "1", "--json")
    assert code == 0, err  # the run directory: its checkpoints, in step order
    steps = [r["provenance"]["step"] for r in json.loads(out)]
    names = sorted(p.name for p in (finished_run / "checkpoints").iterdir())
    assert len(steps) == len(names) and steps == sorted(steps) and steps[-1] == 12
    code, out, err = run(capsys, "show", finished_run / "metrics.h5")
    assert code == 0 and "refreshes" in out and "λmax of the held-out batch" in out, err
    assert "last command: hessian-cli train" in out and "written by hessian-cli" in out


def _root_attrs(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def test_existing_run_is_refused_not_overwritten(capsys, tmp_path, finished_run):
    before = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    code, _, err = run(capsys, "train", *TINY, "--out", finished_run)
    # A finished run: --resume (which it advised) would have nothing to do.
    assert code == 2 and "already holds a finished training run" in one_sentence(err, strict=True)
    assert "--resume" not in err
    assert {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()} == before
    stopped = tmp_path / "stopped"
    shutil.copytree(finished_run, stopped)
    (stopped / "checkpoints" / "final.pt").unlink()
    code, _, err = run(capsys, "train", *TINY, "--out", stopped)
    assert code == 2 and f"continue with --resume {stopped}" in one_sentence(err, strict=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--resume", "{tmp}"], "is not a training run"),
        (["--resume", "{run}", "--lr", "0.5"], "--lr cannot be given"),
        (TINY[:2], "give --model, --data and --out"),
        (TINY, "--out is missing: give --model, --data and --out"),
        (TINY[:4], "--data and --out are missing: give"),
        ([*TINY, "--out", ""], "--out needs a name"),  # not ".", a directory not named
        ([*TINY, "--data-root", "{tmp}", "--out", "{tmp}/x"], "--data-root is read only for"),
        ([*TINY, "--download", "--out", "{tmp}/x"], "--download is read only for"),
        (["--resume", ""], "--resume needs a name"),
        ([*TINY, "--loss", "", "--out", "{tmp}/x"], "--loss needs a name"),  # not the default
        ([*TINY, "--data-root", "", "--out", "{tmp}/x"], "--data-root needs a name"),  # not cwd
        ([*TINY, "--model-kwargs", "{bad", "--out", "{tmp}/x"], "not valid JSON"),
        ([*TINY, "--model-kwargs", "", "--out", "{tmp}/x"], "--model-kwargs needs a JSON"),
        (  # config.json recorded it as given, which no strict JSON reader reads
            ["-m", "mlp", "-d", "digits", "--model-kwargs", '{"x": NaN}', "--out", "{tmp}/x"],
            "--model-kwargs is not valid JSON: NaN is no JSON number",
        ),
        ([*TINY, "--schedule", "step", "--out", "{tmp}/x"], "unknown schedule"),
        ([*TINY, "--device", "tpu", "--out", "{tmp}/x"], "unknown device"),
        (
            [*PLAIN, "--optimizer", "sgd", "--rho", "0.1", "--out", "{tmp}/x"],
            "--rho has no effect with --optimizer sgd",
        ),
        ([*TINY, "--optimizer", "sam", "--out", "{tmp}/x"], "--eig-every has no effect"),
        (
            [*PLAIN, "--optimizer", "sam", "--eig-hvps", "12", "--out", "{tmp}/x"],
            "--eig-hvps has no effect with --optimizer sam",
        ),
        ([*PLAIN, "--eig-hvps", "0", "--out", "{tmp}/x"], "--eig-hvps must be at least 1"),
        # 0 in float32, or below its smallest normal number: steps of 0, or of lost digits
        ([*PLAIN, "--lr", "1e-320", "--out", "{tmp}/x"], "--lr 1e-320 is too small for float32"),
        ([*TINY, "--rho", "1e-40", "--out", "{tmp}/x"], "--rho 1e-40 is too small for float32"),
        ([*TINY, "--alpha", "1e-45", "--out", "{tmp}/x"], "--alpha 1e-45 is too small"),
        ([*PLAIN, "--weight-decay", "1e-39", "--out", "{tmp}/x"], "--weight-decay 1e-39 is too"),
        ([*PLAIN, "--optimizer", "foo", "--rho", "0.1", "--out", "{tmp}/x"], "unknown optimizer"),
        (  # it quoted the name with its case and dashes taken out: 'foobar'
            [*PLAIN, "--optimizer", "Foo-Bar", "--out", "{tmp}/x"],
            "unknown optimizer 'Foo-Bar': use eigensam, sam, sgd.",
        ),
        (
            [*PLAIN, "--base-optimizer", "adamw", "--momentum", "0.5", "--out", "{tmp}/x"],
            "--momentum has no effect with --base-optimizer adamw",
        ),
    ],
)
def test_bad_input_is_one_sentence(capsys, tmp_path, finished_run, args, message):
    args = [a.replace("{tmp}", str(tmp_path)).replace("{run}", str(finished_run)) for a in args]
    code, _, err = run(capsys, "train", *args)
    assert code == 2 and message in one_sentence(err, strict=True)
    assert not (tmp_path / "x").exists()


def test_a_run_whose_loss_grew_without_becoming_nan_ends_as_diverged(capsys, tmp_path):
    """--lr 1000 took the loss from 1.1 to hundreds, and the run said "done:" with status 0."""
    out = tmp_path / "run"
    args = (*PLAIN, "--optimizer", "sgd", "--lr", "1000", "--out", out)
    code, stdout, err = run(capsys, "train", *args)
    said = one_sentence(err)
    assert code == 2 and "training diverged: its loss grew from" in said, err
    assert said.endswith("with a lower --lr.") and "done:" not in stdout
    assert (out / "checkpoints" / "final.pt").is_file()  # the run's files, as it said


def _signalled_after_the_first_epoch(args: list[str], out: Path, sig: int) -> tuple[int, str]:
    """Train in a real process and send it ``sig`` once the first epoch is written (``args``
    ask for far more epochs, so that it lands mid-run); the exit status and stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "hessian_cli", "train", *args, "--quiet", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics.h5").exists():  # written at the end of the first epoch
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


def test_ctrl_c_saves_a_checkpoint_and_resume_is_exact(capsys, tmp_path):
    """SIGINT to a real process: exit 130 with a checkpoint; resuming gives the same weights as
    a run that was never interrupted."""
    out = tmp_path / "stopped"
    args = [*TINY, "--epochs", "400", "--track-every", "7", "--checkpoint-every", "0"]
    code, err = _signalled_after_the_first_epoch(args, out, signal.SIGINT)
    assert code == 130, err
    assert "interrupted at step" in err and "--resume" in err and "Traceback" not in err
    saved = list((out / "checkpoints").glob("step*.pt"))
    assert len(saved) == 1
    step = load_checkpoint(saved[0]).metadata["step"]
    assert 6 <= step < 2400

    target = step + 9  # on into a different epoch, with refreshes and tracking on the way
    code, _, err = run(capsys, "train", "--resume", out, "--max-steps", target, "--quiet")
    assert code == 0, err
    whole = tmp_path / "whole"
    code, _, err = run(capsys, "train", *args, "--max-steps", target, "--quiet", "--out", whole)
    assert code == 0, err
    name = f"checkpoints/step{target:07d}.pt"
    a, b = load_checkpoint(out / name).state_dict, load_checkpoint(whole / name).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_stops_a_run_at_a_checkpoint_with_status_143(tmp_path):
    """SIGTERM (a scheduler's preemption, torchrun stopping a job) stops as Ctrl-C does: a
    checkpoint of the steps done, which --resume continues (it used to keep only the metrics,
    losing up to an epoch of steps)."""
    args = [*TINY, "--epochs", "400", "--checkpoint-every", "0"]
    run_dir = tmp_path / "run"
    code, err = _signalled_after_the_first_epoch(args, run_dir, signal.SIGTERM)
    assert code == 143, err
    last = err.strip().splitlines()[-1]  # after any note on the refreshes
    assert last.startswith("stopped by SIGTERM at step ") and f"--resume {run_dir}" in last
    (saved,) = (run_dir / "checkpoints").glob("step*.pt")
    step = load_checkpoint(saved).metadata["step"]
    assert 6 <= step < 2400
    assert len(read_metrics(run_dir / "metrics.h5")["steps"]["step"]) == step


def test_a_second_sigterm_says_what_was_kept(tmp_path):
    """A second SIGTERM stops at once, as a second Ctrl-C does, and says how to continue: the
    scheduler's kill after its grace period still leaves the user a --resume."""
    (tmp_path / "net.py").write_text(
        "import os, signal\nimport torch\n\n\n"
        "class Net(torch.nn.Linear):\n"
        "    calls = 0\n\n"
        "    def forward(self, x):\n"
        "        Net.calls += 1\n"
        "        if Net.calls == 40:  # the scheduler's SIGTERM, then its second\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "        return super().forward(x.flatten(1))\n\n\n"
        "def make():\n"
        "    return Net(64, 10)\n"
    )
    out = tmp_path / "run"
    args = ["--model", f"{tmp_path}/net.py:make", "--data", "digits", "--optimizer", "sgd"]
    proc = subprocess.run(
        [sys.executable, "-m", "hessian_cli", "train", *args, "--quiet", "--out", str(out)],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
        timeout=120,
    )
    words = " ".join(proc.stderr.split())
    assert proc.returncode == 143 and "Traceback" not in words, words
    assert words.startswith("stopped at once by SIGTERM: the metrics of the steps done are")
    assert re.search(
        f"the last checkpoint is {out}/checkpoints/step[0-9]{{7}}.pt \\(continue with --resume "
        f"{out}\\)",
        words,
    )


def _train_on_a_full_disk(args: list[str], *full: str) -> subprocess.CompletedProcess:
    """`train ARGS` with its standard output or error, or both (``full``), on a full disk:
    /dev/full, where every write fails (no space left); the other stream captured."""
    with open("/dev/full", "w") as full_disk:
        streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        streams.update(dict.fromkeys(full, full_disk))
        return subprocess.run(
            [sys.executable, "-m", "hessian_cli", "train", *args],
            **streams, text=True, timeout=300,
            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
        )  # fmt: skip


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_run_whose_standard_output_is_full_goes_on_and_says_so_at_the_end(tmp_path):
    """`train ... > train.log` on a full disk stopped at its first line, before any step, and
    left a run directory without a checkpoint; analyze writes its --out before saying it."""
    out = tmp_path / "run"
    done = _train_on_a_full_disk([*PLAIN, "--max-steps", "2", "--out", str(out)], "stdout")
    assert done.returncode == 2
    assert one_sentence(done.stderr, strict=True) == (
        "error: could not write to standard output: no space left on device; the run went on "
        f"without it, its checkpoints and metrics are in {out}."
    )
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step0000002.pt"]
    assert len(read_metrics(out / "metrics.h5")["steps"]["loss"]) == 2


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_resuming_a_finished_run_with_standard_output_full_says_nothing_ran(finished_run):
    """It said "the run went on without it", of a run that had already finished."""
    done = _train_on_a_full_disk(["--resume", str(finished_run)], "stdout")
    assert done.returncode == 2
    assert one_sentence(done.stderr, strict=True) == (
        "error: could not write to standard output: no space left on device; the run in "
        f"{finished_run} had already finished, nothing was run."
    )


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_run_whose_standard_error_is_full_ends_as_one_whose_standard_output_is(tmp_path):
    """`train ... 2> /dev/full` finished its run and then failed on its end-of-run note (11 of
    12 refreshes unconverged here): status 1, from an error it could not print; now the note
    is lost as stdout's lines are, and the status is stdout's, 2."""
    out = tmp_path / "run"
    args = [*PLAIN, "--eig-every", "1", "--epochs", "2", "--quiet", "--out", str(out)]
    done = _train_on_a_full_disk(args, "stderr")
    assert done.returncode == 2 and done.stdout == ""
    assert (out / "checkpoints" / "final.pt").is_file()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_run_whose_standard_output_and_error_are_full_ends_as_one_whose_output_is(tmp_path):
    """`train ... &> /dev/full` went on with its run, then failed to print why it failed
    (stdout full) on stderr: status 1, where either stream full alone gives 2."""
    out = tmp_path / "run"
    args = [*PLAIN, "--max-steps", "2", "--out", str(out)]
    done = _train_on_a_full_disk(args, "stdout", "stderr")
    assert done.returncode == 2
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step0000002.pt"]
    assert len(read_metrics(out / "metrics.h5")["steps"]["loss"]) == 2


@pytest.mark.parametrize("second", ["on_sigint", "on_sigterm"])
def test_copies_of_one_ctrl_c_under_torchrun_are_one_request(monkeypatch, second):
    """Under torchrun one Ctrl-C can reach a rank more than once (torchrun's SIGINT, then its
    SIGTERM; the terminal's SIGINT too): copies within the window are the first request (they
    stopped the run at once, without its checkpoint); a later signal still stops at once, and a
    single process keeps stopping at once on the second."""
    from hessian_cli.cli import train as train_cli
    from hessian_cli.errors import Terminated

    now = [100.0]
    monkeypatch.setattr(train_cli, "time", SimpleNamespace(monotonic=lambda: now[0]))
    at_once = KeyboardInterrupt if second == "on_sigint" else Terminated

    stop = train_cli._StopRequest(echo_window_s=train_cli.ECHO_WINDOW_S)
    stop.started = True
    stop.on_sigint(signal.SIGINT, None)
    now[0] += 0.05
    getattr(stop, second)(0, None)  # torchrun's copy
    getattr(stop, second)(0, None)
    assert stop() and stop.exit_status == 130  # the Ctrl-C's, not the copy's SIGTERM
    now[0] += train_cli.ECHO_WINDOW_S
    with pytest.raises(at_once):  # the user's second Ctrl-C, or a scheduler's second SIGTERM
        getattr(stop, second)(0, None)

    alone = train_cli._StopRequest()
    alone.started = True
    alone.on_sigint(signal.SIGINT, None)
    with pytest.raises(at_once):
        getattr(alone, second)(0, None)

    # Before the loop the first signal stops at once; its copies raised again while that stop
    # was under way (a SIGTERM copy turned the Ctrl-C into a silent 143).
    early = train_cli._StopRequest(echo_window_s=train_cli.ECHO_WINDOW_S)
    with pytest.raises(KeyboardInterrupt):
        early.on_sigint(signal.SIGINT, None)
    now[0] += 0.05
    getattr(early, second)(0, None)  # torchrun's copy: nothing
    now[0] += train_cli.ECHO_WINDOW_S
    with pytest.raises(at_once):
        getattr(early, second)(0, None)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_the_data_loads_stops_at_once_and_writes_nothing(tmp_path, sig, status):
    """Before the loop there are no steps to keep: a scheduler's grace period is not spent
    waiting for a download or a long load (it then wrote a run with a step-0 checkpoint), and
    Ctrl-C, which waited for the whole load and said to resume the run, stops at once too."""
    (tmp_path / "slow.py").write_text(
        "import time\nimport torch\n\n\ndef make():\n"
        "    print('loading', flush=True)\n"
        "    time.sleep(20)\n"
        "    return torch.randn(32, 4), torch.randint(0, 2, (32,))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = tmp_path / "run"
    args = ["--model", "mlp", "--data", f"{tmp_path}/slow.py:make", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hessian_cli", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "loading"
    start = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert time.monotonic() - start < 10
    assert not out.exists()
    if sig == signal.SIGINT:
        assert "Traceback" not in err and "nothing was written" in err and "second" not in err


def test_download_reaches_the_data_loader_and_is_a_run_time_option(capsys, tmp_path, monkeypatch):
    import eigensam.training
    from hessian_cli.errors import UserError

    seen = {}

    def load_data(spec, *, root=None, download=False):
        seen.update(spec=spec, root=root, download=download)
        raise UserError("stopped by the test.")

    monkeypatch.setattr(eigensam.training, "load_data", load_data)
    args = ("train", "--model", "mlp", "--data", "cifar10", "--data-root", tmp_path / "d")
    code, _, err = run(capsys, *args, "--out", tmp_path / "r", "--download")
    assert code == 2 and "stopped by the test" in err
    assert seen == {"spec": "cifar10", "root": str(tmp_path / "d"), "download": True}
    assert "download" not in eigensam.config.TrainConfig(model="m", data="d").identity()


def test_data_holding_nan_is_refused_before_the_run_starts(capsys, tmp_path):
    import numpy as np

    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    x[5, 2] = np.nan
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=np.arange(32) % 3)
    code, _, err = run(capsys, "train", "--model", "mlp", "--data", path, "--out", tmp_path / "x")
    assert code == 2 and "inputs hold NaN or infinite values" in one_sentence(err, strict=True)
    assert not (tmp_path / "x").exists()


def test_a_run_analyses_and_resumes_after_its_model_s_defaults_change(
    capsys, tmp_path, monkeypatch
):
    """A run without --model-kwargs recorded {}, so once mlp's default hidden changed (it was
    [64, 128, 128]) its checkpoints no longer loaded: 2 unexpected keys, 5 mismatches."""
    from hessian_cli.specs import models

    out = tmp_path / "run"
    args = ("--model", "mlp", "--data", "synthetic:16:3:96", "--batch-size", "16")
    code, _, err = run(
        capsys, "train", *args, "--optimizer", "sgd", "--max-steps", "3", "--out", out
    )
    assert code == 0, err
    ckpt = out / "checkpoints" / "step0000003.pt"
    code, before, err = run(capsys, "analyze", ckpt, "--top-k", "2", "--json")
    assert code == 0, err
    monkeypatch.setitem(
        models.BUILTIN_DEFAULTS, "mlp", {"hidden": [64, 128, 128], "activation": "relu"}
    )
    code, after, err = run(capsys, "analyze", ckpt, "--top-k", "2", "--json")
    assert code == 0, err
    assert json.loads(after)["eigen"]["eigenvalues"] == json.loads(before)["eigen"]["eigenvalues"]
    code, _, err = run(capsys, "train", "--resume", out, "--max-steps", "4", "--quiet")
    assert code == 0, err
    assert (out / "checkpoints" / "step0000004.pt").is_file()


def test_resume_refuses_a_configuration_edited_since_the_checkpoint(capsys, tmp_path, finished_run):
    """config.json can be edited by hand; the checkpoint records how its run was configured."""
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(finished_run, edited)
    config = json.loads((edited / "config.json").read_text())
    config["config"]["lr"] = 0.5
    (edited / "config.json").write_text(json.dumps(config))
    before = {p: p.read_bytes() for p in edited.rglob("*") if p.is_file()}
    code, _, err = run(capsys, "train", "--resume", edited, "--max-steps", "1000")
    assert code == 2
    assert "--lr differs from the configuration" in one_sentence(err, strict=True)
    assert {p: p.read_bytes() for p in edited.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"version": 99}, "is of version 99, newer than this hessian-cli reads (1)"),
        # A newer version's fields were read first: "damaged or not ours".
        (
            {"version": 2, "config": {"label_smoothing": 0.1}},
            "is of version 2, newer than this hessian-cli reads (1)",
        ),
        ({"config": {"epochs": "four"}}, "holds a bad value: --epochs must be"),
    ],
)
def test_resume_names_a_configuration_it_cannot_use(capsys, tmp_path, finished_run, edit, message):
    """A newer config.json used to be read as if it were ours; a bad value in it was named as an
    option the user had not given."""
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(finished_run, edited)
    saved = json.loads((edited / "config.json").read_text())
    saved["config"].update(edit.pop("config", {}))
    (edited / "config.json").write_text(json.dumps(saved | edit))
    code, _, err = run(capsys, "train", "--resume", edited)
    assert code == 2 and message in one_sentence(err, strict=True)


@pytest.mark.parametrize("inside", ["checkpoints/final.pt", "checkpoints", "config.json"])
def test_a_resume_of_a_path_inside_a_run_names_the_run(capsys, finished_run, inside):
    """A checkpoint given to resume from was only "not a directory, so not a training run"."""
    code, _, err = run(capsys, "train", "--resume", finished_run / inside)
    assert code == 2
    assert f"lies in the training run '{finished_run}'" in one_sentence(err, strict=True)


def test_an_out_directory_under_a_file_is_one_sentence(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "train", *TINY, "--out", tmp_path / "notes.txt" / "run")
    said = f"lies under {tmp_path / 'notes.txt'}, which is not a directory."
    assert code == 2 and said in one_sentence(err, strict=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_run_that_stopped_before_its_first_checkpoint_is_named_as_such(capsys, tmp_path):
    out = tmp_path / "failed"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.json").write_text("{}")  # what a run that failed at its first step leaves
    code, _, err = run(capsys, "train", *TINY, "--out", out)
    said = one_sentence(err, strict=True)
    assert code == 2 and "stopped before its first checkpoint" in said
    # It can be started again as it was (the Ctrl-C before the first step says so too).
    assert f"start it again with --resume {out} (its own options, from step 0)" in said


def test_a_resume_that_finds_no_checkpoint_says_it_starts_again(capsys, tmp_path, finished_run):
    """It began as a new run would, under a plain "Training:" header."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    for ckpt in (run_dir / "checkpoints").iterdir():
        ckpt.unlink()
    code, out, err = run(capsys, "train", "--resume", run_dir, "--max-steps", "2")
    assert code == 0, err
    assert "Starting again at step 0 (the run holds no checkpoint to resume)" in " ".join(
        out.split()
    )


def test_a_second_ctrl_c_says_what_was_kept(capsys, tmp_path, monkeypatch, finished_run):
    """The second Ctrl-C interrupts at once (KeyboardInterrupt): one line, status 130; before
    the loop started it said "the metrics of the steps done are written", with nothing written."""
    import eigensam.training
    from eigensam.events import RunStarted

    def interrupted(*args, progress, started: bool = True, **kwargs):
        if started:
            progress(RunStarted(tmp_path, 0, 10, 5, 2, "cpu", 100, None, 40, 8, "2 classes"))
        raise KeyboardInterrupt

    monkeypatch.setattr(eigensam.training, "train", interrupted)
    code, _, err = run(capsys, "train", *TINY, "--out", tmp_path / "new", "-q")
    assert code == 130 and "Traceback" not in err
    assert "stopped at once by a second Ctrl-C" in err and "no checkpoint was written" in err
    code, _, err = run(capsys, "train", "--resume", finished_run, "-q")
    words = " ".join(err.split())
    assert code == 130 and f"final.pt (continue with --resume {finished_run})" in words
    monkeypatch.setattr(
        eigensam.training, "train", lambda *a, **k: interrupted(*a, started=False, **k)
    )
    code, _, err = run(capsys, "train", *TINY, "--out", tmp_path / "setup", "-q")
    assert code == 130 and "stopped at once by Ctrl-C before training began: nothing was" in err


def test_a_ctrl_c_after_the_run_directory_is_claimed_names_what_it_holds(
    capsys, tmp_path, monkeypatch
):
    """Between config.json's write and the loop's start a Ctrl-C said "nothing was written",
    and the same --out was then refused as a run that stopped before its first checkpoint."""
    import eigensam.training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(eigensam.training._Run, "train", interrupted)
        code, _, err = run(capsys, "train", *TINY, "--out", tmp_path / "run", "-q")
    words = " ".join(err.split())
    assert code == 130 and f"only {tmp_path / 'run' / 'config.json'} was written" in words
    code, out, err = run(capsys, "train", "--resume", tmp_path / "run", "--max-steps", "1")
    assert code == 0 and "Starting again at step 0" in " ".join(out.split()), err


def test_data_float32_cannot_hold_is_refused_before_the_run(capsys, tmp_path):
    """float64 inputs of 1e300 became inf in each step's float32 batch: the run "diverged"."""
    import numpy as np

    data = tmp_path / "big.npz"
    np.savez(data, x=np.full((32, 4), 1e300), y=np.arange(32) % 2)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", "mlp", "--data", data, "--out", out)
    message = one_sentence(err, strict=True)
    # The engine names its parameter (`dtype=float64`); the command line shows the flag.
    assert (
        code == 2
        and "beyond float32's range" in message
        and "(an analysis can also run in float64: --dtype float64)" in message
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("optimizer", "extra", "refused"),
    [("eigensam", [], True), ("sgd", ["--track-every", "5"], True), ("sgd", [], False)],
)
def test_a_model_without_a_sound_hessian_is_refused_where_the_engine_trains_or_tracks(
    capsys, tmp_path, optimizer, extra, refused
):
    """Eigen-SAM's refresh and the tracker met it at their first operator, each rank on its own;
    a run that uses neither trains it (its randomness is training's business)."""
    (tmp_path / "drop.py").write_text(
        "import torch\nimport torch.nn.functional as F\n\n\n"
        "class Net(torch.nn.Linear):\n"
        "    def forward(self, x):\n"
        "        return super().forward(F.dropout(x.flatten(1), 0.1))  # training=True\n\n\n"
        "def make():\n"
        "    return Net(64, 10)\n"
    )
    out = tmp_path / "run"
    args = ["--model", f"{tmp_path}/drop.py:make", "--data", "digits", "--optimizer", optimizer]
    code, _, err = run(capsys, "train", *args, *extra, "--max-steps", "2", "-q", "--out", out)
    if refused:
        assert code == 2 and "draws random numbers in eval mode" in one_sentence(err), err
        assert not out.exists()  # refused before anything was written
    else:
        assert code == 0, err


@pytest.mark.parametrize(
    ("extra", "refused"),
    [
        ([], "embedding '0' has sparse=True, whose sparse gradients SGD cannot apply"),
        (
            ["--base-optimizer", "adamw", "--weight-decay", "0"],
            "whose sparse gradients AdamW cannot take",
        ),
        (["--weight-decay", "0"], None),
    ],
)
def test_a_sparse_embedding_is_refused_where_the_base_step_cannot_take_it(
    capsys, tmp_path, extra, refused
):
    """nn.Embedding(sparse=True) gives sparse gradients, which torch's SGD refuses to decay and
    AdamW refuses whole: the run stopped at its first step with "unexpected RuntimeError:
    add(sparse, dense) is not supported", its run directory left behind."""
    (tmp_path / "bag.py").write_text(
        "import torch\n\n\n"
        "def make():\n"
        "    return torch.nn.Sequential(\n"
        "        torch.nn.Embedding(6, 3, sparse=True), torch.nn.Flatten(), torch.nn.Linear(12, 2)\n"
        "    )\n\n\n"
        "def data():\n"
        "    return torch.randint(0, 6, (32, 4)), torch.randint(0, 2, (32,))\n"
    )
    out = tmp_path / "run"
    args = ["--model", f"{tmp_path}/bag.py:make", "--data", f"{tmp_path}/bag.py:data"]
    code, _, err = run(capsys, "train", *args, *extra, "--max-steps", "2", "-q", "--out", out)
    if refused:
        assert code == 2 and refused in one_sentence(err, strict=True), err
        assert not out.exists()
    else:
        assert code == 0, err


def test_an_embedding_with_max_norm_is_refused_where_hessians_are_taken(capsys, tmp_path):
    """nn.Embedding(max_norm=...) rescales its weights in place at every forward: Eigen-SAM's
    refresh took products of other weights than the model's. Plain SGD trains it."""
    (tmp_path / "capped.py").write_text(
        "import torch\n\n\n"
        "def make():\n"
        "    return torch.nn.Sequential(\n"
        "        torch.nn.Embedding(6, 3, max_norm=1.0), torch.nn.Flatten(), torch.nn.Linear(12, 2)\n"
        "    )\n\n\n"
        "def data():\n"
        "    return torch.randint(0, 6, (32, 4)), torch.randint(0, 2, (32,))\n"
    )
    args = ["--model", f"{tmp_path}/capped.py:make", "--data", f"{tmp_path}/capped.py:data"]
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", *args, "--max-steps", "2", "-q", "--out", out)
    assert code == 2 and "embedding '0' has max_norm set" in one_sentence(err, strict=True), err
    assert not out.exists()
    code, _, err = run(capsys, "train", *args, "--optimizer", "sgd", "--max-steps", "2", "-q",
                       "--out", out)  # fmt: skip
    assert code == 0, err


def test_the_first_line_says_what_the_data_asks_and_a_batch_past_the_data(capsys, tmp_path):
    """Class labels stored as floats trained a one-output regression without a word; a batch
    larger than the data was all of it, unsaid ("1 steps")."""
    x, y = torch.randn(24, 3), torch.tensor([0.0, 1.0, 2.0] * 8)
    floats = tmp_path / "floats.npz"
    np.savez(floats, x=x.numpy(), y=y.numpy())
    code, stdout, _ = run(
        capsys, "train", "--model", "mlp", "--data", floats, "--batch-size", "64",
        "--epochs", "1", "--optimizer", "sgd", "--out", tmp_path / "run",
    )  # fmt: skip
    text = " ".join(stdout.split())
    # As analyze says it where a classifier's checkpoint does not fit the model made so
    said = (
        f"on {floats} (the data's targets are real numbers, read as 1 regression output: class "
        "labels must be stored as integers) with sgd"
    )
    assert code == 0 and said in text
    assert "1 step (1 epoch of 1; a batch of 64 is all 24 samples)" in text
    assert "done: 1 step;" in text
    y = torch.tensor([0.5, 1.0, 2.0] * 8)  # real targets: regression, as asked
    np.savez(floats, x=x.numpy(), y=y.numpy())
    code, stdout, _ = run(
        capsys, "train", "--model", "mlp", "--data", floats, "--epochs", "1", "--optimizer",
        "sgd", "--out", tmp_path / "run2",
    )  # fmt: skip
    assert code == 0 and f"on {floats} (regression, 1 target) with sgd" in " ".join(stdout.split())
    # Whole numbers regressed onto by a named loss (counts, say) are what the user asked for.
    y = torch.tensor([0.0, 1.0, 2.0] * 8)
    np.savez(floats, x=x.numpy(), y=y.numpy())
    code, stdout, _ = run(
        capsys, "train", "--model", "mlp", "--data", floats, "--epochs", "1", "--optimizer",
        "sgd", "--loss", "mse", "--out", tmp_path / "run3",
    )  # fmt: skip
    assert code == 0 and f"on {floats} (regression, 1 target) with sgd" in " ".join(stdout.split())


def test_labels_of_one_class_are_said_as_one_class(capsys, tmp_path):
    """The run's first line said "(1 classes)"."""
    code, stdout, _ = run(
        capsys, "train", "--model", "mlp", "--data", "synthetic:4:1:16", "--loss", "mse",
        "--epochs", "1", "--optimizer", "sgd", "--out", tmp_path / "run",
    )  # fmt: skip
    assert code == 0 and "on synthetic:4:1:16 (1 class) with sgd" in " ".join(stdout.split())


def test_a_run_directory_named_with_brackets_is_said_as_named(capsys, tmp_path):
    """Its brackets were read as Rich markup: 'run[bold]1' was said to be 'run1' (a --resume
    that names no run), and a '[/x]' stopped the run with 'unexpected MarkupError' (status 1)."""
    out = tmp_path / "run[bold]1[/x]"
    code, stdout, err = run(capsys, "train", *TINY, "--max-steps", "1", "--out", out)
    text = " ".join(stdout.split())
    assert code == 0, err
    assert f"run directory {out}" in text and f"(continue with --resume {out})" in text
    code, stdout, err = run(capsys, "train", "--resume", out)
    assert code == 0 and f"metrics {out / 'metrics.h5'}." in " ".join(stdout.split()), err


def test_the_stop_counts_steps_as_the_start_does(capsys, tmp_path):
    """The start said '1,200 steps' and the stop 'at step 1 of 1200'."""
    args = [*PLAIN, "--optimizer", "sgd", "--epochs", "200", "--max-steps", "1"]
    code, stdout, err = run(capsys, "train", *args, "--out", tmp_path / "run")
    text = " ".join(stdout.split())
    assert code == 0 and "1,200 steps" in text and "at step 1 of 1,200:" in text, err


def test_the_start_says_a_last_batch_of_one_is_left_out(capsys, tmp_path):
    """97 samples at --batch-size 16 train on 96 an epoch, also for a model without BatchNorm:
    the start said only "6 steps (1 epoch of 6)"."""
    args = ["--model", "mlp", "--model-kwargs", '{"hidden": [8]}', "--epochs", "1"]
    code, stdout, _ = run(
        capsys, "train", *args, "--data", "synthetic:16:3:97", "--batch-size", "16",
        "--optimizer", "sgd", "--out", tmp_path / "odd",
    )  # fmt: skip
    text = " ".join(stdout.split())
    assert code == 0 and "6 steps (1 epoch of 6)" in text
    assert (
        "note: each epoch leaves out 1 of its 97 samples (the last of its shuffled order)" in text
    )
    code, stdout, _ = run(
        capsys, "train", *args, "--data", "synthetic:16:3:98", "--batch-size", "16",
        "--optimizer", "sgd", "--out", tmp_path / "even",
    )  # fmt: skip
    assert code == 0 and "7 steps (1 epoch of 7)" in stdout and "leaves out" not in stdout


def test_refreshes_that_found_no_positive_curvature_are_reported(capsys, tmp_path):
    """EigenSAM counted them (negative_refreshes) but train said nothing: a concave loss of a
    linear model, whose minibatch Hessians are negative definite."""
    (tmp_path / "concave.py").write_text("def loss(out, y):\n    return -(out**2).mean() * 1e-3\n")
    code, stdout, err = run(
        capsys, "train", "--model", "mlp", "--model-kwargs", '{"hidden": []}',
        "--data", "synthetic:4:2:64", "--loss", f"{tmp_path}/concave.py:loss",
        "--batch-size", "32", "--eig-every", "1", "--epochs", "1", "--out", tmp_path / "run",
    )  # fmt: skip
    assert code == 0, stdout + err
    assert "warning: 2 of 2 Eigen-SAM refreshes found no positive curvature" in " ".join(
        err.split()
    )
    assert (read_metrics(tmp_path / "run" / "metrics.h5")["refresh"]["eigenvalue"] < 0).all()


def test_refreshes_short_of_their_tolerance_are_said_at_the_end(capsys, tmp_path):
    """A refresh that stops at its HVP budget above its tolerance was shown only by show and
    plot (2 of this run's 3, residuals up to 0.066): the end of the run says how many."""
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", *TINY, "--epochs", "2", "-q", "--out", out)
    residual = read_metrics(out / "metrics.h5")["refresh"]["residual"]
    short = int((residual > 1e-2).sum())
    assert code == 0 and len(residual) / 2 < short < len(residual), err
    assert (
        f"note: {short} of {len(residual)} Eigen-SAM refreshes ended above the tolerance 1e-02 "
        f"(median residual {np.median(residual):.1e}: the HVP budget spent, or the residual "
        f"stopped improving); {'its vector was' if short == 1 else 'their vectors were'} used"
        in " ".join(err.split())
    )


def test_a_refresh_or_two_short_of_their_tolerance_are_not_said_at_the_end(capsys, tmp_path):
    """Most refreshes within it: "1 of 7 Eigen-SAM refreshes ended above the tolerance" ended
    nearly every run (the README's too), a note of no consequence (the metrics hold them)."""
    out = tmp_path / "run"
    args = ("--eig-every", "1", "--eig-hvps", "12", "--epochs", "1")
    code, _, err = run(capsys, "train", *TINY[:-2], *args, "-q", "--out", out)
    residual = read_metrics(out / "metrics.h5")["refresh"]["residual"]
    assert code == 0 and 0 < (residual > 1e-2).sum() < len(residual) / 2, err
    assert "ended above the tolerance" not in " ".join(err.split())


def test_a_top_eigenvalue_of_0_is_not_said_to_have_stopped_at_the_hvp_budget(capsys, tmp_path):
    """Its residual is infinite (none relative to 0), which show counts apart: train's end said
    "2 of 2 Eigen-SAM refreshes stopped at the HVP budget" and "3 of 3 lambda_max measurements"
    of a linear loss of a linear model, whose Hessian is 0 and whose solves stopped at 2 HVPs."""
    (tmp_path / "linear.py").write_text("def loss(out, y):\n    return out.mean() * 1e-3\n")
    out = tmp_path / "run"
    code, _, err = run(
        capsys, "train", "--model", "mlp", "--model-kwargs", '{"hidden": []}',
        "--data", "synthetic:4:2:64", "--loss", f"{tmp_path}/linear.py:loss",
        "--batch-size", "32", "--eig-every", "1", "--epochs", "1", "--track-every", "1",
        "-q", "--out", out,
    )  # fmt: skip
    metrics = read_metrics(out / "metrics.h5")
    assert code == 0, err
    assert np.isinf(metrics["refresh"]["residual"]).all()
    assert np.isinf(metrics["track"]["residual"]).all()
    said = " ".join(err.split())
    assert "warning: 2 of 2 Eigen-SAM refreshes found no positive curvature" in said
    assert "HVP budget" not in said and "ended above the tolerance" not in said


def test_steps_whose_minibatch_held_no_label_are_said_at_the_end(capsys, tmp_path):
    """Such a step makes no update (its loss NaN in the metrics), which the run stopped at
    before; the end of the run says how many there were."""
    (tmp_path / "tokens.py").write_text(PADDED_TEXTS)
    out = tmp_path / "run"
    code, _, err = run(
        capsys, "train", "--model", f"{tmp_path}/tokens.py:make", "--data",
        f"{tmp_path}/tokens.py:data", "--batch-size", "2", "--epochs", "1", "-q", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert np.isnan(read_metrics(out / "metrics.h5")["steps"]["loss"]).sum() == 2
    said = "note: 2 minibatches held no label but -100 (padding): no update was made on them."
    assert said in " ".join(err.split())


def test_the_epoch_table_folds_numbers_on_a_narrow_terminal():
    """At 40 columns its numbers were cut ("0.2641…"), each then read as another."""
    from rich.console import Console

    from eigensam.events import EpochDone
    from hessian_cli.presentation.training import epoch_table

    epochs = [EpochDone(e, 0.264174 / e, 0.912, 0.301234, 0.897, 12.5, 21.0625) for e in (1, 2)]
    terminal = Console(width=40, force_terminal=True, record=True)
    terminal.print(epoch_table(epochs), crop=False)
    text = terminal.export_text()
    assert "Epochs" in text and "…" not in text, text


def test_the_first_line_counts_steps_with_thousands_separators_as_the_stop_line_does():
    """A resume began "Resuming at step 12345: ... 23,460 steps (30 epochs of 1564)" where the
    stop before it said "at step 12,345 of 23,460"."""
    from io import StringIO

    from rich.console import Console

    from eigensam.config import TrainConfig
    from eigensam.events import RunStarted
    from hessian_cli.presentation.training import TrainingDisplay

    terminal = Console(file=StringIO(), width=300, record=True)
    display = TrainingDisplay(
        terminal, TrainConfig(model="mlp", data="digits"), False, resuming=True
    )
    at = Path("run/checkpoints/step0012345.pt")
    display(RunStarted(Path("run"), 12_345, 46_920, 1_564, 30, "cpu", 26_122, at, 100_000, 64, "c"))
    line = terminal.export_text()
    assert "Resuming at step 12,345:" in line and "46,920 steps (30 epochs of 1,564)" in line, line


@pytest.mark.parametrize("max_steps", [None, 100, 30_000])
def test_the_progress_bar_runs_to_where_the_call_stops(max_steps):
    """It ran to the run's end: "100/23460" and hours remaining of a --max-steps 100 that
    stopped in a minute."""
    from io import StringIO

    from rich.console import Console

    from eigensam.config import TrainConfig
    from eigensam.events import RunStarted
    from hessian_cli.presentation.training import TrainingDisplay

    config = TrainConfig(model="mlp", data="digits", max_steps=max_steps)
    terminal = Console(file=StringIO(), width=100, force_terminal=True)
    display = TrainingDisplay(terminal, config, False, resuming=False)
    display(RunStarted(Path("run"), 0, 23_460, 782, 30, "cpu", 26_122, None, 50_000, 64, "c"))
    display.progress.stop()
    assert display.progress.tasks[0].total == (100 if max_steps == 100 else 23_460)


@pytest.mark.parametrize("width", [80, 120])
def test_the_progress_bar_keeps_its_step_count_and_times_and_shortens_for_its_figures(width):
    """Every column gave way alike: once the test accuracy joined the figures the bar read
    "epoch 2/2 ━━━╺ 34/… 0:0… 0:0… loss 0.5424 ..." on 80 columns. The bar shortens first
    (the figures whole on 120 columns), the figures are cut last."""
    from io import StringIO

    from rich.console import Console

    from eigensam.config import TrainConfig
    from eigensam.events import EpochDone, RunStarted, StepDone
    from hessian_cli.presentation.training import TrainingDisplay

    terminal = Console(file=StringIO(), width=width, force_terminal=True)
    display = TrainingDisplay(
        terminal, TrainConfig(model="mlp", data="digits"), False, resuming=False
    )
    display(
        RunStarted(Path("run"), 0, 23_460, 782, 30, "cpu", 26_122, None, 50_000, 64, "10 classes")
    )
    display.progress.stop()  # rendered below, once, not live
    display(EpochDone(1, 0.264174, 0.912345, 0.301234, 0.897654, 12.5, 21.0625))
    display(StepDone(12_345, 16, 0.123456, 0.953125, 0.05, 21.0625, None))
    shown = Console(width=width, record=True, file=StringIO(), force_terminal=True)
    shown.print(display.progress.make_tasks_table(display.progress.tasks))
    line = shown.export_text().strip()
    assert "12346/23460" in line and re.search(r" \d+:\d\d:\d\d -?:?[-\d:]+ ", line), line
    figures = "loss 0.1235  acc 0.953  λmax 21.06  test acc 0.898"
    assert figures in line or width == 80, line
    assert ("…" in line) == (width == 80), line


def test_the_epoch_table_leaves_out_columns_that_hold_nothing(capsys, tmp_path):
    """A regression without a test split showed train acc, test loss and test acc as columns of
    dashes, which its epoch lines leave out."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    np.savez(tmp_path / "reg.npz", x=x, y=x.sum(1, keepdims=True))
    args = ("--data", tmp_path / "reg.npz", "--optimizer", "sgd", "--lr", "0.01", "--epochs", "2")
    code, stdout, err = run(capsys, "train", *PLAIN[:4], *args, "--out", tmp_path / "run")
    assert code == 0, err
    header = next(line for line in stdout.splitlines() if "epoch" in line and "┃" in line)
    assert header.replace("┃", " ").split() == ["epoch", "train", "loss", "step", "time"]
    losses = read_metrics(tmp_path / "run" / "metrics.h5")["epochs"]["train_loss"]
    rows = [line.replace("│", " ").split() for line in stdout.splitlines() if line[:1] == "│"]
    assert [row[:2] for row in rows] == [[str(i + 1), f"{v:.4g}"] for i, v in enumerate(losses)]


def test_the_help_names_the_loss_of_a_binary_classifier_of_one_output(capsys):
    """torch's binary cross-entropy takes such a model's 0/1 labels: the help said ce, mse or
    module:function alone, and --loss bce is unknown."""
    code, stdout, _ = run(capsys, "train", "--help")
    assert code == 0
    assert "torch.nn:BCEWithLogitsLoss for one output on 0/1 labels" in " ".join(
        stdout.replace("│", " ").split()
    )


def test_the_help_says_what_ctrl_c_does(capsys):
    """A stop at the next step with a checkpoint that --resume continues, what a researcher
    needs to know before pressing it on a long run: the help said nothing of it."""
    code, stdout, _ = run(capsys, "train", "--help")
    said = " ".join(stdout.replace("│", " ").split())
    assert code == 0 and "Ctrl-C (or SIGTERM) stops at the next step with a checkpoint" in said
    assert "--resume continues exactly; a second one stops at once" in said


def test_a_binary_classifier_whose_loss_says_no_threshold_is_given_no_accuracy(capsys, tmp_path):
    """A one-output model whose loss weighs the labels unequally as probabilities (no output at
    which both weigh alike, nor a logit's loss falling past 1) is given no accuracy, and the run
    says why at its end: a dash alone did not."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    np.savez(tmp_path / "binary.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    (tmp_path / "user.py").write_text(
        "import torch.nn.functional as F\n"
        "from torch import nn\n"
        "def model():\n"
        "    return nn.Sequential(nn.Linear(4, 1), nn.Sigmoid())\n"
        "def weighted(out, y):\n"
        "    return F.binary_cross_entropy(out[:, 0], y.float(), weight=1 + y.float())\n"
    )
    user, out = tmp_path / "user.py", tmp_path / "run"
    code, stdout, err = run(
        capsys, "train", "--model", f"{user}:model", "--data", tmp_path / "binary.npz",
        "--loss", f"{user}:weighted", "--optimizer", "sgd", "--epochs", "1", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert "note: no accuracy is given: the loss does not say whether the model's one output " in (
        " ".join(err.split())
    )
    assert np.isnan(read_metrics(out / "metrics.h5")["steps"]["accuracy"]).all()


def test_lambda_max_measurements_short_of_their_tolerance_are_said_at_the_end(
    capsys, tmp_path, monkeypatch
):
    """A --track-every measurement that stopped at its HVP budget above its tolerance (as a
    refresh that did is) was shown in the epoch table like the others, and the end of the run
    said nothing (here 4 of 4 with a budget of 3 products, residuals 0.043 to 0.15)."""
    monkeypatch.setattr("eigensam.tracking.TRACK_MAX_HVPS", 3)
    out = tmp_path / "run"
    code, _, err = run(
        capsys, "train", *PLAIN, "--optimizer", "sgd", "--epochs", "1", "--track-every", "2",
        "-q", "--out", out,
    )  # fmt: skip
    residual = read_metrics(out / "metrics.h5")["track"]["residual"]
    short = int((residual > 1e-3).sum())
    assert code == 0 and short > 0, err
    assert (
        f"note: {short} of {len(residual)} lambda_max measurements (--track-every) ended above "
        "the tolerance 1e-03 (the HVP budget spent, or the residual stopped improving), so "
        f"{'its value' if short == 1 else 'their values'} may be off" in " ".join(err.split())
    )


def test_a_float64_runs_checkpoint_is_analysed_in_float64(capsys, tmp_path):
    """A run of a float64 model (a factory's .double()) was analysed in float32 unless --dtype
    said so: its weights rounded, its eigenvalues about 1e-7 off its float64 Hessian's."""
    (tmp_path / "wide.py").write_text(
        "import torch\n\n\n"
        "def make():\n"
        "    layers = torch.nn.Linear(16, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)\n"
        "    return torch.nn.Sequential(*layers).double()\n"
    )
    spec, data_spec, out = f"{tmp_path}/wide.py:make", "synthetic:16:3:96", tmp_path / "run"
    code, _, err = run(
        capsys, "train", "--model", spec, "--data", data_spec, "--batch-size", "16",
        "--optimizer", "sgd", "--epochs", "1", "-q", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    final = out / "checkpoints" / "final.pt"
    code, stdout, err = run(
        capsys, "analyze", final, "--trust-checkpoint", "--top-k", "2", "--tol", "1e-8", "--json"
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["provenance"]["dtype"] == "float64"
    model = build_model(spec, input_shape=None, num_classes=3)
    model.load_state_dict(load_checkpoint(final).state_dict)
    train = load_data(data_spec).train
    batches = analysis_batches(
        train, batch_size=128, num_samples=min(128, len(train)), dtype=torch.float64
    )
    top = torch.linalg.eigvalsh(dense_hessian(model, cross_entropy, batches)).flip(0)[:2]
    np.testing.assert_allclose(report["eigen"]["eigenvalues"], top, rtol=1e-9)


def test_a_run_goes_on_where_the_reader_of_its_output_has_gone(tmp_path):
    """A pager quit before the run's first line came (`| less`, then q): printing it to the
    closed pipe ended the run, silently with status 1, before its first checkpoint (a run
    directory that --out then refused: "stopped before its first checkpoint")."""
    run_dir = tmp_path / "run"
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "hessian_cli", "train", "--model", "mlp", "--data",
             "digits", "--optimizer", "sgd", "--epochs", "1", "--out", str(run_dir)],
            stdout=writer, stderr=subprocess.PIPE, text=True, timeout=300,
        )  # fmt: skip
    finally:
        os.close(writer)
    assert done.returncode == 0, done.stderr
    assert (run_dir / "checkpoints" / "final.pt").is_file()


def test_a_data_file_moved_since_the_run_is_named_as_recorded(capsys, tmp_path):
    """A run's data file moved away met "data file '...' does not exist", from analyze and from
    --resume alike, as if the user had named it: say it is the recorded one, and what to do."""
    data, moved = tmp_path / "d.npz", tmp_path / "d2.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((32, 4)), y=np.arange(32) % 3)
    out = tmp_path / "run"
    args = ("--model", "mlp", "--data", data, "--batch-size", "16", "--epochs", "1", "-q")
    assert run(capsys, "train", *args, "--out", out)[0] == 0
    data.rename(moved)
    code, _, err = run(capsys, "analyze", out, "--top-k", "1")
    assert code == 2 and one_sentence(err, strict=True).endswith(
        f"the file '{data}' that the checkpoint records for its data does not exist (moved or "
        "deleted?): give --data to say where it is now."
    )
    assert run(capsys, "analyze", out, "--top-k", "1", "--data", moved)[0] == 0
    code, _, err = run(capsys, "train", "--resume", out, "--max-steps", "3")
    assert code == 2 and "that the run's config.json records for its data does not exist" in err
    assert "put it back there (or a link to it) to resume the run" in one_sentence(err)


@pytest.mark.parametrize("what", ["model", "loss"])
def test_a_code_file_moved_since_the_run_is_named_as_recorded(capsys, tmp_path, what):
    """As a data file: "the file '...' named for the model factory does not exist", and
    untrusted, a refusal that asked to name the missing file with --model (or --loss)."""
    code_file = tmp_path / "code.py"
    code_file.write_text(
        "import torch\n\n\ndef make():\n    return torch.nn.Sequential(torch.nn.Flatten(), "
        "torch.nn.Linear(16, 3))\n\n\nloss = torch.nn.functional.cross_entropy\n"
    )
    out = tmp_path / "run"
    name = "make" if what == "model" else "loss"
    given = ("--model", "mlp") if what == "loss" else ()
    args = (*given, f"--{what}", f"{code_file}:{name}", "--data", "synthetic:16:3:32")
    assert (
        run(capsys, "train", *args, "--epochs", "1", "--batch-size", "16", "-q", "--out", out)[0]
        == 0
    )
    moved = code_file.rename(tmp_path / "code2.py")
    for trust in ((), ("--trust-checkpoint",)):
        code, _, err = run(capsys, "analyze", out, "--top-k", "1", *trust)
        assert code == 2 and one_sentence(err, strict=True).endswith(
            f"the file '{code_file}' that the checkpoint records for its {what} does not exist "
            f"(moved or deleted?): give --{what} to say where it is now."
        )
    assert run(capsys, "analyze", out, "--top-k", "1", f"--{what}", f"{moved}:{name}")[0] == 0
    code, _, err = run(capsys, "train", "--resume", out, "--max-steps", "3")
    assert code == 2 and f"that the run's config.json records for its {what} does not exist" in err
