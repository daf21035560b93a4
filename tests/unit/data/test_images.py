"""Pictures of subtomograms: a query's PNG holds its three central slices, side by side."""

from __future__ import annotations

import struct
import zlib

import numpy as np

from orchestrator.data.images import slices_png


def decode_grey_png(data: bytes) -> np.ndarray:
    """The pixels of an 8-bit grey PNG with unfiltered lines (what `to_png` writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    length = struct.unpack(">I", data[33:37])[0]  # IDAT follows IHDR's 25-byte chunk
    assert data[37:41] == b"IDAT"
    lines = np.frombuffer(zlib.decompress(data[41:41 + length]), np.uint8).reshape(height, width + 1)
    assert (lines[:, 0] == 0).all()  # filter byte 0 on every line
    return lines[:, 1:]


def test_a_query_png_shows_the_xy_xz_and_yz_slices_left_to_right_zoomed():
    volume = np.zeros((8, 8, 8), np.float32)
    volume[4, :, :] = 1.0  # the central XY plane is bright: XY all bright, XZ and YZ one bright row
    pixels = decode_grey_png(slices_png(volume, zoom=3))
    assert pixels.shape == (8 * 3, (3 * 8 + 2) * 3)
    xy, xz, yz = pixels[:, :24], pixels[:, 27:51], pixels[:, 54:]
    assert (xy == 255).all()
    for side in (xz, yz):
        assert (side[12:15] == 255).all() and (side[:12] == 0).all() and (side[15:] == 0).all()
    assert (pixels[:, 24:27] == 255).all()  # the white column between XY and XZ
