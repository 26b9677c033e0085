r"""How `ich` writes to its terminal: any file name under any locale, and readers that stop early.

`setup_streams()` gives stdout and stderr the error handler `"ich.names"`: a name the OS could not
decode (`surrogateescape`: a UTF-8 name under `LC_ALL=C PYTHONUTF8=0`, a Latin-1 name under UTF-8) goes
out as its own bytes, and text the stream's encoding cannot hold (`é` or `…` on an ASCII stream) as
`\xe9`-style escapes, so printing never raises. `reader_gone()` tells a reader that stopped early
(`ich quarantine | head`) from any other broken pipe; `flows.cli.main` then exits quietly with
`EXIT_READER_GONE`.
"""

from __future__ import annotations

import codecs
import io
import os
import select
import sys

#: The exit status after the reader of stdout went away: what a shell reports for a command that
#: SIGPIPE ended (128 + 13), as `cat`, `grep` or `sort` do in `… | head`. Not 0: the output was not all
#: delivered, and `set -o pipefail` scripts already expect this status from those commands.
EXIT_READER_GONE = 141

_HANDLER = "ich.names"


def _names(exc: UnicodeError) -> tuple[str | bytes, int]:
    """Encode what the stream's codec cannot: escaped bytes as themselves, anything else as an escape."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    chunk = exc.object[exc.start : exc.end]
    if all(0xDC80 <= ord(c) <= 0xDCFF for c in chunk):  # bytes `surrogateescape` carried
        return bytes(ord(c) - 0xDC00 for c in chunk), exc.end
    return codecs.backslashreplace_errors(exc)


def setup_streams() -> None:
    """Make `print` of any text to stdout and stderr succeed (see the module docstring)."""
    codecs.register_error(_HANDLER, _names)
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors=_HANDLER)


def reader_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader has gone; if so, stdout is silenced.

    The interpreter flushes stdout once more at exit: pointed at /dev/null, that flush neither fails
    nor prints "Exception ignored … BrokenPipeError".
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture)
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)  # POLLERR: the write end of a pipe whose read end is closed
    if not any(events & select.POLLERR for _, events in poller.poll(0)):
        return False
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    return True


__all__ = ["EXIT_READER_GONE", "reader_gone", "setup_streams"]
