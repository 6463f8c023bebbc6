"""CRC-32C (Castagnoli), the checksum of every VHDX header, region table and log entry.

[MS-VHDX] section 2 names CRC-32C with the Castagnoli polynomial 0x1EDC6F41 (reflected:
0x82F63B78), initial value 0xFFFFFFFF and a final inversion: the same CRC iSCSI and ext4 use.

:func:`crc32c` uses the C implementation of ``google-crc32c`` when it is installed (a dependency of
the project: it checksums a 1 MiB log entry in tens of microseconds). :func:`crc32c_python` is
our own table-driven implementation; it is the fallback when the C extension is missing and the
reference the tests compare the fast path against.
"""

from __future__ import annotations

from collections.abc import Callable

_POLY_REFLECTED = 0x82F63B78


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY_REFLECTED if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def crc32c_python(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data``, continuing from ``crc`` (the result of a previous call, or 0)."""
    table = _TABLE
    value = crc ^ 0xFFFFFFFF
    for byte in bytes(data):
        value = table[(value ^ byte) & 0xFF] ^ (value >> 8)
    return value ^ 0xFFFFFFFF


def _load_fast() -> Callable[[bytes | bytearray | memoryview, int], int] | None:
    try:
        import google_crc32c
    except ImportError:  # pragma: no cover - the dependency is normally installed
        return None
    if google_crc32c.implementation != "c":  # pragma: no cover - wheel without the extension
        return None
    extend = google_crc32c.extend

    def fast(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
        return int(extend(crc, data if isinstance(data, bytes) else bytes(data)))

    return fast


_FAST = _load_fast()

#: True when the C implementation is in use.
ACCELERATED = _FAST is not None


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data``, continuing from ``crc`` (0 to start)."""
    if _FAST is not None:
        return _FAST(data, crc)
    return crc32c_python(data, crc)  # pragma: no cover - only without google-crc32c


def checksum_with_field_zeroed(buf: bytes | bytearray, field_offset: int = 4) -> int:
    """CRC-32C of ``buf`` with its 4-byte checksum field (at ``field_offset``) taken as zero,
    which is how [MS-VHDX] defines the checksum of headers, region tables and log entries."""
    head = crc32c(memoryview(buf)[:field_offset])
    head = crc32c(b"\0\0\0\0", head)
    return crc32c(memoryview(buf)[field_offset + 4 :], head)
