"""Reader stage: an open binary file -> stream of (line_no, raw bytes); BOM, CRLF, blank lines, size cap. The caller
opens it (stdin is the CLI's to pass: batches.run.RunIO)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

MAX_LINE_BYTES = 10 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"


class LineTooLong:
    """Marker yielded instead of a line longer than the cap (its bytes are skipped, never held in memory)."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def iter_lines(f: BinaryIO, max_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | LineTooLong]]:
    """Yield (1-based line number, line without its line ending) for every non-blank line.

    A UTF-8 BOM on the first line is dropped. Lines longer than `max_bytes` yield a LineTooLong
    marker and are consumed in bounded chunks.
    """
    line_no = 0
    readline = f.readline
    while True:
        raw = readline(max_bytes + 2)  # room for the line ending (CRLF) of a line at the cap
        if not raw:
            return
        line_no += 1
        if len(raw) > max_bytes and not raw.endswith(b"\n"):
            size = len(raw)
            while True:  # skip the rest of the oversized line without keeping it
                chunk = readline(1 << 20)
                size += len(chunk)
                if not chunk or chunk.endswith(b"\n"):
                    break
            yield line_no, LineTooLong(size)
            continue
        if line_no == 1 and raw.startswith(_BOM):
            raw = raw[3:]
        line = raw.rstrip(b"\r\n")
        if len(line) > max_bytes:
            yield line_no, LineTooLong(len(line))
            continue
        if not line or line.isspace():
            continue
        yield line_no, line
