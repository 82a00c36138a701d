"""User-facing errors.

Everything that a user can cause with bad input (a config, a file, a flag) raises a
subclass of :class:`HrmError`. The CLI prints its message as one line and exits with
code 2; library callers can catch it like any ``ValueError``.
"""


class HrmError(ValueError):
    """Bad input from the user: the message names the problem in one line."""


class ConfigError(HrmError):
    """A model or training configuration that cannot be built."""


class CheckpointError(HrmError):
    """A checkpoint directory or file that does not match what it claims to hold."""


class DataError(HrmError):
    """Malformed training or evaluation data."""


class BackendUnavailable(HrmError):
    """An explicitly requested kernel backend cannot run on this machine."""
