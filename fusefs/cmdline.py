"""Command lines of the control file, split as a shell would split them into lines.

A line ends at a newline outside quotes; a newline inside quotes (or after a backslash) belongs
to the line, so a quoted name may hold newlines. Quotes and backslashes are read as
:func:`shlex.split` reads them in POSIX mode: no escapes inside single quotes; inside double
quotes a backslash takes the next character. The state is kept from where the previous scan
stopped, so every byte is examined once however the line arrives (a quoted name with 20,000
newlines written a byte at a time stays linear). All special characters are ASCII, so scanning
the UTF-8 bytes equals scanning the decoded text.
"""

from __future__ import annotations

import re

_PLAIN, _SINGLE, _DOUBLE, _ESCAPED = 0, 1, 2, 4
#: What ends a run of ordinary bytes in each state.
_SPECIAL = {
    _PLAIN: re.compile(rb"[\n'\"\\]"),
    _SINGLE: re.compile(rb"'"),
    _DOUBLE: re.compile(rb'["\\]'),
}


class CommandLines:
    """Bytes written to one control-file handle, handed out one complete line at a time."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scanned = 0  # _buf[:_scanned] holds no line end; _state is the state there
        self._state = _PLAIN  # _PLAIN, _SINGLE or _DOUBLE, | _ESCAPED after a backslash
        self.scan_work = 0  # bytes examined so far (each byte once)

    def __len__(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def take(self) -> bytes | None:
        """The first complete line (without its newline), or None if there is none yet."""
        buf, pos, state = self._buf, self._scanned, self._state
        end = len(buf)
        while pos < end:
            if state & _ESCAPED:  # the byte after a backslash is literal (a newline too)
                state &= ~_ESCAPED
                pos += 1
                continue
            mo = _SPECIAL[state].search(buf, pos)
            if mo is None:
                pos = end
                break
            c, pos = mo.group(), mo.end()
            if c == b"\\":
                state |= _ESCAPED
            elif c == b"\n":  # only searched for outside quotes
                self.scan_work += pos - self._scanned
                line = bytes(buf[: pos - 1])
                del buf[:pos]
                self._scanned, self._state = 0, _PLAIN
                return line
            elif state == _PLAIN:
                state = _SINGLE if c == b"'" else _DOUBLE
            else:  # the closing quote
                state = _PLAIN
        self.scan_work += pos - self._scanned
        self._scanned, self._state = pos, state
        return None

    def rest(self) -> bytes:
        """Everything not taken yet (a last line without a newline); the buffer is emptied."""
        out = bytes(self._buf)
        self.clear()
        return out

    def clear(self) -> None:
        self._buf.clear()
        self._scanned, self._state = 0, _PLAIN
