"""The one exception type for bad user input: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Input the user can fix (a path, a config value, a CSV row, a checkpoint)."""

    exit_code = 2
