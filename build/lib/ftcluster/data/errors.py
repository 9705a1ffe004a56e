"""The one exception type for bad data, so callers can tell bad input from a bug."""
from __future__ import annotations


class DataError(ValueError):
    """Bad data or a data setting that cannot work. The message names the config key, or the file
    and line (`file:line: ...`) or row (`file: row N: ...`) at fault."""


class RowError(Exception):
    """Raised while tokenising, inside `datasets.map` workers, for one raw row.

    It carries the global row index instead of a location because only the parent process knows
    how rows map back to files and lines; `build_dataset` turns it into a `DataError`. The
    arguments are kept in `args` so the exception pickles across `num_proc` worker processes.
    """

    def __init__(self, row: int, message: str) -> None:
        super().__init__(row, message)
        self.row = row
        self.message = message
