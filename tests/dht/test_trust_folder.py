"""The trust folder's formats: scopes, endorsements (valid, forged, chained), reading it."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from dht_adaptor.keys import SiteKey, endorse
from dht_adaptor.trust_folder import (
    SCOPE_PATTERN,
    Endorsement,
    EndorsementError,
    KeyFileError,
    Scope,
    fingerprint,
    public_pem,
    read_folder,
)


@pytest.fixture(scope="module")
def paris() -> SiteKey:
    return SiteKey.generate()


@pytest.fixture(scope="module")
def oslo() -> SiteKey:
    return SiteKey.generate()


def put_key(folder: Path, name: str, key: SiteKey, scope: str | None = None) -> None:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.pub").write_bytes(public_pem(key.public_bytes))
    if scope is not None:
        (folder / f"{name}.scope").write_text(scope)


# -- scopes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "aor", "allowed"),
    [
        ("a.example.com", "sip:alice@a.example.com", True),
        ("a.example.com", "sip:alice@b.example.com", False),
        ("a.example.com", "sip:alice@x.a.example.com", False),  # not subdomains
        ("A.Example.COM", "sip:alice@a.example.com", True),  # hosts are case-blind
        ("a.example.com", "sips:alice@a.example.com", True),  # sips folds into sip
        ("a.example.com", "sip:a.example.com", True),  # an AOR without a user
        ("*.example.com", "sip:bob@a.example.com", True),
        ("*.example.com", "sip:bob@example.com", False),
        ("sip:*@a.example.com", "sip:bob@a.example.com", True),
        ("sip:*@a.example.com", "sip:a.example.com", False),  # needs a user
        ("*@a.example.com", "sip:bob@a.example.com", True),  # the scheme may be left out
        ("sip:+33*@example.com", "sip:+33123@example.com", True),
        ("sip:+33*@example.com", "sip:+44123@example.com", False),
        ("sip:alice@example.com", "sip:Alice@example.com", False),  # users are case-exact
        ("sip:al?ce@EXAMPLE.com", "sip:alice@example.com", True),
        ("example.com", "sip:alice@example.com:5060", False),  # AORs have no port
        ("example.com", "tel:+33123", False),
        ("example.com", "alice@example.com", False),  # not a sip AOR
    ],
)
def test_scope_patterns(pattern: str, aor: str, allowed: bool) -> None:
    assert Scope.parse([pattern]).allows(aor) is allowed


def test_scope_allows_never_raises() -> None:
    scope = Scope.parse(["example.com", "sip:a*@x.com"])
    for junk in (None, 3, b"sip:a@example.com", ["sip:a@example.com"], "sip:\ud800@y.com"):
        assert scope.allows(junk) is False
    assert scope.allows("sip:a\ud800@x.com") is True  # (records refuse such AORs anyway)


@pytest.mark.parametrize(
    "bad",
    ["", " example.com", "exa mple.com", "sip:@example.com", "a@b@example.com", "[ab].com",
     "-example.com", "sip:alice", "tel:+33*@example.com", "x" * 300, "example.com\n"],
)  # fmt: skip
def test_bad_scope_patterns(bad: str) -> None:
    with pytest.raises(ValueError):
        Scope.parse([bad])


def test_scope_normalizes_and_dedupes() -> None:
    scope = Scope.parse(["A.example.com", "SIPS:Bob@X.COM", "a.example.com", "*@y.com"])
    assert scope.patterns == ("a.example.com", "sip:Bob@x.com", "sip:*@y.com")
    assert Scope.parse(scope.patterns) == scope
    assert scope.text() == b"a.example.com\nsip:Bob@x.com\nsip:*@y.com\n"


def test_scope_file(tmp_path: Path) -> None:
    path = tmp_path / "a.scope"
    path.write_text("# paris publishes for its two domains\n\na.example.com  # main\n"
                    "  sip:*@b.example.com\n")  # fmt: skip
    assert Scope.read(path).patterns == ("a.example.com", "sip:*@b.example.com")
    path.write_text("# nothing\n")
    empty = Scope.read(path)
    assert empty.patterns == () and not empty.allows("sip:alice@a.example.com")
    path.write_text("a.example.com\nnot a pattern\n")
    with pytest.raises(KeyFileError, match=r"a\.scope:2: not a domain"):
        Scope.read(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(KeyFileError, match="not UTF-8"):
        Scope.read(path)
    path.write_text("".join(f"d{i}.example.com\n" for i in range(300)))
    with pytest.raises(KeyFileError, match="more than 256"):
        Scope.read(path)


def test_the_admin_schema_describes_scopes_as_they_are_checked() -> None:
    from admin_api.schemas import SCOPE_PATTERN as SCHEMA_PATTERN

    assert SCHEMA_PATTERN == SCOPE_PATTERN


# -- endorsements ----------------------------------------------------------------------


def test_endorsement_round_trip_and_verify(paris: SiteKey, oslo: SiteKey) -> None:
    new = SiteKey.generate()
    e = endorse(paris, new.public_bytes)
    assert (e.old_key_id, e.new_key_id) == (paris.key_id, new.key_id)
    assert e.file_name == f"{paris.key_id}-{new.key_id}.endorsement"
    assert Endorsement.decode(e.encode()) == e
    assert e.verify(paris.public_bytes)
    assert not e.verify(oslo.public_bytes)  # not the signer
    forged = endorse(oslo, new.public_bytes)  # oslo signs, claims to be paris
    claimed = Endorsement(paris.key_id, new.key_id, new.public_bytes, forged.signature)
    assert not claimed.verify(paris.public_bytes)
    other = SiteKey.generate()  # a valid signature, moved onto another key
    moved = Endorsement(paris.key_id, other.key_id, other.public_bytes, e.signature)
    assert not moved.verify(paris.public_bytes)


def fields(e: Endorsement) -> dict[str, object]:
    obj: dict[str, object] = json.loads(e.encode())
    return obj


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"v": 2}, "version"),
        ({"old_key_id": "ABCDEF0123456789"}, "old_key_id"),
        ({"new_key_id": "0" * 16}, "not the id"),
        ({"new_public_key": "not base64!"}, "not base64"),
        ({"new_public_key": base64.b64encode(b"x" * 31).decode()}, "32 bytes"),
        ({"signature": base64.b64encode(b"x" * 63).decode()}, "64 bytes"),
        ({"signature": 7}, "must be a string"),
        ({"extra": 1}, "unknown field"),
    ],
)
def test_bad_endorsements(paris: SiteKey, change: dict[str, object], message: str) -> None:
    obj = {**fields(endorse(paris, SiteKey.generate().public_bytes)), **change}
    with pytest.raises(EndorsementError, match=message):
        Endorsement.decode(json.dumps(obj).encode())


def test_a_key_cannot_endorse_itself(paris: SiteKey) -> None:
    with pytest.raises(EndorsementError, match="itself"):
        Endorsement.decode(endorse(paris, paris.public_bytes).encode())


@pytest.mark.parametrize("data", [b"", b"[]", b"{", b"\xff", b'{"v":1,"v":1}', b"x" * 70_000])
def test_unreadable_endorsements(data: bytes) -> None:
    with pytest.raises(EndorsementError):
        Endorsement.decode(data)


# -- reading the folder ----------------------------------------------------------------


def test_folder_with_scopes(tmp_path: Path, paris: SiteKey, oslo: SiteKey) -> None:
    folder = tmp_path / "trust"
    put_key(folder, "oslo", oslo, "a.example.com\n")
    put_key(folder, "paris", paris)
    (folder / "orphan.scope").write_text("z.example.com\n")  # no orphan.pub: ignored
    (folder / "README").write_text("ignored")
    table = read_folder(folder)
    assert set(table) == {paris.key_id, oslo.key_id}
    assert table[oslo.key_id].scope == Scope(("a.example.com",))
    assert table[oslo.key_id].file == "oslo.pub" and not table[oslo.key_id].own
    assert table[paris.key_id].scope is None
    assert table[oslo.key_id].allows("sip:a@a.example.com")
    assert not table[oslo.key_id].allows("sip:a@b.example.com")


def test_own_key_takes_its_scope_from_the_folder(
    tmp_path: Path, paris: SiteKey, oslo: SiteKey
) -> None:
    folder = tmp_path / "trust"
    put_key(folder, "paris", paris, "a.example.com\n")
    table = read_folder(folder, paris.public_bytes)
    assert table[paris.key_id].own and table[paris.key_id].scope == Scope(("a.example.com",))
    alone = read_folder(None, oslo.public_bytes)
    assert alone[oslo.key_id].own and alone[oslo.key_id].scope is None


def test_one_key_in_two_files(tmp_path: Path, paris: SiteKey) -> None:
    folder = tmp_path / "trust"
    put_key(folder, "a", paris)
    put_key(folder, "b", paris)
    assert len(read_folder(folder)) == 1  # the same scope (none): harmless
    (folder / "b.scope").write_text("b.example.com\n")
    with pytest.raises(KeyFileError, match="with another scope"):
        read_folder(folder)


def test_endorsed_keys_inherit_the_scope_and_chain(tmp_path: Path, paris: SiteKey) -> None:
    folder = tmp_path / "trust"
    put_key(folder, "paris", paris, "a.example.com\n")
    new, newer = SiteKey.generate(), SiteKey.generate()
    first, second = endorse(paris, new.public_bytes), endorse(new, newer.public_bytes)
    # The second link is read first (sorted by name): order does not matter.
    (folder / "0-second.endorsement").write_bytes(second.encode())
    (folder / "1-first.endorsement").write_bytes(first.encode())
    table = read_folder(folder)
    assert set(table) == {paris.key_id, new.key_id, newer.key_id}
    for key, signer in ((new, paris), (newer, new)):
        assert table[key.key_id].endorsed_by == signer.key_id
        assert table[key.key_id].scope == Scope(("a.example.com",))
    # Without the old key, the endorsements vouch for nothing (they stay inactive).
    (folder / "paris.pub").unlink()
    assert read_folder(folder) == {}


def test_a_forged_endorsement_is_a_bad_file(tmp_path: Path, paris: SiteKey, oslo: SiteKey) -> None:
    folder = tmp_path / "trust"
    put_key(folder, "paris", paris)
    new = SiteKey.generate()
    forged = Endorsement(paris.key_id, new.key_id, new.public_bytes,
                         endorse(oslo, new.public_bytes).signature)  # fmt: skip
    (folder / "forged.endorsement").write_bytes(forged.encode())
    with pytest.raises(KeyFileError, match=r"forged\.endorsement: is not signed by key"):
        read_folder(folder)
    (folder / "forged.endorsement").write_text("{}")
    with pytest.raises(KeyFileError, match=r"forged\.endorsement"):
        read_folder(folder)


def test_a_key_file_beats_an_endorsement_of_the_same_key(tmp_path: Path, paris: SiteKey) -> None:
    folder = tmp_path / "trust"
    new = SiteKey.generate()
    put_key(folder, "paris", paris, "a.example.com\n")
    put_key(folder, "new", new)  # trusted in its own right, for any AOR
    (folder / "rot.endorsement").write_bytes(endorse(paris, new.public_bytes).encode())
    key = read_folder(folder)[new.key_id]
    assert key.scope is None and key.file == "new.pub" and key.endorsed_by is None


def test_too_many_files(tmp_path: Path) -> None:
    folder = tmp_path / "trust"
    folder.mkdir()
    for i in range(1025):
        (folder / f"{i}.scope").write_text("")
    with pytest.raises(KeyFileError, match="more than 1024"):
        read_folder(folder)


def test_fingerprint_sees_names_and_contents(tmp_path: Path, paris: SiteKey) -> None:
    folder = tmp_path / "trust"
    put_key(folder, "paris", paris)
    first = fingerprint(folder)
    (folder / "notes.txt").write_text("not a key file")
    (folder / ".paris.pub.swp").write_text("an editor's")
    assert fingerprint(folder) == first
    (folder / "paris.scope").write_text("a.example.com\n")
    second = fingerprint(folder)
    assert second != first
    stat = (folder / "paris.scope").stat()
    (folder / "paris.scope").write_text("b.example.com\n")  # same size, same second maybe
    os.utime(folder / "paris.scope", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert fingerprint(folder) != second
    assert isinstance(fingerprint(tmp_path / "nope"), str)
