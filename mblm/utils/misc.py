"""Small helpers without a better home."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


def retry(
    num_retries: int,
    on_error: Callable[[Exception, int], Any] | None = None,
) -> Callable[[Callable[P, T]], Callable[P, T | None]]:
    """Decorator: call the function up to ``num_retries + 1`` times until it does not raise.

    After each failed attempt ``on_error(error, retries_left)`` is called, where
    ``retries_left`` counts down from ``num_retries`` (first failure) to 0 (last failure).
    Returns the function's result, or None when every attempt raised.
    """
    assert num_retries >= 0, "num_retries must be non-negative"

    def decorate(fn: Callable[P, T]) -> Callable[P, T | None]:
        def attempt(*args: P.args, **kwargs: P.kwargs) -> T | None:
            for failed in range(num_retries + 1):
                try:
                    return fn(*args, **kwargs)
                except Exception as err:
                    if on_error:
                        on_error(err, num_retries - failed)
            return None

        return attempt

    return decorate
