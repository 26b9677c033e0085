"""One declaration per command-line option: a config dataclass field that carries its help.

A stage's config dataclass declares each field with `option(...)`; the `ich` command line
(`flows/cli.py`) builds its parsers from those fields, so the default, the type and the help text
live in one place. Fields without `option` metadata are not on the command line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    metavar: str | None = None,
    positional: bool = False,
    nargs: str | None = None,
    choices: Sequence[str] | None = None,
    group: str | None = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default: the field's default; a field without one is a required option (or a positional).
        help: the option's help text, as `ich COMMAND --help` shows it.
        flag: the option's name when it is not `--` + the field name with `-` for `_` (a `bool`
            field whose default is True needs one, e.g. `--no-augment`, which sets it to False).
        metavar: the placeholder shown in the usage line.
        positional: a positional argument instead of a `--flag`.
        nargs: argparse's `nargs` (e.g. `"+"` for one or more run directories).
        choices: the values allowed (a `Literal` type gives them too).
        group: options sharing a group name are mutually exclusive.
        default_factory: as `dataclasses.field`'s.
    """
    metadata = {
        "help": help,
        "flag": flag,
        "metavar": metavar,
        "positional": positional,
        "nargs": nargs,
        "choices": None if choices is None else tuple(choices),
        "group": group,
    }
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


__all__ = ["option"]
