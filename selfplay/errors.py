"""Errors that mean an input is wrong (not the code): the command line prints them in one line and exits with 2.

They live here, free of heavy imports, so that `selfplay` reports a mistake without loading torch first.
"""


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message names the path and the reason."""
