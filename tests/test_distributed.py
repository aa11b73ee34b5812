"""`analyze` and `train` under torchrun (2 ranks, Gloo on CPU) give the single-process answers.

Each test launches real processes (`torchrun --standalone --nproc_per_node=2 -m hessian_cli`),
so it exercises the process-group setup, the sharding of batches, the all-reduced products and
rank-0-only output exactly as a user runs them.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import pytest
import torch
import torch.distributed as dist
from cli_runner import PADDED_TEXTS, run

from eigensam.determinism import DataOrder
from hessian_cli.engine.distributed import shard
from hessian_cli.errors import UserError
from hessian_cli.specs import load_checkpoint
from hessian_cli.storage.files import held
from hessian_cli.storage.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints_example" / "digits_mlp.pt"
TORCHRUN = Path(sys.executable).with_name("torchrun")

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and TORCHRUN.exists()),
    reason="torch.distributed with Gloo (and torchrun) is not available",
)


def _env() -> dict[str, str]:
    # No GPU for the ranks: on a machine of one GPU, `auto` refuses a second rank a CUDA device.
    # PYTHONFAULTHANDLER: a rank that aborts prints where each of its threads was.
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONFAULTHANDLER="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


# Each job's torchrun, forked from one process that imported torchrun's module once: torchrun
# imports torch as it starts, 3-4 s of CPU here before any rank starts, in every one of this
# file's 51 jobs. The fork runs torchrun's main() as the torchrun script does, in the job's
# directory and environment, and its ranks are new processes, as under a real torchrun.
_LAUNCHER = """
import json, os, signal, sys, time
from torch.distributed.run import main

print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = job["argv"]
        sys.exit(main())
    code, deadline = None, time.monotonic() + job["timeout"]
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
        time.sleep(0.02)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    print(json.dumps(code), flush=True)
"""


@functools.cache
def _launcher() -> subprocess.Popen:
    """The process that forks each job's torchrun; it ends when its input does, at exit."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    atexit.register(launcher.communicate)  # waited for, as each torchrun was
    launcher.stdout.readline()  # ready: its import is no job's time
    return launcher


def _run(
    args: list[str],
    *,
    ranks: int,
    cwd: Path,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    entry: tuple[str, ...] = ("-m", "hessian_cli"),
) -> tuple:
    """Run the CLI under torchrun; (code, stdout, stderr, seconds).

    ``entry``: a script that runs the CLI instead (e.g. with other options on some rank)."""
    argv = [str(TORCHRUN), "--standalone", f"--nproc_per_node={ranks}", *entry, *args]
    launcher = _launcher()
    with tempfile.TemporaryDirectory() as streams:
        out, err = Path(streams, "stdout"), Path(streams, "stderr")
        job = {"argv": argv, "cwd": str(cwd), "env": {**_env(), **(env or {})}}
        job |= {"timeout": timeout, "out": str(out), "err": str(err)}
        start = time.monotonic()
        launcher.stdin.write(json.dumps(job) + "\n")
        launcher.stdin.flush()
        code = json.loads(launcher.stdout.readline())
        seconds = time.monotonic() - start
        if code is None:
            raise subprocess.TimeoutExpired(argv, timeout)
        return code, out.read_text(), err.read_text(), seconds


def _one_process(monkeypatch, capsys, args: list[str], cwd: Path) -> tuple[int, str, str]:
    """The single-process reference run, in this process (code, stdout, stderr): a process of
    its own started torch again, 4 s a run here. Without a GPU, as the ranks run."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return run(capsys, *args)


def _close(a: float, b: float, rtol: float = 1e-6, atol: float = 0.0) -> bool:
    return abs(a - b) <= rtol * abs(a) + atol


def test_shard_is_a_contiguous_partition() -> None:
    items = list(range(11))
    for world_size in (1, 2, 3, 4, 16):
        shares = [shard(items, r, world_size) for r in range(world_size)]
        assert sum(shares, []) == items  # in order, no duplicates, nothing dropped
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1


def test_what_ranks_compare_is_not_even_computed_without_torchrun() -> None:
    from hessian_cli.engine.distributed import check_same

    check_same(lambda: pytest.fail("hashed the data of a single process"))


@pytest.mark.parametrize("value", ["0", "-5", "inf", "nan", "soon"])
def test_a_bad_collective_timeout_is_one_sentence(monkeypatch, value: str) -> None:
    from hessian_cli.engine import distributed
    from hessian_cli.errors import UserError

    monkeypatch.setattr(distributed, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(distributed, "is_distributed", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: None)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, value)
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(UserError, match=f"must be a positive number of seconds, not '{value}'"):
        distributed.init_from_env()


def test_rank_and_world_size_without_a_rendezvous_address_is_one_sentence(monkeypatch) -> None:
    """RANK and WORLD_SIZE set by hand (or inherited) without MASTER_ADDR: torch's ValueError
    was reported as "unexpected ValueError"."""
    from hessian_cli.engine import distributed

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(UserError, match="but MASTER_ADDR is not: start the job with torchrun"):
        distributed.init_from_env()
    assert not distributed.is_distributed()


@needs_gloo
def test_a_bad_collective_timeout_is_said_once_under_torchrun(tmp_path: Path) -> None:
    """Every rank said it, as its own ("rank 0: ...", "rank 1: ...")."""
    args = ["analyze", str(CKPT), "--top-k", "1"]
    env = {"HESSIAN_CLI_COLLECTIVE_TIMEOUT": "soon"}
    code, _, err, _ = _run(args, ranks=2, cwd=tmp_path, timeout=90, env=env)
    assert code != 0
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: $HESSIAN_CLI_COLLECTIVE_TIMEOUT must be a positive number of seconds, not 'soon'."
    ], err


@pytest.mark.parametrize("local_rank, selected", [("0", [0]), ("1", [])])
def test_a_rank_without_a_gpu_of_its_own_joins_the_job(
    monkeypatch, local_rank: str, selected: list[int]
) -> None:
    """Two ranks on a one-GPU node (a --device cpu job): rank 1 has no GPU to select, and
    selecting one failed with "invalid device ordinal" before any option was read."""
    from hessian_cli.engine import distributed

    def set_device(index: int) -> None:
        if index >= torch.cuda.device_count():
            raise RuntimeError("CUDA error: invalid device ordinal")
        selections.append(index)

    selections: list[int] = []
    joined: list[str] = []
    monkeypatch.setattr(distributed, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(distributed, "is_distributed", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: joined.append(backend))
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert distributed.init_from_env() is True
    assert selections == selected and joined == ["cpu:gloo,cuda:nccl"]


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_a_rank_without_a_gpu_of_its_own_is_refused_a_cuda_device(monkeypatch, device: str) -> None:
    """It would share local rank 0's GPU (torch's current device), which NCCL refuses later in
    words of its own; --device cpu is what such a job can run with."""
    from hessian_cli.engine import devices

    monkeypatch.setattr(devices, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match="local rank 1 has no GPU of its own: this machine has 1"):
        devices.resolve_device(device)
    assert devices.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert devices.resolve_device(device) == torch.device("cuda")


@needs_gloo
@pytest.mark.parametrize(
    "samples,batch,minibatches,ranks", [(201, 50, 4, 2), (160, 40, 6, 2), (50, 50, 2, 3)]
)
def test_analyze_two_ranks_matches_one_process(
    monkeypatch, capsys, tmp_path: Path, samples: int, batch: int, minibatches: int, ranks: int
) -> None:
    """Eigenpairs, residuals, trace, density and alignment agree to 1e-6 in float64 (minibatch
    statistics over part of the analysed batches, or over more batches than those; with fewer
    of those than ranks, a rank without a share still takes part: it hung before)."""
    args = [
        "analyze",
        str(CKPT),
        "--num-samples",
        str(samples),
        "--batch-size",
        str(batch),
        "--dtype",
        "float64",
        "--trace",
        "--trace-probes",
        "30",
        "--density",
        "--density-steps",
        "16",
        "--alignment",
        "--minibatches",
        str(minibatches),  # spans both ranks' shares
        "--json",
    ]
    code1, out1, err1 = _one_process(monkeypatch, capsys, args, tmp_path)
    assert code1 == 0, err1
    out_file = tmp_path / "two.h5"
    code2, out2, err2, _ = _run([*args, "--out", str(out_file)], ranks=ranks, cwd=tmp_path)
    assert code2 == 0, err2
    one, two = json.loads(out1), json.loads(out2)  # rank 0 alone printed: one JSON document
    # Fewer batches than ranks (1 for 3): the idle ranks are said, once; it ran as one process.
    idle = ranks - one["provenance"]["num_batches"]
    words = " ".join(err2.split())
    assert words.count("note: ") == (idle > 0), err2
    assert idle <= 0 or f"1 batch for {ranks} ranks, so {idle} of them held none" in words, err2

    assert two["provenance"]["world_size"] == ranks
    assert two["provenance"]["num_samples"] == samples
    assert two["provenance"]["num_batches"] == one["provenance"]["num_batches"]
    assert two["provenance"]["hvps"] == one["provenance"]["hvps"]
    assert _close(one["loss"], two["loss"])
    lam = one["eigen"]["eigenvalues"]
    assert len(lam) == 5
    for a, b in zip(lam, two["eigen"]["eigenvalues"], strict=True):
        assert _close(a, b)
    # Residuals are differences of products: compare them above the float64 round-off floor.
    for a, b in zip(one["eigen"]["residuals"], two["eigen"]["residuals"], strict=True):
        assert _close(a, b, atol=1e-12 * abs(lam[0]))
    assert two["eigen"]["converged"] == one["eigen"]["converged"]
    for key in ("estimate", "stderr"):
        assert _close(one["trace"][key], two["trace"][key])
    for key in ("nodes", "weights"):
        torch.testing.assert_close(
            torch.tensor(two["density"][key]),
            torch.tensor(one["density"][key]),
            rtol=1e-6,
            atol=1e-9,
        )
    al1, al2 = one["alignment"], two["alignment"]
    for key in ("subspace_alignment", "curvature_ratio", "eigensam_alignment", "grad_norm"):
        assert _close(al1[key], al2[key]), key
    assert _close(al1["sam_sharpness"], al2["sam_sharpness"], rtol=1e-5)
    for a, b in zip(al1["alignment"], al2["alignment"], strict=True):
        assert _close(a, b, atol=1e-12)
    mb1 = torch.tensor(al1["minibatch"]["values"])
    mb2 = torch.tensor(al2["minibatch"]["values"])
    assert mb1.shape == mb2.shape == (minibatches, 5)
    torch.testing.assert_close(mb2, mb1, rtol=1e-6, atol=1e-12)

    with h5py.File(out_file, "r") as f:
        assert int(f["checkpoints/digits_mlp"].attrs["world_size"]) == ranks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.h5"]  # no stray files per rank


@needs_gloo
@pytest.mark.parametrize(
    "args",
    [
        ["analyze", str(CKPT), "--num-samples", "32", "-q", "--rho", "0.1"],
        ["train", "--model", "mlp", "--data", "digits", "--out", ""],
        ["analyze", str(CKPT), "--top-k", "1", "--out", "missing/s.h5"],
    ],
    ids=["unused option", "empty --out", "--out under a file"],
)
def test_an_option_refused_under_torchrun_is_said_once(tmp_path: Path, args: list[str]) -> None:
    """Each rank said it, prefixed with its rank, and left on its own. What rank 0 alone checks
    (the output it writes) was said as that rank's: "rank 0 of 2: The output directory ..."."""
    (tmp_path / "missing").write_text("")  # a file where --out's directory would be made
    code, _, err, _ = _run(args, ranks=2, cwd=tmp_path, timeout=90)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(lines) == 1, err
    said = ("--rho has no effect", "needs a name", f"lies under {tmp_path / 'missing'}, which")
    assert "rank" not in lines[0] and any(s in lines[0] for s in said), err


@needs_gloo
def test_a_failing_write_of_the_results_fails_every_rank_with_one_sentence(tmp_path: Path) -> None:
    """A full disk when rank 0 writes the spectra: it said so as its own ("rank 0: Could not
    write ..."), left alone, and the other ranks went on to exit 0."""
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(
        "import errno\n\n"
        "from hessian_cli.cli import main\n"
        "from hessian_cli.storage import files\n\n\n"
        "def full(fd):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n\n\n"
        "files.os.fsync = full\n"
        "main()\n"
    )
    args = ["analyze", str(CKPT), "--top-k", "1", "--num-samples", "64", "--batch-size", "32"]
    code, _, err, _ = _run(
        [*args, "-q", "--out", "s.h5"],
        ranks=2,
        cwd=tmp_path,
        timeout=90,
        env={"PYTHONPATH": str(ROOT)},
        entry=(str(wrapper),),
    )
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and lines == [
        f"error: could not write {tmp_path / 's.h5'}: no space left on device."
    ], err
    assert not (tmp_path / "s.h5").exists()


@needs_gloo
@pytest.mark.parametrize("command", ["analyze", "train"])
def test_one_failing_rank_ends_the_job_with_one_message(tmp_path: Path, command: str) -> None:
    """A data path that exists on rank 0's node but not on rank 1's: exit non-zero, quickly,
    and nothing written."""
    torch.save({"x": torch.randn(64, 1, 8, 8), "y": torch.randint(0, 10, (64,))}, tmp_path / "0.pt")
    factory = tmp_path / "node_data.py"
    factory.write_text(
        "import os\n"
        "import torch\n"
        "from pathlib import Path\n\n\n"
        "def make():\n"
        "    path = Path(__file__).parent / f\"{os.environ.get('RANK', '0')}.pt\"\n"
        "    d = torch.load(path)\n"
        "    return d['x'], d['y']\n"
    )
    data = f"{factory}:make"
    run_dir = tmp_path / "run"
    args = {
        "analyze": ["analyze", str(CKPT), "--data", data, "--top-k", "2", "--out", "s.h5"],
        "train": ["train", "--model", "mlp", "--data", data, "--out", str(run_dir)],
    }[command]
    code, out, err, seconds = _run(args, ranks=2, cwd=tmp_path, timeout=90)
    assert code != 0
    assert seconds < 60
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err  # reported once, by rank 0, naming the failing rank
    assert "rank 1 of 2" in lines[0] and "1.pt" in lines[0]
    assert "Traceback" not in err.split("error:")[0]
    assert not (tmp_path / "s.h5").exists()
    assert not run_dir.exists() or not any(run_dir.iterdir())


@needs_gloo
def test_debug_shows_an_agreed_errors_traceback_once_from_the_rank_where_it_arose(
    tmp_path: Path,
) -> None:
    """Every rank printed one: rank 1's, which shows where its data failed to load, and rank
    0's, which showed only where the ranks agreed on it."""
    torch.save({"x": torch.randn(64, 1, 8, 8), "y": torch.randint(0, 10, (64,))}, tmp_path / "0.pt")
    (tmp_path / "node_data.py").write_text(
        "import os\n"
        "import torch\n\n\n"
        "def make():\n"
        "    d = torch.load(f\"{os.environ['RANK']}.pt\")  # 1.pt is missing\n"
        "    return d['x'], d['y']\n"
    )
    args = ["--debug", "analyze", str(CKPT), "--data", "node_data.py:make", "--top-k", "1"]
    code, _, err, _ = _run(args, ranks=2, cwd=tmp_path, timeout=90)
    assert code != 0
    assert err.count("CollectiveUserError: rank 1 of 2:") == 1, err
    assert 'node_data.py", line 6, in make' in err, err


@needs_gloo
@pytest.mark.parametrize("command", ["analyze", "train"])
def test_ranks_given_other_data_are_refused(tmp_path: Path, command: str) -> None:
    """Each node reads its own copy of the data, and one copy differs: the job stops with one
    message (it summed products over two different data sets and reported the mixture)."""
    factory = tmp_path / "node_data.py"
    factory.write_text(
        "import os\n"
        "import torch\n\n\n"
        "def make():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)\n"
        "    if os.environ.get('RANK') == '1':\n"
        "        x[5, 0, 0, 0] += 1.0  # one value differs\n"
        "    return x, y\n"
    )
    data = f"{factory}:make"
    args = {
        "analyze": ["analyze", str(CKPT), "--data", data, "--top-k", "2", "--out", "s.h5"],
        "train": ["train", "--model", "mlp", "--data", data, "--out", str(tmp_path / "run")],
    }[command]
    code, _, err, seconds = _run(args, ranks=2, cwd=tmp_path, timeout=90)
    assert code != 0 and seconds < 60
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: rank 1 of 2 was started with other data than rank 0; every rank must be given "
        "the same options and files."
    ], err
    assert not (tmp_path / "s.h5").exists() and not (tmp_path / "run").exists()


@needs_gloo
def test_ranks_given_other_series_are_refused(tmp_path: Path) -> None:
    """One node's copy of a checkpoint directory holds a file more: one message before any work
    (rank 1 went on alone to the extra file, waited a minute in a collective rank 0 never
    joined, and said "another rank left" while rank 0 had written the two as a success)."""
    state = load_checkpoint(CKPT).raw
    for name, steps in (("a", (1, 2)), ("b", (1, 2, 3))):
        (tmp_path / name).mkdir()
        for step in steps:
            torch.save(state, tmp_path / name / f"step{step}.pt")
    wrapper = tmp_path / "per_rank.py"
    wrapper.write_text(
        "import os\n"
        "import sys\n\n"
        "from hessian_cli.cli import main\n\n"
        "series = 'b' if os.environ['RANK'] == '1' else 'a'\n"
        "sys.argv = ['hessian-cli', 'analyze', series, *sys.argv[1:]]\n"
        "main()\n"
    )
    code, _, err, seconds = _run(
        ["--top-k", "1", "--num-samples", "32", "--out", "s.h5", "-q"],
        ranks=2,
        cwd=tmp_path,
        timeout=90,
        env={"PYTHONPATH": str(ROOT)},
        entry=(str(wrapper),),
    )
    assert code != 0 and seconds < 45, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: rank 1 of 2 was started with other checkpoints than rank 0; every rank must be "
        "given the same options and files."
    ], err
    assert not (tmp_path / "s.h5").exists()


@needs_gloo
def test_ranks_given_other_max_steps_are_refused(tmp_path: Path) -> None:
    """Nodes launched with other --max-steps (a run-time option, left out of what ranks compare):
    one message and nothing written (the rank that stopped first left the other inside a
    collective, and the job aborted on a Gloo size mismatch without a word)."""
    wrapper = tmp_path / "per_rank.py"
    wrapper.write_text(
        "import os\n"
        "import sys\n\n"
        "from hessian_cli.cli import main\n\n"
        "steps = str(3 + 2 * int(os.environ['RANK']))  # rank 0: 3, rank 1: 5\n"
        "sys.argv = ['hessian-cli', *sys.argv[1:], '--max-steps', steps]\n"
        "main()\n"
    )
    run_dir = tmp_path / "run"
    args = ["train", "--model", "mlp", "--data", "digits", "--optimizer", "sgd"]
    code, _, err, seconds = _run(
        [*args, "--batch-size", "32", "--quiet", "--out", str(run_dir)],
        ranks=2,
        cwd=tmp_path,
        timeout=90,
        env={"PYTHONPATH": str(ROOT)},
        entry=(str(wrapper),),
    )
    assert code != 0 and seconds < 60
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: rank 1 of 2 was started with other options than rank 0; every rank must be "
        "given the same options and files."
    ], err
    assert not run_dir.exists()


@needs_gloo
def test_a_run_that_diverges_is_said_once(tmp_path: Path) -> None:
    """Every rank meets the divergence at the same step (the losses are summed): each said it
    as its own ("rank 1: training diverged ...", "rank 0: training diverged ...")."""
    args = ["train", "--model", "mlp", "--data", "digits", "--optimizer", "sgd", "--lr", "1e30"]
    args += ["--batch-size", "8", "--max-steps", "5", "--quiet", "--out", str(tmp_path / "run")]
    code, _, err, seconds = _run(args, ranks=2, cwd=tmp_path, timeout=90)
    assert code != 0 and seconds < 60, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: training diverged at step "), err


@needs_gloo
def test_a_series_stopped_by_a_bad_checkpoint_is_written_and_reported_once(
    tmp_path: Path,
) -> None:
    """Every rank meets the NaN checkpoint: rank 0 writes the ones before it and says so once
    (rank 1 took the error for its own, left at once, and torchrun stopped rank 0 mid-write)."""
    series = tmp_path / "series"
    series.mkdir()
    state = load_checkpoint(CKPT).raw
    for step in (1, 2):
        torch.save(state, series / f"step{step}.pt")
    bad = {**state, "model": {k: v.clone() for k, v in state["model"].items()}}
    next(iter(bad["model"].values())).fill_(float("nan"))
    torch.save(bad, series / "step9.pt")
    args = ["analyze", str(series), "--top-k", "2", "--out", "s.h5", "-q"]
    code, _, err, seconds = _run(args, ranks=2, cwd=tmp_path, timeout=90)
    assert code != 0 and seconds < 60
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "step9.pt" in lines[0] and "non-finite" in lines[0] and "are kept" in lines[0]
    assert "rank" not in lines[0]  # every rank met it: no rank's doing
    assert "Terminated" not in err
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert sorted(f["checkpoints"]) == ["step1", "step2"]


@needs_gloo
@pytest.mark.parametrize(
    "args, message",
    [
        (["analyze", str(CKPT), "--top-k", "-1"], "error: --top-k must be at least 0, not -1."),
        (
            ["analyze", str(CKPT), "--which", "foo"],
            "error: --which must be one of largest, smallest, both, not 'foo'.",
        ),
        (
            ["train", "--model", "mlp", "--data", "digits", "--optimizer", "sgd", "--rho", "0.1"],
            "error: --rho has no effect with --optimizer sgd (it is used by sam and eigensam "
            "only); leave it out.",
        ),
    ],
)
def test_a_bad_option_is_said_once(tmp_path: Path, args: list[str], message: str) -> None:
    code, _, err, _ = _run([*args, "--out", "x"], ranks=2, cwd=tmp_path, timeout=90)
    assert code != 0
    assert [line for line in err.splitlines() if line.startswith("error:")] == [message], err


@needs_gloo
@pytest.mark.parametrize(
    "args, said",
    [(["analyze", str(CKPT), "--top-kk", "3"], "no such option: --top-kk"), (["--help"], "Usage:")],
    ids=["usage error", "help"],
)
def test_what_click_says_before_a_command_runs_is_said_once(
    tmp_path: Path, args: list[str], said: str
) -> None:
    """A mistyped option's box (and --help) came once from every rank."""
    _, out, err, _ = _run(args, ranks=2, cwd=tmp_path, timeout=90)
    assert (out + err).count(said) == 1, out + err


@needs_gloo
def test_products_that_are_not_finite_after_their_sum_are_said_once(tmp_path: Path) -> None:
    """Rank 1's samples are huge (finite, so the data check lets them through): the summed
    products overflow on every rank at once, and rank 0 alone says so."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 8, 8, generator=g)
    x[196:] = 3e38 * torch.randn(60, 1, 8, 8, generator=g).sign()
    torch.save({"x": x, "y": torch.randint(0, 10, (256,), generator=g)}, tmp_path / "d.pt")
    args = ["analyze", str(CKPT), "--data", "d.pt", "--num-samples", "256", "--batch-size", "50"]
    code, _, err, _ = _run([*args, "--top-k", "2"], ranks=2, cwd=tmp_path, timeout=90)
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: the Hessian-vector products are not finite (NaN or inf): the loss's second "
        "derivatives are undefined or infinite at these weights."
    ], err


@needs_gloo
def test_a_basis_too_large_for_one_rank_is_refused_by_all(tmp_path: Path) -> None:
    """Rank 1 reports too little free memory for the eigensolver's basis: every rank stops at
    once with one message (rank 0 alone would have waited for rank 1's products)."""
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import hessian_cli.engine.memory as memory\n"
        "    memory.free_bytes = lambda device: 1000\n"
    )
    args = ["analyze", str(CKPT), "--top-k", "2", "--out", "s.h5"]
    code, _, err, seconds = _run(
        args, ranks=2, cwd=tmp_path, timeout=90, env={"PYTHONPATH": str(patch)}
    )
    assert code != 0 and seconds < 60
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "rank 1 of 2" in lines[0] and "more than the 0.0 GiB free" in lines[0]
    assert not (tmp_path / "s.h5").exists()


@needs_gloo
@pytest.mark.parametrize("command", ["analyze", "train"])
def test_a_rank_that_runs_out_of_memory_alone_ends_the_job_at_once(
    tmp_path: Path, command: str
) -> None:
    """Rank 1 runs out of memory in the middle of the work while rank 0 waits for it inside a
    collective: rank 1 says so and leaves without waiting for rank 0 (its barrier on the way out
    hung until the 15-minute collective timeout), and torchrun stops rank 0, which writes the
    metrics of the steps done first (they used to be lost: they are written per epoch)."""
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import torch\n"
        "    calls = [0]\n"
        "    def failing(f):\n"
        "        def wrapped(*args, **kwargs):\n"
        "            calls[0] += 1\n"
        "            if calls[0] > int(os.environ['FAIL_AFTER']):\n"
        "                raise torch.cuda.OutOfMemoryError('CUDA out of memory.')\n"
        "            return f(*args, **kwargs)\n"
        "        return wrapped\n"
        "    # forward passes (training) and kept-graph products (analysis)\n"
        "    torch.nn.Linear.forward = failing(torch.nn.Linear.forward)\n"
        "    torch.autograd.grad = failing(torch.autograd.grad)\n"
    )
    run_dir = tmp_path / "run"
    args = {
        "analyze": [
            *("analyze", str(CKPT), "--top-k", "2", "--batch-size", "64", "--num-batches", "2"),
            *("--out", "s.h5"),
        ],
        "train": _train_args(run_dir, 32),
    }[command]
    # in training, after a few steps (the first used up 12 calls)
    env = {"PYTHONPATH": str(patch), "FAIL_AFTER": "12" if command == "analyze" else "80"}
    code, _, err, seconds = _run(args, ranks=2, cwd=tmp_path, timeout=120, env=env)
    assert code != 0 and seconds < 60, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: rank 1: CUDA ran out of memory"), err
    assert not (tmp_path / "s.h5").exists()
    if command == "train":
        step = int(lines[0].split(" at step ")[1].split()[0])  # where rank 1 stopped
        assert step > 1 and len(read_metrics(run_dir / "metrics.h5")["steps"]["loss"]) == step


@needs_gloo
def test_plain_run_records_world_size_one(monkeypatch, capsys, tmp_path: Path) -> None:
    code, out, err = _one_process(
        monkeypatch, capsys, ["analyze", str(CKPT), "--top-k", "1", "--json"], tmp_path
    )
    assert code == 0, err
    assert json.loads(out)["provenance"]["world_size"] == 1


def _train_args(out: Path, batch_size: int, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        "mlp",  # no BatchNorm: the global-batch gradient is exactly the single-process one
        "--model-kwargs",
        '{"hidden": [16]}',
        "--data",
        "digits",
        "--epochs",
        "1",
        "--track-every",
        "8",
        "--lr",
        "0.05",
        "--batch-size",
        str(batch_size),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "final.pt").state_dict


@needs_gloo
@pytest.mark.parametrize("optimizer", ["eigensam", "sam"])
def test_train_two_ranks_matches_doubled_batch(
    monkeypatch, capsys, tmp_path: Path, optimizer: str
) -> None:
    """2 ranks with batch B each == 1 process with batch 2B (weights, losses, refreshes)."""
    opt = ["--optimizer", optimizer] if optimizer == "sam" else ["--eig-every", "5"]
    code, _, err = _one_process(
        monkeypatch, capsys, _train_args(tmp_path / "one", 64, *opt), tmp_path
    )
    assert code == 0, err
    code, out, err, _ = _run(_train_args(tmp_path / "two", 32, *opt), ranks=2, cwd=tmp_path)
    assert code == 0, err
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-5)
    with (
        h5py.File(tmp_path / "one" / "metrics.h5") as f1,
        h5py.File(tmp_path / "two" / "metrics.h5") as f2,
    ):
        assert f1["steps/loss"].shape == f2["steps/loss"].shape
        torch.testing.assert_close(
            torch.tensor(f2["steps/loss"][()]),
            torch.tensor(f1["steps/loss"][()]),
            rtol=1e-5,
            atol=0,
        )
        if optimizer == "eigensam":
            torch.testing.assert_close(
                torch.tensor(f2["refresh/eigenvalue"][()]),
                torch.tensor(f1["refresh/eigenvalue"][()]),
                rtol=1e-4,
                atol=0,
            )
        # lambda_max of the held-out batch: one global batch too (it was each rank's B rows)
        assert f1["track/step"][()].tolist() == f2["track/step"][()].tolist()
        assert len(f1["track/step"]) >= 3
        torch.testing.assert_close(
            torch.tensor(f2["track/lambda_max"][()]),
            torch.tensor(f1["track/lambda_max"][()]),
            rtol=1e-4,
            atol=0,
        )


@needs_gloo
def test_train_two_ranks_of_a_routed_model_match_doubled_batch(
    monkeypatch, capsys, tmp_path: Path
) -> None:
    """Each sample goes through one of two heads: a rank whose share reached one head alone
    all-reduced a list of gradients of another length than its peer's, and the job aborted
    ("terminate called ... Received data size doesn't match expected size")."""
    (tmp_path / "routed.py").write_text(
        "from torch import nn\n\n\n"
        "class Routed(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = nn.Linear(8, 3), nn.Linear(8, 3)\n\n"
        "    def forward(self, x):\n"
        "        to_a = x[:, 0] > 0\n"
        "        out = x.new_zeros(len(x), 3)\n"
        "        if to_a.any():\n"
        "            out[to_a] = self.a(x[to_a])\n"
        "        if (~to_a).any():\n"
        "            out[~to_a] = self.b(x[~to_a])\n"
        "        return out\n\n\n"
        "def make():\n"
        "    return Routed()\n"
    )
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    args = ["train", "--model", "routed.py:make", "--data", "d.pt", "--eig-every", "3"]
    args += ["--epochs", "2", "--lr", "0.1", "--track-every", "0", "--quiet", "--out"]
    code, _, err = _one_process(monkeypatch, capsys, [*args, "one", "--batch-size", "4"], tmp_path)
    assert code == 0, err
    code, _, err, _ = _run([*args, "two", "--batch-size", "2"], ranks=2, cwd=tmp_path)
    assert code == 0, err
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-5)


@needs_gloo
def test_a_failing_final_checkpoint_fails_every_rank_with_one_sentence(tmp_path: Path) -> None:
    """A full disk when rank 0 writes the final checkpoint: it said so as its own ("rank 0:
    Could not write ..."), and the other ranks ended the run as a success."""
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(
        "import errno\n"
        "import os\n\n"
        "from hessian_cli.cli import main\n\n"
        "fsync = os.fsync\n\n\n"
        "def full(fd):\n"
        "    if 'final.pt' in os.readlink(f'/proc/self/fd/{fd}'):\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    fsync(fd)\n\n\n"
        "os.fsync = full\n"
        "main()\n"
    )
    run_dir = tmp_path / "run"
    code, _, err, _ = _run(
        _train_args(run_dir, 128, "--optimizer", "sgd", "--track-every", "0"),
        ranks=2,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT)},
        entry=(str(wrapper),),
    )
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(lines) == 1, err
    assert lines[0].startswith(
        f"error: could not write {run_dir / 'checkpoints' / 'final.pt'}: no space left on device;"
    ), err
    assert not (run_dir / "checkpoints" / "final.pt").exists()
    step = int(re.search(r"stopped at step (\d+)", lines[0])[1])
    assert len(read_metrics(run_dir / "metrics.h5")["steps"]["step"]) == step  # written first


@needs_gloo
def test_train_resume_two_ranks_repeats_the_run(tmp_path: Path) -> None:
    """Stopped at step 6 and resumed with the same world size: the uninterrupted run's weights
    and tracked lambda_max. With BatchNorm: each rank's running statistics move on its own share
    and rank 0's are kept on every rank (as DDP keeps them), so lambda_max in eval mode sums
    products of one model, and a resume (which restores rank 0's) goes on as the run did."""
    bn = ["--model", "cnn", "--model-kwargs", '{"widths": [4], "batchnorm": true}']
    bn += ["--eig-every", "5"]
    code, _, err, _ = _run(_train_args(tmp_path / "full", 32, *bn), ranks=2, cwd=tmp_path)
    assert code == 0, err
    part = tmp_path / "part"
    code, _, err, _ = _run(_train_args(part, 32, *bn, "--max-steps", "6"), ranks=2, cwd=tmp_path)
    assert code == 0, err
    resume = ["train", "--resume", str(part), "--quiet"]
    with held(part / "config.json", "held by the test"):  # as another job training it
        code, _, err, _ = _run(resume, ranks=2, cwd=tmp_path)
    # Refused by rank 0, which alone claims the run: not as that rank's ("rank 0 of 2: ...").
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and lines == [
        f"error: the run in '{part}' is being trained by another process."
    ], err
    code, _, err, _ = _run(resume, ranks=2, cwd=tmp_path)
    assert code == 0, err
    with h5py.File(tmp_path / "full" / "metrics.h5") as f1, h5py.File(part / "metrics.h5") as f2:
        steps = f1["track/step"][()].tolist()
        assert f2["track/step"][()].tolist() == steps and len(steps) >= 3
        torch.testing.assert_close(
            torch.tensor(f2["track/lambda_max"][()]),
            torch.tensor(f1["track/lambda_max"][()]),
            rtol=1e-6,
            atol=0,
        )
    full, resumed = _weights(tmp_path / "full"), _weights(part)
    for key in full:  # the running statistics too
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)


@needs_gloo
def test_a_resume_into_a_directory_rank_0_cannot_write_is_refused_as_the_jobs(
    monkeypatch, capsys, tmp_path: Path
) -> None:
    """Checked by rank 0 alone, which writes: said as that rank's ("rank 0 of 2: Cannot write
    to the directory ..."). The run is one process's: refused before its course is compared."""
    run_dir = tmp_path / "run"
    code, _, err = _one_process(
        monkeypatch, capsys, _train_args(run_dir, 32, "--max-steps", "2"), tmp_path
    )
    assert code == 0, err
    wrapper = tmp_path / "read_only.py"
    wrapper.write_text(
        "import errno\n\n"
        "from hessian_cli.cli import main\n"
        "from hessian_cli.storage import files\n\n\n"
        "def read_only(*args, **kwargs):\n"
        "    raise OSError(errno.EROFS, 'Read-only file system')\n\n\n"
        "files.tempfile.TemporaryFile = read_only\n"
        "main()\n"
    )
    code, _, err, _ = _run(
        ["train", "--resume", str(run_dir), "--quiet"],
        ranks=2,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT)},
        entry=(str(wrapper),),
    )
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and lines == [
        f"error: cannot write to the directory {run_dir}: read-only file system."
    ], err


@needs_gloo
def test_a_new_run_s_out_is_checked_by_rank_0_alone(tmp_path: Path) -> None:
    """Only rank 0 writes the run: an --out on each node's own disk, not empty on another node
    (an old run there), refused the job as that rank's ("rank 1 of 2: --out 'run' is not
    empty")."""
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
    (tmp_path / "node1" / "run").mkdir()
    (tmp_path / "node1" / "run" / "old.txt").write_text("another run's\n")
    wrapper = tmp_path / "own_disk.py"
    wrapper.write_text(
        "import os\n\n"
        "from hessian_cli.cli import main\n\n"
        "os.chdir(f\"node{os.environ['RANK']}\")  # a node-local --out, as on two nodes\n"
        "main()\n"
    )
    code, _, err, _ = _run(
        _train_args(Path("run"), 32, "--max-steps", "2"),
        ranks=2,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT)},
        entry=(str(wrapper),),
    )
    assert code == 0, err
    assert (tmp_path / "node0" / "run" / "checkpoints" / "step0000002.pt").is_file()
    assert [p.name for p in (tmp_path / "node1" / "run").iterdir()] == ["old.txt"]


@needs_gloo
def test_a_thread_still_in_torch_when_a_rank_ends_does_not_abort_the_job(tmp_path: Path) -> None:
    """A rank that had done and written its work aborted now and then at exit ("terminate
    called without an active exception", SIGABRT; rank 0, twice in CI), and torchrun called the
    job failed: C++ ending a thread that was inside torch as Python tore itself down. Here a
    thread of the script's own goes on multiplying once the command is done, so that teardown
    meets it every time: the ranks end without the teardown and the job succeeds."""
    wrapper = tmp_path / "busy_thread.py"
    wrapper.write_text(
        "import threading\n\n"
        "import torch\n\n"
        "from hessian_cli.cli import main\n\n"
        "done = threading.Event()\n\n\n"
        "def multiply():\n"
        "    a = torch.ones(300, 300)\n"
        "    done.wait()\n"
        "    while True:\n"
        "        a @ a  # the lock Python holds is let go in here, and taken again after\n\n\n"
        "threading.Thread(target=multiply, daemon=True).start()\n"
        "try:\n"
        "    main()\n"
        "finally:  # reached only where the command ends as Python's own exit does\n"
        "    done.set()\n"
    )
    code, _, err, _ = _run(
        _train_args(tmp_path / "run", 32, "--max-steps", "2"),
        ranks=2,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT)},
        entry=(str(wrapper),),
    )
    assert code == 0, err
    assert "terminate called" not in err
    assert (tmp_path / "run" / "checkpoints" / "step0000002.pt").is_file()


@needs_gloo
def test_ctrl_c_under_torchrun_stops_at_a_checkpoint_that_resumes(tmp_path: Path) -> None:
    """Ctrl-C that reaches torchrun twice (from the terminal and from a wrapper in the same
    process group, e.g. `timeout`): torchrun sends each rank SIGINT, then SIGTERM. The copies are
    one request: a checkpoint at the step where the run stopped, which --resume continues (the
    SIGTERM was taken for a second request and stopped the run at once, without it)."""
    (tmp_path / "net.py").write_text(
        "import os\nimport signal\nimport time\nfrom pathlib import Path\n\nimport torch\n\n"
        "ARMED = Path(__file__).with_name('armed')\n\n\n"
        "class Net(torch.nn.Linear):\n"
        "    calls = 0\n\n"
        "    def forward(self, x):\n"
        "        Net.calls += 1\n"
        "        if Net.calls == 30 and os.environ['RANK'] == '0' and ARMED.exists():\n"
        "            ARMED.unlink()\n"
        "            os.kill(os.getppid(), signal.SIGINT)  # torchrun: the terminal's Ctrl-C\n"
        "            time.sleep(0.5)\n"
        "            os.kill(os.getppid(), signal.SIGINT)  # and the wrapper's copy\n"
        "            time.sleep(1.0)  # both reach the ranks mid-step\n"
        "        return super().forward(x.flatten(1))\n\n\n"
        "def make():\n"
        "    return Net(64, 10)\n"
    )
    (tmp_path / "armed").touch()
    run_dir = tmp_path / "run"
    args = ["train", "--model", f"{tmp_path}/net.py:make", "--data", "digits"]
    args += ["--optimizer", "sgd", "--epochs", "5", "--batch-size", "32"]
    args += ["--checkpoint-every", "0", "--quiet", "--out", str(run_dir)]
    code, _, err, _ = _run(args, ranks=2, cwd=tmp_path)
    words = " ".join(err.split())
    assert code != 0 and "stopped at once" not in words, err
    found = re.search(r"interrupted at step (\d+) of \d+: the last checkpoint is (\S+) ", words)
    assert found and f"--resume {run_dir}" in words, err
    step = int(found[1])
    (saved,) = (run_dir / "checkpoints").glob("step*.pt")
    assert str(saved) == found[2] and load_checkpoint(saved).metadata["step"] == step
    assert len(read_metrics(run_dir / "metrics.h5")["steps"]["step"]) == step

    resume = ["train", "--resume", str(run_dir), "--max-steps", str(step + 3), "--quiet"]
    code, _, err, _ = _run(resume, ranks=2, cwd=tmp_path)
    assert code == 0, err
    assert (run_dir / "checkpoints" / f"step{step + 3:07d}.pt").exists()
    assert len(read_metrics(run_dir / "metrics.h5")["steps"]["step"]) == step + 3


@needs_gloo
def test_sigterm_that_reaches_one_rank_stops_every_rank_as_sigterm(tmp_path: Path) -> None:
    """A scheduler's SIGTERM that reaches one node's ranks only (here rank 1) stops the run at a
    checkpoint on every rank, and every rank takes it as SIGTERM: rank 0 said "Interrupted at
    step 21" (a Ctrl-C's words) and went to exit 130 where rank 1 exited 143."""
    (tmp_path / "net.py").write_text(
        "import os\nimport signal\n\nimport torch\n\n\n"
        "class Net(torch.nn.Linear):\n"
        "    calls = 0\n\n"
        "    def forward(self, x):\n"
        "        Net.calls += 1\n"
        "        if Net.calls == 30 and os.environ['RANK'] == '1':\n"
        "            os.kill(os.getpid(), signal.SIGTERM)  # this rank's node preempted\n"
        "        return super().forward(x.flatten(1))\n\n\n"
        "def make():\n"
        "    return Net(64, 10)\n"
    )
    args = ["train", "--model", f"{tmp_path}/net.py:make", "--data", "digits"]
    args += ["--optimizer", "sgd", "--epochs", "5", "--batch-size", "32"]
    args += ["--checkpoint-every", "0", "--quiet", "--out", str(tmp_path / "run")]
    code, _, err, _ = _run(args, ranks=2, cwd=tmp_path)
    words = " ".join(err.split())
    assert code != 0 and "stopped by SIGTERM at step" in words and "interrupted at" not in words, (
        err
    )


@needs_gloo
def test_a_loss_that_is_not_finite_on_one_ranks_share_stops_a_series_once(tmp_path: Path) -> None:
    """step2's loss overflows on rank 1's share alone: rank 1 used to raise by itself (claiming
    the checkpoints before were kept), rank 0 lost its peer and wrote nothing. The sums now
    carry the NaN to every rank, rank 0 writes step1 and one line says why."""
    (tmp_path / "relu.py").write_text(
        "from torch import nn\n\n\n"
        "def make(**kw):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))\n"
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 64, generator=g)
    x[50:] *= 1e18  # rank 1's batch: finite, and its loss too, until the weights grow
    torch.save({"x": x, "y": torch.randint(0, 10, (100,), generator=g)}, tmp_path / "d.pt")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)
    )
    series = tmp_path / "series"
    series.mkdir()
    torch.save(model.state_dict(), series / "step1.pt")
    grown = {k: v * 1e12 if k.endswith("weight") else v for k, v in model.state_dict().items()}
    torch.save(grown, series / "step2.pt")
    args = ["analyze", str(series), "--model", "relu.py:make", "--data", "d.pt"]
    args += ["--num-samples", "100", "--batch-size", "50", "--top-k", "2", "-q"]
    code, _, err, seconds = _run([*args, "--out", "s.h5"], ranks=2, cwd=tmp_path, timeout=90)
    assert code != 0 and seconds < 60, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: step2.pt: the loss is not finite (NaN or inf) on the analysed data: check the "
        "weights and the data (the checkpoint before it was analysed and is kept)."
    ], err
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert list(f["checkpoints"]) == ["step1"]


@needs_gloo
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--params", "nomatch*"], "error: the model has no trainable parameters matching"),
        (["--params", "3.bias", "--top-k", "12"], "error: cannot compute 12 eigenpairs of a"),
    ],
)
def test_a_refusal_every_rank_meets_after_loading_is_said_once(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    """They were said by every rank, each as its own ("rank 0: ...", "rank 1: ...")."""
    args = ["analyze", str(CKPT), "--top-k", "2", *extra, "-q"]
    code, _, err, _ = _run(args, ranks=2, cwd=tmp_path, timeout=90)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(lines) == 1 and lines[0].startswith(message), err


@needs_gloo
def test_a_model_without_a_sound_hessian_is_refused_once(tmp_path: Path) -> None:
    """The operator's checks of the model ran at the first gradient, outside the agreement on
    refusals: each rank said it ("rank 0: ...", "rank 1: ...")."""
    (tmp_path / "drop.py").write_text(
        "import torch\n"
        "import torch.nn.functional as F\n"
        "from torch import nn\n\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 10)\n\n"
        "    def forward(self, x):\n"
        "        return self.b(F.dropout(torch.relu(self.a(x.flatten(1))), 0.1))\n\n\n"
        "def make(**kwargs):\n"
        "    return Net()\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        from drop import make  # noqa: PLC0415
    finally:
        sys.path.remove(str(tmp_path))
    torch.save(make().state_dict(), tmp_path / "ck.pt")
    args = ["analyze", "ck.pt", "--model", "drop.py:make", "--data", "digits"]
    args += ["--num-samples", "128", "--batch-size", "64", "--top-k", "2", "-q"]
    code, _, err, _ = _run(args, ranks=2, cwd=tmp_path, timeout=90)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(lines) == 1, err
    assert "draws random numbers in eval mode" in lines[0], err


@needs_gloo
def test_a_one_sample_batchnorm_batch_on_one_rank_is_refused_by_every_rank(
    tmp_path: Path,
) -> None:
    """The library's refusal came on the rank that held the batch alone, before a collective
    the other rank then waited in (or died in, as PeerLost)."""
    script = tmp_path / "one_sample.py"
    script.write_text(
        "import datetime\n"
        "import torch\n"
        "import torch.distributed as dist\n"
        "from torch import nn\n\n"
        "from hessian_cli.engine import HessianOperator\n"
        "from hessian_cli.errors import UserError\n\n"
        "dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=30))\n"
        "rank = dist.get_rank()\n"
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))\n"
        "x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))\n"
        "batches = [(x[:4], y[:4])] if rank == 0 else [(x[4:], y[4:])]\n"
        "try:\n"
        "    HessianOperator(model, nn.CrossEntropyLoss(), batches, bn='train')\n"
        "    said = 'built'\n"
        "except UserError as exc:\n"
        "    said = f'refused: {exc}'\n"
        "open(f'rank{rank}.txt', 'w').write(said)  # not stdout: the ranks' lines interleave\n"
        "dist.destroy_process_group()\n"
    )
    code, _, err, seconds = _run(
        [], ranks=2, cwd=tmp_path, timeout=90, env={"PYTHONPATH": str(ROOT)}, entry=(str(script),)
    )
    assert code == 0 and seconds < 60, err
    said = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert all(s.startswith("refused: ") for s in said), said
    assert "one sample has no statistics for BatchNorm" in said[0]


@needs_gloo
def test_a_ctrl_c_that_reaches_one_rank_alone_ends_the_job_at_once(tmp_path: Path) -> None:
    """One node's terminal signals its ranks only: the interrupted rank left through the
    barrier of leaving together, while its peer sat in a product's all-reduce, and both waited
    for the collective timeout (900 s; 60 s here)."""
    (tmp_path / "net.py").write_text(
        "import os\nimport signal\nimport threading\n\nimport torch\n\n"
        "if os.environ['RANK'] == '1':  # this rank's Ctrl-C, in the middle of the solve\n"
        "    threading.Timer(4.0, os.kill, (os.getpid(), signal.SIGINT)).start()\n\n\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n"
    )
    weights = 0.3 * torch.randn(10, 64, generator=torch.Generator().manual_seed(0))
    torch.save({"1.weight": weights, "1.bias": torch.zeros(10)}, tmp_path / "w.pt")
    # About 15 s of products on 650 batches (the signal comes at 4 s).
    args = ["analyze", "w.pt", "--model", "net.py:make", "--data", "digits", "--dtype", "float64"]
    args += ["--num-samples", "1300", "--batch-size", "2", "--top-k", "40", "--tol", "1e-12"]
    args += ["--max-hvps", "3000", "-q", "--out", "s.h5"]
    env = {"HESSIAN_CLI_COLLECTIVE_TIMEOUT": "60"}
    code, _, err, seconds = _run(args, ranks=2, cwd=tmp_path, timeout=150, env=env)
    assert code != 0 and seconds < 40, (seconds, err)
    assert "hessian_cli/" not in err, err  # no traceback of ours (torchrun prints its own)
    assert not (tmp_path / "s.h5").exists()


@needs_gloo
def test_a_language_model_of_named_inputs_runs_under_torchrun(
    monkeypatch, capsys, tmp_path: Path
) -> None:
    """Every rank failed comparing its data ("'dict' object has no attribute 'dtype'"). Here
    analyze; train's ranks compare named inputs in the padded-text tests below."""
    from test_token_labels import CODE

    (tmp_path / "lm.py").write_text(CODE)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(CODE, "lm", "exec"), ns)
    torch.save(ns["TinyLM"]().state_dict(), tmp_path / "lm.pt")
    specs = ["--model", "lm.py:lm", "--data", "lm.py:text"]
    analyze = ["analyze", "lm.pt", *specs, "--num-samples", "24", "--batch-size", "6", "--top-k",
               "2", "--trace", "--dtype", "float64", "--json", "-q"]  # fmt: skip
    code, out, err = _one_process(monkeypatch, capsys, analyze, tmp_path)
    assert code == 0, err
    code2, out2, err2, _ = _run(analyze, ranks=2, cwd=tmp_path)
    assert code2 == 0, err2
    one, two = json.loads(out)["eigen"], json.loads(out2)["eigen"]
    assert all(map(_close, one["eigenvalues"], two["eigenvalues"]))


def _one_process_and_two_ranks_train_alike(
    monkeypatch,
    capsys,
    tmp_path: Path,
    model: str,
    data: str,
    batch: int,
    options: list[str],
    checkpoint: str,
) -> None:
    """Eigen-SAM on one process with ``batch`` and on 2 ranks with half of it: the same weights
    in ``checkpoint``, and the same losses, lambda_max and refresh eigenvalues."""

    def args(name: str, size: int) -> list[str]:
        return ["train", "--model", model, "--data", data, "--optimizer", "eigensam",
                "--batch-size", str(size), *options, "--out", str(tmp_path / name), "-q"]  # fmt: skip

    code, _, err = _one_process(monkeypatch, capsys, args("one", batch), tmp_path)
    assert code == 0, err
    code, _, err, _ = _run(args("two", batch // 2), ranks=2, cwd=tmp_path)
    assert code == 0, err
    runs = {
        name: load_checkpoint(tmp_path / name / "checkpoints" / checkpoint).state_dict
        for name in ("one", "two")
    }
    for key in runs["one"]:
        torch.testing.assert_close(runs["two"][key], runs["one"][key], rtol=1e-5, atol=1e-5)
    with (
        h5py.File(tmp_path / "one" / "metrics.h5") as f1,
        h5py.File(tmp_path / "two" / "metrics.h5") as f2,
    ):
        for column in ("steps/loss", "track/lambda_max", "refresh/eigenvalue"):
            torch.testing.assert_close(
                torch.tensor(f2[column][()]),
                torch.tensor(f1[column][()]),
                rtol=1e-4,
                atol=0,
                equal_nan=True,  # the loss of a step whose minibatch held no label
            )


@needs_gloo
def test_train_two_ranks_of_padded_text_match_one_process(
    monkeypatch, capsys, tmp_path: Path
) -> None:
    """Each rank's loss averages over its own labelled tokens; weighted by samples, 2 ranks of
    batch 4 ended 0.068 away from one process of batch 8 (weights, losses, lambda_max too)."""
    example = Path(__file__).parents[1] / "checkpoints_example" / "tiny_lm.py"
    options = ["--eig-every", "3", "--track-every", "4", "--max-steps", "8"]
    _one_process_and_two_ranks_train_alike(
        monkeypatch,
        capsys,
        tmp_path,
        f"{example}:make",
        f"{example}:text",
        8,
        options,
        "step0000008.pt",
    )


@needs_gloo
def test_train_two_ranks_step_over_a_global_batch_of_padding_only_as_one_process(
    monkeypatch, capsys, tmp_path: Path
) -> None:
    """A global minibatch of padding only (steps 0 and 12 here) stopped the run on 2 ranks as on
    one ("a batch of the data holds no label"): both make no update there, alike."""
    (tmp_path / "texts.py").write_text(PADDED_TEXTS)
    options = ["--eig-every", "3", "--track-every", "4", "--epochs", "1"]
    _one_process_and_two_ranks_train_alike(
        monkeypatch, capsys, tmp_path, "texts.py:make", "texts.py:data", 2, options, "final.pt"
    )


@needs_gloo
def test_a_share_of_padding_only_moves_batchnorm_statistics_as_ddp(tmp_path: Path) -> None:
    """Rank 0's share of padding only in a global batch that is trained on: DDP's forward moves
    its BatchNorm statistics, which every rank keeps; they stayed (num_batches_tracked 0 after
    a step that updated the weights)."""
    first = DataOrder(16, 0).next_epoch()[:2].tolist()  # rank 0's share of step 0
    (tmp_path / "bnpad.py").write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "def data():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)\n"
        f"    y[{first}] = -100\n"
        "    return torch.utils.data.TensorDataset(x, y)\n\n\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))\n"
    )
    args = ["train", "--model", "bnpad.py:make", "--data", "bnpad.py:data", "--optimizer", "sgd",
            "--batch-size", "2", "--max-steps", "1", "--out", "run", "-q"]  # fmt: skip
    code, _, err, _ = _run(args, ranks=2, cwd=tmp_path)
    assert code == 0, err
    kept = load_checkpoint(tmp_path / "run" / "checkpoints" / "step0000001.pt").state_dict
    source = runpy.run_path(str(tmp_path / "bnpad.py"))
    torch.manual_seed(0)  # the run's seed, before it builds the model
    ddp = source["make"]()
    ddp(source["data"]().tensors[0][first])  # rank 0's forward, in training mode
    for name, buffer in ddp[1].named_buffers():
        torch.testing.assert_close(kept[f"1.{name}"], buffer, msg=name)


@needs_gloo
def test_train_two_ranks_with_a_share_of_padding_only_match_one_process(
    monkeypatch, capsys, tmp_path: Path
) -> None:
    """One sample holds no label (a one-token sequence): one process trains on the global batch
    that holds it, but the rank whose share it was alone refused it ("holds no label but -100"),
    or, from tensors, its 0/0 loss made every rank's sum NaN ("training diverged")."""
    example = Path(__file__).parents[1] / "checkpoints_example"
    (tmp_path / "onetoken.py").write_text(
        "import sys\n\n"
        f"sys.path.insert(0, {str(example)!r})\n"
        "from tiny_lm import MarkovText, TinyLM  # noqa: E402\n\n\n"
        "def make():\n"
        "    return TinyLM()\n\n\n"
        "def text():\n"
        "    train = MarkovText(16, seed=0)\n"
        "    train.ids[5, 1:], train.mask[5, 1:], train.labels[5] = 0, 0, -100\n"
        "    return train, MarkovText(8, seed=1)\n"
    )
    options = ["--eig-every", "1", "--track-every", "4", "--epochs", "1"]
    _one_process_and_two_ranks_train_alike(
        monkeypatch,
        capsys,
        tmp_path,
        "onetoken.py:make",
        "onetoken.py:text",
        2,
        options,
        "final.pt",
    )
