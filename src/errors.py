"""Errors that train.py and classify.py report as one line, without a traceback."""


class UserError(Exception):
    """Something the user can fix (a setting, a file, a folder); the message says what to do."""


class ConfigError(UserError, ValueError):
    """An impossible or inconsistent setting."""


class DataError(UserError):
    """A missing, corrupt or unusable dataset or image."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (full disk, read-only folder); the previous one is intact."""


class DivergedError(UserError):
    """Training produced NaN or inf; the checkpoints from before it are kept."""
