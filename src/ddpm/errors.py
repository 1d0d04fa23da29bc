"""The errors that are the user's to fix, as opposed to bugs.

Library code raises :class:`UserError` (or a subclass) when the input, a file, a flag or the
machine cannot be used, with a message that names the file, field or value. The command line
prints exactly these as ``ddpm <command>: error: <message>`` (exit status 2); anything else is a
bug and keeps its traceback. ``UserError`` is a ``ValueError``, so library users who catch
``ValueError`` keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Input that cannot be used: a bad value, file, flag or environment; the message says which."""


class ConfigError(UserError):
    """A configuration file or override that cannot be used; the message names the key."""


class DataError(UserError):
    """A data set, file or image that cannot be read or used; the message names it."""


class CheckpointError(UserError):
    """A checkpoint or run folder that is missing, incomplete, corrupt or of another format."""


class DeviceError(UserError):
    """A requested device (cuda, mps) that this machine does not have."""


class NonFiniteLossError(RuntimeError):
    """Training blew up: too many consecutive non-finite steps, or an update made the weights non-finite.

    Not a :class:`UserError` (the command line reports it with exit status 1): the message names the
    last good checkpoint and what to try.
    """


class OutputError(UserError):
    """An output file or folder that cannot be written (an existing file, no permission, a full disk)."""
