"""The errors a stage or tool reports to the user, in one torch-free module.

The CLI maps them to exit codes (ParamsError in dmat.config: 2; these: 1) without importing the
layers that raise them, so parsing arguments never imports torch. Each message names the file, key,
URI or gate it is about.
"""

from __future__ import annotations


class DataError(ValueError):
    """Missing, malformed or inconsistent input data; the message names the file."""


class StoreError(ValueError):
    """A store that is missing, corrupt or inconsistent; the message names the path."""


class CheckpointError(ValueError):
    """A checkpoint or model file that is missing, unreadable or from another configuration; names the file."""


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI."""


class GateFailed(RuntimeError):
    """A deployment gate failed; the message names it and its measured value."""


# What the CLI turns into exit code 1.
USER_ERRORS = (DataError, StoreError, CheckpointError, TrackingError, GateFailed)
