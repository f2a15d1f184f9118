"""The sticky-session cookie: an opaque, signed, expiring pin of a client to a backend.

Value layout, before base64url without padding (39 characters)::

    version (1) | expiry, unix seconds, big-endian (4) | tag (8) | mac (16)

    tag = HMAC-SHA256(key, b"backend:" + pool + b"\\0" + backend address)[:8]
    mac = HMAC-SHA256(key, version | expiry | tag | pool)[:16]

The tag is a keyed hash, so the value names no backend (an address cannot be guessed and
checked without the key); the mac makes it unforgeable and binds it to its pool and expiry.
Both depend only on the key, pool name and address, so every balancer holding the same key
routes a cookie the same way with no shared table. The pool keeps `tag -> Backend`.

Keys rotate through the key file (see `load_or_create_keys`): the first key signs, every key
verifies; a cookie signed with an older key is translated to the current key's tag for the
same backend, so rotating the key does not unpin anyone.

API:
    StickyCodec(keys, pool, ttl)
        .tag(backend_address) -> bytes
        .encode(tag, now) -> str
        .decode(value: str | bytes, now) -> bytes | None      (never raises)
        .set_cookie_header(cookie_name, value, secure) -> bytes
    load_or_create_keys(path) -> list[bytes]
    find_cookie(cookie_header_value, name) -> bytes | None
    strip_cookie(cookie_header_value, cookie_name) -> bytes | None

`now` is wall-clock time (time.time()): expiry must mean the same on every node.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Sequence
from hashlib import sha256

log = logging.getLogger("balancer.sticky")

VERSION = 1
TAG_BYTES = 8
MAC_BYTES = 16
_HEAD_BYTES = 1 + 4 + TAG_BYTES  # what the mac covers, before the pool name
_RAW_BYTES = _HEAD_BYTES + MAC_BYTES
_VALUE_CHARS = (_RAW_BYTES * 8 + 5) // 6  # base64 without padding
_PADDING = b"=" * (-_VALUE_CHARS % 4)
_FROM_URLSAFE = bytes.maketrans(b"-_+/", b"+/-_")  # "+" and "/" become invalid, then dropped

# A cookie whose expiry lies further ahead than one ttl (plus this much for clocks of two
# nodes disagreeing) was issued under a longer ttl: refused, so shortening the ttl takes effect
# at once rather than one old ttl later.
CLOCK_SKEW = 300.0

# Keys shorter than this are accepted (an operator's passphrase shared by an HA pair must not
# keep the balancer from starting) but logged as weak: an HMAC key can be guessed offline
# from one cookie. Generated keys are NEW_KEY_BYTES of randomness.
STRONG_KEY_BYTES = 16
VERIFIED_CACHE = 10000  # verified cookie values remembered per pool
NEW_KEY_BYTES = 32


class StickyCodec:
    """Encodes and verifies the sticky cookie of one pool (see the module docstring)."""

    def __init__(self, keys: Sequence[bytes], pool: str, ttl: float) -> None:
        if not keys:
            raise ValueError("sticky: at least one key is needed")
        if not all(keys):
            raise ValueError("sticky: a key must not be empty")
        if not 0 < ttl < 2**31:
            raise ValueError(f"sticky: ttl must be positive seconds, not {ttl!r}")
        self.pool = pool
        self.ttl = ttl
        self._pool_bytes = pool.encode()
        self._macs = tuple(_HmacSha256(bytes(k)) for k in keys)
        # an older key's tag -> the current key's tag for the same backend (see decode)
        self._current_tag: dict[bytes, bytes] = {}
        # values already verified -> (tag, expiry): a returning client's cookie is checked by
        # HMAC once, then by a dict lookup (its expiry is still enforced on every request)
        self._verified: dict[bytes, tuple[bytes, int]] = {}

    def tag(self, backend_address: str) -> bytes:
        """The stable tag of a backend in this pool under the current key."""
        message = b"backend:" + self._pool_bytes + b"\0" + backend_address.encode()
        tags = [mac.sign(message, TAG_BYTES) for mac in self._macs]
        current = tags[0]
        for old in tags[1:]:
            self._current_tag[old] = current
        return current

    def encode(self, tag: bytes, now: float) -> str:
        """The cookie value pinning to `tag` until now + ttl, signed with the current key."""
        if len(tag) != TAG_BYTES:
            raise ValueError(f"sticky: a tag is {TAG_BYTES} bytes, not {len(tag)}")
        head = bytes((VERSION,)) + int(now + self.ttl).to_bytes(4, "big") + tag
        raw = head + self._macs[0].sign(head + self._pool_bytes, MAC_BYTES)
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    def decode(self, value: str | bytes, now: float) -> bytes | None:
        """The current tag a cookie value pins to; None when it is malformed, forged,
        tampered with, from another pool or expired. Never raises. Takes the value as text
        or as the bytes `find_cookie` returns."""
        # a returning client's value was verified before: one dict lookup
        known = self._verified.get(value) if value.__class__ is bytes else None
        if known is not None:
            tag, expiry = known
            return tag if now < expiry <= now + self.ttl + CLOCK_SKEW else None
        if isinstance(value, str):
            if len(value) != _VALUE_CHARS or not value.isascii():
                return None
            text = value.encode("ascii")
        elif isinstance(value, bytes) and len(value) == _VALUE_CHARS:
            text = value
        else:
            return None
        known = self._verified.get(text)
        if known is None:
            known = self._verify(text, now)
            if known is None:
                return None
            if len(self._verified) >= VERIFIED_CACHE:
                self._verified.clear()  # bounded: forget all rather than track recency
            self._verified[text] = known
        tag, expiry = known
        # expiry is checked on every use, cached or not
        return tag if now < expiry <= now + self.ttl + CLOCK_SKEW else None

    def _verify(self, text: bytes, now: float) -> tuple[bytes, int] | None:
        """(current tag, expiry) of a well-signed value, whatever its expiry; else None."""
        try:
            # binascii directly: base64.urlsafe_b64decode is this behind two Python layers
            raw = binascii.a2b_base64(text.translate(_FROM_URLSAFE) + _PADDING)
        except binascii.Error:
            return None
        # a2b_base64 drops characters outside the alphabet and ignores the unused low bits
        # of the last character: only the canonical spelling of the bytes is accepted, so no
        # two strings carry the same cookie
        if len(raw) != _RAW_BYTES or base64.urlsafe_b64encode(raw)[:_VALUE_CHARS] != text:
            return None
        if raw[0] != VERSION:
            return None
        head = raw[:_HEAD_BYTES]
        mac = raw[_HEAD_BYTES:]
        message = head + self._pool_bytes
        index = 0
        for keyed in self._macs:
            if hmac.compare_digest(keyed.sign(message, MAC_BYTES), mac):
                break
            index += 1
        else:
            return None
        expiry = int.from_bytes(raw[1:5], "big")
        tag = raw[5:_HEAD_BYTES]
        if index != 0:
            # signed with an older key: the tag is that key's; the pool knows current tags
            current = self._current_tag.get(tag)
            if current is None:
                return None
            tag = current
        return tag, expiry

    def set_cookie_header(self, cookie_name: str, value: str, secure: bool) -> bytes:
        """The value of a Set-Cookie header carrying `value` for one ttl."""
        header = f"{cookie_name}={value}; Max-Age={int(self.ttl)}; Path=/; HttpOnly; SameSite=Lax"
        if secure:
            header += "; Secure"
        return header.encode("latin-1")


class _HmacSha256:
    """HMAC-SHA256 (RFC 2104) under one key, truncated to `size` bytes.

    The padded-key states are hashed once and copied per message: half the cost of
    `hmac.new(...).copy()`, whose OpenSSL context copy dominates a cookie check. Equal to
    `hmac.new(key, message, sha256).digest()` (a test holds it to that).
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > _SHA256_BLOCK:
            key = sha256(key).digest()
        key = key.ljust(_SHA256_BLOCK, b"\0")
        self._inner = sha256(key.translate(_IPAD))
        self._outer = sha256(key.translate(_OPAD))

    def sign(self, message: bytes, size: int = 32) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:size]


_SHA256_BLOCK = 64
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))


# ---------------------------------------------------------------------------------------------
# The key file
# ---------------------------------------------------------------------------------------------


def parse_keys(text: str, source: str = "key file") -> list[bytes]:
    """Keys from key-file text: one a line, hex or base64 (standard or url-safe, padding
    optional) of at least 16 bytes; any other line is a passphrase, its text the key (weak
    ones are logged). Blank lines and lines starting with # are skipped. A line of an even
    number of hex digits is read as hex. The first key is the current."""
    keys: list[bytes] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key = _parse_key(line)
        if key is None or len(key) < STRONG_KEY_BYTES:
            # not hex or base64 of a real key: the line itself is the key (a passphrase)
            key = line.encode("utf-8")
        if len(key) < STRONG_KEY_BYTES:
            log.warning(
                "sticky: %s:%d: a %d-byte key is weak; use at least %d random bytes"
                " (openssl rand -hex 32)",
                source,
                lineno,
                len(key),
                STRONG_KEY_BYTES,
            )
        keys.append(key)
    if not keys:
        raise ValueError(f"{source}: no key in the file")
    return keys


def _parse_key(line: str) -> bytes | None:
    if len(line) % 2 == 0:
        try:
            return bytes.fromhex(line)
        except ValueError:
            pass
    text = line.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def load_or_create_keys(path: str) -> list[bytes]:
    """The keys in `path` (format: `parse_keys`), creating the file with one new random key,
    mode 0600, when it does not exist.

    To rotate: prepend a new key as the first line (it signs from then on, the old one still
    verifies), reload, and delete the old line one ttl later.

    Creation is atomic and never replaces a file: the key is written to a temporary file
    and hard-linked into place, so of two processes starting together one creates the file
    and the other reads that one's key. ValueError for a file that holds no valid key.
    """
    try:
        return _read_keys(path)
    except FileNotFoundError:
        pass
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=".sticky-key-", dir=directory)  # created 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_bytes(NEW_KEY_BYTES).hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temp, path)  # fails if the file appeared meanwhile: then read that one
            log.warning("sticky: created key file %s with a new random key", path)
        except FileExistsError:
            pass
        except OSError:
            # a file system without hard links: rename, after checking once more (a narrower
            # race, and only on such file systems)
            if not os.path.exists(path):
                os.replace(temp, path)
                log.warning("sticky: created key file %s with a new random key", path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return _read_keys(path)


def _read_keys(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        data = f.read()
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("sticky: key file %s is readable by others (mode %o)", path, mode & 0o777)
    return keys_from_bytes(data, path)


def keys_from_bytes(data: bytes, source: str = "key file") -> list[bytes]:
    """The keys of a key file's bytes: text as `parse_keys` reads it, or, for a file that is
    not text (`openssl rand 32 > sticky.key`, as the HA auth_key_file may be), the whole
    file but for surrounding whitespace as one raw key. ValueError when it holds no key."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or any(c < " " and c not in "\t\r\n" for c in text):
        key = data.strip()
        if len(key) < STRONG_KEY_BYTES:
            raise ValueError(
                f"{source}: a raw (binary) key is {len(key)} bytes,"
                f" at least {STRONG_KEY_BYTES} needed"
            )
        return [key]
    return parse_keys(text, source)


# ---------------------------------------------------------------------------------------------
# The request's Cookie header. Both run per request: plain bytes operations, no regex.
# ---------------------------------------------------------------------------------------------

_SPACE = b" \t"


def find_cookie(cookie_header_value: bytes, name: bytes) -> bytes | None:
    """The value of the first cookie called exactly `name` in a Cookie header value
    (surrounding whitespace and double quotes removed), or None."""
    header = cookie_header_value
    size = len(header)
    n = len(name)
    i = header.find(name)
    while i != -1:
        # the name must start a pair: at the start, or after ";" and optional whitespace
        j = i - 1
        while j >= 0 and header[j] in _SPACE:
            j -= 1
        if j < 0 or header[j] == 0x3B:  # ";"
            k = i + n
            while k < size and header[k] in _SPACE:
                k += 1
            if k < size and header[k] == 0x3D:  # "=": the name ends here, not XLBSTICKYX
                end = header.find(b";", k + 1)
                value = header[k + 1 : end if end != -1 else size].strip(_SPACE)
                if len(value) >= 2 and value[0] == 0x22 and value[-1] == 0x22:
                    value = value[1:-1]
                return value
        i = header.find(name, i + 1)
    return None


def strip_cookie(cookie_header_value: bytes, cookie_name: bytes) -> bytes | None:
    """The Cookie header value without every cookie called `cookie_name`, other cookies
    kept byte for byte and in order; None when no cookie remains."""
    header = cookie_header_value
    if cookie_name not in header:  # the common case is one C-level search
        return header or None
    kept = []
    removed = False
    for pair in header.split(b";"):
        stripped = pair.lstrip(_SPACE)
        if stripped.startswith(cookie_name) and stripped[len(cookie_name) :].lstrip(
            _SPACE
        ).startswith(b"="):
            removed = True
        else:
            kept.append(pair)
    if not removed:
        return header
    result = b";".join(kept).lstrip(_SPACE)
    if not result.strip(b" \t;"):
        return None
    return result
