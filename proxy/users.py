"""The users file: who may register, with which digest secrets (TOML, one table per user).

::

    [users."alice"]
    password = "correct horse"          # both HA1s are computed for the realm

    [users."bob"]
    ha1_md5 = "0123...(32 hex)"          # H(bob:realm:password), precomputed
    ha1_sha256 = "4567...(64 hex)"

A clear password is turned into HA1s for the configured realm as the file is read and
is not kept. Precomputed HA1s must have been computed for that same realm. A user with
only one HA1 can only answer challenges of that algorithm.

Every problem raises :class:`UsersFileError` with one line naming the file and the
user or field, e.g. ``users file /etc/p2psip/users.toml: user 'bob': ha1_md5 must be
32 hex digits``; the CLI prints it and exits 2.
"""

from __future__ import annotations

import string
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from proxy.sip.auth import UserRecord

_HEX = frozenset(string.hexdigits)
_FIELDS = {"password": None, "ha1_md5": 32, "ha1_sha256": 64}


class UsersFileError(ValueError):
    """The users file cannot be read or is not valid. The message is one line."""


def _one_line(text: str) -> str:
    return " ".join(text.split())


class UserDirectory:
    """Usernames to :class:`UserRecord` for one realm; ``get`` is the digest ``lookup``."""

    def __init__(
        self, realm: str, records: Iterable[UserRecord] = (), *, path: Path | None = None
    ) -> None:
        self.realm = realm
        self.path = path
        self._users: dict[str, UserRecord] = {}
        for record in records:
            self.set_user(record)

    def __repr__(self) -> str:
        return f"<UserDirectory realm={self.realm!r} users={len(self._users)} path={self.path}>"

    def get(self, username: str) -> UserRecord | None:
        return self._users.get(username)

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, username: object) -> bool:
        return username in self._users

    def __iter__(self) -> Iterator[UserRecord]:
        return iter(list(self._users.values()))

    def usernames(self) -> list[str]:
        return sorted(self._users)

    def set_user(self, record: UserRecord) -> None:
        """Add or replace a user, in memory only (the file is not written)."""
        if not record.username:
            raise ValueError("a username must not be empty")
        if record.ha1_md5 is None and record.ha1_sha256 is None:
            raise ValueError(f"user {record.username!r} has no HA1")
        self._users[record.username] = record

    def remove(self, username: str) -> bool:
        """Remove a user in memory; False if there was none of that name."""
        return self._users.pop(username, None) is not None

    def reload(self) -> None:
        """Read the file again and replace every user, dropping in-memory changes.

        On error the current users are kept and :class:`UsersFileError` is raised.
        """
        if self.path is None:
            raise UsersFileError("this user directory was not loaded from a file")
        fresh = load_users_file(self.path, self.realm)
        self._users = fresh._users


def load_users_file(path: Path | str, realm: str) -> UserDirectory:
    """Read a users file (see the module docs). Raises :class:`UsersFileError`."""
    path = Path(path)
    where = f"users file {path}"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsersFileError(f"{where}: cannot read: {exc.strerror or exc}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UsersFileError(f"{where}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsersFileError(f"{where}: invalid TOML: {_one_line(str(exc))}") from None
    unknown = sorted(set(doc) - {"users"})
    if unknown:
        raise UsersFileError(f"{where}: unknown top-level key {unknown[0]!r} (expected [users])")
    users = doc.get("users", {})
    if not isinstance(users, dict):
        raise UsersFileError(f"{where}: 'users' must be a table of [users.\"name\"] tables")
    records = [_record(where, name, entry, realm) for name, entry in users.items()]
    return UserDirectory(realm, records, path=path)


def _record(where: str, name: str, entry: Any, realm: str) -> UserRecord:
    who = f"{where}: user {name!r}"
    if not name:
        raise UsersFileError(f"{where}: a username must not be empty")
    if not isinstance(entry, dict):
        raise UsersFileError(f"{who}: must be a table with password or ha1_md5/ha1_sha256")
    for key in entry:
        if key not in _FIELDS:
            raise UsersFileError(
                f"{who}: unknown field {key!r} (expected password, ha1_md5 or ha1_sha256)"
            )
    for key, value in entry.items():
        if not isinstance(value, str):
            raise UsersFileError(f"{who}: {key} must be a string")
    password = entry.get("password")
    md5 = entry.get("ha1_md5")
    sha256 = entry.get("ha1_sha256")
    if password is not None:
        if md5 is not None or sha256 is not None:
            raise UsersFileError(f"{who}: give either password or ha1_md5/ha1_sha256, not both")
        if not password:
            raise UsersFileError(f"{who}: password must not be empty")
        return UserRecord.from_password(name, realm, password)
    if md5 is None and sha256 is None:
        raise UsersFileError(f"{who}: needs password, ha1_md5 or ha1_sha256")
    for key, value in (("ha1_md5", md5), ("ha1_sha256", sha256)):
        length = _FIELDS[key]
        if value is not None and (len(value) != length or not _HEX.issuperset(value)):
            raise UsersFileError(f"{who}: {key} must be {length} hex digits")
    return UserRecord(
        name,
        None if md5 is None else md5.lower(),
        None if sha256 is None else sha256.lower(),
    )


__all__ = ["UserDirectory", "UsersFileError", "load_users_file"]
