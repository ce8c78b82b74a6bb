"""Progress of training and evaluation loops: a tqdm bar on a terminal, plain lines elsewhere.

A tqdm bar redraws itself with carriage returns; written to a log file or a pipe (a batch
job, ``tee``, CI) every redraw stays, some 100 KB an epoch. Off a terminal a
:class:`LineProgress` prints one complete line every ``lines_every`` steps and at the end.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")

#: Off a terminal, a line after every tenth of the loop (and at its end).
LINES_PER_LOOP = 10


class LineProgress:
    """The part of tqdm's interface the loops use, writing whole lines (no ``"\\r"``)."""

    def __init__(self, total: int, desc: str, initial: int = 0, file: IO[str] | None = None):
        self.total = total
        self.desc = desc
        self.count = initial
        self.postfix = ""
        self.file = file if file is not None else sys.stderr
        self.lines_every = max(1, math.ceil(total / LINES_PER_LOOP))
        self.printed_at = initial

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def update(self, steps: int = 1) -> None:
        self.count += steps
        if self.count - self.printed_at >= self.lines_every:
            self._line()

    def close(self) -> None:
        if self.count > self.printed_at:
            self._line()

    def _line(self) -> None:
        suffix = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.count}/{self.total}{suffix}", file=self.file, flush=True)
        self.printed_at = self.count


def on_terminal(file: IO[str] | None = None) -> bool:
    """Whether ``file`` (default: stderr, where tqdm draws) is an interactive terminal."""
    file = file if file is not None else sys.stderr
    isatty = getattr(file, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0) -> tqdm | LineProgress:
    """A step counter for a loop of ``total`` steps: a tqdm bar on a terminal, a
    :class:`LineProgress` elsewhere, a disabled bar when not ``enabled``."""
    if enabled and not on_terminal():
        return LineProgress(total, desc, initial)
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        disable=not enabled,
        dynamic_ncols=True,
    )


def progress_iter(items: Iterable[T], desc: str, enabled: bool) -> Iterator[T] | Any:
    """``items`` with a transient tqdm bar on a terminal; as they are elsewhere (an evaluation
    pass is short next to an epoch, and its result is printed)."""
    if not enabled or not on_terminal():
        return iter(items)
    return tqdm(items, desc=desc, leave=False)


def write_line(text: str) -> None:
    """Print ``text`` on its own line without breaking a tqdm bar that is being drawn."""
    tqdm.write(text)
