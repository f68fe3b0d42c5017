"""Registries of installed plug-ins, by entry-point group.

A registry lists the entry points of its group once (``importlib.metadata``, at construction)
and imports one only when its name is asked for, checking that it is a subclass of the group's
interface. Built-in names (the ``fcfs`` and ``priority`` policies) are always there and cannot
be shadowed by a package. Names come from requests and flags; they are only ever keys here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, TypeVar

from gpu_worker.core.scheduling_policy import BUILTIN_POLICIES, SchedulingPolicy
from gpu_worker.plugins.interfaces import LogitsProcessor, StoppingCriterion

logger = logging.getLogger(__name__)

LOGITS_PROCESSORS = "llmserve.logits_processors"
STOPPING_CRITERIA = "llmserve.stopping_criteria"
SCHEDULING_POLICIES = "llmserve.scheduling_policies"

T = TypeVar("T")


class PluginRegistry(Generic[T]):
    """The plug-ins of one entry-point group: ``names()``, ``get(name)`` -> class."""

    def __init__(self, group: str, base: type[Any], builtins: Mapping[str, type[T]] | None = None) -> None:
        self.group = group
        self.base = base
        self._loaded: dict[str, type[T]] = dict(builtins or {})
        self._entry_points: dict[str, EntryPoint] = {}
        for ep in entry_points(group=group):
            if ep.name in self._loaded:
                logger.warning("%s: entry point %r (%s) cannot replace the built-in one",
                               group, ep.name, ep.value)
            else:
                self._entry_points[ep.name] = ep

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted({*self._loaded, *self._entry_points})

    def __contains__(self, name: object) -> bool:
        return name in self._loaded or name in self._entry_points

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; ``ValueError`` naming the installed ones otherwise."""
        cls = self._loaded.get(name)
        if cls is not None:
            return cls
        ep = self._entry_points.get(name)
        if ep is None:
            raise ValueError(
                f"{name!r} is not an installed plug-in of {self.group}; installed: {self.names()}"
            )
        loaded = ep.load()
        if not (isinstance(loaded, type) and issubclass(loaded, self.base)):
            raise ValueError(f"{self.group} entry point {name!r} ({ep.value}) is not a {self.base.__name__}")
        self._loaded[name] = loaded
        return loaded


def logits_processor_registry() -> PluginRegistry[LogitsProcessor]:
    return PluginRegistry(LOGITS_PROCESSORS, LogitsProcessor)


def stopping_criterion_registry() -> PluginRegistry[StoppingCriterion]:
    return PluginRegistry(STOPPING_CRITERIA, StoppingCriterion)


def scheduling_policy_registry() -> PluginRegistry[SchedulingPolicy]:
    return PluginRegistry(SCHEDULING_POLICIES, SchedulingPolicy, BUILTIN_POLICIES)
