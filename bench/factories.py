"""User code named ``"pkg.module:function"``: one loader for task factories, model factories, audits."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from bench.errors import UserError


def is_factory(name: str) -> bool:
    """Whether a setting names user code (``"pkg.module:function"``) rather than a built-in."""
    return ":" in name


def load(name: str, where: str) -> Callable[..., Any]:
    """The callable ``name`` = ``"pkg.module:function"`` names.

    Args:
        name: ``"pkg.module:function"``; the module is imported as Python would (``sys.path``).
        where: how the setting is named in messages, e.g. ``"task"`` or ``"--factory"``.

    Raises:
        UserError: not of that form, the module cannot be imported (any exception on import: it is
            the user's code), or it has no callable of that name. One line naming both.
    """
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr.isidentifier():
        raise UserError(f"{where} = {name!r}: expected 'pkg.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - a user module can fail on import in any way
        raise UserError(f"{where} = {name!r}: cannot import {module_name!r}: "
                        f"{type(err).__name__}: {err}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{where} = {name!r}: {module_name!r} has no function {attr!r}")
    return fn
