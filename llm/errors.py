"""User-facing errors: bad input ends a command with one line on stderr, never a traceback."""
import argparse
import os
import sys
from contextlib import contextmanager


class UserError(Exception):
    """Something the user can fix: a bad path, value or checkpoint. Printed as one line."""


@contextmanager
def exit_on_user_error():
    """Turn a UserError into `error: <message>` on stderr and exit status 2, and Ctrl-C
    into `interrupted` and exit status 130. Under torchrun, ranks other than 0 say who they are.
    """
    try:
        yield
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        message = " ".join(str(e).split())  # always one line
        rank = os.environ.get("RANK", "0")
        print(f"{f'[rank {rank}] ' if rank != '0' else ''}error: {message}", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only where it says something (not None, False or [])."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is a UserError (one line) instead of usage + message."""

    def error(self, message):
        raise UserError(message)
