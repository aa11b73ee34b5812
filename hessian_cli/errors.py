"""One exception type for problems the user can fix; the CLI prints its message as one sentence."""


class UserError(Exception):
    """Bad input or an environment problem, described in one sentence for the user."""
