"""Objects a config names by ``_target_`` (a loss term, an optimizer, a schedule): found by their dotted
path and checked against the arguments they will be called with, so a wrong path or argument is
named before any compute instead of failing mid-job."""

from __future__ import annotations

import importlib
import inspect
from typing import Any


class TargetError(ValueError):
    """A ``_target_`` that cannot be imported, or that does not take the arguments given
    (``argument``: the one it does not accept, when that is the problem)."""

    def __init__(self, message: str, argument: str | None = None):
        super().__init__(message)
        self.argument = argument


def locate(path: str) -> Any:
    """The object at the dotted ``path`` (``package.module.Name``, or an attribute of a class in it)."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):  # this prefix is not a module: try a shorter one
                continue
            raise TargetError(f"cannot import {path!r}: {e}") from None  # the module exists but fails to import
        except Exception as e:  # noqa: BLE001 - the module's own code failed
            raise TargetError(f"cannot import {path!r}: {type(e).__name__}: {e}") from None
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            raise TargetError(f"cannot import {path!r}: module {module_name!r} has no {'.'.join(parts[cut:])!r}") from None
        return obj
    raise TargetError(f"cannot import {path!r}: no module of that name (a dotted path, package.module.Name, importable from here)")


def check_arguments(obj: Any, path: str, positional: int, keywords: dict[str, Any]) -> None:
    """``obj`` can be called with ``positional`` positional arguments and ``keywords``; else the
    first argument it does not accept, or the one it lacks, is named."""
    if not callable(obj):
        raise TargetError(f"{path!r} is not a class or a function")
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin without a signature: it will say so itself when called
        return
    try:
        signature.bind(*range(positional), **keywords)
    except TypeError as e:
        params = signature.parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = [k for k in keywords if k not in params and not takes_any]
        if unknown:
            accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][positional:]
            raise TargetError(f"{path} does not accept it (it takes {', '.join(accepted) or 'no arguments'})", unknown[0]) from None
        raise TargetError(f"{path}: {e}") from None
