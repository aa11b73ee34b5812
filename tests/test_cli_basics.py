import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hessian_cli import __version__


def test_version_and_help_run_as_module():
    out = subprocess.run(
        [sys.executable, "-m", "hessian_cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"hessian-cli {__version__}"
    helptext = subprocess.run(
        [sys.executable, "-m", "hessian_cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "Hessian spectra" in helptext


@pytest.mark.parametrize("command", [[], ["analyze"], ["train"], ["show"], ["plot"]])
def test_h_is_help_as_most_tools_take_it(command: list[str]) -> None:
    """``-h`` was "No such option: -h" (exit 2)."""
    out = subprocess.run(
        [sys.executable, "-m", "hessian_cli", *command, "-h"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert " ".join(["Usage:", "python -m hessian_cli", *command]) in " ".join(out.stdout.split())


def test_help_and_version_do_not_load_the_numerical_stack():
    """--help and --version answer at once: no command imports torch, h5py or matplotlib until
    it runs (torch alone takes seconds to import)."""
    script = (
        "import sys\n"
        "from hessian_cli.cli import main\n"
        "for argv in (['--help'], ['--version'], ['analyze', '--help'], ['train', '--help']):\n"
        "    sys.argv = ['hessian-cli', *argv]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'h5py', 'matplotlib', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert "Eigen-SAM" in out  # the help texts were printed
    assert out.strip().splitlines()[-1] == "[]"


def test_only_version_reads_the_package_metadata():
    """Importing the app read the installed package's metadata, for --version, at every start
    (--help, a usage error)."""
    script = (
        "import sys, importlib.metadata as metadata\n"
        "read = []\n"
        "metadata.version = lambda name: read.append(name) or '9.9'\n"
        "from hessian_cli.cli import main\n"
        "for argv in (['show', '--help'], ['analyze'], ['--version']):\n"
        "    sys.argv = ['hessian-cli', *argv]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    print(argv[0], read, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.endswith("hessian-cli 9.9\n")
    read = [line for line in done.stderr.splitlines() if not line.startswith("error:")]
    assert read[:2] == ["show []", "analyze []"], done.stderr
    assert read[2].startswith("--version ['hessian-cli'"), done.stderr


def test_ctrl_c_while_the_cli_loads_exits_130_without_a_traceback(monkeypatch, capsys):
    import hessian_cli.__main__ as entry

    app = importlib.import_module("hessian_cli.cli.app")  # the package's `app` is the Typer app

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(app, "load_commands", interrupted)
    with pytest.raises(SystemExit) as stopped:
        entry.main()
    assert stopped.value.code == 130
    assert capsys.readouterr().err == "interrupted by Ctrl-C.\n"  # it said nothing


def test_a_ctrl_c_no_command_caught_says_so(monkeypatch, capsys):
    """Typer ends a command that a Ctrl-C escaped (importing torch, the first seconds of
    analyze) with status 130 and no word; a command's own word for it is said alone."""
    from cli_runner import run

    from hessian_cli.cli import show

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(show, "read_result_file", interrupted)
    assert run(capsys, "show", "spectra.h5")[::2] == (130, "interrupted by Ctrl-C.\n")


def test_ctrl_c_inside_numpys_import_stops_the_command(tmp_path):
    """torch's C initialisation imports numpy and swallows what that raises: a Ctrl-C there let
    the analysis run on to exit 0 (and a later numpy use could fail on the half-made module)."""
    script = (
        "import sys\n"
        "class Interrupt:\n"
        "    fired = False\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'numpy.linalg' and not Interrupt.fired:\n"
        "            Interrupt.fired = True\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "sys.argv = ['hessian-cli', 'analyze', sys.argv[1], '--top-k', '1']\n"
        "from hessian_cli.__main__ import main\n"
        "main()\n"
    )
    checkpoint = Path(__file__).parents[1] / "checkpoints_example" / "digits_mlp.pt"
    done = subprocess.run(
        [sys.executable, "-c", script, str(checkpoint)], capture_output=True, text=True
    )
    assert done.returncode == 130
    assert done.stdout == ""
    assert "Traceback" not in done.stderr


def test_eigensam_names_load_on_first_use():
    import eigensam

    for name in eigensam.__all__:
        assert getattr(eigensam, name).__name__ == name
    assert sorted(eigensam.__all__) == sorted(eigensam._HOMES)


def test_help_at_80_columns_cuts_off_no_option_and_shows_train_defaults():
    """Names joined by slashes were one word Rich cut ("fashion-mn…", svhn lost); train's
    defaults were swallowed as markup once written as analyze's are."""
    for command in ("analyze", "train", "show", "plot"):
        helptext = subprocess.run(
            [sys.executable, "-m", "hessian_cli", command, "--help"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "COLUMNS": "80", "TERM": "dumb"},
        ).stdout
        assert "…" not in helptext, command
        if command in ("analyze", "train"):
            assert "svhn" in helptext and "synthetic-regression" in helptext
        if command == "train":
            assert "[default: 0.05]" in helptext  # --rho


def test_train_and_plot_take_the_option_names_analyze_takes():
    from typer.testing import CliRunner

    from hessian_cli.cli import app

    load = importlib.import_module("hessian_cli.cli.app").load_commands
    load()
    runner = CliRunner()
    # Refused for the missing run directory, not for an unknown option.
    result = runner.invoke(app, ["train", "-m", "mlp", "-d", "digits", "-b", "8"])
    assert result.exit_code != 0 and "no such option" not in result.output.lower()
    result = runner.invoke(app, ["plot", "missing.h5", "--out", "fig.png"])
    assert "no such option" not in result.output.lower()


@pytest.mark.parametrize(
    "command",
    [
        ["analyze", "checkpoints_example/digits_mlp.pt", "--out"],
        ["train", "-m", "mlp", "-d", "digits", "--optimizer", "sgd", "--out"],
        ["plot", "spectra.h5", "-o"],
    ],
)
def test_an_output_under_a_file_is_refused_in_the_same_words_by_every_command(
    capsys, tmp_path, command
):
    """`--out notes.txt/run` was "--out 'notes.txt/run' lies under 'notes.txt', a file." in
    train, "The output directory notes.txt is not a directory." in analyze, and plot -o said
    "Could not create the output directory notes.txt: file exists." once it had drawn."""
    from cli_runner import one_sentence, run

    tmp_path = tmp_path.resolve()  # as analyze names it
    (tmp_path / "notes.txt").write_text("mine")
    given = tmp_path / "notes.txt" / "run" / "out.h5"
    code, _, err = run(capsys, *command, given)
    said = f"{command[-1]} {given} lies under {tmp_path / 'notes.txt'}, which is not a directory."
    assert code == 2 and one_sentence(err) == f"error: {said}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_signal_the_process_was_started_to_ignore_stays_ignored():
    """A script's background job ignores SIGINT: train took it over (and stopped on the
    terminal's Ctrl-C meant for the script) where analyze, as Python does, left it."""
    import signal

    from hessian_cli.cli.app import signal_handled

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signal_handled(signal.SIGINT, lambda signum, frame: None):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)

    def handler(signum, frame):
        return None

    with signal_handled(signal.SIGINT, handler):  # otherwise taken over, and given back
        assert signal.getsignal(signal.SIGINT) is handler
    assert signal.getsignal(signal.SIGINT) is previous


def test_messages_into_a_log_are_one_line_each_without_a_blank_line_before():
    """stderr into a file was wrapped at 80 columns mid-sentence (grep missed it), and the
    spinner's end left an empty line before every error."""
    checkpoint = Path(__file__).parents[1] / "checkpoints_example" / "digits_mlp.pt"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run(
        [sys.executable, "-m", "hessian_cli", "analyze", checkpoint, "--tol", "1e-10"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert done.returncode == 3
    (line,) = done.stderr.splitlines()
    assert line.startswith("not converged to tol 1e-10") and len(line) > 100
    missing = subprocess.run(
        [sys.executable, "-m", "hessian_cli", "analyze", "no_such.pt"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert missing.returncode == 2 and missing.stderr.startswith("error: no such checkpoint")


def test_debug_after_the_command_shows_the_traceback(capsys):
    """Users add --debug at the end: it was "No such option: --debug"."""
    from cli_runner import run

    code, _, err = run(capsys, "analyze", "no_such.pt", "--debug")
    assert code == 2 and "Traceback" in err and "no such checkpoint" in err
    code, _, err = run(capsys, "analyze", "no_such.pt")
    assert code == 2 and "Traceback" not in err


def test_every_debug_after_the_command_is_taken(capsys):
    from cli_runner import run

    from hessian_cli.cli.app import _debug_first

    code, _, err = run(capsys, "--debug", "analyze", "no_such.pt", "--debug")
    assert code == 2 and "Traceback" in err
    assert _debug_first(["show", "a.h5", "--debug", "--", "--debug"]) == [
        "--debug",
        "show",
        "a.h5",
        "--",
        "--debug",
    ]


def _help(command: str, *, columns: int) -> str:
    """``command --help`` as a terminal ``columns`` wide shows it (its own process: Rich reads
    the width at import)."""
    return subprocess.run(
        [sys.executable, "-m", "hessian_cli", command, "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": str(columns)},
    ).stdout


@pytest.mark.parametrize("command", ["analyze", "train"])
def test_help_shows_no_type_beside_a_flag(command: str) -> None:
    """Typer's help showed every flag as `--trace <bool>`, as if it took a value: users wrote
    `--trace true`, which made `true` a checkpoint name (`train --quiet true`: an extra
    argument). Options that take a value keep their type."""
    out = _help(command, columns=200)
    assert "--quiet" in out and "<bool>" not in out
    assert "<int>" in out  # --batch-size


def test_help_shows_the_type_of_one_value_of_a_repeated_option_or_argument() -> None:
    """analyze --help showed `TARGET <list[str]>` and `--params <list[str]>`, as if a Python
    list were wanted."""
    out = subprocess.run(
        [sys.executable, "-m", "hessian_cli", "analyze", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    assert "list[" not in out
    assert re.search(r"TARGET +<str>\.\.\. ", out) and re.search(r"--params +<str> ", out)


@pytest.mark.parametrize(
    ("args", "given"),
    [
        (["train", "--quiet", "true"], "--quiet true"),
        (["train", "--model", "mlp", "-q", "1"], "-q 1"),
        (["show", "s.h5", "--json", "yes"], "--json yes"),
        (["show", "--all", "no", "s.h5"], "--all no"),
    ],
)
def test_every_commands_flag_given_a_value_is_told_that_it_takes_none(capsys, args, given):
    """train and show said "Got unexpected extra argument(s) (true)" (show --json yes s.h5:
    "(s.h5)"), where analyze's `--trace true` was told that a flag takes no value."""
    from cli_runner import run

    code, _, err = run(capsys, *args)
    flag = given.split()[0]
    assert code == 2
    assert err == (
        f"error: {flag} takes no value: give it alone to turn it on, or leave it out (not "
        f"{given}). See 'hessian-cli {args[0]} --help'.\n"  # the command's usage error
    )


def test_a_file_named_as_a_flag_value_is_an_argument(capsys, tmp_path, monkeypatch):
    """`show --json 1` shows the file 1 where there is one: only a missing file is a value."""
    from cli_runner import run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "1").write_text("not hdf5")
    code, _, err = run(capsys, "show", "--json", "1")
    assert code == 2 and "is not an HDF5 file" in err and "takes no value" not in err


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["analyze", "m.pt", "-k", "2.5"],
            "invalid value for '--top-k' / '-k': '2.5' is not a whole number.",
        ),
        (
            ["analyze", "m.pt", "--tol", "1e-4x"],
            "invalid value for '--tol': '1e-4x' is not a number.",
        ),
        (["train", "--epochs", "x"], "invalid value for '--epochs': 'x' is not a whole number."),
    ],
)
def test_a_value_of_the_wrong_type_is_named_with_the_kind_wanted(capsys, args, said):
    """Typer's words named neither the value nor the kind: "Input should be a valid integer,
    unable to parse string as an integer" (--top-k 2.5), "... a valid number" (--tol)."""
    from cli_runner import run

    code, _, err = run(capsys, *args)
    assert code == 2
    assert err == f"error: {said} See 'hessian-cli {args[0]} --help'.\n"


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["analyze"], "missing argument 'TARGET'. See 'hessian-cli analyze --help'."),
        (
            ["analyze", "m.pt", "--topk", "3"],
            "no such option: --topk. Did you mean --top-k, --tol or --dtype? See "
            "'hessian-cli analyze --help'.",
        ),
        (
            ["analyz", "m.pt"],
            "no such command 'analyz'. Did you mean 'analyze'? See 'hessian-cli --help'.",
        ),
        (["--bogus", "show"], "no such option: --bogus. See 'hessian-cli --help'."),
        (
            ["train", "runs/a"],  # (show's and plot's files past the first say how to compare)
            "got unexpected extra argument(s) (runs/a). See 'hessian-cli train --help'.",
        ),
        # A command's option given before it was "No such option", as if there were none.
        (
            ["-q", "analyze", "m.pt"],
            "-q goes after the command's name: it is an option of analyze and train. See "
            "'hessian-cli --help'.",
        ),
        (
            ["--checkpoint", "final", "show", "s.h5"],
            "--checkpoint goes after the command's name: it is an option of plot and show. See "
            "'hessian-cli --help'.",
        ),
        # And the program's own after a command: "Did you mean --precision, --criterion or --json?"
        (
            ["analyze", "--version"],
            "--version goes before the command's name: it is an option of hessian-cli itself. "
            "See 'hessian-cli analyze --help'.",
        ),
        # Click's errors of an option's use name no command: the command is the one given.
        (
            ["plot", "s.h5", "-o"],
            "option '-o' requires an argument. See 'hessian-cli plot --help'.",
        ),
        (
            ["show", "s.h5", "--json=yes"],
            "option '--json' does not take a value. See 'hessian-cli show --help'.",
        ),
    ],
)
def test_a_usage_error_is_one_line_as_every_other_error(capsys, args, said):
    """Click's usage errors came in a red box under the command's usage, in capitals ("Missing
    argument 'TARGET'."), beside our one-line `error: ...` everywhere else."""
    from cli_runner import run

    assert run(capsys, *args) == (2, "", f"error: {said}\n")
    code, _, err = run(capsys, *args, "--debug")  # the traceback first, then the same line
    assert code == 2 and "Traceback" in err and err.endswith(f"error: {said}\n")


@pytest.mark.parametrize(
    ("given", "command"), [("checkpoints_example/digits_mlp.pt", "analyze"), ("s.h5", "show")]
)
def test_a_file_given_without_a_command_is_told_the_command(capsys, tmp_path, given, command):
    """`hessian-cli model.pt` was "No such command 'model.pt'." with no word of analyze."""
    from cli_runner import run

    root = Path(__file__).parents[1]
    (tmp_path / "s.h5").write_bytes(b"")
    path = str(root / given if given.startswith("checkpoints") else tmp_path / given)
    code, _, err = run(capsys, path, "--top-k", "2")
    verb = "analyse" if command == "analyze" else command
    assert code == 2 and err == (
        f"error: no such command {path!r}. To {verb} it, name the command first: "
        f"hessian-cli {command} {path}. See 'hessian-cli --help'.\n"
    )


@pytest.mark.parametrize(
    "args",
    [
        ["plot", "spectra.h5", "-o", "a" * 300 + "/fig.png"],
        ["show", "a" * 300 + ".h5"],
        ["analyze", "checkpoints_example/digits_mlp.pt", "--out", "a" * 300 + ".h5"],
    ],
)
def test_a_name_too_long_for_the_file_system_is_one_sentence(capsys, monkeypatch, args):
    """Looking at a path of a 300-letter name raises the system's ENAMETOOLONG: it was
    "unexpected OSError: [Errno 36] File name too long", status 1, as if ours."""
    from cli_runner import one_sentence, run

    monkeypatch.chdir(Path(__file__).parent.parent)
    code, _, err = run(capsys, *args)
    assert code == 2
    said = one_sentence(err)
    assert said.startswith("error: the name " + "a" * 300) and "is too long for the file" in said


@pytest.mark.parametrize("command", ["analyze", "train"])
def test_help_on_a_narrow_terminal_folds_long_words_rather_than_cut_them(command):
    """At 70 columns Rich cut a help word longer than its column with an ellipsis: analyze
    --help read "synthetic-regression:D[:k[:…" for the data's syntax."""
    out = _help(command, columns=70)
    assert "…" not in out
    assert "synthetic-regression:D[:k[:n" in out.replace("│", "")


@pytest.mark.parametrize("command", ["analyze", "train", "show", "plot"])
def test_help_on_a_40_column_terminal_names_every_option_whole(command):
    """Below 60 columns Rich's table of options cut their names: at 40, analyze --help listed
    "--model-…", "--data-r…" and "--downlo…", names a user could not type."""
    import typer

    from hessian_cli.cli.app import app, load_commands

    load_commands()
    names = [
        o
        for p in typer.main.get_command(app).commands[command].params
        for o in p.opts
        if o.startswith("--")
    ]
    out = _help(command, columns=40)
    assert "…" not in out and max(map(len, out.splitlines())) <= 40
    shown = set(re.findall(r"--[\w-]+", out))
    assert names and not set(names) - shown, set(names) - shown
    for unknown in (0, 1):  # no help at all (0), or "invalid width" (1)
        assert not set(names) - set(re.findall(r"--[\w-]+", _help(command, columns=unknown)))


def test_a_zero_columns_environment_still_shows_errors_and_help():
    """$COLUMNS=0 (fish's config, a container's terminal not yet sized) is no width known, as
    Python's shutil reads it: Rich printed nothing at 0 columns, an error's exit 2 unsaid."""
    env = {**os.environ, "COLUMNS": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "hessian_cli", "analyze", "no_such.pt"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("error: no such checkpoint")
    helped = subprocess.run(
        [sys.executable, "-m", "hessian_cli", "--help"], capture_output=True, text=True, env=env
    )
    assert "Usage:" in helped.stdout and "analyze" in helped.stdout
