"""hessian-cli: Hessian spectra of neural networks and Eigen-SAM training, from the terminal."""


def __getattr__(name: str) -> str:
    """``__version__``, read from the installed metadata when first asked for: importing
    importlib.metadata takes a tenth of a second, outside the CLI's Ctrl-C handling if done here."""
    if name != "__version__":
        raise AttributeError(f"module 'hessian_cli' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hessian-cli")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0.0.0+source"
