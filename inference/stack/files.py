"""Durable, deterministic files: fsync'd writes and the PNG encoding every stack image uses.

Shared by the stack writer and the PSD/ORA exports.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def fsync_dir(path: Path) -> None:
    """Persist a directory entry change (rename, new file); a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# zlib's run-length strategy on PNG-filtered rows: about half the encoding time of the
# default strategy for files of about the same size (1024² RGB: 65 vs 133 ms).
PNG_SAVE_OPTIONS = dict(format="PNG", compress_level=6, compress_type=zlib.Z_RLE)


def write_png(path: Path, array: np.ndarray) -> None:
    """Write an 8-bit PNG with no ancillary chunks (no time, text or dpi) and fsync it.

    Only IHDR, IDAT and IEND are written, so equal arrays give equal bytes.
    """
    image = Image.fromarray(np.ascontiguousarray(array))
    with open(path, "wb") as handle:
        image.save(handle, **PNG_SAVE_OPTIONS)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
