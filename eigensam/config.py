"""A training run's configuration: what defines it, checked, and how it is read back.

Kept apart from the loop (and free of torch) so that the command line can build its options and
help from it without loading the numerical stack.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hessian_cli.engine.seeds import check_seed
from hessian_cli.errors import UserError

OPTIMIZERS = ("eigensam", "sam", "sgd")
BASE_OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
CONFIG_FILE = "config.json"
CONFIG_FORMAT = "hessian-cli-train-config"
CONFIG_VERSION = 1  # what config.json says it is; a newer one is not guessed at
# How every refusal of a resume with other options begins.
RESUME_AS_CONFIGURED = "--resume continues a run as it was configured"


@dataclass
class TrainConfig:
    """Everything that defines a run, plus the run-time fields ``out``, ``max_steps``,
    ``device`` and ``download``, which a resume may change (they are not stored in
    ``config.json``).

    ``momentum`` applies to the SGD base optimizer only; ``rho`` to SAM and Eigen-SAM, ``alpha``,
    ``eig_every`` and ``eig_hvps`` (the products of a warm refresh) to Eigen-SAM.
    ``track_every = 0`` turns tracking off and ``checkpoint_every = 0`` keeps only interruption
    and final checkpoints.
    """

    model: str
    data: str
    out: str = ""
    optimizer: str = "eigensam"
    base_optimizer: str = "sgd"
    model_kwargs: dict[str, Any] | None = None
    data_root: str | None = None
    loss: str | None = None
    rho: float = 0.05
    alpha: float = 0.2
    eig_every: int = 100
    eig_hvps: int = 6  # eigensam.refresh.DEFAULT_MAX_HVPS: why 6 (a test holds them equal)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0
    track_every: int = 0
    checkpoint_every: int = 1
    max_steps: int | None = None
    device: str = "auto"
    download: bool = False  # fetch a torchvision dataset into data_root if missing

    def validate(self) -> None:
        """Refuse values that cannot make a run, in one sentence each."""
        self._check_types()
        for name, allowed in (
            ("optimizer", OPTIMIZERS),
            ("base_optimizer", BASE_OPTIMIZERS),
            ("schedule", SCHEDULES),
        ):
            if getattr(self, name) not in allowed:
                # Adam(W) is the step SAM wraps, which --optimizer adam did not say.
                adam = name == "optimizer" and str(self.optimizer).lower().startswith("adam")
                raise UserError(
                    f"unknown {name.replace('_', ' ')} {getattr(self, name)!r}: use "
                    f"{', '.join(allowed)}"
                    + (
                        " (AdamW is a base optimizer: --optimizer sgd --base-optimizer adamw "
                        "for plain AdamW steps, or sam / eigensam around it)."
                        if adam
                        else "."
                    )
                )
        for name in ("epochs", "batch_size", "eig_every", "eig_hvps"):
            require(getattr(self, name) >= 1, f"{flag(name)} must be at least 1")
        for name in ("track_every", "checkpoint_every"):
            require(getattr(self, name) >= 0, f"{flag(name)} must be 0 (off) or more")
        require(self.max_steps is None or self.max_steps >= 0, "--max-steps must be 0 or more")
        # "finite" and the value: inf is positive, and "must be a positive number" said no more
        require(
            math.isfinite(self.lr) and self.lr > 0,
            f"--lr must be a finite positive number, not {self.lr:g}",
        )
        for name in ("rho", "alpha", "weight_decay"):
            value = getattr(self, name)
            require(
                math.isfinite(value) and value >= 0,
                f"{flag(name)} must be a finite number of at least 0, not {value:g}",
            )
        require(0 <= self.momentum < 1, f"--momentum must be in [0, 1), not {self.momentum:g}")
        check_seed(self.seed)
        require(
            _json_values(self.model_kwargs),
            "--model-kwargs must hold JSON values only "
            "(numbers, text, lists, objects): config.json and the checkpoints record them",
        )
        for name in ("lr", "rho", "alpha", "weight_decay"):
            value = getattr(self, name)
            require(value <= FLOAT32_MAX, f"{flag(name)} is too large for float32")
            # 1e-320 is 0 in float32 (--lr 1e-320 ran 0-length steps), and below the smallest
            # normal number a factor has lost its digits: the products it scales underflow.
            require(
                value == 0 or value >= FLOAT32_TINY,
                f"{flag(name)} {value:.3g} is too small for float32 (below {FLOAT32_TINY:.2g}, "
                "it is 0 or loses its precision there)",
            )
        from hessian_cli.specs.data import check_root_options  # torch: not at --help

        check_root_options(self.data, data_root=self.data_root is not None, download=self.download)

    def _check_types(self) -> None:
        """Each field of the type it is declared with (a library caller or an edited
        config.json may give any): a number where a number is due, and so on."""
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            hint = hints[field.name]
            kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
            kinds = tuple(typing.get_origin(kind) or kind for kind in kinds)
            value = getattr(self, field.name)
            if isinstance(value, bool) and bool not in kinds:  # JSON true is no count
                ok = False
            else:
                ok = isinstance(value, kinds + ((int,) if float in kinds else ()))
            wanted = next(_KIND_WORDS[kind] for kind in kinds if kind in _KIND_WORDS)
            require(ok, f"{flag(field.name)} must be {wanted}, not {value!r}")

    def identity(self) -> dict[str, Any]:
        """The fields that define the run (what ``config.json`` holds): not the run-time ones,
        nor those its optimizers do not use (a SAM run recorded alpha 0.2 and eig_every 100, as
        if they had been used)."""
        fields = {k: v for k, v in asdict(self).items() if k not in RUNTIME_FIELDS}
        return without_unused(fields)


def _json_values(value: Any) -> bool:
    """Whether ``value`` can be written as JSON (a library caller's model kwargs may hold a
    class: the run failed with a TypeError after making its directory)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


RUNTIME_FIELDS = ("out", "max_steps", "device", "download")
FLOAT32_MAX = 3.4028234663852886e38  # the weights' type: a larger factor cannot multiply them
FLOAT32_TINY = 1.1754943508222875e-38  # its smallest normal number
_KIND_WORDS = {
    int: "a whole number",
    float: "a number",
    str: "text",
    bool: "true or false",
    dict: "a JSON object",
}


# The options only some optimizers use: (the field that chooses, the choices that use it).
USED_BY = {
    "rho": ("optimizer", ("sam", "eigensam")),
    "alpha": ("optimizer", ("eigensam",)),
    "eig_every": ("optimizer", ("eigensam",)),
    "eig_hvps": ("optimizer", ("eigensam",)),
    "momentum": ("base_optimizer", ("sgd",)),
}


# Fields added since runs were first recorded, at the value those runs used: a run recorded
# without one resumes as it ran (eig_hvps: 2026-12-02).
ADDED_FIELDS = {"eig_hvps": 6}


def without_unused(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` (of a configuration) without the options its optimizers do not use: what
    :meth:`TrainConfig.identity` records, and how older recorded configurations, which held
    them all, compare with it."""
    return {
        k: v
        for k, v in fields.items()
        if k not in USED_BY or fields.get(USED_BY[k][0]) in USED_BY[k][1]
    }


def check_options_used(given: dict[str, Any]) -> None:
    """Refuse an option the chosen optimizer ignores, rather than record it as if it were used
    (``given``: the fields set explicitly; defaults are never refused)."""
    defaults = TrainConfig(model="", data="")
    for name, (chooser, users) in USED_BY.items():
        chosen = given.get(chooser, getattr(defaults, chooser))
        known = chosen in (OPTIMIZERS if chooser == "optimizer" else BASE_OPTIMIZERS)
        if name in given and known and chosen not in users:  # an unknown one: said later
            raise UserError(
                f"{flag(name)} has no effect with {flag(chooser)} {chosen} (it is used by "
                f"{' and '.join(users)} only); leave it out."
            )


def check_resume_options(named: list[str]) -> None:
    """Refuse fields given with a resume other than the run-time ones (``out`` included: the
    run's directory is the one resumed)."""
    if named:
        allowed = ", ".join(flag(k) for k in RUNTIME_FIELDS if k != "out")
        raise UserError(
            f"{RESUME_AS_CONFIGURED}, so {', '.join(map(flag, named))} "
            f"cannot be given with it (only {allowed} and --quiet can)."
        )


def flag(name: str) -> str:
    """The command-line option of a config field: ``eig_every`` -> ``--eig-every``."""
    return "--" + name.replace("_", "-")


def require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message + ".")


def load_config(run_dir: str | Path) -> TrainConfig:
    """The configuration saved in a run directory (run-time fields at their defaults)."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    owner = _run_holding(run_dir)
    if owner is not None:  # a checkpoint of a run (or its folder, or its config.json)
        raise UserError(
            f"{str(run_dir)!r} lies in the training run {str(owner)!r}: resume that directory "
            "(a run continues from its latest checkpoint)."
        )
    if not run_dir.exists():  # it said "is not a directory" of a mistyped name
        gone = "is a symbolic link that leads nowhere" if run_dir.is_symlink() else "does not exist"
        raise UserError(f"{str(run_dir)!r} {gone}, so there is no training run to resume there.")
    if not run_dir.is_dir():
        raise UserError(f"{str(run_dir)!r} is not a directory, so it is not a training run.")
    if path.exists() and not path.is_file():
        raise UserError(f"the run configuration {str(path)!r} is not a regular file.")
    if not path.is_file():
        raise UserError(
            f"{str(run_dir)!r} is not a training run (it has no {CONFIG_FILE}); start one with --out."
        )
    try:
        saved = json.loads(path.read_text())
        if saved.get("format") != CONFIG_FORMAT:
            raise ValueError("wrong format")
        version = saved.get("version", CONFIG_VERSION)
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"the run configuration {str(path)!r} is damaged or not ours.") from exc
    # Before its fields are read: a newer version's may be ones this version does not know.
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise UserError(
            f"the run configuration {str(path)!r} is of version {version!r}, newer than this "
            f"hessian-cli reads ({CONFIG_VERSION}): update hessian-cli to resume it."
        )
    try:
        config = TrainConfig(**saved["config"], out=str(run_dir))
    except (TypeError, KeyError) as exc:
        raise UserError(f"the run configuration {str(path)!r} is damaged or not ours.") from exc
    try:
        config.validate()
    except UserError as exc:  # the options it names were saved there, not given now
        raise UserError(f"the run configuration {str(path)!r} holds a bad value: {exc}") from exc
    return config


def _run_holding(path: Path) -> Path | None:
    """The run directory that ``path`` lies in, where it is no run itself: a run's
    ``config.json`` or other file, its checkpoints folder, or a checkpoint in that (what a
    researcher gives to resume from one)."""
    from hessian_cli.specs.checkpoints import RUN_CHECKPOINTS  # torch: not at --help

    if not path.exists() or (path / CONFIG_FILE).exists():
        return None
    parents = [path.parent] + ([path.parent.parent] if path.parent.name == RUN_CHECKPOINTS else [])
    return next((p for p in parents if (p / CONFIG_FILE).is_file()), None)
