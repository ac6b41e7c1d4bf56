"""reader.iter_lines: line numbering, BOM, CRLF, blank lines, the per-line size cap."""

from __future__ import annotations

import io

from hfbatch.reader import MAX_LINE_BYTES, LineTooLong, iter_lines

BOM = b"\xef\xbb\xbf"


def lines(data: bytes, **kw: object) -> list[tuple[int, bytes | LineTooLong]]:
    return list(iter_lines(io.BytesIO(data), **kw))  # type: ignore[arg-type]


def test_plain_lines_are_numbered_from_one() -> None:
    assert lines(b'{"a":1}\n{"b":2}\n') == [(1, b'{"a":1}'), (2, b'{"b":2}')]


def test_last_line_without_newline_is_read() -> None:
    assert lines(b"a\nb") == [(1, b"a"), (2, b"b")]


def test_blank_and_whitespace_lines_are_skipped_but_still_counted() -> None:
    data = b"\nfirst\n\n   \n\t\r\nsecond\n\n"
    assert lines(data) == [(2, b"first"), (6, b"second")]


def test_only_blank_lines_yield_nothing() -> None:
    assert lines(b"") == []
    assert lines(b"\n\n  \r\n\n") == []


def test_crlf_line_endings_are_stripped() -> None:
    assert lines(b"one\r\ntwo\r\n\r\nthree") == [(1, b"one"), (2, b"two"), (4, b"three")]


def test_utf8_bom_on_the_first_line_is_dropped() -> None:
    assert lines(BOM + b'{"a":1}\r\n{"b":2}\r\n') == [(1, b'{"a":1}'), (2, b'{"b":2}')]


def test_bom_alone_on_a_blank_first_line() -> None:
    assert lines(BOM + b"\nx\n") == [(2, b"x")]


def test_bom_is_only_dropped_on_the_first_line() -> None:
    assert lines(b"a\n" + BOM + b"b\n") == [(1, b"a"), (2, BOM + b"b")]


def test_binary_bytes_are_passed_through() -> None:
    junk = b"\x00\xff\xfe\x80\x81garbage"
    assert lines(b"ok\n" + junk + b"\n") == [(1, b"ok"), (2, junk)]


def test_non_ascii_text_is_kept_byte_for_byte() -> None:
    text = "héllo → 世界 🙂".encode()
    assert lines(text + b"\n") == [(1, text)]


def test_line_over_the_cap_yields_a_marker_and_reading_goes_on() -> None:
    data = b"short\n" + b"x" * 50 + b"\nafter\n"
    got = lines(data, max_bytes=10)
    assert got[0] == (1, b"short")
    assert got[1][0] == 2 and isinstance(got[1][1], LineTooLong)
    assert got[1][1].size >= 50
    assert got[2] == (3, b"after")


def test_line_exactly_at_the_cap_is_accepted() -> None:
    assert lines(b"x" * 10 + b"\n", max_bytes=10) == [(1, b"x" * 10)]
    assert lines(b"x" * 10, max_bytes=10) == [(1, b"x" * 10)]


def test_line_at_the_cap_is_accepted_with_crlf_too() -> None:
    # The cap is on the line, not on its line ending: CRLF files must get the same limit as LF ones.
    assert lines(b"x" * 10 + b"\r\n" + b"y\r\n", max_bytes=10) == [(1, b"x" * 10), (2, b"y")]


def test_line_one_byte_over_the_cap_is_refused() -> None:
    got = lines(b"x" * 11 + b"\nok\n", max_bytes=10)
    assert isinstance(got[0][1], LineTooLong) and got[0][0] == 1
    assert got[1] == (2, b"ok")


def test_default_cap_is_ten_mebibytes() -> None:
    assert MAX_LINE_BYTES == 10 * 1024 * 1024

