"""hessian-cli: Hessian spectra of neural networks and Eigen-SAM training, from the terminal."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hessian-cli")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
