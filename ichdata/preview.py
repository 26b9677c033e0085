"""One slice as the model sees it: raw HU beside the brain, subdural and bone windows, as a PNG.

The layout is the paper's Fig. 1. For checking what a DICOM file holds — and what the preprocessing
makes of it — without a DICOM viewer.

It reads through `ichdata.dicom.read_slice` and windows through `ichdata.windows.window_hu`: the
same HU recovery (RSNA 12-bit correction included) and the same windows as conversion and
prediction, at the slice's native resolution.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ichdata.dicom import SliceError, read_slice
from ichdata.errors import UserError
from ichdata.options import option
from ichdata.paths import display_name
from ichdata.windows import WINDOWS, window_hu

__all__ = ["PREVIEW_SIZE_PX", "PreviewConfig", "write_preview"]

PREVIEW_SIZE_PX: tuple[int, int] = (1800, 540)
"""(width, height) of the PNG `write_preview` writes, in pixels."""


@dataclass(frozen=True)
class PreviewConfig:
    """What `ich preview` shows: one DICOM file, written as one PNG."""

    file: Path = option(help="DICOM file of one CT slice", positional=True, metavar="FILE")
    out: Path = option(help="PNG to write")


_DPI = 100
_RAW_RANGE = (-1000.0, 2000.0)  # the raw panel's grey scale: air to dense bone


def write_preview(path: str | os.PathLike[str], out_png: str | os.PathLike[str]) -> Path:
    """Write a PNG of one DICOM slice and return its path.

    The panels: raw HU (grey scale -1000..2000 HU with a colour bar) and the three windows, each
    titled with its window's level and width.

    Raises:
        UserError: when `path` does not exist or is not a usable CT slice (the message names the file
            and the reason), or when the PNG's folder does not exist.
    """
    path, out_png = Path(path), Path(out_png)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if not out_png.parent.is_dir():
        raise UserError(f"{out_png.parent}: no such folder to write the preview into")
    try:
        hu, meta = read_slice(path)
    except SliceError as exc:
        raise UserError(f"cannot preview {exc} (reason: {exc.reason})") from exc

    # Agg through the object API: no pyplot, no global backend switch, safe in threads and servers.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    windows = window_hu(hu, size=max(hu.shape))
    width, height = PREVIEW_SIZE_PX
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 1 + len(WINDOWS))
    image = axes[0].imshow(hu, cmap="gray", vmin=_RAW_RANGE[0], vmax=_RAW_RANGE[1], interpolation="nearest")
    axes[0].set_title(f"raw HU ({hu.min():.0f} .. {hu.max():.0f})")
    bar = fig.colorbar(image, ax=axes[0], shrink=0.85)
    bar.set_label("HU")
    for ax, window, channel in zip(axes[1:], WINDOWS, windows, strict=True):
        ax.imshow(channel, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{window.name} (level {window.level:g}, width {window.width:g})")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"{display_name(path.name)}  ·  {display_name(meta.image_id)}  ·  {meta.rows}×{meta.cols}  ·  "
        f"position {meta.slice_position:.1f} mm",
        fontsize=11,
    )
    fig.savefig(out_png, dpi=_DPI, format="png")
    return out_png
