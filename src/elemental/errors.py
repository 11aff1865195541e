"""One error type for bad input, so the CLI can print one line and exit 2 without a traceback."""


class ElementalError(Exception):
    """A problem with the user's input (a path, a file, a field) that a person can fix.

    The message must name the offending thing (file, line, field) and fit on one line.
    """
