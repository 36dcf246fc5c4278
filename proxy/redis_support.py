"""Small helpers for every Redis-backed store of a site (bindings, records, users):
readable URLs without credentials, one error line per failure, MATCH escaping."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qs, urlsplit

from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS
from redis.exceptions import RedisError

_SCHEMES = ("redis", "rediss", "unix")
_QUERY_OPTIONS = frozenset(URL_QUERY_ARGUMENT_PARSERS) | {
    "client_name",
    "username",
    "password",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_ciphers",
}


@contextmanager
def redis_errors(error: type[Exception], where: str, action: str) -> Iterator[None]:
    """Turn any Redis failure inside the block into ``error`` with one readable line."""
    try:
        yield
    except (RedisError, OSError) as exc:  # OSError covers asyncio's TimeoutError too
        raise error(f"redis at {where}: {action} failed: {type(exc).__name__}: {exc}") from exc


def describe_url(url: str) -> str:
    """``host:port/db`` (or the socket path) for messages; ``ValueError`` if ``url`` is bad.

    Never includes the user name or password.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("invalid redis URL: cannot parse host and port") from None
    if parts.scheme not in _SCHEMES:
        raise ValueError(
            f"redis URL must start with redis://, rediss:// or unix://, "
            f"not {parts.scheme + '://' if parts.scheme else 'no scheme'}"
        )
    for name in parse_qs(parts.query, keep_blank_values=True):
        # redis-py hands unknown options to the connection, which fails on first use with a
        # TypeError; decode_responses would change what GET returns. Refuse both now.
        if name not in _QUERY_OPTIONS:
            raise ValueError(f"redis URL has an unsupported query option {name!r}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("redis unix:// URL lacks a socket path")
        return f"unix:{parts.path}"
    host = parts.hostname or "localhost"
    db = parts.path.strip("/") or "0"
    return f"{host}:{port or 6379}/{db}"


def glob_escape(text: str) -> str:
    """Escape the characters that are special in a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
