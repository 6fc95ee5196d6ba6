"""PNG files written byte by byte: 16-bit images and decompression bombs PIL cannot make."""

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows) -> bytes:
    """A PNG from an iterable of raw scanlines (filter byte included), compressed as it goes."""
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(r) for r in rows) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", data)
        + _chunk(b"IEND", b"")
    )


def bomb_png(side: int = 30_000) -> bytes:
    """A complete, valid side x side 1-bit PNG of zeros: ~110 KB on disk, 900 M pixels decoded."""
    row = b"\x00" * (1 + (side + 7) // 8)
    block = row * 1000
    return raw_png(side, side, 1, 0, (block for _ in range(side // 1000)))
