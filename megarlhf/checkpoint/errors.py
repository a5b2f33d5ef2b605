"""The error every checkpoint reader raises for a user-facing problem (a missing, malformed or
mismatched file); its message names the file."""


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not fit the request (message names the file)."""
