"""Command-line parsers generated from config dataclasses whose fields are declared with `option()`.

A field's type gives the argparse type (`Path`, `int`, `float`, `str`, `X | None`, `list[X]`, `Literal`
choices; a list option may be repeated), a `bool` field a flag, a field without a default a required option; help, flag name, metavar,
positional, nargs and mutually exclusive groups come from `ichdata.options.option`. A field whose type is
itself such a dataclass (`ConvertConfig.cluster: ClusterConfig`) is a group of options of its own, titled
by that class's docstring in `--help` (transformers' `HfArgumentParser` gives each dataclass a group), its
flags as flat as the others'; `build_config` builds it nested. Kept on argparse (no typer or cyclopts) so
that `ich convert` needs nothing beyond the lean core and user mistakes keep argparse's one-line messages
and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

_Config = TypeVar("_Config")
_SCALARS: dict[str, type] = {"Path": Path, "int": int, "float": float, "str": str, "bool": bool}


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """The annotation without `| None`, and whether it was a list (typing objects have no narrower type)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else str
        origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return typing.get_args(annotation)[0], True
    return annotation, False


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, localns=dict(_SCALARS))


def option_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of dataclass `cls` that are command-line options, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def option_groups(cls: type) -> dict[str, type]:
    """The fields of dataclass `cls` that hold a dataclass of options of their own, with that class."""
    hints = _field_types(cls)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if "help" not in f.metadata
        and dataclasses.is_dataclass(hints[f.name])
        and option_fields(hints[f.name])
    }


def add_options(
    parser: argparse.ArgumentParser,
    cls: type,
    prefix: str = "",
    group: argparse._ArgumentGroup | None = None,
) -> None:
    """Add one argument to `parser` per `option()` field of dataclass `cls` (`dest`: `prefix` + the field name).

    Each field holding a dataclass of options (`option_groups`) adds its own argument group to `parser`,
    whose `dest`s are prefixed with the field's name and a dot; `group` is the one `cls`'s options go to.
    """
    hints = _field_types(cls)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in option_fields(cls):
        meta = f.metadata
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else None
        kind, is_list = _unwrap(hints[f.name])
        kwargs: dict[str, Any] = {"help": meta["help"]}
        if kind is bool:
            kwargs["action"] = "store_false" if default else "store_true"
            if default and not meta["flag"]:
                raise TypeError(f"{cls.__name__}.{f.name}: a bool option that defaults to True needs a flag")
        else:
            if typing.get_origin(kind) is Literal:
                kwargs["choices"] = typing.get_args(kind)
                kind = type(typing.get_args(kind)[0])
            kwargs["type"] = kind
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
            elif prefix and "choices" not in kwargs:
                kwargs["metavar"] = f.name.upper()  # as without a group: not argparse's QUERY.MODALITY
            if meta["nargs"] or is_list:
                kwargs["nargs"] = meta["nargs"] or "+"
            if is_list and not meta["positional"]:
                # Repeatable, each time with one or more values: `--allow-root /a --allow-root /b`.
                kwargs["action"] = "extend"
        target: Any = group or parser
        if meta["group"]:
            target = groups.get(meta["group"]) or groups.setdefault(
                meta["group"], (group or parser).add_mutually_exclusive_group()
            )
        if meta["positional"]:
            if prefix:
                raise TypeError(f"{cls.__name__}.{f.name}: a group's options cannot be positional")
            kwargs.pop("metavar", None)
            target.add_argument(f.name, metavar=meta["metavar"] or f.name.upper(), **kwargs)
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        if not has_default:
            kwargs["required"] = True
        if kwargs.get("action") == "extend":
            default = None  # argparse extends a copy of the default; None: the field's own default
        target.add_argument(flag, dest=prefix + f.name, default=default, **kwargs)
    for name, inner in option_groups(cls).items():
        title = (inner.__doc__ or name).strip().splitlines()[0].rstrip(".")
        add_options(parser, inner, f"{prefix}{name}.", parser.add_argument_group(title))


def build_config(cls: type[_Config], args: argparse.Namespace, prefix: str = "") -> _Config:
    """An instance of dataclass `cls` from the parsed `args` (fields that are no option keep their default).

    A repeatable option not given keeps the field's default; one given fills a tuple field as a tuple.
    A field of `option_groups` is built from its own options (`add_options`' prefixed `dest`s).
    """
    hints = _field_types(cls)
    values: dict[str, Any] = {
        name: build_config(inner, args, f"{prefix}{name}.") for name, inner in option_groups(cls).items()
    }
    for f in option_fields(cls):
        value = getattr(args, prefix + f.name)
        kind = typing.get_origin(hints[f.name])
        if isinstance(value, list) and not f.metadata["positional"]:
            value = tuple(value) if kind is tuple else value
        elif value is None and kind in (list, tuple):
            continue
        values[f.name] = value
    return cls(**values)


__all__ = ["add_options", "build_config", "option_fields", "option_groups"]
