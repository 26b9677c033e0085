"""Errors a user can fix: the CLI prints them as one line, without a traceback."""

from __future__ import annotations

import errno


class UserError(Exception):
    """A mistake in what the user asked for: a wrong path, a missing column, a store from another plan.

    The message names the thing, the value and what was expected; `ich` prints it as
    `ich: error: <message>` and exits with status 2.
    """


def disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC or EDQUOT error in `exc`'s chain of causes, if any."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def out_of_space(exc: BaseException, then: str, where: object = None) -> UserError | None:
    """The one-line error for a full disk or quota anywhere in `exc`'s causes (else None).

    It names the file that could not be written (`ichdata.atomic` names its target in the OS error;
    `where` when the OS names none) and says what to do: free some space, then `then`.
    """
    full = disk_full(exc)
    if full is None:
        return None
    name = full.filename or where
    where = f"{name}: " if name else ""
    what = "disk quota exceeded" if full.errno == errno.EDQUOT else "no space left on device"
    return UserError(f"{where}{what}; free some space, then {then}")


__all__ = ["UserError", "disk_full", "out_of_space"]
