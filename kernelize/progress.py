"""Progress a person can read: one line per step, and a bar with count and ETA (``tqdm``)
for the long ones (calibration per site and candidate, tuning trials, latency runs).

The pipeline's ``progress`` (``Context.progress``, the ``say`` callbacks of the passes) is a
callable taking one message. :class:`Progress` is such a callable that can also draw bars;
code that has only a callable asks for a bar through :func:`bar`, which gives a bar that
does nothing when the callable cannot draw one (a plain function from a caller of the API).
Bars are drawn only on a terminal: under ``-q`` nothing is printed, and when stderr is a
file or a pipe the lines are written as before, without bars.
"""

from __future__ import annotations

import sys
import time
from typing import Callable


class Progress:
    """``progress(message)`` prints ``[  elapsed] message`` on stderr (nothing when
    ``quiet``); ``progress.bar(total, label)`` is a bar (see :class:`Bar`)."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self._bars = 0  # bars being drawn: lines go above them

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        line = f"[{time.perf_counter() - self.start:6.1f}s] {message}"
        if self._bars:
            from tqdm import tqdm

            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    @property
    def draws_bars(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return not self.quiet and bool(isatty and isatty())

    def bar(self, total: int, label: str, unit: str = "it") -> "Bar":
        return Bar(self, total, label, unit)


class Bar:
    """A count towards ``total`` with rate and ETA (``tqdm``), used as a context manager:
    ``update(n)`` advances it, ``say(message)`` shows what is being done now (beside the bar
    on a terminal; as a progress line otherwise, so that logs keep every step)."""

    def __init__(self, progress: Callable[[str], None] | None, total: int, label: str, unit: str = "it"):
        self.progress = progress
        self.label = label
        self._tqdm = None
        if isinstance(progress, Progress) and progress.draws_bars and total > 0:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, desc=label, unit=unit, file=progress.stream, leave=False,
                              dynamic_ncols=True, bar_format="{desc}: {n_fmt}/{total_fmt} {bar} "
                                                             "[{elapsed}<{remaining}] {postfix}")
            progress._bars += 1

    @property
    def drawn(self) -> bool:
        return self._tqdm is not None

    def update(self, n: int = 1) -> None:
        if self._tqdm is not None:
            self._tqdm.update(n)

    def say(self, message: str) -> None:
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(message, refresh=True)
        elif self.progress is not None:
            self.progress(message)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
            self.progress._bars -= 1

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(progress: Callable[[str], None] | None, total: int, label: str, unit: str = "it") -> Bar:
    """A bar on ``progress`` when it draws bars (a :class:`Progress` on a terminal), else one
    whose ``say`` passes messages to ``progress`` and whose ``update`` does nothing."""
    return Bar(progress, total, label, unit)


def ticker(bar_: Bar) -> Callable[[], None]:
    """``bar_.update`` as a no-argument callback (for the timing loops of the backends)."""
    return lambda: bar_.update(1)
