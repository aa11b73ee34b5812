"""``python -m hessian_cli`` and the ``hessian-cli`` command: load the CLI, then run it."""

import sys

from hessian_cli.launch import env_rank  # torch-free, as all that loads before the CLI


def main() -> None:
    """Run the CLI. A Ctrl-C while it loads (typer, rich, the commands: the first ~0.3 s) ends
    with the shell's status for SIGINT, as one later does, not with an import traceback."""
    try:
        from hessian_cli.cli.app import load_commands
        from hessian_cli.cli.app import main as run

        load_commands()
    except KeyboardInterrupt:
        if env_rank() == 0:  # under torchrun, said once
            print("interrupted by Ctrl-C.", file=sys.stderr)  # as the CLI's INTERRUPTED says
        sys.exit(130)  # the shell's status for SIGINT, as the CLI's own INTERRUPTED_STATUS
    run()


if __name__ == "__main__":
    main()
