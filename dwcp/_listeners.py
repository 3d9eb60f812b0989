"""Listeners: the subscribe/unsubscribe/notify pattern the link monitor, the config and the Manager share.

Thread-safe; notify() calls a snapshot of the listeners outside any lock the caller holds for its own
state, and one listener that raises is logged without stopping the others (a bad subscriber must not
stop the monitor's polling or a config change)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

E = TypeVar("E")


class Listeners(Generic[E]):
    def __init__(self, what: str, log: logging.Logger) -> None:
        self._what = what
        self._log = log
        self._lock = threading.Lock()
        self._items: list[Callable[[E], None]] = []

    def subscribe(self, listener: Callable[[E], None]) -> Callable[[], None]:
        """Add listener; returns the function that removes it (idempotent)."""
        with self._lock:
            self._items.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._items:
                    self._items.remove(listener)
        return unsubscribe

    def notify(self, event: E) -> None:
        with self._lock:
            items = list(self._items)
        for listener in items:
            try:
                listener(event)
            except Exception:
                self._log.exception("%s listener %r failed; the others still ran", self._what, listener)
