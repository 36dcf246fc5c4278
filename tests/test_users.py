"""The users file: loading, HA1 computation, in-memory edits, reload and every error."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from proxy.sip.auth import MD5, SHA256, UserRecord, ha1
from proxy.users import UserDirectory, UsersFileError, load_users_file

REALM = "example.com"
MD5_HEX = hashlib.md5(b"bob:example.com:pw").hexdigest()
SHA_HEX = hashlib.sha256(b"bob:example.com:pw").hexdigest()


def write(tmp_path: Path, text: str, name: str = "users.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_password_and_ha1_users(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
[users."alice"]
password = "wonderland"

[users."bob"]
ha1_md5 = "{MD5_HEX.upper()}"
ha1_sha256 = "{SHA_HEX}"

[users.carol]
ha1_sha256 = "{SHA_HEX}"
""",
    )
    d = load_users_file(path, REALM)
    assert len(d) == 3
    assert d.usernames() == ["alice", "bob", "carol"]
    alice = d.get("alice")
    assert alice is not None
    assert alice.ha1_md5 == ha1("alice", REALM, "wonderland", MD5)
    assert alice.ha1_sha256 == ha1("alice", REALM, "wonderland", SHA256)
    bob = d.get("bob")
    assert bob == UserRecord("bob", MD5_HEX, SHA_HEX)  # hex lower-cased
    carol = d.get("carol")
    assert carol is not None and carol.ha1_md5 is None and carol.ha1_for("SHA-256") == SHA_HEX
    assert d.get("mallory") is None and d.get("Alice") is None
    assert "alice" in d and "mallory" not in d
    assert {r.username for r in d} == {"alice", "bob", "carol"}
    # The clear password is nowhere in the directory or its records.
    assert "wonderland" not in repr(d) + repr(alice) + repr(vars(d))
    assert d.path == path and d.realm == REALM


def test_ha1_depends_on_realm(tmp_path: Path) -> None:
    path = write(tmp_path, '[users.alice]\npassword = "pw"\n')
    a = load_users_file(path, "a.example").get("alice")
    b = load_users_file(path, "b.example").get("alice")
    assert a is not None and b is not None and a.ha1_md5 != b.ha1_md5


def test_empty_file_is_an_empty_directory(tmp_path: Path) -> None:
    assert len(load_users_file(write(tmp_path, ""), REALM)) == 0
    assert len(load_users_file(write(tmp_path, "[users]\n"), REALM)) == 0


def test_set_user_and_remove_in_memory() -> None:
    d = UserDirectory(REALM)
    d.set_user(UserRecord.from_password("dave", REALM, "pw"))
    assert d.usernames() == ["dave"]
    d.set_user(UserRecord("dave", MD5_HEX, None))
    dave = d.get("dave")
    assert dave is not None and dave.ha1_md5 == MD5_HEX and dave.ha1_sha256 is None
    assert d.remove("dave") is True
    assert d.remove("dave") is False
    assert len(d) == 0
    with pytest.raises(ValueError):
        d.set_user(UserRecord("erin"))
    with pytest.raises(ValueError):
        d.set_user(UserRecord("", MD5_HEX))


def test_reload_replaces_users_and_keeps_them_on_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[users.alice]\npassword = "pw"\n')
    d = load_users_file(path, REALM)
    d.set_user(UserRecord("temp", MD5_HEX))
    path.write_text('[users.bob]\npassword = "pw"\n[users.carol]\npassword = "x"\n')
    d.reload()
    assert d.usernames() == ["bob", "carol"]
    path.write_text("[users.bob\n")
    with pytest.raises(UsersFileError):
        d.reload()
    assert d.usernames() == ["bob", "carol"]


def test_reload_without_a_file() -> None:
    with pytest.raises(UsersFileError):
        UserDirectory(REALM).reload()


def test_accepts_str_path(tmp_path: Path) -> None:
    path = write(tmp_path, '[users.alice]\npassword = "pw"\n')
    assert len(load_users_file(str(path), REALM)) == 1


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[users.alice\npassword = 1\n", ["invalid TOML", "line 1"]),
        ('users = "alice"\n', ["'users' must be a table"]),
        ('[groups.admins]\nx = "y"\n', ["unknown top-level key 'groups'"]),
        ('[users]\nalice = "pw"\n', ["user 'alice'", "must be a table"]),
        ("[users.alice]\n", ["user 'alice'", "needs password, ha1_md5 or ha1_sha256"]),
        ("[users.alice]\npassword = 1234\n", ["user 'alice'", "password must be a string"]),
        ("[users.alice]\nha1_md5 = true\n", ["user 'alice'", "ha1_md5 must be a string"]),
        ('[users.alice]\npassword = ""\n', ["user 'alice'", "password must not be empty"]),
        ('[users.alice]\npasword = "pw"\n', ["user 'alice'", "unknown field 'pasword'"]),
        (
            f'[users.alice]\npassword = "pw"\nha1_md5 = "{MD5_HEX}"\n',
            ["user 'alice'", "not both"],
        ),
        ('[users.bob]\nha1_md5 = "abc"\n', ["user 'bob'", "ha1_md5 must be 32 hex digits"]),
        (
            f'[users.bob]\nha1_md5 = "{"g" * 32}"\n',
            ["user 'bob'", "ha1_md5 must be 32 hex digits"],
        ),
        (
            f'[users.bob]\nha1_sha256 = "{MD5_HEX}"\n',
            ["user 'bob'", "ha1_sha256 must be 64 hex digits"],
        ),
        ('[users.""]\npassword = "pw"\n', ["username must not be empty"]),
        ('[users."a\\nb"]\n', ["user 'a\\nb'", "needs password"]),
    ],
)
def test_errors_are_one_line_naming_file_and_problem(
    tmp_path: Path, text: str, needles: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UsersFileError) as info:
        load_users_file(path, REALM)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"users file {path}: ")
    for needle in needles:
        assert needle in message, message
    assert isinstance(info.value, ValueError)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(UsersFileError) as info:
        load_users_file(path, REALM)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "cannot read" in message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(UsersFileError) as info:
        load_users_file(tmp_path, REALM)
    assert "cannot read" in str(info.value) and "\n" not in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[users.alice]\npassword = "caf\xe9"\n')
    with pytest.raises(UsersFileError) as info:
        load_users_file(path, REALM)
    assert "not UTF-8" in str(info.value) and str(path) in str(info.value)


def test_password_not_in_error_messages(tmp_path: Path) -> None:
    path = write(tmp_path, f'[users.alice]\npassword = "s3cret"\nha1_md5 = "{MD5_HEX}"\n')
    with pytest.raises(UsersFileError) as info:
        load_users_file(path, REALM)
    assert "s3cret" not in str(info.value) and MD5_HEX not in str(info.value)
