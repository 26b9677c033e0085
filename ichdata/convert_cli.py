"""Parsers and handlers of `ich convert`, `ich verify` and `ich quarantine` (owned by the conversion stage)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the conversion commands on the `ich` parser."""
