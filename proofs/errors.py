"""The exception hierarchy shared by every veritrain package.

Each specific error also inherits the matching builtin (as web3.py's ``Web3ValueError`` does), so
a caller can catch ``ValueError`` without knowing veritrain, or ``VeritrainError`` for ours alone.
"""

from __future__ import annotations


class VeritrainError(Exception):
    """Root of every error veritrain raises on purpose."""


class EncodingError(VeritrainError, ValueError):
    """A tensor, record or file could not be encoded or decoded canonically."""


class MalformedProofError(VeritrainError, ValueError):
    """A proof or tree input has the wrong shape (bad index, length, hash size).

    ``verify_*`` functions return False instead of raising this; ``build_*`` functions raise it.
    """


class SignatureError(VeritrainError, ValueError):
    """A key or signature could not be created or parsed."""


class KeyFileError(VeritrainError, OSError):
    """A key file is missing, unreadable, malformed or has unsafe permissions."""


class KeyFileExistsError(KeyFileError, FileExistsError):
    """A key file already exists where a new one would be written (pass overwrite/--force)."""
