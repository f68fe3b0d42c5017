"""Files that are re-read when they change: certificates, API keys, fleet secrets.

A :class:`WatchedFile` checks the file's identity (inode, size, modification time) at most once
per ``min_interval_s`` and parses it again only when that changed. A file that cannot be read
or parsed after a change keeps the last good value (logged once per change), so a half-written
certificate or a typo in the key file never takes a running server down; at start-up (no good
value yet) the error is raised.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
_Stamp = tuple[int, int, int, int]  # device, inode, size, mtime_ns


def _stamp(path: Path) -> _Stamp:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class WatchedFile(Generic[T]):
    """The parsed content of one file (or several read together), re-parsed when it changes.

    ``parse`` receives the paths and returns the value; it raises (OSError, ValueError) on bad
    content. Thread-safe: gRPC calls certificate fetchers from its own threads.
    """

    def __init__(
        self,
        paths: Path | str | tuple[Path | str, ...],
        parse: Callable[[tuple[Path, ...]], T],
        *,
        min_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        raw = paths if isinstance(paths, tuple) else (paths,)
        self.paths = tuple(Path(p) for p in raw)
        self._parse = parse
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._stamps = tuple(_stamp(p) for p in self.paths)
        self._value = parse(self.paths)  # start-up: a bad file is an error
        self._generation = 0
        self._next_check = clock() + min_interval_s
        self._failed_stamps: tuple[_Stamp, ...] | None = None

    @property
    def generation(self) -> int:
        """Incremented each time a changed file was parsed successfully."""
        return self._generation

    def get(self) -> T:
        """The current value (re-read first if the files changed and the interval passed)."""
        self.refresh()
        return self._value

    def refresh(self, force: bool = False) -> bool:
        """Re-read if changed (``force``: ignore the interval); True when the value changed."""
        now = self._clock()
        if not force and now < self._next_check:
            return False
        with self._lock:
            self._next_check = now + self._min_interval_s
            try:
                stamps = tuple(_stamp(p) for p in self.paths)
            except OSError as exc:
                self._report(None, exc)
                return False
            if stamps == self._stamps:
                return False
            try:
                value = self._parse(self.paths)
            except (OSError, ValueError) as exc:
                self._report(stamps, exc)
                return False
            self._value = value
            self._stamps = stamps
            self._generation += 1
            self._failed_stamps = None
            log.info("reloaded %s", ", ".join(str(p) for p in self.paths))
            return True

    def _report(self, stamps: tuple[_Stamp, ...] | None, exc: BaseException) -> None:
        seen = () if stamps is None else stamps  # () stands for "unreadable"
        if seen != self._failed_stamps:
            log.warning("keeping the previous content of %s: %s",
                        ", ".join(str(p) for p in self.paths), exc)
        self._failed_stamps = seen
