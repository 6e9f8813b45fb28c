"""The one exception class for problems the user can fix.

Library code raises :class:`UserError` with a message that names the file, the
key, the bad value and the valid choices. Only the command-line ``main()``
functions catch it: they print the message as one line on stderr and exit 2.
"""

import math
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1  # some jobs crashed, or a regression was found
EXIT_USAGE = 2  # bad input: spec, flag, unknown name


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool: the rule for every number read from a spec.

    TOML integers are unbounded in Python, and ``math.isfinite(10**400)`` raises
    OverflowError instead of returning False: such values are rejected here.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


class UserError(Exception):
    """An error caused by the user's input; its message says how to fix it."""


def shown(value: Any) -> str:
    """A spec value as a message quotes it: TOML's ``true``/``false`` for booleans, else ``repr``."""
    return str(value).lower() if isinstance(value, bool) else repr(value)
