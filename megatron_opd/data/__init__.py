"""Data: dataset loading, chat templating with assistant-only loss masks, batching."""


class DataError(ValueError):
    """A data file or row is unusable (message names the file/row and what was expected)."""
