"""The one exception the exporter raises for anything a user can fix.

The CLI prints its message as a single line and exits with status 2; `build()` callers catch it.
"""
from __future__ import annotations


class ExportError(RuntimeError):
    """A bad input or a failed check; the message names the problem and the fix."""
