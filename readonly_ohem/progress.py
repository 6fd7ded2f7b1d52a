"""A tiny tqdm-like progress line on stderr: ``desc  12/4952  3.4 im/s  ETA 24:10``.

Redrawn in place (``\\r``) at most every ``min_interval`` seconds on a terminal; elsewhere (logs)
one line per ``log_interval`` seconds, so log files stay readable. The last line stays.
``write(text)`` prints a log line on the same stream without garbling it: on a terminal the
in-place line is cleared first and redrawn below the text.
"""

from __future__ import annotations

import sys
import time


def clock(seconds: float) -> str:
    """``m:ss``-style wall time: ``05:07``, or ``1:05:07`` from an hour on."""
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Count ``total`` items; ``update()`` after each, ``close()`` at the end (or use ``with``)."""

    def __init__(self, total: int, desc: str = "", unit: str = "im", stream=None,
                 min_interval: float = 0.2, log_interval: float = 10.0):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = min_interval if self.tty else log_interval
        self.n = 0
        self.start = self._last = time.perf_counter()
        self._partial = False  # a terminal line drawn in place, without its newline

    @property
    def rate(self) -> float:
        """Items per second so far."""
        elapsed = time.perf_counter() - self.start
        return self.n / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        eta = clock((self.total - self.n) / rate) if rate > 0 and self.n < self.total else "--:--"
        if self.n >= self.total:
            eta = clock(time.perf_counter() - self.start)  # the total time once done
        width = len(str(self.total))
        head = f"{self.desc}  " if self.desc else ""
        tail = "done in" if self.n >= self.total else "ETA"
        return f"{head}{self.n:>{width}}/{self.total}  {rate:.2f} {self.unit}/s  {tail} {eta}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self._last >= self.interval and self.n < self.total:
            self._last = now
            self._draw(final=False)

    def _draw(self, final: bool) -> None:
        end = "\n" if (final or not self.tty) else ""
        self.stream.write(("\r" if self.tty else "") + self.line() + end)
        self.stream.flush()
        self._partial = not end

    def write(self, text: str) -> None:
        """A whole log line on the progress stream (the in-place line cleared, then redrawn)."""
        if self._partial:
            self.stream.write("\r\x1b[K")  # carriage return + erase to end of line
        self.stream.write(text + "\n")
        self.stream.flush()
        if self._partial:
            self._draw(final=False)

    def close(self) -> None:
        self._draw(final=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
