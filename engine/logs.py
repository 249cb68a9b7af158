"""What an operator reads while things start and run: one log format for both processes (the
engine core is spawned, so it sets up its own logging), a one-line form of an error, and
progress lines for long waits. No torch here: the API process imports this module."""
import logging
import re
import time
from collections.abc import Callable

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for a log line a script or systemd shows whole."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


# A C++ library's log prefix, `[16:23:58] /project/cpp/json_schema_converter.cc:5082: `, and
# an internal assertion's `Check failed: (error.empty()) is false: `.
_NATIVE_PREFIX = re.compile(r"^\[[\d:.]+\] \S+:\d+: (Check failed: .*? is false: )?")
_NATIVE_MESSAGE_CHARS = 300


def native_message(exc: BaseException) -> str:
    """The human part of a C++ library's error (xgrammar's), for a client to read: its line
    without the prefix naming the library's source files, cut to a few hundred characters (a
    message may quote the whole schema)."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    line = next((ln for ln in lines if _NATIVE_PREFIX.match(ln)), lines[-1])
    text = _NATIVE_PREFIX.sub("", line)
    return text if len(text) <= _NATIVE_MESSAGE_CHARS else text[:_NATIVE_MESSAGE_CHARS] + "..."


class Progress:
    """`done/total what (percent), elapsed` at most every `interval_s` seconds while work goes
    on: a long wait shows that it moves, and a short one prints nothing."""

    def __init__(self, total: int, what: str, emit: Callable[[str], None],
                 interval_s: float) -> None:
        self.total, self.what, self.emit, self.interval_s = total, what, emit, interval_s
        self.start = self._last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if done < self.total and now - self._last >= self.interval_s:
            self._last = now
            self.emit(f"{done}/{self.total} {self.what} ({done / max(self.total, 1):.0%}), "
                      f"{now - self.start:.1f} s")
