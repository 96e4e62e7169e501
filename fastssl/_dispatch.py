"""One place that turns ``impl="auto"`` into a concrete implementation.

Every op takes ``impl``: ``"auto"`` picks the fast path for the input's device; an explicit
name is honoured or raises, never silently replaced. The environment variable
``FASTSSL_IMPL`` overrides ``"auto"`` only, and is read once per process.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Iterable

from fastssl.errors import MissingDependencyError

ENV_VAR = "FASTSSL_IMPL"


@functools.lru_cache(maxsize=None)
def env_override() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    return value or None


def resolve_impl(
    op: str,
    impl: str,
    *,
    choices: Iterable[str],
    auto: Callable[[], str],
    available: Callable[[str], str | None],
) -> str:
    """Return the implementation to run ``op`` with.

    Args:
        op: the op's name, used in messages.
        impl: what the caller asked for ("auto" or one of ``choices``).
        choices: the implementations this op has.
        auto: picks the implementation for "auto" from the inputs' device and what is
            installed.
        available: returns None when an implementation can run on these inputs, else the
            reason it cannot.
    Raises:
        ValueError: ``impl`` (or FASTSSL_IMPL) names no implementation of ``op``.
        MissingDependencyError: the named implementation cannot run here.
    """
    choices = tuple(choices)
    requested = impl
    if impl == "auto" and env_override() is not None:
        requested = env_override()
        if requested not in choices and requested != "auto":
            raise ValueError(
                f"{ENV_VAR}={requested!r} is not an implementation of {op}; "
                f"expected one of {('auto',) + choices}"
            )
    if requested == "auto":
        return auto()
    if requested not in choices:
        raise ValueError(f"{op}: impl={impl!r}; expected one of {('auto',) + choices}")
    why = available(requested)
    if why is not None:
        raise MissingDependencyError(f"{op}: impl={requested!r} cannot run here: {why}")
    return requested
