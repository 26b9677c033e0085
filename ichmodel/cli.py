"""Parsers and handlers of this stage's `ich` subcommands. Imports nothing heavy at module level."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this stage's commands on the `ich` parser."""
