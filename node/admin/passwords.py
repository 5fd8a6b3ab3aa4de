"""Password hashes of the admin API's users: scrypt (stdlib), a random salt per hash.

The configuration holds only ``scrypt$n$r$p$salt$hash`` (salt and hash in unpadded URL-safe
base64), made by ``ainode api hash-password``; a password is checked by deriving it again with the
stored parameters and comparing in constant time.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets

# scrypt's cost: N=2^15, r=8 (32 MiB and about 0.1 s on one core per check), p=1. The API
# remembers a checked password for a few minutes, so a script logging in on every call does not
# pay it each time.
DEFAULT_N, DEFAULT_R, DEFAULT_P = 2**15, 8, 1
# A configured hash may not ask for more than this (a typo must not exhaust the node's memory).
MAX_N = 2**20
SALT_BYTES, KEY_BYTES = 16, 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _derive(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=129 * n * r * p + 2**20, dklen=length)


def hash_password(password: str, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P) -> str:
    """``scrypt$n$r$p$salt$hash`` of a password, with a fresh random salt."""
    if not password:
        raise ValueError("the password is empty")
    if n < 2 or n & (n - 1) or n > MAX_N:
        raise ValueError(f"n must be a power of two between 2 and {MAX_N}")
    salt = secrets.token_bytes(SALT_BYTES)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(_derive(password, salt, n, r, p, KEY_BYTES))}"


def check_password(password: str, stored: str) -> bool:
    """Whether the password matches the stored hash (False for a malformed or too costly hash)."""
    try:
        scheme, n_text, r_text, p_text, salt_text, key_text = stored.split("$")
        n, r, p = int(n_text), int(r_text), int(p_text)
        salt, key = _unb64(salt_text), _unb64(key_text)
    except ValueError:
        return False
    if scheme != "scrypt" or not (2 <= n <= MAX_N) or n & (n - 1) or not key or r < 1 or p < 1 or r * p > 64:
        return False
    return hmac.compare_digest(_derive(password, salt, n, r, p, len(key)), key)


@functools.cache
def dummy_hash() -> str:
    """A hash to check when the user name is unknown, so that the answer takes as long as for a
    known name (an attacker must not learn which names exist from the timing)."""
    return hash_password(secrets.token_urlsafe(16))
