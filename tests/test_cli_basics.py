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
