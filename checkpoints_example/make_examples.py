"""Regenerate the example checkpoints with the product's own `train` command.

    python checkpoints_example/make_examples.py

Trains a digits MLP (64-32-10, tanh) with Eigen-SAM for 8 epochs and a small digits CNN
(conv8-conv16-GAP) with SAM for 40, on CPU with seed 0, and copies each run's final
self-describing checkpoint here. The runs themselves go to a temporary folder.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = {
    "digits_mlp.pt": [
        "--model",
        "mlp",
        "--model-kwargs",
        '{"hidden": [32]}',
        "--optimizer",
        "eigensam",
        "--eig-every",
        "20",
        "--lr",
        "0.05",
        "--epochs",
        "8",
    ],
    "digits_cnn.pt": [
        "--model",
        "cnn",
        "--model-kwargs",
        '{"widths": [8, 16]}',
        "--optimizer",
        "sam",
        "--lr",
        "0.5",  # this small CNN leaves chance level slowly: at 0.05 it was still there
        "--epochs",
        "40",
    ],
}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in EXAMPLES.items():
            run = Path(tmp) / name.removesuffix(".pt")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "hessian_cli",
                    "train",
                    "--data",
                    "digits",
                    "--batch-size",
                    "64",
                    "--seed",
                    "0",
                    "--device",
                    "cpu",
                    "--quiet",
                    *args,
                    "--out",
                    str(run),
                ],
                check=True,
            )
            shutil.copyfile(run / "checkpoints" / "final.pt", HERE / name)
            print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
