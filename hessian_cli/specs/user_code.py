"""Import a user's object from ``package.module:attr`` or ``path/to/file.py:attr``.

Models, data and losses all accept user code in these two forms; one loader keeps their
behaviour and error messages identical.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from hessian_cli.errors import USER_MODULE_PREFIX, UserError, described

USER_CODE_FORMS = "'path/to/file.py:name' or 'package.module:name'"


def split_user_spec(spec: str) -> tuple[str, str] | None:
    """Split ``where:attr`` at the last colon; None when the spec is not of that shape.

    The last colon is used so that Windows drive letters (``C:\\x.py:f``) survive.
    """
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        return None
    return where, attr


def refuse_file_without_name(spec: str, what: str) -> None:
    """An unknown spec that is a Python file with nothing named in it (``net.py`` for
    ``net.py:make``) says so, rather than listing every form a spec takes."""
    if spec.endswith(".py") and ":" not in spec:
        raise UserError(
            f"{what} {spec!r} is a Python file but names nothing in it to call: give '{spec}:NAME'."
        )


def is_file_spec(where: str) -> bool:
    """A ``where`` that names a Python file rather than an importable module."""
    return where.endswith(".py") or "/" in where or "\\" in where


def missing_code_file(spec: str) -> str | None:
    """The Python file user code ``spec`` names (``path/to/file.py:name``) where it is not
    there: for a spec read from a checkpoint or a run, which the file may have left since."""
    parts = split_user_spec(spec)
    if parts is None or not is_file_spec(parts[0]) or Path(parts[0]).expanduser().exists():
        return None
    return parts[0]


def absolute(path: str) -> str:
    """``path`` made absolute as the user wrote it (``~`` expanded, ``..`` folded; symbolic
    links kept, so that a link re-pointed later is followed then)."""
    return os.path.abspath(os.path.expanduser(path))


def anchored(spec: str) -> str:
    """``spec`` with the file it names (``path/to/file.py:name``) made absolute, so that a run's
    config.json and checkpoints mean the same code from any working directory."""
    parts = split_user_spec(spec)
    if parts is None or not is_file_spec(parts[0]):
        return spec
    return f"{absolute(parts[0])}:{parts[1]}"


def load_object(spec: str, what: str, *, trusted: bool = True) -> Any:
    """Return the object that ``spec`` names; ``what`` ("model factory", ...) words the errors.

    ``trusted=False`` (a spec read from a checkpoint's metadata, not given by the user) refuses:
    importing the code runs it, and a checkpoint is not a reason to run code.
    """
    if not trusted:
        raise UserError(
            f"the checkpoint names code to run as its {what} ({spec!r}): it runs only if you "
            "name it yourself, or pass --trust-checkpoint if you trust where the file came from."
        )
    parts = split_user_spec(spec)
    if parts is None:
        raise UserError(f"{what} {spec!r} is not of the form {USER_CODE_FORMS}.")
    where, attr = parts
    module = _import_file(where, what) if is_file_spec(where) else _import_module(where, what)
    obj: Any = module
    for name in attr.split("."):
        if not name.isidentifier() or not hasattr(obj, name):
            raise UserError(f"{where!r} has no attribute {attr!r} (the {what} in {spec!r}).")
        obj = getattr(obj, name)
    return obj


def _import_module(name: str, what: str) -> Any:
    # The working directory, as `python -m hessian_cli` has it (the console script does not):
    # last, so that nothing installed is shadowed.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(name)
    except SystemExit as exc:
        raise UserError(f"importing {name!r} for the {what} {_exited(exc)}.") from None
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise UserError(
                f"cannot import module {name!r} for the {what}: it is not installed or not on "
                "the Python path (use 'path/to/file.py:name' for a file)."
            ) from exc
        raise UserError(f"importing {name!r} for the {what} failed: {described(exc)}.") from exc
    except Exception as exc:
        raise UserError(f"importing {name!r} for the {what} failed: {described(exc)}.") from exc


def _import_file(where: str, what: str) -> Any:
    path = Path(where).expanduser()
    if not path.is_file():
        raise UserError(f"the file {where!r} named for the {what} does not exist.")
    resolved = path.resolve()
    # A stable, unique module name per file, so two user files called model.py do not collide.
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    mod_name = f"{USER_MODULE_PREFIX}{resolved.stem}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if spec is None or spec.loader is None:
        raise UserError(f"the file {where!r} named for the {what} is not a Python module.")
    module = importlib.util.module_from_spec(spec)
    # Let the file import its siblings, as it would when run as a script.
    parent = str(resolved.parent)
    added = parent not in sys.path
    if added:
        sys.path.insert(0, parent)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(mod_name, None)
        if isinstance(exc, SystemExit):
            raise UserError(f"running {where!r} for the {what} {_exited(exc)}.") from None
        if not isinstance(exc, Exception):
            raise
        raise UserError(f"running {where!r} for the {what} failed: {described(exc)}.") from exc
    finally:
        # Kept, last: a factory may import a sibling when called; nothing is shadowed there.
        if added and parent in sys.path:
            sys.path.remove(parent)
            sys.path.append(parent)
    return module


def call_user(func: Any, what: str, spec: str, **kwargs: Any) -> Any:
    """Call a user factory, turning its exceptions into one-sentence user errors."""
    if not callable(func):
        raise UserError(f"the {what} {spec!r} is not callable.")
    try:
        return func(**kwargs)
    except UserError:
        raise
    except SystemExit as exc:
        raise UserError(f"the {what} {spec!r} {_exited(exc)}.") from None
    except Exception as exc:
        raise UserError(f"the {what} {spec!r} raised {described(exc)}.") from exc


def guarded_user_function(func: Any, what: str, spec: str) -> Any:
    """``func`` (user code called again and again, such as a loss) with what it raises said in
    one sentence that names it: ``sys.exit`` would end the command with the user's status (0
    for a run that did nothing), and an error midway (a batch the first check did not meet) read
    as an unexpected error of ours. A RuntimeError passes as it is: torch raises one inside the
    function where a transform cannot follow it, and the engine falls back on it."""

    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SystemExit as exc:
            raise UserError(f"the {what} {spec!r} {_exited(exc)}.") from None
        except (UserError, RuntimeError):
            raise
        except Exception as exc:
            raise UserError(f"the {what} {spec!r} raised {described(exc)}.") from exc

    # As its __wrapped__: the engine looks in a loss module for its TorchScript (loss_scripts).
    return functools.update_wrapper(guarded, func, assigned=(), updated=())


def _exited(exc: SystemExit) -> str:
    return f"called sys.exit({exc.code!r}) instead of returning"
