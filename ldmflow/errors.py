"""The one exception type for bad user input; the CLI turns it into a clear message and exit code 1."""


class LdmflowError(Exception):
    """A problem with the user's input or environment, explained in the message (no traceback needed)."""
