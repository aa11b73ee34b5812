"""The benchmark scripts' options and defaults (benchmarks/), without running a benchmark."""

import argparse
import importlib
import os
import runpy
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.append(str(BENCHMARKS))  # the scripts import each other

import peers  # noqa: E402

from hessian_cli.specs import build_model  # noqa: E402


def parse(monkeypatch: pytest.MonkeyPatch, *argv: str):
    monkeypatch.setattr(sys, "argv", ["peers.py", *argv])
    return peers.parse_args()


SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if "run_main(main)" in p.read_text())


def run_script(monkeypatch: pytest.MonkeyPatch, script: str, *argv: str) -> None:
    """``python benchmarks/SCRIPT.py ARGV`` in this process."""
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    importlib.import_module(script).main()


def build(spec: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(spec, input_shape=(3, 32, 32), num_classes=10)


def test_cuda_default_model_builds_without_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision fails
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda is taken
    model = build(parse(monkeypatch, "--device", "cuda").model)
    assert sum(p.numel() for p in model.parameters()) == 11_181_642


def test_peers_quick_runs_a_small_model_once_where_not_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--quick is a smoke test: on ResNet-20 its HVP costs alone took 137 s of a loaded 2-core
    machine. Sizes given on the command line, and the full run's defaults, stay as they were."""
    quick = parse(monkeypatch, "--quick")
    assert sum(p.numel() for p in build(quick.model).parameters()) < 10_000
    assert quick.reps == 1 and quick.batch < 16 and quick.k < 5 and quick.many_k < 10
    given = parse(monkeypatch, "--quick", "--model", "resnet20", "--k", "5", "--reps", "3")
    assert (given.model, given.k, given.reps) == ("resnet20", 5, 3)
    full = parse(monkeypatch)
    assert (full.model, full.k, full.reps, full.many_k) == ("resnet20", 5, 2, 50)


def test_peers_header_names_a_peer_that_does_not_import(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A peer installed but failing to import was shown with its version, then failed once per
    row: the header says so once."""
    monkeypatch.setitem(sys.modules, "pyhessian", None)  # import pyhessian fails
    # and hessian-eigenthings imports, installed or not (CI installs no [bench] extra)
    monkeypatch.setitem(sys.modules, "hessian_eigenthings", types.ModuleType("stand-in"))
    args = peers.argparse.Namespace(model="mlp", checkpoint="", batch=2)
    batch = (torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    peers.header(peers.Bench(args, torch.device("cpu"), build("mlp"), [batch]))
    out = capsys.readouterr().out
    assert "PyHessian does not import (" in out
    assert "does not import" not in out.split("hessian-eigenthings")[1]


def test_resnet18_copy_has_torchvisions_weights() -> None:
    pytest.importorskip("torchvision")
    ours = build(f"{peers.Path(peers.__file__).with_name('resnet18.py')}:resnet18")
    theirs = build("torchvision:resnet18")
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_overhead_cpu_default_model_needs_no_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    import overhead

    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setattr(sys, "argv", ["overhead.py", "--device", "cpu"])
    model = build(overhead.parse_args().model)
    assert sum(p.numel() for p in model.parameters()) == 272_474  # ResNet-20


def test_solver_cost_spectrum_below_200_entries() -> None:
    import solver_cost

    values = solver_cost.spectrum(150)
    assert values.shape == (150,) and torch.allclose(values[:2], torch.tensor([1000.0, 500.0]))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--n", "10", "--k", "5,20"), "--k 20 is more eigenpairs than --n 10 has"),
        (("--n", "10", "--k", "0"), "--n and each --k must be at least 1"),
        (("--n", "10", "--k", "2", "--blocks", "default,0"), "each --blocks must be at least 1"),
        (("--k", "5,x"), "argument --k: 'x' is not a whole number (or default)"),
        (("--blocks", "1,two"), "argument --blocks: 'two' is not a whole number (or default)"),
    ],
)
def test_solver_cost_refuses_what_no_solve_runs_with_before_any_row(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, args: tuple, message: str
) -> None:
    """The engine's refusal came as a traceback, after the rows before it."""
    import solver_cost

    monkeypatch.setattr(sys, "argv", ["solver_cost.py", *args])
    with pytest.raises(SystemExit):
        solver_cost.main()
    out, err = capsys.readouterr()
    assert message in err and not out


@pytest.mark.parametrize("option", ["--reps", "--probes", "--batch", "--many-k"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_peers_refuses_counts_below_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, option: str, value: str
) -> None:
    with pytest.raises(SystemExit):
        parse(monkeypatch, option, value)
    assert f"{option} must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--reps", "--batches"])
def test_overhead_refuses_counts_below_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, option: str
) -> None:
    import overhead

    monkeypatch.setattr(sys, "argv", ["overhead.py", option, "0"])
    with pytest.raises(SystemExit):
        overhead.parse_args()
    assert f"{option} must be at least 1" in capsys.readouterr().err


def test_overhead_batchnorm_rows_without_batchnorm(capsys: pytest.CaptureFixture) -> None:
    import overhead

    model = build("mlp").eval()
    batch = (torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    overhead.batchnorm_rows(model, batch, torch.device("cpu"), reps=1)
    assert "no BatchNorm layer" in capsys.readouterr().out


def session(tmp_path: Path, total_s: int) -> list[str]:
    """gpu_session.sh's steps in the order it ran them, with gpu.sh and gpu_tests.sh stubbed."""
    root = Path(__file__).parents[1]
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    shutil.copy(root / "benchmarks" / "gpu_session.sh", bench)
    for name in ("gpu.sh", "gpu_tests.sh"):
        (bench / name).write_text(f'echo {name} >> "$OUT/order"\n')
    env = {**os.environ, "OUT": str(tmp_path / "out"), "TOTAL_S": str(total_s)}
    subprocess.run(["bash", str(bench / "gpu_session.sh")], env=env, check=True)
    return (tmp_path / "out" / "order").read_text().split()


def test_gpu_session_runs_the_benchmarks_before_the_tests(tmp_path: Path) -> None:
    assert session(tmp_path, 560) == ["gpu.sh", "gpu_tests.sh"]


def test_gpu_session_short_of_time_cuts_the_tests(tmp_path: Path) -> None:
    assert session(tmp_path, 10) == ["gpu.sh"]


def gpu_sh_calls(tmp_path: Path, *argv: str, device: str = "cpu") -> list[list[str]]:
    """The arguments gpu.sh passed to its python (a script's path first), with a python that
    only records them."""
    root = Path(__file__).parents[1]
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    shutil.copy(root / "benchmarks" / "gpu.sh", bench)
    python = tmp_path / "python"
    python.write_text('#!/usr/bin/env bash\necho "$@" >> "$CALLS"\n')
    python.chmod(0o755)
    calls = tmp_path / "calls"
    env = {**os.environ, "PYTHON": str(python), "CALLS": str(calls), "DEVICE": device}
    env.update(LOG=str(tmp_path / "log"), WHEELS=str(tmp_path / "none"))
    for name in ("SEEDS", "DATALOADER_SEEDS", "MANY_K"):
        env.pop(name, None)
    subprocess.run(["bash", str(bench / "gpu.sh"), *argv], env=env, check=True, capture_output=True)
    return [line.split() for line in calls.read_text().splitlines() if ".py" in line]


def gpu_sh_peers_calls(tmp_path: Path, *argv: str) -> list[list[str]]:
    """The arguments gpu.sh passed to peers.py."""
    return [argv for argv in gpu_sh_calls(tmp_path, *argv) if argv[0].endswith("peers.py")]


def test_gpu_sh_quick_runs_one_start_per_tool(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """gpu.sh's smoke test keeps peers.py's --quick sizes: it passed 3 seeds (2 in the
    dataloader case) and many-k 10, tripling the top-k runs of a smoke test."""
    calls = gpu_sh_peers_calls(tmp_path, "--quick")
    assert len(calls) == 2  # every case but many, then many
    for argv in calls:
        assert argv[argv.index("--seeds") + 1] == "1"
        assert argv[argv.index("--dataloader-seeds") + 1] == "1"
        assert int(argv[argv.index("--many-k") + 1]) == parse(monkeypatch, "--quick").many_k


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help_at_once_and_refuses_an_unknown_option(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, script: str
) -> None:
    """error_bounds.py had no parser: `--help`, or a misspelt option, ran the whole benchmark."""
    with pytest.raises(SystemExit) as help_exit:
        run_script(monkeypatch, script, "--help")
    assert help_exit.value.code == 0 and "usage:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad_exit:
        run_script(monkeypatch, script, "--no-such-option")
    assert bad_exit.value.code == 2 and "--no-such-option" in capsys.readouterr().err


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_scripts_help_is_its_docstring_and_says_what_each_option_is(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, script: str
) -> None:
    """restart_policy.py's and warm_start.py's help stopped mid-sentence at the docstring's
    first line break, and options such as `--seeds SEEDS` said nothing of what they count."""
    parsers: list[argparse.ArgumentParser] = []
    parse = argparse.ArgumentParser.parse_args

    def recorded(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        parsers.append(self)
        return parse(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", recorded)
    with pytest.raises(SystemExit):
        run_script(monkeypatch, script, "--help")
    out = " ".join(capsys.readouterr().out.split())
    assert " ".join(importlib.import_module(script).__doc__.split()) in out
    unsaid = [a.dest for a in parsers[0]._actions if a.option_strings and not a.help]
    assert not unsaid, f"options without help: {unsaid}"


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("known_eigenpairs", ["--seeds", "0"], "--seeds: must be at least 1, not 0"),
        ("known_eigenpairs", ["--probes", "12,x"], "--probes: 'x' is not a whole number"),
        ("known_eigenpairs", ["--density", "8"], "--density: '8' is not PROBESxSTEPS"),
        ("known_eigenpairs", ["--density", "8x1"], "--density: must be at least 2, not 1"),
        ("known_eigenpairs", ["--parts", "trace,dens"], "--parts: unknown dens: choose"),
        ("known_eigenpairs", ["--parts", ","], "--parts: ',' names nothing"),
        ("known_eigenpairs", ["--probes", ","], "--probes: ',' names nothing"),
        ("restart_policy", ["--seeds", "0"], "--seeds: must be at least 1, not 0"),
        ("skip_check", ["--steps", "0,a"], "--steps: 'a' is not a whole number"),
        ("skip_check", ["--seeds", "0"], "--seeds: must be at least 1, not 0"),
        ("warm_start", ["--every", "0"], "--every: must be at least 1, not 0"),
        ("warm_start", ["--every", "700"], "--every 700 leaves no checkpoint in --steps 600"),
        ("warm_start", ["--tol", "1e-4,0"], "--tol: must be a positive number below 1, not 0"),
        ("sam_memory", ["--params", "5"], "--params: must be at least 10, not 5"),
    ],
)
def test_scripts_refuse_counts_they_cannot_run_with_before_any_work(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    script: str,
    argv: list[str],
    message: str,
) -> None:
    """Each ended in a traceback (a division by zero over no seeds or checkpoints, int('x')),
    some after minutes of work (warm_start.py trained its series first)."""
    with pytest.raises(SystemExit) as exit:
        run_script(monkeypatch, script, *argv)
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and message in err and not out


@pytest.mark.parametrize("script", ["peers", "overhead", "solver_cost"])
@pytest.mark.parametrize(
    ("given", "message"),
    [("cuda", "no CUDA device is available"), ("gpu", "unknown device 'gpu'")],
)
def test_scripts_refuse_a_device_torch_cannot_use_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    script: str,
    given: str,
    message: str,
) -> None:
    """torch's own traceback came at the first tensor moved, after the model was built."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--device", given])
    with pytest.raises(SystemExit) as exit:
        importlib.import_module(script).parse_args()
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "argument --device" in err and message in err


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("peers", ["--quick", "--model", "nosuch"], "unknown model 'nosuch'"),
        ("peers", ["--quick", "--checkpoint", "/no/such.pt"], "'/no/such.pt' does not exist"),
        ("overhead", ["--device", "cpu", "--model", "nosuch"], "unknown model 'nosuch'"),
    ],
)
def test_scripts_say_the_engines_refusal_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    script: str,
    argv: list[str],
    message: str,
) -> None:
    """The engine's one-sentence refusal came at the end of a traceback."""
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(BENCHMARKS / f"{script}.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith(f"{script}.py: error: ") and message in err


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux's /proc only")
def test_sam_memory_rows_hold_the_parameters_asked_for(capsys: pytest.CaptureFixture) -> None:
    """--params 1000005 held 1,000,000 parameters, and the Eigen-SAM row failed on its
    eigenvector of 1,000,005."""
    import sam_memory

    assert sum(p.numel() for p in sam_memory.parameters(1005)) == 1005
    sam_memory.measure("eigensam", 1005)
    assert float(capsys.readouterr().out) >= 0  # the row's growth in MB


def test_sam_memory_says_why_a_row_failed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A row's process failing (say /proc/self/clear_refs not writable) was a
    CalledProcessError naming the command, its captured reason lost."""
    import sam_memory

    reason = "PermissionError: [Errno 13] Permission denied: '/proc/self/clear_refs'"

    def failing(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(
            argv, 1, "", f"Traceback (most recent call last):\n{reason}\n"
        )

    monkeypatch.setattr(sam_memory.subprocess, "run", failing)
    monkeypatch.setattr(sys, "argv", ["sam_memory.py", "--params", "100"])
    with pytest.raises(SystemExit) as exit:
        sam_memory.main()
    assert exit.value.code == f"sam_memory.py: the sam row failed: {reason}"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--tol", "-1", "--tol: must be a positive number below 1, not -1"),
        ("--low-tol", "1", "--low-tol: must be a positive number below 1, not 1"),
        ("--threads", "-1", "--threads: must be at least 0, not -1"),
    ],
)
def test_peers_refuses_a_tolerance_or_thread_count_before_any_case(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    option: str,
    value: str,
    message: str,
) -> None:
    """--tol -1 ran every case to one failed row per solve; --threads -1 was torch's traceback."""
    with pytest.raises(SystemExit):
        parse(monkeypatch, option, value)
    assert message in capsys.readouterr().err


def run_into_a_closed_pipe(script: str, *argv: str) -> subprocess.CompletedProcess:
    """``python benchmarks/SCRIPT.py ARGV | head`` where head has gone before the first line."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, str(BENCHMARKS / f"{script}.py"), *argv],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write)


@pytest.mark.parametrize(
    "argv",
    [
        ["solver_cost", "--n", "50", "--k", "2", "--blocks", "1"],
        ["error_bounds"],  # one of the scripts not run through run_main before
        ["skip_check", "--seeds", "1", "--steps", "1"],
    ],
)
def test_a_benchmark_piped_into_head_stops_quietly(argv: list[str]) -> None:
    """``peers.py | head`` ended in a BrokenPipeError's traceback, exit status 1."""
    done = run_into_a_closed_pipe(*argv)
    assert (done.returncode, done.stderr) == (141, "")


def test_peers_cases_take_a_trailing_comma_and_name_what_they_refuse(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``--cases top-k,`` was refused as "unknown case(s) :", naming nothing."""
    assert parse(monkeypatch, "--cases", "top-k,").cases == ["top-k"]
    for given, message in (
        ("top-k,tops", "unknown case(s) tops: choose from costs,"),
        (",", "',' names nothing"),
    ):
        with pytest.raises(SystemExit):
            parse(monkeypatch, "--cases", given)
        assert f"argument --cases: {message}" in capsys.readouterr().err


def test_peers_runs_the_reference_before_the_cases_measured_against_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--cases top-k,reference`` ran top-k with no reference: its rows had no error."""
    cases = parse(monkeypatch, "--cases", "trace,top-k,reference,trace").cases
    assert cases == ["reference", "trace", "top-k"]


def test_gpu_sh_quick_on_cuda_runs_every_script_at_small_sizes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On CUDA, gpu.sh --quick ran overhead.py (ResNet-18, batches of 256) and solver_cost.py
    (11 million entries, 50 eigenpairs) at full size: ~100 s of a smoke test on an H200."""
    import overhead
    import solver_cost

    calls = {
        Path(argv[0]).stem: argv[1:] for argv in gpu_sh_calls(tmp_path, "--quick", device="cuda")
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda is taken
    monkeypatch.setattr(sys, "argv", ["overhead.py", *calls["overhead"]])
    sizes = overhead.parse_args()
    assert sum(p.numel() for p in build(sizes.model).parameters()) < 10_000
    assert sizes.batch < 16 and sizes.reps == 1
    monkeypatch.setattr(sys, "argv", ["solver_cost.py", *calls["solver_cost"]])
    sizes = solver_cost.parse_args()
    assert sizes.n < 100_000 and max(sizes.k) < 5


def test_gpu_sh_measures_issue_6s_targets_first(tmp_path: Path) -> None:
    """A GPU run cut at its time limit loses the least: top-1/top-5 against the peers, trace,
    density and the dataloader case came after the HVP costs (20 s on an H200), and the costs'
    block-1 product, the last target, before reduced precision."""
    first, *_ = gpu_sh_peers_calls(tmp_path)
    cases = first[first.index("--cases") + 1].split(",")
    targets = ["reference", "top-k", "trace", "density", "dataloader", "costs"]
    assert cases[: len(targets)] == targets and cases[len(targets) :] == ["precision"]


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("arguments", "run a script, e.g. python benchmarks/peers.py --help"),
        ("resnet18", "python benchmarks/peers.py --model benchmarks/resnet18.py:resnet18"),
    ],
)
def test_a_module_run_as_a_script_says_what_to_run(module: str, message: str) -> None:
    """``python benchmarks/resnet18.py --help`` printed nothing and exited 0."""
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(BENCHMARKS / f"{module}.py"), run_name="__main__")
    assert isinstance(exit.value.code, str) and exit.value.code.endswith(message)


def test_a_benchmark_stopped_by_ctrl_c_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Ctrl-C in a long benchmark (peers.py on a CPU runs for half an hour) was a traceback."""
    import arguments

    def interrupted() -> None:
        print("# a row measured before the Ctrl-C")
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["peers.py"])
    with pytest.raises(SystemExit) as exit:
        arguments.run_main(interrupted)
    out, err = capsys.readouterr()
    assert exit.value.code == 130 and err == "peers.py: interrupted by Ctrl-C.\n"
    assert out == "# a row measured before the Ctrl-C\n"


def test_restart_policy_random_0_prints_no_table_of_random_solves(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``--random 0`` ("0: none") printed "0 random solves" and a row of zeros per policy,
    as if each had solved them with no product."""
    import restart_policy

    monkeypatch.setattr(restart_policy, "known_spectra", lambda seeds: print("known spectra"))
    run_script(monkeypatch, "restart_policy", "--seeds", "1", "--random", "0")
    assert capsys.readouterr().out == "known spectra\n"


def test_known_eigenpairs_parts_take_a_trailing_comma() -> None:
    """``--parts trace,`` was refused as "unknown --parts ", naming nothing."""
    import known_eigenpairs

    assert known_eigenpairs.parts("trace,") == ["trace"]


@pytest.mark.parametrize(
    ("script", "option", "given", "taken"),
    [
        ("known_eigenpairs", "--probes", "12,30,", [12, 30]),
        ("warm_start", "--tol", "1e-4,", [1e-4]),
        ("skip_check", "--steps", "0,3,", [0, 3]),
        ("solver_cost", "--k", "5,", [5]),
    ],
)
def test_lists_of_numbers_take_a_trailing_comma(
    monkeypatch: pytest.MonkeyPatch, script: str, option: str, given: str, taken: list
) -> None:
    """``--probes 12,30,`` was refused as "'' is not a whole number" (solver_cost.py's
    ``--k 5,`` as "invalid counts value"), where names took a trailing comma."""
    parsed = []
    monkeypatch.setattr(
        argparse.ArgumentParser,
        "parse_args",
        lambda self: parsed.append(self.parse_known_args([option, given])[0]) or sys.exit(0),
    )
    with pytest.raises(SystemExit):
        run_script(monkeypatch, script)
    assert getattr(parsed[0], option.lstrip("-")) == taken


def test_error_bounds_names_its_columns(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Its rows were bare fields ("100 0 stalled 0.14 max actual ..."), which said nothing of
    which number was the seed and which the ratio that must stay below 1."""
    run_script(monkeypatch, "error_bounds")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| n | seed | stop | max error / bound | max error | min bound |"
    assert len(lines) == 2 + 12 + 2 and all(line.startswith("| ") for line in lines[2:14])
    assert lines[-1].startswith("worst error / bound: ")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_bench_installs_both_peers(tmp_path: Path) -> None:
    """``make bench`` installed hessian-eigenthings alone (the bench extra): every PyHessian row
    failed and the targets against it had no ratio."""
    root = Path(__file__).parents[1]
    stamp = tmp_path / ".installed"
    stamp.touch()  # the venv's install, made: only the bench recipe is printed
    dry = subprocess.run(
        ["make", "-n", "-C", str(root), "bench", f"STAMP={stamp}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    installs = [line for line in dry.stdout.splitlines() if "pip install" in line]
    assert any(".[bench]" in line and "pyhessian==" in line for line in installs)


def test_a_benchmark_started_with_stdout_closed_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """``python benchmarks/peers.py >&-`` (standard output closed: sys.stdout is None) ended in
    an AttributeError from the flush on the way out."""
    import arguments

    monkeypatch.setattr(sys, "stdout", None)
    ran = []
    arguments.run_main(lambda: ran.append(True))
    assert ran == [True]
