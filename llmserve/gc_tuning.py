"""Keeping the cyclic garbage collector off the objects a server builds at startup.

A serving process holds hundreds of thousands of long-lived objects once torch, grpc and the
model code are imported, and every full (generation 2) collection walks all of them. Streams
allocate enough short-lived containers per chunk to trigger such a collection every few
seconds: W4's router + worker process spent about 15% of its CPU there. ``gc.freeze()``
(what vLLM does after its engine starts) moves everything alive at that point into a permanent
generation that collections skip. Entry points call :func:`freeze_startup_objects` once
serving starts (never at import) and :func:`unfreeze_objects` when it stops, so that the
interpreter's last collections still see those objects (extensions such as nanobind's report
objects never freed at exit as leaks).

The offline API runs the engine in its caller's process, whose heap is the caller's to freeze
or not: it freezes only for the length of one ``generate`` (:func:`objects_frozen`). Without
that a full collection could fall inside a run and stop every request for its length: 366 ms
in one W1 step on an H100, where a served worker never pauses (DECISIONS 157).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


def freeze_startup_objects() -> None:
    """Collect once, then exempt every object alive now from later collections.

    Call once startup is over (models loaded, servers started); objects made later are
    collected as usual. Garbage created by startup is collected first, so nothing leaks.
    """
    gc.collect()
    gc.freeze()


@contextmanager
def objects_frozen() -> Iterator[None]:
    """While open, collections skip every object alive when it opened; they go back to the
    collector when it closes (also on an exception), so nothing is kept from it for longer.
    Objects made inside are collected as usual. A no-op where the heap is frozen already (a
    serving process's startup objects stay frozen)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()  # moves the generations' lists: no walk of the heap
    try:
        yield
    finally:
        gc.unfreeze()


def unfreeze_objects() -> None:
    """Hand the frozen objects back to the collector (serving stopped); a no-op without a freeze."""
    gc.unfreeze()
