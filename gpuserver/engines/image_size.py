"""Image dimensions read from the file header, so a decompression bomb is refused undecoded.

A 100 KB PNG can claim 30000x30000 pixels (2.7 GB once decoded). OpenCV picks its decoder
from the content, not the file name, so the format is sniffed here the same way, and only
PNG, JPEG, WebP and BMP are accepted.
"""

from __future__ import annotations

from gpuserver.engines.base import AvatarSourceError

# The most any image or video frame is decoded at, whatever the settings say (~300 MB BGR).
MAX_DECODE_PIXELS = 100_000_000

_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (C4 = DHT, C8 = JPG, CC = DAC are not frames).
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD9)})


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG, JPEG, WebP or BMP header; ValueError if not readable."""
    if data.startswith(_PNG) and data[12:16] == b"IHDR":
        return _be(data, 16, 4), _be(data, 20, 4)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    if data.startswith(b"BM") and len(data) >= 26:
        if _le(data, 14, 4) == 12:  # OS/2 BITMAPCOREHEADER
            return _le(data, 18, 2), _le(data, 20, 2)
        height = int.from_bytes(data[22:26], "little", signed=True)  # negative: top-down
        return _le(data, 18, 4), abs(height)
    raise ValueError("not a PNG, JPEG, WebP or BMP image")


def check_image_pixels(data: bytes, max_pixels: int) -> tuple[int, int]:
    """The image's (width, height); AvatarSourceError if unreadable or over `max_pixels`."""
    try:
        width, height = image_size(data)
    except (ValueError, IndexError) as exc:
        raise AvatarSourceError(f"cannot read the image's size: {exc}") from None
    check_pixels(width, height, max_pixels)
    return width, height


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise AvatarSourceError(f"the image claims to be {width}x{height} pixels")
    limit = min(max_pixels, MAX_DECODE_PIXELS)
    if width * height > limit:
        raise AvatarSourceError(
            f"the image is {width}x{height} pixels; at most {limit:,} pixels are accepted"
        )


def _jpeg_size(data: bytes) -> tuple[int, int]:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise ValueError("corrupt JPEG marker")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_NO_LENGTH:
            position += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        if marker in _JPEG_FRAMES:
            return _be(data, position + 7, 2), _be(data, position + 5, 2)
        position += 2 + _be(data, position + 2, 2)
    raise ValueError("no JPEG frame header")


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return _le(data, 26, 2) & 0x3FFF, _le(data, 28, 2) & 0x3FFF
    if chunk == b"VP8L" and data[20:21] == b"\x2f":
        bits = _le(data, 21, 4)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return _le(data, 24, 3) + 1, _le(data, 27, 3) + 1
    raise ValueError("unknown WebP layout")


def _be(data: bytes, offset: int, size: int) -> int:
    if offset + size > len(data):
        raise ValueError("truncated header")
    return int.from_bytes(data[offset : offset + size], "big")


def _le(data: bytes, offset: int, size: int) -> int:
    if offset + size > len(data):
        raise ValueError("truncated header")
    return int.from_bytes(data[offset : offset + size], "little")
