"""A log file a child process keeps writing (llama-server's), read incrementally and bounded.

tuner polls llama-server's log many times a second while it loads (its stage, its error when it stops), and parses
it once loaded. Reading the whole file each time costs memory and time in proportion to what the child wrote, and a
``--server-bin`` may write without end. :class:`GrowingLog` keeps an offset and reads only what was appended since
its last read, and keeps at most :data:`HEAD_BYTES` from the start of the file (the load log: model, buffers,
context) and the last :data:`TAIL_BYTES` (the latest lines: why it stopped, the memory breakdown it prints on
exit); whatever lies between is skipped unread. A real load log with ``-lv 4`` is 10-100 kB, far inside both.

Hand-written: the standard library has no bounded incremental reader of a growing file (``collections.deque`` bounds
lines, not bytes, and still reads all of them).
"""

from __future__ import annotations

import os
from pathlib import Path

HEAD_BYTES = 4 << 20
TAIL_BYTES = 4 << 20


class GrowingLog:
    """The first ``head_bytes`` and the last ``tail_bytes`` of a file that only grows, read incrementally."""

    def __init__(self, path: Path, head_bytes: int = HEAD_BYTES, tail_bytes: int = TAIL_BYTES) -> None:
        self.path = path
        self.head_bytes = head_bytes
        self.tail_bytes = tail_bytes
        self._offset = 0  # bytes of the file accounted for: len(head) + skipped_bytes + len(tail)
        self._head = bytearray()
        self._tail = bytearray()
        self.skipped_bytes = 0
        self._text: str | None = None

    def _reset(self) -> None:
        self._offset, self.skipped_bytes, self._text = 0, 0, None
        self._head.clear()
        self._tail.clear()

    def update(self) -> bool:
        """Read what was appended since the last call (at most ``head_bytes + tail_bytes``); True when there was
        anything. A file that shrank (replaced or truncated) is read again from its start; one that cannot be
        opened reads as what was read before."""
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < self._offset:
                    self._reset()
                if size == self._offset:
                    return False
                if len(self._head) < self.head_bytes:  # then nothing went to the tail yet: offset == len(head)
                    fh.seek(self._offset)
                    chunk = fh.read(min(size - self._offset, self.head_bytes - len(self._head)))
                    self._head += chunk
                    self._offset += len(chunk)
                new = size - self._offset
                if new > 0:
                    if new > self.tail_bytes:  # more than the tail keeps: skip what it would drop, unread
                        self.skipped_bytes += len(self._tail) + new - self.tail_bytes
                        self._tail.clear()
                        self._offset = size - self.tail_bytes
                    fh.seek(self._offset)
                    data = fh.read(size - self._offset)
                    self._tail += data
                    self._offset += len(data)
                    over = len(self._tail) - self.tail_bytes
                    if over > 0:
                        self.skipped_bytes += over
                        del self._tail[:over]
        except OSError:
            return False
        self._text = None
        return True

    @property
    def read_bytes(self) -> int:
        """How far into the file this log has got (read, or skipped unread)."""
        return self._offset

    def grew_since(self, read_bytes: int) -> bool:
        """Whether the file has grown past ``read_bytes`` (a :attr:`read_bytes` of earlier), reading what it has."""
        self.update()
        return self._offset != read_bytes

    def text(self) -> str:
        """What was kept, decoded (invalid UTF-8 replaced): the head, then a line that says how much was skipped,
        then the tail from its first whole line."""
        self.update()
        if self._text is None:
            head = self._head.decode("utf-8", errors="replace")
            if not self.skipped_bytes:
                self._text = head + self._tail.decode("utf-8", errors="replace")
            else:
                newline = self._tail.find(b"\n")
                tail = self._tail[newline + 1:] if newline >= 0 else self._tail
                self._text = (f"{head}\n[tuner: {self.skipped_bytes} bytes of this log were not read]\n"
                              f"{tail.decode('utf-8', errors='replace')}")
        return self._text
