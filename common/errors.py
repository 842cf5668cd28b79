"""The one exception type users see.

Library code raises :class:`KdcacheError` for anything the user can fix (a wrong path, a cache
made from other data, a bad option). The CLI prints its message as one sentence and exits
non-zero; other exceptions are bugs and get a traceback only with ``--debug``.
"""


class KdcacheError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class CacheMismatchError(KdcacheError):
    """A cache was made from other data, another teacher or another view spec than requested."""


class CacheDamagedError(KdcacheError):
    """Bytes of a cache do not pass their checksum (or a committed unit's rows are missing)."""
