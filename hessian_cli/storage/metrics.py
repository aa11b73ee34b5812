"""Reading the training metrics file (``metrics.h5``, format ``hessian-cli-metrics``).

Layout (written by ``train``): root attrs ``format`` and a version; one group per kind of record
(``steps``, ``epochs``, ``refresh``, ``track``), each holding equally long 1-D datasets (columns).
Reading is tolerant: missing groups are simply absent and unknown groups are returned as well.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from hessian_cli.storage.files import open_format, open_hdf5

METRICS_FORMAT_NAME = "hessian-cli-metrics"


def read_metrics(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """``{group: {column: values}}`` for every group of datasets in a metrics file."""
    with open_format(path, METRICS_FORMAT_NAME, "metrics") as f:
        metrics = {
            name: {
                col: np.asarray(ds[()])
                for col, ds in group.items()
                if isinstance(ds, h5py.Dataset) and ds.dtype.kind in "biuf"
            }
            for name, group in f.items()
            if isinstance(group, h5py.Group)
        }
        for name, columns in metrics.items():
            _check_rows(name, columns)
        return metrics


def _check_rows(group: str, columns: dict[str, np.ndarray]) -> None:
    """Refuse (a ValueError, one sentence in :func:`open_format`) columns that are not rows of
    one table: a column shorter than the others would be drawn against the wrong steps."""
    lengths = {}
    for col, values in columns.items():
        if values.ndim == 0:
            raise ValueError(f"{group}/{col} is a single value, not a column")
        lengths[col] = len(values)
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{col} {n}" for col, n in lengths.items())
        raise ValueError(f"the columns of /{group} differ in length ({shown})")


def read_metrics_info(path: str | Path) -> dict[str, object]:
    """The root attributes of a metrics file (format, version, and whatever else train wrote)."""
    with open_hdf5(Path(path)) as f:
        return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in f.attrs.items()}
