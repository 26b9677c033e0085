"""Errors a user can fix: the CLI prints them as one line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for: a wrong path, a missing column, a store from another plan.

    The message names the thing, the value and what was expected; `ich` prints it as
    `ich: error: <message>` and exits with status 2.
    """
