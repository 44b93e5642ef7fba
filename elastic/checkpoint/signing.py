"""Signing: the key from ``checkpoint.signing_key_file`` and the manifest's HMAC-SHA256.

Only the standard library (``hmac``, ``hashlib``): the config reads the key with it, wherever
a config is built. Signatures are compared in constant time (``hmac.compare_digest``).
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["MIN_KEY_BYTES", "read_signing_key", "sign", "signature_problem"]

MIN_KEY_BYTES = 16
"""Shortest signing key accepted (after stripping whitespace): 128 bits."""


def read_signing_key(path: str) -> bytes:
    """The key in ``path``, surrounding whitespace stripped; ``ValueError`` naming the
    problem when the file cannot be read or holds fewer than ``MIN_KEY_BYTES`` bytes."""
    try:
        with open(path, "rb") as fh:
            key = fh.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read it ({exc.strerror or exc})") from None
    if not key:
        raise ValueError("the file is empty")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"the key has {len(key)} bytes, at least {MIN_KEY_BYTES} are needed "
            "(e.g. `openssl rand -hex 32 > FILE`)"
        )
    return key


def sign(payload: bytes, key: bytes) -> str:
    """HMAC-SHA256 of ``payload`` under ``key``, hex."""
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def signature_problem(payload: bytes, signature: str | None, key: bytes) -> str | None:
    """Why ``signature`` does not vouch for ``payload`` (``None`` when it does)."""
    if signature is None:
        return "unsigned (checkpoint.signing_key_file is set)"
    if not hmac.compare_digest(sign(payload, key), signature):
        return "bad signature (written without this key, or changed since)"
    return None
