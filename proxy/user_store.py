"""Users that can change while the site runs: kept in Redis or in the users file.

A :class:`UserStore` is the :class:`~proxy.users.UserDirectory` the registrar and the
auth gate read (``get`` stays a plain dict lookup: digest verification is synchronous),
plus ``put``/``delete`` that write through to where the users are kept and then tell
subscribers (the site switches digest authentication on when the first user appears).

* :class:`FileUserStore`: the TOML users file, rewritten atomically on every change
  (a temporary file, fsync, rename). It is written with HA1s only: a clear password
  read from the file is never written back.
* :class:`RedisUserStore`: one hash per user, ``{prefix}user:{username}`` with fields
  ``realm``, ``ha1_md5`` and ``ha1_sha256``. The process keeps a copy in memory and
  reloads it every few seconds, so users changed by another proxy process sharing the
  Redis show up here too. While Redis is away the copy stays as it was. A marker key,
  ``{prefix}marker:users``, tells a reload that Redis lost its data (a crash without
  persistence, FLUSHALL): the copy is then written back instead of being replaced by
  nothing, user by user and never over a user written since.

Digest authentication is on once there has been a user or a users file was given, and
stays on (:mod:`proxy.auth_gate`); ``/ready`` reports a site that then has no users.

Failures to write or read are :class:`UserStoreError` (the admin API answers 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import string
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from .config import Config
from .redis_support import describe_url, glob_escape, redis_errors
from .sip.auth import UserRecord
from .users import UserDirectory, UsersFileError, load_users_file

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "p2psip:"
REFRESH_INTERVAL = 5.0  # seconds between reloads of the Redis users
_HEX = frozenset(string.hexdigits)
# Create the user's hash only if there is none: a user written since the loss wins.
_RESTORE_USER = """
if redis.call('exists', KEYS[1]) == 1 then return 0 end
redis.call('hset', KEYS[1], unpack(ARGV))
return 1
"""


class UserStoreError(Exception):
    """The users could not be read or written; the message is one line."""


def check_record(record: UserRecord) -> None:
    """Raise ``ValueError`` unless ``record`` can be stored (name, HA1 lengths)."""
    if not record.username:
        raise ValueError("a username must not be empty")
    if record.ha1_md5 is None and record.ha1_sha256 is None:
        raise ValueError(f"user {record.username!r} has no HA1")
    for name, value, length in (
        ("ha1_md5", record.ha1_md5, 32),
        ("ha1_sha256", record.ha1_sha256, 64),
    ):
        if value is not None and (len(value) != length or not _HEX.issuperset(value)):
            raise ValueError(f"{name} must be {length} hex digits")


class UserStore(UserDirectory):
    """A user directory whose changes are kept somewhere and announced to subscribers."""

    def __init__(
        self, realm: str, records: Iterable[UserRecord] = (), *, path: Path | None = None
    ) -> None:
        super().__init__(realm, records, path=path)
        self._listeners: list[Callable[[], None]] = []
        self._write_lock = asyncio.Lock()

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every change of the users."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    async def put(self, record: UserRecord) -> bool:
        """Add or replace a user; True if it is new. ``ValueError`` for a bad record."""
        raise NotImplementedError

    async def delete(self, username: str) -> bool:
        """Remove a user; False if there was none of that name."""
        raise NotImplementedError

    async def ping(self) -> None:
        """Readiness: return if the users' home answers, else raise UserStoreError."""

    async def close(self) -> None:
        """Stop background work (idempotent)."""


# --- the users file ---------------------------------------------------------------------


def _toml_string(text: str) -> str:
    """A TOML basic string (TOML 1.0 §String: escape quote, backslash and controls)."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def render_users_file(records: Iterable[UserRecord]) -> str:
    lines = [
        "# p2psip users, rewritten by the admin API: HA1s only, never clear passwords.",
        "# HA1 = H(username:realm:password), MD5 (RFC 2617) and SHA-256 (RFC 7616).",
    ]
    for r in sorted(records, key=lambda r: r.username):
        lines += ["", f"[users.{_toml_string(r.username)}]"]
        if r.ha1_md5 is not None:
            lines.append(f"ha1_md5 = {_toml_string(r.ha1_md5)}")
        if r.ha1_sha256 is not None:
            lines.append(f"ha1_sha256 = {_toml_string(r.ha1_sha256)}")
    return "\n".join(lines) + "\n"


def write_users_file(path: Path, records: Iterable[UserRecord]) -> None:
    """Replace ``path`` atomically (readers see the old file or the new one, whole)."""
    data = render_users_file(records).encode("utf-8")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserStoreError(f"cannot write users file {path}: {exc.strerror or exc}") from None


class FileUserStore(UserStore):
    """Users in a TOML users file (see :mod:`proxy.users` for the format)."""

    @classmethod
    def open(cls, path: Path, realm: str, *, must_exist: bool) -> FileUserStore:
        """Read ``path``; a missing file is an empty store unless ``must_exist``.

        Raises :class:`~proxy.users.UsersFileError` for a file that cannot be read.
        """
        if not must_exist and not path.exists():
            return cls(realm, path=path)
        return cls(realm, load_users_file(path, realm), path=path)

    async def put(self, record: UserRecord) -> bool:
        check_record(record)
        async with self._write_lock:
            created = record.username not in self._users
            users = {**self._users, record.username: record}
            await self._write(users)
        self._changed()
        return created

    async def delete(self, username: str) -> bool:
        async with self._write_lock:
            if username not in self._users:
                return False
            users = {n: r for n, r in self._users.items() if n != username}
            await self._write(users)
        self._changed()
        return True

    async def _write(self, users: dict[str, UserRecord]) -> None:
        assert self.path is not None
        await asyncio.to_thread(write_users_file, self.path, users.values())
        self._users = users  # only once the file holds them


# --- Redis ------------------------------------------------------------------------------


class RedisUserStore(UserStore):
    """Users in Redis, one hash per user (see the module docstring)."""

    def __init__(
        self,
        url: str,
        realm: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 2.0,
        refresh_interval: float = REFRESH_INTERVAL,
    ) -> None:
        super().__init__(realm)
        self._where = describe_url(url)  # ValueError for a bad URL
        self._key_prefix = f"{prefix}user:"
        self._marker_key = f"{prefix}marker:users"
        self._refresh_interval = refresh_interval
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # Retry once, at once, on a pooled connection found dead (Redis restarted).
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._restore_user = self._client.register_script(_RESTORE_USER)
        self._epoch: str | None = None  # the marker as the last reload saw it
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<RedisUserStore {self._where} realm={self.realm!r} users={len(self)}>"

    def key(self, username: str) -> str:
        return f"{self._key_prefix}{username}"

    def _errors(self, action: str) -> AbstractContextManager[None]:
        return redis_errors(UserStoreError, self._where, action)

    def _fields(self, record: UserRecord) -> list[str]:
        fields = ["realm", self.realm]
        if record.ha1_md5 is not None:
            fields += ["ha1_md5", record.ha1_md5.lower()]
        if record.ha1_sha256 is not None:
            fields += ["ha1_sha256", record.ha1_sha256.lower()]
        return fields

    async def put(self, record: UserRecord) -> bool:
        check_record(record)
        fields = self._fields(record)
        key = self.key(record.username)
        async with self._write_lock:
            with self._errors(f"save user {record.username!r}"):
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.delete(key)
                    pipe.hset(key, items=fields)
                    existed, _ = await pipe.execute()
            self._users = {**self._users, record.username: record}
        self._changed()
        return not existed

    async def delete(self, username: str) -> bool:
        async with self._write_lock:
            with self._errors(f"delete user {username!r}"):
                existed = await self._client.delete(self.key(username))
            self._users = {n: r for n, r in self._users.items() if n != username}
        self._changed()
        return bool(existed)

    async def refresh(self) -> None:
        """Read every user from Redis and replace the copy in memory; or, if Redis lost
        the users since the last reload, write the copy back instead (and read it next
        time). Raises UserStoreError; the copy is then kept as it was."""
        async with self._write_lock:
            await self._refresh()

    async def _refresh(self) -> None:
        pattern = glob_escape(self._key_prefix) + "*"
        with self._errors("load users"):
            keys = [k async for k in self._client.scan_iter(match=pattern, count=500)]
            # One MULTI: the hashes are read as of the marker read with them, so a FLUSHALL
            # after the SCAN shows as a lost marker, never as users deleted.
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.get(self._marker_key)
                for k in keys:
                    pipe.hgetall(k)
                raw_marker, *hashes = await pipe.execute(raise_on_error=False)
        if isinstance(raw_marker, Exception):
            raise UserStoreError(f"redis at {self._where}: cannot read the users' marker")
        marker = None if raw_marker is None else _text(raw_marker)
        if self._epoch is not None and marker != self._epoch:
            await self._write_back()
            return
        if marker is None:  # the first reload of a Redis never marked (or lost before)
            marker = await self._ensure_marker()
        self._epoch = marker
        users: dict[str, UserRecord] = {}
        for raw_key, fields in zip(keys, hashes, strict=True):
            name = _text(raw_key)[len(self._key_prefix) :]
            if isinstance(fields, ResponseError) or not isinstance(fields, dict):
                log.warning("redis at %s: key of user %r is not a hash", self._where, name)
                continue
            record = self._record(name, {_text(k): _text(v) for k, v in fields.items()})
            if record is not None:
                users[name] = record
        changed = users != self._users
        self._users = users
        if changed:
            self._changed()

    async def _ensure_marker(self) -> str:
        with self._errors("write the users' marker"):
            await self._client.set(self._marker_key, secrets.token_hex(8), nx=True)
            value = await self._client.get(self._marker_key)
        if value is None:
            raise UserStoreError(f"redis at {self._where}: the users' marker vanished")
        return _text(value)

    async def _write_back(self) -> None:
        """Redis lost the users (or another process noticed first and marked it anew):
        write back each user held in memory that Redis lacks, then adopt the marker."""
        written = 0
        records = list(self._users.values())
        with self._errors("write back users"):
            for record in records:
                key = self.key(record.username)
                written += int(await self._restore_user(keys=[key], args=self._fields(record)))
        self._epoch = await self._ensure_marker()
        log.warning(
            "users: redis at %s had lost them; wrote back %d user(s) held in memory "
            "(%d were there already)",
            self._where, written, len(records) - written,
        )  # fmt: skip

    def _record(self, name: str, fields: dict[str, str]) -> UserRecord | None:
        if fields.get("realm") != self.realm:
            log.warning(
                "redis at %s: user %r has HA1s for realm %r, not %r; ignored",
                self._where, name, fields.get("realm"), self.realm,
            )  # fmt: skip
            return None
        record = UserRecord(name, fields.get("ha1_md5"), fields.get("ha1_sha256"))
        try:
            check_record(record)
        except ValueError as exc:
            log.warning("redis at %s: user %r ignored: %s", self._where, name, exc)
            return None
        return record

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        failing = False  # log the first failure and the recovery, not every reload
        while True:
            await asyncio.sleep(self._refresh_interval)
            try:
                await self.refresh()
            except UserStoreError as exc:
                if not failing:
                    log.warning(
                        "users: cannot reload (%s); keeping the %d user(s) held in memory",
                        exc, len(self),
                    )  # fmt: skip
                failing = True
                continue
            if failing:
                log.info("users: reloaded from redis at %s again", self._where)
                failing = False

    async def ping(self) -> None:
        with self._errors("ping"):
            await self._client.ping()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._client.aclose()


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


# --- opening the site's store -----------------------------------------------------------


async def open_user_store(config: Config, realm: str) -> UserStore:
    """Redis with ``--redis-url`` (a ``--users`` file seeds an empty one), else the users
    file: ``--users FILE``, or ``DATA_DIR/users.toml`` (created by the first change).

    Raises UsersFileError or UserStoreError with one line.
    """
    if config.redis_url:
        try:
            store = RedisUserStore(config.redis_url, realm)
        except ValueError as exc:
            raise UserStoreError(str(exc)) from None
        try:
            await store.refresh()
            if len(store) == 0 and config.users_file is not None:
                seed = load_users_file(config.users_file, realm)
                for record in seed:
                    await store.put(record)
                log.info("copied %d user(s) from %s into Redis", len(seed), config.users_file)
        except (UserStoreError, UsersFileError):
            await store.close()
            raise
        store.start()
        return store
    path = config.users_file or config.data_dir / "users.toml"
    return FileUserStore.open(path, realm, must_exist=config.users_file is not None)


__all__ = [
    "FileUserStore",
    "RedisUserStore",
    "UserStore",
    "UserStoreError",
    "open_user_store",
    "write_users_file",
]
