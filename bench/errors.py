"""The one exception class for problems the user can fix.

Library code raises :class:`UserError` with a message that names the file, the
key, the bad value and the valid choices. Only the command-line ``main()``
functions catch it: they print the message as one line on stderr and exit 2.
"""

EXIT_OK = 0
EXIT_FAILED = 1  # some jobs crashed, or a regression was found
EXIT_USAGE = 2  # bad input: spec, flag, unknown name


class UserError(Exception):
    """An error caused by the user's input; its message says how to fix it."""
