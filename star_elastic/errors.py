"""One exception type for every problem a user can fix (bad path, bad budget, foreign file).

The CLI prints its message as a single line and exits with status 2; library callers can catch it.
"""


class StarElasticError(Exception):
    """A clear, user-facing error: the message names the problem and, where possible, the file."""
