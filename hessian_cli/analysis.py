"""Analyse checkpoints: specs in, certified spectra and alignment scores out.

The library behind ``hessian-cli analyze``: resolves the model, weights, data and loss (from the
flags, else from a self-describing checkpoint), builds the curvature operator and runs the
requested solvers. It knows nothing of the terminal: progress goes to an optional callback.

Under torchrun every rank runs this same code: all build the same global list of batches, each
keeps its contiguous share, and the operator sums products over ranks, so every rank computes the
result one process would on the same samples (rank 0 reports it). Errors in loading the inputs
are agreed on by all ranks (:func:`distributed.fail_together`), so one bad rank ends the job.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args, get_origin, get_type_hints

import torch

from hessian_cli.checkpoint_analysis import CheckpointAnalysis
from hessian_cli.engine import distributed
from hessian_cli.engine.alignment import alignment_scores
from hessian_cli.engine.density import check_density_memory, spectral_density
from hessian_cli.engine.devices import resolve_device
from hessian_cli.engine.eigensolver import eigenpairs
from hessian_cli.engine.inputs import input_tensors, inputs_to
from hessian_cli.engine.model_mode import (
    batch_statistics_error,
    has_batchnorm,
    holds_running_instance_statistics,
    initial_statistics_layers,
    scripted_running_norm,
)
from hessian_cli.engine.operator import HessianOperator
from hessian_cli.engine.params import check_real
from hessian_cli.engine.precision import check_precision
from hessian_cli.engine.results import EigenResult
from hessian_cli.engine.seeds import check_seed
from hessian_cli.engine.solver_plan import (
    check_check_steps,
    check_count,
    check_options,
    check_whole,
)
from hessian_cli.engine.trace import check_trace_memory, stochastic_trace
from hessian_cli.errors import (
    OUT_OF_HOST_MEMORY,
    Terminated,
    UserError,
    described,
    first_line,
    out_of_host_memory,
)
from hessian_cli.specs import (
    CHECKPOINT_SUFFIXES,
    DataSource,
    LoadedCheckpoint,
    absolute,
    analysis_batches,
    anchored,
    anchored_data,
    apply_weights,
    build_model,
    check_finite,
    check_fits,
    check_next_tokens,
    check_root_options,
    check_targets,
    checkpoint_order_key,
    default_loss,
    embedding_reach,
    get_loss,
    list_checkpoints,
    load_checkpoint,
    load_data,
    model_device,
    takes_token_ids,
)
from hessian_cli.specs.checkpoints import (
    DEEPSPEED_WEIGHTS,
    RUN_CHECKPOINTS,
    TRAINER_WEIGHTS,
    WeightsMismatch,
    checkpoint_label,
    folder_checkpoint,
    trainer_weights,
)
from hessian_cli.specs.data import data_names_code, labels_note, missing_recorded_file
from hessian_cli.specs.fit import guard_embedding_lookups
from hessian_cli.specs.losses import label_weight, loss_names_code
from hessian_cli.specs.models import defaults_hint, model_names_code, with_checkpoint_layout
from hessian_cli.specs.user_code import split_user_spec
from hessian_cli.storage.files import storable_text

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class AnalyzeRequest:
    """Everything the user can ask of ``analyze``; ``None`` specs come from the checkpoint."""

    model: str | None = None
    model_kwargs: dict | None = None
    data: str | None = None
    data_root: str | None = None
    download: bool = False  # fetch a torchvision dataset into data_root if missing
    loss: str | None = None
    top_k: int = 5
    which: Literal["largest", "smallest", "both"] = "largest"
    tol: float = 1e-4
    criterion: Literal["residual", "eigenvalue"] = "residual"
    max_hvps: int | None = None
    block_size: int | None = None
    guard: int | None = None
    check_steps: int | None = None
    trace: bool = False
    trace_probes: int = 99
    trace_method: Literal["hutch++", "hutchinson"] = "hutch++"
    density: bool = False
    density_probes: int = 8
    density_steps: int = 64
    density_sigma: float | None = None  # the smoothing width; None: 1% of the nodes' spread
    alignment: bool = False
    rho: float = 0.05
    alpha: float = 0.2
    minibatches: int = 8
    params: str | Sequence[str] | None = None  # globs; one string may join them by commas
    bn: Literal["eval", "train"] = "eval"
    batch_size: int = 128
    num_samples: int | None = None
    num_batches: int | None = None
    device: str | torch.device = "auto"
    # None: the checkpoint's, float64 where its weights are (see _analysis_dtype), else float32
    dtype: Literal["float32", "float64"] | None = None
    precision: Literal["full", "tf32", "bf16"] = "full"
    seed: int = 0
    trust_checkpoint: bool = False
    weights_key: str | None = None  # which of a file's weights (see load_checkpoint)


def param_globs(params: str | Sequence[str] | None) -> list[str] | None:
    """The globs of ``params``, each entry split at its commas as ``--params`` takes them: a
    string is not its letters (``"1.*"`` was recorded as the globs ``1,.,*``)."""
    if params is None:
        return None
    given = [params] if isinstance(params, str) else params
    return [glob for item in given for glob in item.split(",") if glob]


def checkpoint_paths(target: str | Path | Sequence[str | Path]) -> list[Path]:
    """One checkpoint file, or every checkpoint in a directory (of a training run directory:
    in its checkpoints folder); or several files (a shell glob's), folders of one checkpoint
    among them (a Trainer's checkpoint-N, accelerate's checkpoint_N) taken for it: a series, as
    a directory's."""
    targets = [Path(target)] if isinstance(target, str | Path) else [Path(t) for t in target]
    if not targets:
        raise UserError("no checkpoint was given.")
    if len(targets) == 1:
        return _paths_in(targets[0])
    paths = []
    for path in targets:
        _check_exists(path)
        if not path.is_dir():
            paths.append(path)
            continue
        # A folder of one checkpoint is it (a glob of accelerate's checkpoint_N folders, whose
        # weights under DeepSpeed are in pytorch_model/, was refused as "a directory").
        found = _paths_in(path)
        if (weights := trainer_weights(path)) is not None and found != [weights]:
            # its folders were skipped unsaid
            raise UserError(
                f"{path} is a Trainer output directory, a series of its checkpoint folders: give "
                f"it alone, or its final weights as the file {weights}."
            )
        if len(found) > 1:
            raise UserError(
                f"{path} is a directory of {len(found)} checkpoints, a series: give it alone, or "
                "the checkpoint files themselves (a shell glob such as run/*.pt)."
            )
        paths.append(found[0])
    return paths


def is_series(targets: Sequence[Path]) -> bool:
    """Whether ``targets`` (given to :func:`checkpoint_paths`) are a series, however many
    checkpoints it holds: several, or a directory of checkpoints; not one file, nor a
    checkpoint folder (a Trainer's, accelerate's), which is its weights file."""
    if len(targets) != 1:
        return True
    (target,) = targets
    return target.is_dir() and checkpoint_paths(target) != [folder_checkpoint(target)]


def _paths_in(path: Path) -> list[Path]:
    """A checkpoint file itself, or the checkpoints of a directory."""
    _check_exists(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found and (path / RUN_CHECKPOINTS).is_dir():
            found = list_checkpoints(path / RUN_CHECKPOINTS)
        if not found:
            raise UserError(
                f"the directory {path} holds no checkpoint files "
                f"({', '.join(CHECKPOINT_SUFFIXES)}) or Hugging Face Trainer checkpoint "
                f"folders (holding {' or '.join(TRAINER_WEIGHTS)}) or DeepSpeed ones (holding "
                f"{DEEPSPEED_WEIGHTS}); a file of another name is read when given by itself."
            )
        return found
    return [path]


def _check_exists(path: Path) -> None:
    if not path.exists():
        if path.is_symlink():  # dangling, or a loop of links
            raise UserError(f"the checkpoint {path} is a symbolic link that leads nowhere.")
        if set("*?[") & set(str(path)):  # a glob quoted, or one that matched nothing
            raise UserError(
                f"no such checkpoint file or directory: {path} (the shell expands a pattern "
                "such as this, and only where it is unquoted and matches files)."
            )
        raise UserError(f"no such checkpoint file or directory: {path}.")


class SeriesStopped(UserError):
    """A checkpoint of a series could not be analysed after others were: those are ``results``,
    for the caller to keep (hours of products need not be lost to one bad file, a Ctrl-C or a
    SIGTERM). ``interrupt`` is the KeyboardInterrupt or Terminated that stopped it, if one did,
    for the caller to end as that would have."""

    def __init__(
        self,
        message: str,
        results: list[CheckpointAnalysis],
        interrupt: BaseException | None = None,
    ) -> None:
        super().__init__(message)
        self.results = results
        self.interrupt = interrupt


def _words(kind: Any) -> tuple[str, ...] | None:
    """The words a Literal option takes (also one that may be None, left for the analysis to
    choose)."""
    literals = [k for k in (kind, *get_args(kind)) if get_origin(k) is Literal]
    return get_args(literals[0]) if literals else None


# The options that take one of a few words, and those words (from AnalyzeRequest's Literals).
CHOICES: dict[str, tuple[str, ...]] = {
    name: words
    for name, kind in get_type_hints(AnalyzeRequest).items()
    if (words := _words(kind)) is not None
}


def analyze_target(
    target: str | Path | Sequence[str | Path],
    request: AnalyzeRequest,
    progress: Progress | None = None,
    notice: Callable[[str], None] | None = None,
    starting: Callable[[str, int, int], None] | None = None,
) -> list[CheckpointAnalysis]:
    """Analyse one checkpoint, a directory of them or several files (:func:`checkpoint_paths`),
    returned in series order (epoch, then step: :func:`series_key`); whatever stops a
    checkpoint after the first (bad input, an error, a lost torchrun peer, an interrupt) is
    :class:`SeriesStopped`, which holds the results so far. ``notice`` is told, in one line, what of
    the series was left out and :func:`analyze_checkpoint`'s notes (of a series, each naming its
    checkpoint);
    ``starting``, as each checkpoint starts, its label (its path where others share it), place
    (from 1) and the count."""
    with distributed.fail_together():
        _check_request(request)  # before any checkpoint is loaded
        paths = checkpoint_paths(target)
        if len(paths) > 1 and request.data:
            # The --data file kept beside the checkpoints is none of them (its x and y were
            # taken for weights, refused at its turn: after the others' hours of products).
            data = anchored_data(request.data)
            paths = [p for p in paths if absolute(str(p)) != data] or paths
        # A link to another file of the series (Lightning's last.ckpt) is that file again: left
        # out unread, named with the copies below (it was left out unsaid), the file analysed.
        files = {p.resolve(): p for p in paths if not p.is_symlink()}
        links = {p: files[p.resolve()] for p in paths if p.is_symlink() and p.resolve() in files}
        paths = [p for p in paths if p not in links]
        # Every file is read first (one that cannot be is said before hours of products, and
        # the metadata orders the series), but of a series only its order and digest are held:
        # each file's weights are read again at its turn (a series held them all, with what
        # else the files hold, optimizer states too: its memory grew with every file).
        held_only = len(paths) > 1  # (copies left out below may leave one file of several)
        # A glob over runs (runs/*/final.pt) holds files of one name: those go by their paths.
        labels = Counter(map(checkpoint_label, paths))

        def named(ckpt: LoadedCheckpoint) -> str:
            return ckpt.label if labels[ckpt.label] == 1 else str(ckpt.path)

        loaded = []
        for path in paths:
            try:
                ckpt = _load(path, request)
            except UserError as exc:
                if held_only:  # one file need not stop the others
                    exc.args = (
                        f"{str(exc).rstrip('.')}; to analyse the others, give them as "
                        "files without it.",
                    )
                raise
            try:  # one that names no model or data: said before hours of products
                _check_specs_named(ckpt, request)
            except UserError as exc:
                if held_only:  # which of the series
                    exc.args = (f"{named(ckpt)}: {exc}",)
                raise
            loaded.append(_ordering_only(ckpt) if held_only else ckpt)
    loaded.sort(key=checkpoint_order_key)
    # A copy of another file of the series (Lightning's last.ckpt, where it is not a link) is
    # that file's analysis again: the first in order is kept, and the others named.
    distinct: dict[str, LoadedCheckpoint] = {}
    copies = [_copy_of(link, file) for link, file in links.items()]
    for ckpt in loaded:
        kept = distinct.setdefault(ckpt.sha256, ckpt)
        if kept is not ckpt:
            copies.append(_copy_of(ckpt.path, kept.path))
    loaded = list(distinct.values())
    if copies and notice is not None:
        notice(
            "left out, as copies of another checkpoint of the series (the same sha256): "
            f"{', '.join(copies)}."
        )
    # A series that differs between nodes (a file more on one): the rank that ran out of files
    # left the others inside a collective, which failed after a minute with a wrong message.
    distributed.check_same(lambda: {"checkpoints": " ".join(c.sha256 for c in loaded)})
    results: list[CheckpointAnalysis] = []
    init = warm_from = None
    for place, ckpt in enumerate(loaded, 1):
        if starting is not None:
            starting(named(ckpt), place, len(loaded))
        try:
            if held_only:
                with distributed.fail_together():
                    ckpt = _at_its_turn(ckpt, request)
            result = analyze_checkpoint(
                ckpt,
                request,
                progress,
                init=init,
                warm_from=warm_from,
                notice=_of(named(ckpt), notice) if len(loaded) > 1 else notice,
            )
        except (Exception, KeyboardInterrupt, Terminated) as exc:
            # Those after it were never reached: said, for the user to run them (unsaid, a
            # series stopped in its middle read as one that had ended there).
            unreached = _unreached([named(c) for c in loaded[place:]])
            if not results:
                if held_only and isinstance(exc, UserError):  # which of the series
                    said = f"{str(exc).rstrip('.')} ({unreached})." if unreached else str(exc)
                    exc.args = (f"{named(ckpt)}: {said}",)
                raise
            # Whatever stopped this one (an error of ours too), the others' work is kept.
            interrupt = exc if isinstance(exc, (KeyboardInterrupt, Terminated)) else None
            if interrupt is not None:
                why = "interrupted"
            elif isinstance(exc, UserError):
                why = str(exc).rstrip(".")
            elif out_of_host_memory(exc):
                why = OUT_OF_HOST_MEMORY
            elif isinstance(exc, distributed.PeerLost):  # Gloo's own words are no help
                why = "another rank left or stopped answering (its message or torchrun's says why)"
            else:
                why = f"unexpected {described(exc)} (run with --debug for the traceback)"
            before = (
                "the checkpoint before it was analysed and is kept"
                if len(results) == 1
                else f"the {len(results)} checkpoints before it were analysed and are kept"
            )
            before += f"; {unreached}" if unreached else ""
            stopped = SeriesStopped(f"{named(ckpt)}: {why} ({before}).", results, interrupt)
            if not isinstance(exc, UserError | KeyboardInterrupt | Terminated):
                stopped.exit_status = 1  # not the input's: as the entry point says of one
            raise stopped from exc
        if result.eigen is not None:
            # warm start the next checkpoint of the series, named by its path: the names of a
            # glob's files in several directories may repeat
            init, warm_from = result.eigen.eigenvectors, result.provenance["checkpoint"]
        results.append(result)
    return results


def _unreached(labels: list[str]) -> str:
    """What a series stopped at one checkpoint says of those after it (``labels``), never
    analysed; empty where it was the last."""
    if not labels:
        return ""
    if len(labels) == 1:
        return f"the one after it, {labels[0]}, was not analysed"
    return f"the {len(labels)} after it, from {labels[0]} on, were not analysed"


def _of(label: str, notice: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """``notice`` of one checkpoint of a series: its lines name it."""
    return None if notice is None else lambda line: notice(f"{label}: {line}")


def _copy_of(copy: Path, kept: Path) -> str:
    """A copy left out of a series and the file kept, by their labels in one folder, else by
    their paths (runs/*/init.pt of runs from one start: "init.pt (of init.pt)"); a file given
    twice is said to be (`analyze a.pt a.pt` said "a.pt (of a.pt)")."""
    if os.path.abspath(copy) == os.path.abspath(kept):  # a link to it is a copy, said so
        return f"{checkpoint_label(copy)} (given again)"
    if copy.parent == kept.parent:
        return f"{checkpoint_label(copy)} (of {checkpoint_label(kept)})"
    return f"{copy} (of {kept})"


def _load(path: Path, request: AnalyzeRequest) -> LoadedCheckpoint:
    return load_checkpoint(path, trust=request.trust_checkpoint, weights_key=request.weights_key)


def _ordering_only(ckpt: LoadedCheckpoint) -> LoadedCheckpoint:
    """What a series holds of a file until its turn: its path, digest and metadata."""
    return replace(ckpt, state_dict={}, raw={}, module=None)


def _at_its_turn(held: LoadedCheckpoint, request: AnalyzeRequest) -> LoadedCheckpoint:
    """The file of ``held`` read again, whole; refused where it changed since the series was
    read (a run still writing it, say): its place in the series came from what it held then.
    Without what else the file holds (optimizer state), which the analysis does not read."""
    ckpt = _load(held.path, request)
    if ckpt.sha256 != held.sha256:
        # (the series names the file before its error)
        raise UserError("changed since the series was read (its sha256 differs).")
    return replace(ckpt, raw={})


def _spec(flag: str | None, metadata: dict, key: str, what: str, option: str) -> str:
    value = flag or metadata.get(key)
    if not value:
        raise UserError(f"the checkpoint does not say which {what} it is for: pass {option}.")
    return str(value)


def _recorded_kwargs(value: Any) -> dict:
    """The model keyword arguments a checkpoint records: JSON text (``train`` writes), or the
    object itself (a checkpoint made by hand)."""
    kwargs = value
    if isinstance(value, str):
        try:
            kwargs = json.loads(value)
        except (json.JSONDecodeError, RecursionError):  # nested past Python's stack
            kwargs = None
    elif isinstance(value, dict):
        try:  # recorded as JSON again: a dtype value failed there, an int key in the factory
            json.dumps(value)
        except (TypeError, ValueError, RecursionError):
            kwargs = None
        if not all(isinstance(key, str) for key in value):
            kwargs = None
    if not isinstance(kwargs, dict):
        raise UserError(
            f"the checkpoint's model_kwargs are not a JSON object ({str(value)[:60]!r}): pass "
            "--model-kwargs."
        )
    return kwargs


def _a_path(name: str, value: object) -> bool:
    """Whether an option names a file, whose contents (not path) the ranks compare."""
    return name in ("data", "data_root") or (
        name in ("model", "loss") and isinstance(value, str) and split_user_spec(value) is not None
    )


def read_options(request: AnalyzeRequest) -> dict[str, tuple[bool, str]]:
    """Which options the analyses asked for read: name -> (whether one reads it, what would)."""
    r = request
    return {
        **dict.fromkeys(
            ("which", "tol", "criterion", "max_hvps", "block_size", "guard", "check_steps"),
            (r.top_k > 0, "eigenpairs (--top-k 0 skips them)"),
        ),
        **dict.fromkeys(("trace_probes", "trace_method"), (r.trace, "--trace")),
        **dict.fromkeys(
            ("density_probes", "density_steps", "density_sigma"), (r.density, "--density")
        ),
        **dict.fromkeys(("rho", "alpha", "minibatches"), (r.alignment, "--alignment")),
        # The products' arithmetic: losses and gradients are always in full precision.
        "precision": (
            r.top_k > 0 or r.trace or r.density,
            "Hessian-vector products (eigenpairs, --trace or --density)",
        ),
    }


# The request's whole numbers (the seed has its own check).
_COUNTS = (
    "top_k",
    "max_hvps",
    "block_size",
    "guard",
    "check_steps",
    "trace_probes",
    "density_probes",
    "density_steps",
    "minibatches",
    "batch_size",
    "num_samples",
    "num_batches",
)


def _check_request(request: AnalyzeRequest) -> None:
    """Refuse values and combinations that cannot be computed, before any work."""
    r = request
    for name, allowed in CHOICES.items():
        value = getattr(r, name)
        if value not in allowed and not (value is None and getattr(AnalyzeRequest, name) is None):
            raise UserError(
                f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                f"not {getattr(r, name)!r}."
            )
    # Counts given in Python as floats (top_k=2.0) failed deep in torch, a TypeError.
    for name in _COUNTS:
        if (value := getattr(r, name)) is not None:
            check_whole(f"--{name.replace('_', '-')}", value)
    # The command's JSON text given in Python failed in the model's build ("not a mapping").
    if r.model_kwargs is not None and not isinstance(r.model_kwargs, dict):
        raise UserError(
            f"--model-kwargs takes a dict (the JSON object's), not a {type(r.model_kwargs).__name__}."
        )
    defaults = AnalyzeRequest()
    for name, (read, what) in read_options(r).items():
        # As the command refuses them: an option set for an analysis not asked for looked used.
        if not read and getattr(r, name) != getattr(defaults, name):
            raise UserError(
                f"--{name.replace('_', '-')} has no effect without {what}; leave it out."
            )
    if r.num_samples is not None and r.num_batches is not None:
        raise UserError("give --num-samples or --num-batches, not both.")
    if r.top_k:
        check_options(
            tol=r.tol,
            block_size=r.block_size,
            max_hvps=r.max_hvps,
            guard=r.guard,
            k=r.top_k,
            which=r.which,
        )
        if r.check_steps is not None:
            check_check_steps(
                r.check_steps, k=r.top_k, guard=r.guard, max_hvps=r.max_hvps, which=r.which
            )
    counts = (
        ("--top-k", r.top_k, 0, True),
        ("--batch-size", r.batch_size, 1, True),
        ("--num-samples", r.num_samples, 1, r.num_samples is not None),
        ("--num-batches", r.num_batches, 1, r.num_batches is not None),
        ("--trace-probes", r.trace_probes, 2, r.trace),
        ("--density-probes", r.density_probes, 1, r.density),
        ("--density-steps", r.density_steps, 2, r.density),
        ("--minibatches", r.minibatches, 0, r.alignment),
        ("--check-steps", r.check_steps, 0, r.check_steps is not None),
    )
    for flag, value, least, used in counts:
        if used and value < least:
            raise UserError(f"{flag} must be at least {least}, not {value}.")
    # Recorded as given, in 64-bit HDF5 integers: 2**64 failed the write, after all the work.
    for flag, value, used in (
        ("--batch-size", r.batch_size, True),
        ("--trace-probes", r.trace_probes, r.trace),
    ):
        if used and value >= 2**64:
            raise UserError(f"{flag} must be below 2**64, not {value}.")
    sigma = r.density_sigma
    if r.density and sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise UserError(f"--density-sigma must be a positive number, not {sigma:g}.")
    for flag, value in (("--rho", r.rho), ("--alpha", r.alpha)):
        if r.alignment and not (math.isfinite(value) and value >= 0):
            raise UserError(f"{flag} must be a finite number of at least 0, not {value:g}.")
    check_seed(r.seed)
    if request.alignment and not request.top_k:
        raise UserError("--alignment needs the top eigenvectors: give --top-k 1 or more.")
    if request.alignment and request.which == "smallest":
        raise UserError("--alignment needs the top eigenvectors: use --which largest or both.")


def analyze_checkpoint(
    ckpt: LoadedCheckpoint,
    request: AnalyzeRequest,
    progress: Progress | None = None,
    *,
    init: torch.Tensor | None = None,
    warm_from: str | None = None,
    notice: Callable[[str], None] | None = None,
) -> CheckpointAnalysis:
    """Run the requested solvers on one loaded checkpoint, the eigensolver warm-started from
    ``init``, the eigenvectors of the checkpoint at the path ``warm_from`` (for the provenance);
    ``notice`` is told, in one line, what makes its numbers meaningless though they are sound."""
    _check_request(request)
    with distributed.fail_together():
        s = _setup(ckpt, request)
    distributed.check_same(
        lambda: {
            # Paths may differ between nodes (other mount points); what they hold may not.
            "options": repr(
                sorted((k, v) for k, v in asdict(request).items() if not _a_path(k, v))
            ),
            "checkpoint": ckpt.sha256,
            "data": distributed.tensors_digest(
                t for x, y in s.batches + s.minibatches for t in (*input_tensors(x), y)
            ),
        }
    )
    try:
        return _run_solvers(ckpt, request, s, init, warm_from, progress, notice)
    except IndexError as exc:  # a batch past the two samples check_fits ran
        reach = embedding_reach(s.model, (x for x, _ in s.batches + s.minibatches), exc)
        if not reach:
            raise
        raise UserError(
            f"the data does not fit the model analysing {ckpt.label}: {first_line(exc)}{reach}."
        ) from exc
    except torch.cuda.OutOfMemoryError as exc:
        raise UserError(
            f"CUDA ran out of memory analysing {ckpt.label}: try a smaller --batch-size"
            f"{_or_fewer(request)}."
        ) from exc


def _initial_statistics_note(initial: int, layers: int, kind: str) -> str:
    """What analyze says of ``initial`` of the model's ``layers`` normalisation layers of
    ``kind`` (BatchNorm, InstanceNorm or both) holding the running statistics they were built
    with (a model never trained, or saved before its first step), by which eval mode does not
    normalise."""
    which = (
        f"the model's {kind} layer"
        if layers == 1
        else f"all {layers} {kind} layers"
        if initial == layers
        else f"{initial} of the {layers} {kind} layers"
    )
    statistics = {
        "BatchNorm": "each batch's statistics",
        "InstanceNorm": "each sample's statistics",
    }.get(kind, "each batch's statistics (InstanceNorm by each sample's)")
    return (
        f"note: {which} {'holds' if initial == 1 else 'hold'} initial running statistics "
        "(mean 0, variance 1: no training step updated them), by which eval mode does not "
        "normalise, so these are the numbers of an unnormalised network; --bn train normalises "
        f"by {statistics}."
    )


def _or_fewer(request: AnalyzeRequest) -> str:
    """`` (or fewer --top-k or --trace-probes)``: the options of the solvers asked for whose
    smaller values need less memory (the others' would be refused as having no effect)."""
    flags = [
        *(["--top-k"] if request.top_k else []),
        *(["--trace-probes"] if request.trace else []),
        *(["--density-probes", "--density-steps"] if request.density else []),
    ]
    if not flags:
        return ""
    *rest, last = flags
    return f" (or fewer {', '.join(rest)} or {last})" if rest else f" (or fewer {last})"


class _Setup(NamedTuple):
    model_spec: str
    data_spec: str
    loss_spec: str
    model_kwargs: str | None  # as JSON, where the model was built with any
    data_root: str | None
    model: torch.nn.Module
    loss_fn: Callable
    batches: list  # the analysed batches (global list)
    minibatches: list  # the alignment's extra minibatches (global; empty: the batches suffice)
    device: torch.device
    dtype: torch.dtype  # of the products (--dtype, or the checkpoint's)
    weights_part: str | None  # the leading name the checkpoint's weights were taken from
    batch_weight: Callable[[torch.Tensor], float] | None  # None: batches weigh their samples
    # BatchNorm (and InstanceNorm) layers that eval mode runs by their initial statistics, of
    # how many with running statistics, and their kinds (None: --bn train, which runs them by
    # the batches')
    initial_bn: tuple[int, int, str] | None


def _with_recorded_classes(data: DataSource, recorded: Any) -> DataSource:
    """The data with the class count the checkpoint's model was trained for, where it records
    one: labels count classes from the largest they hold, so a subset without the top classes
    built a smaller output layer than the weights' (a shape mismatch said instead), and a
    label beyond the model's classes is then refused as such by the target check."""
    if data.num_classes is None or not isinstance(recorded, int) or isinstance(recorded, bool):
        return data
    if recorded < 1 or recorded == data.num_classes:
        return data
    return replace(data, num_classes=recorded)


def _check_specs_named(ckpt: LoadedCheckpoint, request: AnalyzeRequest) -> None:
    """The model and data are given by flags or recorded in the checkpoint (the model may be
    the module it pickles)."""
    meta = ckpt.metadata
    if _pickled_model(ckpt, request) is None:
        if not (request.model or meta.get("model")) and not (request.data or meta.get("data")):
            # Both at once: a bare state dict asked for --model, and once given, for --data.
            raise UserError(
                "the checkpoint does not say which model and data it is for (those `hessian-cli "
                "train` writes do): pass --model and --data."
            )
        _spec(request.model, meta, "model", "model", "--model")
    elif request.model_kwargs is not None:
        raise UserError(
            "--model-kwargs has no effect on the model the checkpoint pickles, which is used "
            "as it is: leave it out (or give --model to build another)."
        )
    _spec(request.data, meta, "data", "data", "--data")


def _pickled_model(ckpt: LoadedCheckpoint, request: AnalyzeRequest) -> torch.nn.Module | None:
    """The module a trusted checkpoint pickles whole, where it is the model analysed: no
    --model was given and the file records no model spec (with one, its weights go into the
    model it names, as those of any other file)."""
    if request.model or ckpt.metadata.get("model"):
        return None
    return ckpt.module


def _setup(ckpt: LoadedCheckpoint, request: AnalyzeRequest) -> _Setup:
    """Model, loss and the global lists of batches: where bad input shows up."""
    meta = ckpt.metadata
    _check_specs_named(ckpt, request)
    pickled = _pickled_model(ckpt, request)
    if pickled is None:
        model_spec = _spec(request.model, meta, "model", "model", "--model")
    elif isinstance(pickled, torch.jit.ScriptModule):  # its class is torch's: say the script's
        model_spec = f"torchscript {pickled.original_name}"
    else:  # what the results record: its class, not a spec that --model would take
        model_spec = f"pickled {type(pickled).__module__}.{type(pickled).__qualname__}"
    data_spec = _spec(request.data, meta, "data", "data", "--data")
    kwargs = request.model_kwargs
    # The recorded arguments belong to the recorded model, also where --model names it again;
    # --model-kwargs changes those it names (it replaced them all: the others were lost, unsaid).
    same = isinstance(meta.get("model"), str) and anchored(model_spec) == anchored(meta["model"])
    if same and meta.get("model_kwargs"):
        if kwargs is None:
            kwargs = _recorded_kwargs(meta["model_kwargs"])
        else:
            try:
                recorded = _recorded_kwargs(meta["model_kwargs"])
            except UserError:  # unreadable: the given ones alone, as its refusal asks
                recorded = {}
            kwargs = {**recorded, **kwargs}
    kwargs = with_checkpoint_layout(model_spec, kwargs, ckpt.state_dict)
    check_root_options(
        data_spec, data_root=request.data_root is not None, download=request.download
    )
    root = request.data_root or meta.get("data_root") or None
    device = resolve_device(request.device)
    dtype = _analysis_dtype(request, ckpt.state_dict)
    check_precision(request.precision, device, dtype)  # before the work of loading
    torch.manual_seed(request.seed)

    recorded = {
        "model": None if request.model or pickled is not None else model_spec,
        "data": None if request.data else data_spec,
        "loss": None if request.loss else str(meta.get("loss") or ""),
    }
    if gone := missing_recorded_file(recorded):
        what, missing = gone
        raise UserError(
            f"the file {missing!r} that the checkpoint records for its {what} does not exist "
            f"(moved or deleted?): give --{what} to say where it is now."
        )
    # Specs read from the checkpoint may name code only where the user trusts the file.
    trust = request.trust_checkpoint
    if not trust:
        _refuse_recorded_code(request, model_spec, data_spec, meta.get("loss"))
    data = load_data(
        data_spec,
        root=root,
        download=request.download,
        trusted=trust or bool(request.data),
    )
    data = _with_recorded_classes(data, meta.get("num_classes"))
    model = (
        build_model(
            model_spec,
            input_shape=data.input_shape,
            num_classes=data.num_outputs,
            kwargs=kwargs,
            trusted=trust or bool(request.model),
        )
        if pickled is None
        else pickled
    )
    check_real(model)  # before the cast, which would drop imaginary parts
    # Cast before loading: a float64 checkpoint loaded into the float32 model it was built as
    # was rounded to float32 before --dtype float64 cast it back.
    model = model.to(dtype=dtype)
    try:
        weights_part = apply_weights(model, ckpt.state_dict)
    except UserError as exc:
        notes = ""
        if not model_names_code(model_spec) and (labels := labels_note(data)):
            # The built-in model was made for labels stored otherwise: the message blamed only
            # the checkpoint.
            notes = f" ({labels})"
        recorded = meta.get("model")
        if isinstance(exc, WeightsMismatch) and isinstance(recorded, str) and not same:
            # --model named another model: the hint below asked for its options instead
            notes += f"; the checkpoint records the model {recorded!r}, not {model_spec!r}"
        elif isinstance(exc, WeightsMismatch):  # a checkpoint that records no options, say
            notes += defaults_hint(model_spec, kwargs, recorded=recorded == model_spec)
        if not notes:
            raise
        raise UserError(f"{str(exc)[:-1]}{notes}.") from exc
    model = model.to(device=device)
    if device.type != "cpu":
        guard_embedding_lookups(model)
    token_ids = takes_token_ids(model)
    batches = analysis_batches(
        data.train,
        batch_size=request.batch_size,
        # One batch unless told otherwise (a quick, common default), however small the data.
        num_samples=request.num_samples
        if request.num_samples is not None or request.num_batches is not None
        else min(request.batch_size, len(data.train)),
        num_batches=request.num_batches,
        dtype=dtype,
        token_ids=token_ids,
        # Where the data has a test split too, the analysis reads the training split only.
        what="the data" if data.test is None else "the data's training split, which analyze reads,",
    )
    for batch in batches:  # the HVPs would blame the weights
        check_finite(batch, "data's")
    loss_spec = request.loss or meta.get("loss") or default_loss(data.num_classes)
    loss_fn = get_loss(loss_spec, num_classes=data.num_classes, trusted=trust or bool(request.loss))
    check_targets(loss_spec, batches, data.num_classes)
    check_next_tokens(loss_spec, batches)
    check_fits(model, loss_fn, batches)
    minibatches: list = []  # empty: the analysed batches hold the alignment's minibatches
    more_data = len(data.train) > sum(len(y) for _, y in batches)
    # A batch that --num-samples cut short is not one of the data's batches.
    cut = any(len(y) < request.batch_size for _, y in batches[: request.minibatches])
    if request.alignment and (len(batches) < request.minibatches or cut) and more_data:
        # SAM perturbs with minibatch gradients: the data's first M batches, however few of them
        # the Hessian is taken over (by default one).
        minibatches = analysis_batches(
            data.train,
            batch_size=request.batch_size,
            num_samples=min(request.minibatches * request.batch_size, len(data.train)),
            dtype=dtype,
            token_ids=token_ids,
        )
        check_targets(loss_spec, minibatches, data.num_classes)
    if request.bn == "train":
        if not has_batchnorm(model) and not any(
            holds_running_instance_statistics(m) or scripted_running_norm(m)
            for m in model.modules()
        ):
            raise UserError(
                "--bn train switches BatchNorm layers to batch statistics (and InstanceNorm "
                "layers with running statistics to each sample's), and the model has none: "
                "leave it out."
            )
        # check_fits ran in eval mode
        _check_batch_statistics(model, min(batches + minibatches, key=lambda b: len(b[1])))
    return _Setup(
        model_spec,
        data_spec,
        loss_spec,
        json.dumps(kwargs, sort_keys=True) if kwargs else None,
        None if root is None else str(root),
        model,
        loss_fn,
        batches,
        minibatches,
        device,
        dtype,
        weights_part,
        label_weight(loss_spec, batches + minibatches),
        initial_statistics_layers(model) if request.bn == "eval" else None,
    )


def _analysis_dtype(request: AnalyzeRequest, state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    """--dtype, or where none is given the weights': float64 where the checkpoint's floating-point
    tensors all are (a float64 training run's was analysed in float32, its weights rounded),
    unless --precision asks for reduced float32 arithmetic; else float32."""
    if request.dtype is not None:
        return {"float32": torch.float32, "float64": torch.float64}[request.dtype]
    kinds = {t.dtype for t in state_dict.values() if t.is_floating_point()}
    wide = kinds == {torch.float64} and request.precision == "full"
    return torch.float64 if wide else torch.float32


def _refuse_recorded_code(
    request: AnalyzeRequest, model_spec: str, data_spec: str, loss_spec: Any
) -> None:
    """Refuse, in one sentence naming them all, the user code the checkpoint names that the
    user did not (the loaders refuse each too, one at a time: a second run met the next)."""
    recorded = [
        (flag, spec, what)
        for flag, given, spec, what, names_code in (
            ("--data", request.data, data_spec, "data factory", data_names_code),
            ("--model", request.model, model_spec, "model factory", model_names_code),
            ("--loss", request.loss, loss_spec, "loss function", loss_names_code),
        )
        if not given and isinstance(spec, str) and names_code(spec)
    ]
    if recorded:
        whats = " and ".join(f"{what} ({spec!r})" for _, spec, what in recorded)
        flags = " ".join(f"{flag} {shlex.quote(spec)}" for flag, spec, _ in recorded)
        raise UserError(
            f"the checkpoint names code to run as its {whats}: it runs only if you name it "
            f"yourself ({flags}), or pass --trust-checkpoint if you trust where the file came "
            "from."
        )


def _check_batch_statistics(model: torch.nn.Module, batch: tuple) -> None:
    """With --bn train a batch of one sample has no statistics to normalise by (BatchNorm1d)."""
    why = batch_statistics_error(model, inputs_to(batch[0], model_device(model)))
    if why is not None:
        raise UserError(
            f"--bn train normalises by batch statistics, which a batch of {len(batch[1])} "
            f"sample{'s' if len(batch[1]) > 1 else ''} does not have ({why}); "
            "choose a --batch-size or --num-samples that leaves no such batch."
        )


def _run_solvers(
    ckpt: LoadedCheckpoint,
    request: AnalyzeRequest,
    s: _Setup,
    init: torch.Tensor | None,
    warm_from: str | None,
    progress: Progress | None,
    notice: Callable[[str], None] | None,
) -> CheckpointAnalysis:
    """The requested solvers on this rank's share of the batches (and of the alignment's extra
    minibatches), from ``init`` where a series' previous checkpoint gives it; ``notice`` as
    :func:`analyze_checkpoint` takes it."""
    rank, world_size = distributed.world()
    batches = distributed.shard(s.batches, rank, world_size)
    # Where the analysed batches hold the minibatches, None on every rank alike (building an
    # operator is collective), even where a rank's share of extra ones would be empty.
    minibatches = distributed.shard(s.minibatches, rank, world_size) if s.minibatches else None
    model, loss_fn = s.model, s.loss_fn
    start = time.perf_counter()
    # Refusals before any product, every rank's alike (or one rank's free memory): said once,
    # by rank 0, not once per rank, and every rank stops.
    with distributed.fail_together():
        op = HessianOperator(
            model,
            loss_fn,
            batches,
            params=param_globs(request.params),
            bn=request.bn,
            precision=request.precision,
            batch_weight=s.batch_weight,
        )
        op.check_model()  # a model autograd cannot differentiate twice soundly, refused here
        if request.top_k:
            check_count(request.top_k, op.n, request.which)
        if request.trace:  # refused now, not after the eigenpairs it would lose
            # At most every pair asked for joins Hutch++'s sketch (more need more memory).
            hutchpp = request.trace_method == "hutch++"
            pairs = request.top_k * (2 if request.which == "both" else 1) if hutchpp else 0
            largest = request.top_k if hutchpp and request.which != "smallest" else 0
            check_trace_memory(op, request.trace_probes, request.trace_method, pairs, largest)
        if request.density:  # refused now, not after the eigenpairs it would lose
            check_density_memory(op, request.density_probes, request.density_steps)
    # Once nothing refuses the analysis: a note followed by an error was of numbers never made.
    if s.initial_bn is not None and s.initial_bn[0] and notice is not None:
        notice(_initial_statistics_note(*s.initial_bn))
    loss, g = op.gradient()  # where graphs are kept, this builds them for the products too
    eig = trace = density = alignment = None
    if init is not None and init.shape[-1] != op.n:  # a directory may mix models
        init = None
    if request.top_k:

        def eig_progress(hvps: int, done: int, total: int) -> None:
            if progress:
                progress("eigenpairs", done, total)

        eig = eigenpairs(
            op,
            request.top_k,
            which=request.which,
            tol=request.tol,
            criterion=request.criterion,
            block_size=request.block_size,
            guard=request.guard,
            max_hvps=request.max_hvps,
            check_steps=request.check_steps,
            init=init,  # the previous checkpoint's vectors
            # The gradient, computed anyway, leans toward the top eigenvectors.
            hint=g if request.which != "smallest" else None,
            seed=request.seed,
            progress=eig_progress,
        )
    if request.trace:
        if progress:
            progress("trace", 0, 1)
        trace = stochastic_trace(
            op,
            request.trace_probes,
            method=request.trace_method,
            seed=request.seed,
            # The eigenpairs found begin Hutch++'s sketch at no product: less spread, same cost.
            known=eig if request.trace_method == "hutch++" else None,
            progress=(lambda done, total: progress("trace", done, total)) if progress else None,
        )
    if request.density:
        if progress:
            progress("density", 0, 1)
        density = spectral_density(
            op,
            request.density_probes,
            request.density_steps,
            seed=request.seed,
            sigma=request.density_sigma,
            known=eig,  # exact nodes, 1/n each, and the Lanczos runs spent on the rest
            progress=(lambda done, total: progress("density", done, total)) if progress else None,
        )
    if request.alignment:
        assert eig is not None and eig.which != "smallest"  # refused by _check_request
        if progress:
            progress("alignment", 0, 1)
        k = request.top_k
        alignment = alignment_scores(
            op,
            eig.eigenvalues[:k],
            eig.eigenvectors[:k],
            rho=request.rho,
            alpha=request.alpha,
            minibatches=request.minibatches,
            gradient=(loss, g),
            # Minibatches beyond the analysed batches: their own (gradient-only) operator.
            minibatch_op=HessianOperator(
                model,
                loss_fn,
                minibatches,
                params=op.space,
                bn=request.bn,
                keep_graph=False,
                batch_weight=s.batch_weight,
            )
            if minibatches is not None
            else None,
        )
    # A reduced-precision analysis states how far its products are from full-precision ones.
    hvp_rel_error = op.precision_error(seed=request.seed)
    wall = time.perf_counter() - start
    grad_seconds = op.gradient_seconds()  # warm, after the analysis, and not part of its wall
    warm = init is not None and eig is not None and eig.method != "whole-space"
    provenance = _provenance(
        ckpt, request, s, op, eig, wall, grad_seconds, hvp_rel_error, warm_from if warm else None
    )
    op.release()
    return CheckpointAnalysis(
        name=storable_text(ckpt.name),
        provenance=provenance,
        space=op.space,
        loss=loss,
        eigen=eig,
        trace=trace,
        density=density,
        alignment=alignment,
    )


def _provenance(
    ckpt: LoadedCheckpoint,
    request: AnalyzeRequest,
    s: _Setup,
    op: HessianOperator,
    eig: EigenResult | None,
    wall: float,
    grad_seconds: float,
    hvp_rel_error: float,
    warm_start: str | None,
) -> dict[str, Any]:
    """Where an analysis' numbers came from and what they cost (HDF5 attributes, ``--json``);
    ``warm_start`` is the path of the checkpoint whose eigenvectors started the eigensolver."""
    return {
        "checkpoint": storable_text(str(ckpt.path.absolute())),  # read from anywhere later
        "sha256": ckpt.sha256,
        "checkpoint_format": ckpt.format,
        # Where in the file the weights were taken from, if not all of it (None: not recorded):
        # as --weights-key named, and the leading name under which they alone fit the model.
        "weights_key": ckpt.weights_key,
        "weights_prefix": s.weights_part,
        # Files named relatively (--data batch.npz, --model net.py:make) made absolute, as
        # the checkpoint's path: the results are read from elsewhere later.
        "model": anchored(s.model_spec),
        "model_kwargs": s.model_kwargs,  # None (not recorded) where there were none
        "data": anchored_data(s.data_spec),
        "data_root": None if s.data_root is None else absolute(s.data_root),
        "loss": anchored(s.loss_spec),
        "params_glob": ",".join(param_globs(request.params) or []) or "*",
        "num_params": op.n,
        "num_samples": op.num_samples,
        "num_batches": len(s.batches),
        "batch_size": request.batch_size,
        # The alignment's minibatches are the data's first ones: the last may be short.
        "minibatch_samples": sum(
            len(y) for _, y in (s.minibatches or s.batches)[: request.minibatches]
        )
        if request.alignment
        else None,
        # What the batches' mean losses are weighted by in the operator's mean (and so H).
        "batch_weight": "samples" if s.batch_weight is None else "labels",
        "bn": request.bn,
        "bn_initial_statistics": None if s.initial_bn is None else s.initial_bn[0],
        "dtype": str(s.dtype).removeprefix("torch."),
        "precision": request.precision,
        # Measured on the products, where any was taken (--top-k 0 alone recorded 0).
        "hvp_rel_error": hvp_rel_error if op.hvp_count else None,
        "device": str(s.device),
        "seed": request.seed,
        # A warm-started result is reproduced by its series, not by its seed alone.
        "warm_start": warm_start,
        # The eigensolver's, where it ran (--top-k 0 recorded the default tol, never used).
        "solver": eig.method if eig else None,
        "tol": request.tol if eig else None,
        # None where no product was taken (--top-k 0 alone recorded the option's "auto").
        "hvp_backend": ",".join(sorted(op.backends_used)) or None,
        "hvps": op.hvp_count,
        "grad_seconds": grad_seconds,
        "grad_equivalents": wall / grad_seconds if grad_seconds > 0 else float("nan"),
        "wall_seconds": wall,
        "world_size": distributed.world()[1],
        "step": _count(ckpt.metadata.get("step")),
        "epoch": _count(ckpt.metadata.get("epoch")),
    }


def _count(value: Any) -> int | float | None:
    """A checkpoint's recorded step or epoch where it is a finite number HDF5 holds: 2**80
    failed the write after all the work, and text or NaN cannot order a series."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else None
    return value if math.isfinite(value) else None
