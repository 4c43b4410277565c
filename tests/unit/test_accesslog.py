"""The access log writer: twisted.web's line, cheaper, and JSON records."""

from __future__ import annotations

import io
import json
import re

import pytest
from twisted.internet.task import Clock
from twisted.web.http import _escape

from nixeryd.accesslog import AccessLog, quoted


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"/v2/hello/manifests/latest?n=1&last=a",
        b'say "hi"',
        b"it's",
        b"both ' and \"",
        b"back\\slash",
        b"line\nbreak\r\x00\x1b[31m",
        bytes(range(256)),
        "caf\u00e9".encode(),
    ],
)
def test_fields_are_escaped_as_twisted_web_escapes_them(value: bytes) -> None:
    assert quoted(value) == _escape(value)


def log_one(access: AccessLog, **overrides: object) -> None:
    fields: dict[str, object] = {
        "remote": "10.0.0.7",
        "method": b"GET",
        "target": b"/v2/",
        "protocol": b"HTTP/1.1",
        "status": 200,
        "sent": 2,
        "seconds": 0.000125,
        "user_agent": b"docker/27",
        "referer": None,
        "user": None,
    }
    access.request(**{**fields, **overrides})  # type: ignore[arg-type]


class Stream(io.StringIO):
    """A stream counting its writes."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_the_lines_of_a_reactor_turn_are_written_at_its_end_in_one_write() -> None:
    clock, stream = Clock(), Stream()
    access = AccessLog(stream, "text", clock)
    for _ in range(3):
        log_one(access)
    assert stream.getvalue() == ""
    clock.advance(0)
    assert stream.writes == 1
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    line = r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+0000 \[access\] "10\.0\.0\.7" - - \[[^]]+\] '
    line += r'"GET /v2/ HTTP/1\.1" 200 2 "-" "docker/27" 0\.125ms'
    assert re.fullmatch(line, lines[0]), lines[0]
    log_one(access, status=404, sent=0, user="bob", referer=b"http://x/", user_agent=None)
    access.flush()
    assert stream.writes == 2
    assert " - bob [" in stream.getvalue().splitlines()[3]
    assert '" 404 - "http://x/" "-" ' in stream.getvalue().splitlines()[3]
    clock.advance(0)  # the turn's write finds nothing left
    assert stream.writes == 2


def test_a_json_record_is_a_json_text_sequence_entry() -> None:
    stream = io.StringIO()
    access = AccessLog(stream, "json", Clock())
    log_one(access, target=b'/v2/a"b\n', referer=b"http://x/")
    access.flush()
    text = stream.getvalue()
    assert text.startswith("\x1e") and text.endswith("\n") and text.count("\n") == 1
    record = json.loads(text[1:])
    assert record["path"] == '/v2/a"b\n'
    assert record["referer"] == "http://x/"
    assert record["duration_ms"] == 0.125
    assert "user" not in record


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text or json"):
        AccessLog(io.StringIO(), "xml", Clock())
