"""The errors the CLI turns into one sentence (problems the user can fix, a termination), and
helpers that quote other errors in such a sentence."""

from numbers import Real


class UserError(Exception):
    """Bad input or an environment problem, described in one sentence for the user.

    The library's messages name its parameters in backticks (`` `tol` ``, `` `which=both` ``),
    which the command line shows as its flags (``--tol``, ``--which both``): each reader sees
    the name it gave. ``exit_status`` is the command's: 2, or 1 where the sentence reports an
    error of ours (a series that keeps its results after one)."""

    exit_status = 2


class NotFinite(UserError):
    """The loss or its derivatives are NaN or infinite at the weights given: bad input for an
    analysis, a diverged run for training (which says so in its own words)."""


class Terminated(BaseException):
    """The process received SIGTERM (torchrun stopping the job after another rank failed, or a
    scheduler's kill). Raised in the main thread, like KeyboardInterrupt, so that clean-up runs
    on the way out (training writes the metrics of the steps done, temporary files go). A
    message, where given, is what the user is told instead of the plain fact."""


OUT_OF_HOST_MEMORY = (
    "the machine ran out of memory: try fewer samples, a smaller --batch-size or fewer probes"
)


def out_of_host_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed CPU allocation (torch says so in a RuntimeError)."""
    text = str(exc)
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError)
        and ("can't allocate memory" in text or "not enough memory" in text)
    )


def described(exc: BaseException) -> str:
    """An exception as ``Type: first line of its message`` (its type alone if it has none)."""
    return f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without a closing period (its type's name if
    it has none): what a one-sentence error quotes of a library's or the user's own error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


# The module a user's file is imported as starts so (then its stem, then a digest of its path).
USER_MODULE_PREFIX = "hessian_cli_user_"


def is_number(value: object) -> bool:
    """Whether ``value`` is a real number (not a bool, which ``numbers.Real`` admits)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def shown(value: object) -> str:
    """A setting as its refusal names it: a number as ``:g`` writes it, anything else as its
    repr (a string in its quotes: "0.05" from a config file)."""
    return f"{value:g}" if is_number(value) else repr(value)


def a_type(obj: object) -> str:
    """The type of ``obj`` with its article, for messages: ``a list``, ``an int``, ``None``, and
    outside the builtins with its package, which also keeps the article right: ``a
    numpy.ndarray``, ``a torch.Tensor``."""
    if obj is None:
        return "None"
    kind = type(obj)
    package = kind.__module__.split(".")[0]
    if package.startswith(USER_MODULE_PREFIX):  # a user's file: named by its stem, "net.Output"
        package = package[len(USER_MODULE_PREFIX) :].rpartition("_")[0]
    name = kind.__name__ if package == "builtins" else f"{package}.{kind.__name__}"
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
