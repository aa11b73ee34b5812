import subprocess
import sys

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
        "print(sorted(m for m in ('torch', 'h5py', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert "Eigen-SAM" in out  # the help texts were printed
    assert out.strip().splitlines()[-1] == "[]"


def test_eigensam_names_load_on_first_use():
    import eigensam

    for name in eigensam.__all__:
        assert getattr(eigensam, name).__name__ == name
    assert sorted(eigensam.__all__) == sorted(eigensam._HOMES)
