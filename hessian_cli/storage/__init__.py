"""HDF5 storage: the spectra file written by ``analyze`` and the metrics file written by ``train``,
both read by ``show`` and ``plot``."""

from hessian_cli.storage.files import file_format
from hessian_cli.storage.hdf5 import (
    FORMAT_NAME,
    FORMAT_VERSION,
    check_writable,
    group_names,
    read_analyses,
    read_eigenvectors,
    read_file_info,
    read_spectra,
    write_analyses,
)
from hessian_cli.storage.metrics import METRICS_FORMAT_NAME, read_metrics, read_metrics_file

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "METRICS_FORMAT_NAME",
    "check_writable",
    "file_format",
    "group_names",
    "read_analyses",
    "read_eigenvectors",
    "read_file_info",
    "read_metrics",
    "read_metrics_file",
    "read_spectra",
    "write_analyses",
]
