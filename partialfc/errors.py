"""The package's user-facing errors: one base, :class:`PartialFCError`, and one subclass per
kind of bad input. The ``partialfc`` command turns any of them into ``error: <message>`` on
stderr and exit code 2.

Each subclass keeps the builtin it has always been (``ValueError``, ``RuntimeError``,
``FileNotFoundError``), so code catching the builtin keeps working. Standard library only:
importing this module stays cheap.
"""

from __future__ import annotations


class PartialFCError(Exception):
    """Base of every error partialfc raises about its input; the message says what to fix."""


class InputError(PartialFCError, ValueError):
    """Raised identically on every rank when some rank's input is invalid."""


class ConfigError(PartialFCError, ValueError):
    """A configuration that cannot be used; the message names the key."""


class CheckpointError(PartialFCError, RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit this run."""


class LaunchError(PartialFCError, RuntimeError):
    """The launcher's environment variables or launch options are missing or contradict each other."""


class RecordIOError(PartialFCError, ValueError):
    """A malformed, truncated or inconsistent record; the message names the file and record."""


class VerificationBinError(PartialFCError, ValueError):
    """A verification ``.bin`` file that cannot be read or decoded; the message names the file."""


class ImageFileError(PartialFCError, ValueError):
    """An image file that cannot be decoded (``data pack``); the message names the file."""


class InputNotFoundError(PartialFCError, FileNotFoundError):
    """A dataset, image folder or verification set named by the user does not exist."""


class ExportError(PartialFCError, ValueError):
    """An export that cannot be written (unknown output format) or that disagrees with the model."""


class TrainingDiverged(PartialFCError, RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class DistributedError(PartialFCError, RuntimeError):
    """A rank did not join at start-up, or a collective timed out or lost a peer; names what it can."""
