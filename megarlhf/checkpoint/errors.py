"""The errors checkpoint code raises for user-facing problems; every message names the path.

`CheckpointError` (a ValueError) is what the readers of one file raise (missing, malformed or
mismatched); `CheckpointDirError` (a RuntimeError) what the checkpoint-directory code raises (a
torn or unusable directory, a save that ran out of space); the training tools report the latter
as a user error (one line, exit 2). `CorruptCheckpointError` is both: a file whose content does
not match its recorded checksum.
"""


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not fit the request (message names the file)."""


class CheckpointDirError(RuntimeError):
    """A checkpoint root or directory cannot be used; the message names the path."""


class CorruptCheckpointError(CheckpointDirError, CheckpointError):
    """A checkpoint file's content differs from the checksum recorded when it was written."""
