"""Typed errors raised by library code; the CLI turns each into one line on stderr and an exit code."""


class CharRNNError(Exception):
    """A problem with the user's data, checkpoint, disk or environment (exit code 1).

    The message says what went wrong, where, and what to do about it, on one line.
    """

    exit_code = 1


class DataError(CharRNNError):
    """A corpus or labeled file that cannot be read or used."""


class CheckpointError(CharRNNError):
    """A checkpoint or run folder that is missing, unreadable, or incompatible."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose bytes are not what was saved: checksum mismatch, cut short, unparsable.

    `why` is the short reason (for a warning); the message adds what to do.
    """

    def __init__(self, message: str, why: str = "damaged"):
        super().__init__(message)
        self.why = why


class UsageError(CharRNNError):
    """Option values that are invalid together (exit code 2, like the parser's own errors)."""

    exit_code = 2


class TrainingDiverged(CharRNNError):
    """Training produced non-finite values it could not recover from."""


class DownloadError(CharRNNError):
    """A corpus that could not be fetched or did not match its catalogued checksum."""


class DistributedError(CharRNNError):
    """Another process of a torchrun job failed, was killed or stopped answering."""
