"""One exception type for every user-facing failure: the CLI prints its message as one line."""


class LeanformerError(Exception):
    """A problem with the user's input (path, file, config, request) that the message explains."""
