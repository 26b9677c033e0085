"""`ich`: one command line for the three jobs (ingest/convert, train, evaluate/predict).

Every subcommand imports its stage lazily, inside its handler, so `ich convert` runs where only
`ichdata`'s dependencies are installed (a lean conversion image on a cluster) and `ich --help`
never pays for torch or prefect. Parsers for the `flows` and `ichmodel` stages live in their own
`cli.py` modules, which import nothing heavy at module level either.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ichdata.errors import UserError


def _synth(a: argparse.Namespace) -> int:
    from ichdata.testing import write_archive

    summary = write_archive(
        a.out, studies=a.studies, seed=a.seed, any_prevalence=a.prevalence, image_size=a.image_size
    )
    print(summary)
    return 0


def _preview(a: argparse.Namespace) -> int:
    from ichdata.preview import write_preview

    out = write_preview(a.file, a.out)
    print(f"wrote {out}")
    return 0


def _add_ichdata_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic RSNA-format head-CT archive (DICOM + label CSV)")
    p.add_argument("out", type=Path, help="folder to write (created)")
    p.add_argument("--studies", type=int, default=20, help="number of studies (default 20)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same archive")
    p.add_argument(
        "--prevalence",
        type=float,
        default=0.14,
        help="fraction of slices with any hemorrhage, 0..0.6 (default 0.14, RSNA's)",
    )
    p.add_argument(
        "--image-size", type=int, default=512, help="slice rows and columns, 32..1024 (default 512, RSNA's)"
    )
    p.set_defaults(handler=_synth)

    p = sub.add_parser(
        "preview", help="raw HU and the three windows of one DICOM slice, side by side, as PNG"
    )
    p.add_argument("file", type=Path, help="DICOM file of one CT slice")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.set_defaults(handler=_preview)

    from ichdata import convert_cli

    convert_cli.add_commands(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ich",
        description="Head-CT DICOM archives -> a sharded Zarr v3 store -> CNN-RNN hemorrhage detectors.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_ichdata_commands(sub)
    # The other stages declare their parsers without importing torch or prefect.
    from flows import cli as flows_cli
    from ichmodel import cli as model_cli

    flows_cli.add_commands(sub)
    model_cli.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ich` console script; tests call it with an argv list."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"ich: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ich: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in {"torch", "timm", "torchvision", "prefect"}:
            print(
                f"ich: error: `ich {args.command}` needs {exc.name}, which is not installed: "
                "pip install 'ich[all]'",
                file=sys.stderr,
            )
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
