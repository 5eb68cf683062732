"""Counts in words, one rule everywhere: ``1 finding``, ``2 findings``, ``1 batch``, ``3 batches``.

No heavy imports: the CLI uses it without loading the library's numerics.
"""

from __future__ import annotations


def plural(n: int, noun: str, many: str | None = None) -> str:
    """A count and its noun in the number the count needs (``many`` when the plural is not ``noun + "s"``)."""
    return f"{n:,} {noun if n == 1 else many or noun + 's'}"


__all__ = ["plural"]
