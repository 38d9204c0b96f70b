"""Errors a user can hit: the CLI prints their message, never a traceback."""


class UserError(Exception):
    """A problem the operator can fix (bad config, missing file, incompatible model)."""
