# SPDX-License-Identifier: Apache-2.0
"""The one registry mechanism behind every extension point (replacement kinds, graph predicates, report
formats): an ordered table of named entries with clear errors. Each extension point validates its own
protocol and then stores through a :class:`Registry`.

Example:
    >>> r = Registry("report renderer", key_word="for")
    >>> r.add(".csv", "CSV")
    'CSV'
    >>> r.add(".csv", "again")
    Traceback (most recent call last):
    ...
    ValueError: a report renderer for '.csv' is already registered (str); unregister it first, or pick another suffix.
    >>> r.get(".cvs")
    Traceback (most recent call last):
    ...
    KeyError: "no report renderer for '.cvs'; registered: '.csv' (did you mean '.csv'?)"
"""

from __future__ import annotations

from typing import Generic, TypeVar

from ..errors import did_you_mean

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries in registration order. ``what`` names an entry in messages, e.g. ``"graph predicate"``
    (``"a graph predicate 'x' is already registered"``); ``unregister`` is the function users call to remove
    one (named in the duplicate message)."""

    def __init__(self, what: str, *, key_word: str = "named", unregister: str = "") -> None:
        self.what, self.key_word, self.unregister = what, key_word, unregister
        self._items: dict[str, T] = {}

    def add(self, key: str, entry: T) -> T:
        """Store ``entry`` under ``key``; ``ValueError`` if the key is taken."""
        if key in self._items:
            how = f"{self.unregister}({key!r})" if self.unregister else "unregister it"
            other = "suffix" if self.key_word == "for" else "name"
            raise ValueError(f"a {self.what} {self.key_word} {key!r} is already registered "
                             f"({type(self._items[key]).__name__}); {how} first, or pick another {other}.")
        self._items[key] = entry
        return entry

    def remove(self, key: str) -> T:
        """Remove and return the entry under ``key`` (``KeyError`` as :meth:`get`)."""
        self.get(key)
        return self._items.pop(key)

    def get(self, key: str) -> T:
        """The entry under ``key``; ``KeyError`` naming the registered keys, with did-you-mean, otherwise."""
        try:
            return self._items[key]
        except (KeyError, TypeError):
            names = list(self._items)
            which = f"for {key!r}" if self.key_word == "for" else repr(key)
            raise KeyError(f"no {self.what} {which}; registered: {', '.join(map(repr, names))}"
                           f"{did_you_mean(str(key), names)}") from None

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __getitem__(self, key: str) -> T:
        return self.get(key)

    def items(self) -> tuple[tuple[str, T], ...]:
        """``(key, entry)`` pairs, in registration order."""
        return tuple(self._items.items())

    def keys(self) -> tuple[str, ...]:
        """The keys, in registration order."""
        return tuple(self._items)

    def values(self) -> tuple[T, ...]:
        """The entries, in registration order."""
        return tuple(self._items.values())
