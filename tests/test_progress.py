"""``Progress``: in place on a terminal, whole lines in logs, and log lines that never land on
the end of an in-place line."""

import io

from readonly_ohem.progress import Progress


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_terminal_log_line_clears_the_in_place_line_and_redraws_it():
    s = FakeTTY()
    p = Progress(10, desc="train", unit="it", stream=s, min_interval=0.0)
    p.update()  # drawn in place: "\rtrain   1/10 ..." and no newline
    assert s.getvalue().startswith("\rtrain   1/10") and not s.getvalue().endswith("\n")
    p.write("Iteration 0, loss = 1.0")
    text = s.getvalue()
    # the log line starts on a cleared line of its own, then the progress line is redrawn
    assert "\r\x1b[KIteration 0, loss = 1.0\n\rtrain   1/10" in text
    p.close()
    assert s.getvalue().endswith("\n")


def test_log_stream_gets_whole_lines_only():
    s = io.StringIO()  # not a terminal: no \r, no escape codes
    p = Progress(3, desc="test", stream=s, log_interval=0.0)
    p.update()
    p.write("a log line")
    p.update(2)
    p.close()
    text = s.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.splitlines()[:2] == [text.splitlines()[0], "a log line"]
    assert text.splitlines()[0].startswith("test  1/3") and text.endswith("\n")
