"""Lazy package attributes: `import fastssl.<pkg>` stays cheap, names load on first use."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, table: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """Module-level ``__getattr__`` and ``__dir__`` for a package.

    Args:
        package: the package's name, for error messages.
        table: public name -> module that defines it.
        namespace: the package's ``globals()``; a loaded name is cached there, so the
            import happens once.
    """

    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
