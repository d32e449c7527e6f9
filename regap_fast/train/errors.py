"""The errors a training run raises for its user (the command line prints them as one line).

Bad inputs raise the built-in types (``ValueError``, ``FileNotFoundError``, ``FileExistsError``):
``regap-fast`` reports them as usage errors (exit status 2). A run that started and cannot go on
raises ``RunError`` (exit status 1). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class RunError(RuntimeError):
    """The run cannot go on for a reason the user can act on (all records bad, a missing package)."""

    exit_status = 1
