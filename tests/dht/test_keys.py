"""Site keys, key files, the trust store and binding signatures."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dht_adaptor.keys import (
    KeyFileError,
    SiteKey,
    TrustStore,
    key_id,
    load_public_key,
    sign_binding,
)
from dht_adaptor.record import DhtBinding, decode_record, encode_record

ALICE = "sip:alice@example.com"


@pytest.fixture(scope="module")
def paris() -> SiteKey:
    return SiteKey.generate()


@pytest.fixture(scope="module")
def oslo() -> SiteKey:
    return SiteKey.generate()


def unsigned(**fields: Any) -> DhtBinding:
    base = DhtBinding(
        aor=ALICE,
        contact="sip:alice@192.0.2.4",
        home="sip:192.0.2.1:5060;transport=udp",
        expires_at=4600.0,
        site="paris",
        version=1,
        instance="<urn:uuid:1>",
        reg_id=1,
    )
    return dataclasses.replace(base, **fields)


def one_line(exc: KeyFileError) -> str:
    message = str(exc)
    assert message and "\n" not in message
    return message


# -- keys and signatures ---------------------------------------------------------------


def test_key_id_is_16_hex_of_sha256(paris: SiteKey) -> None:
    assert len(paris.public_bytes) == 32
    assert paris.key_id == key_id(paris.public_bytes)
    assert paris.key_id == hashlib.sha256(paris.public_bytes).hexdigest()[:16]


def test_site_key_compares_and_prints_by_public_key(paris: SiteKey, oslo: SiteKey) -> None:
    assert paris == SiteKey(private=paris.private, public_bytes=paris.public_bytes)
    assert paris != oslo and len({paris, oslo, paris}) == 2
    assert repr(paris) == f"SiteKey(key_id={paris.key_id!r})"
    with pytest.raises(ValueError):
        SiteKey(private=paris.private, public_bytes=oslo.public_bytes)


def test_sign_binding_sets_key_id_and_verifies(paris: SiteKey) -> None:
    signed = sign_binding(unsigned(), paris)
    assert signed.key_id == paris.key_id and len(signed.signature) == 64
    assert dataclasses.replace(signed, key_id="", signature=b"") == unsigned()
    assert TrustStore.from_dir(None, paris).verify(signed)
    # Re-signing a signed binding (new version) works the same.
    resigned = sign_binding(dataclasses.replace(signed, version=2), paris)
    assert TrustStore({paris.key_id: paris.public_bytes}).verify(resigned)


def test_signature_survives_the_wire(paris: SiteKey) -> None:
    signed = sign_binding(unsigned(expires_at=4600), paris)  # an int, as a caller may pass
    (decoded,) = decode_record(encode_record([signed]))
    assert TrustStore.from_dir(None, paris).verify(decoded)


TAMPERED: dict[str, Any] = {
    "aor": "sip:mallory@example.com",
    "contact": "sip:mallory@203.0.113.66",
    "home": "sip:203.0.113.66",
    "expires_at": 4600.5,
    "site": "evil",
    "version": 2,
    "q": 0.9,
    "instance": "<urn:uuid:2>",
    "reg_id": 2,
    "tombstone": True,
}


def test_every_field_is_covered_by_the_tampering_table() -> None:
    covered = {*TAMPERED, "key_id", "signature"}
    assert covered == {f.name for f in dataclasses.fields(DhtBinding)}


@pytest.mark.parametrize("field", sorted(TAMPERED))
def test_tampering_with_any_field_breaks_the_signature(paris: SiteKey, field: str) -> None:
    trust = TrustStore.from_dir(None, paris)
    signed = sign_binding(unsigned(), paris)
    assert trust.verify(signed)
    assert not trust.verify(dataclasses.replace(signed, **{field: TAMPERED[field]}))


def test_tampering_with_the_signature_or_key_id(paris: SiteKey, oslo: SiteKey) -> None:
    trust = TrustStore.from_dir(None, paris)
    signed = sign_binding(unsigned(), paris)
    flipped = bytes([signed.signature[0] ^ 1]) + signed.signature[1:]
    assert not trust.verify(dataclasses.replace(signed, signature=flipped))
    assert not trust.verify(dataclasses.replace(signed, signature=signed.signature[:63]))
    assert not trust.verify(dataclasses.replace(signed, signature=b""))
    two = TrustStore({paris.key_id: paris.public_bytes, oslo.key_id: oslo.public_bytes})
    assert not two.verify(dataclasses.replace(signed, key_id=oslo.key_id))


def test_unknown_and_untrusted_keys_are_rejected(paris: SiteKey, oslo: SiteKey) -> None:
    trust = TrustStore.from_dir(None, paris)
    by_oslo = sign_binding(unsigned(), oslo)  # a valid signature, by a key not trusted
    assert oslo.key_id not in trust and not trust.verify(by_oslo)
    # Claiming a trusted key id does not help an untrusted signer.
    claimed = dataclasses.replace(by_oslo, key_id=paris.key_id)
    assert not trust.verify(claimed)
    assert not trust.verify(unsigned())  # no key id at all
    assert not TrustStore({}).verify(sign_binding(unsigned(), paris))


@pytest.mark.parametrize(
    "junk",
    [
        {"signature": "not bytes"},
        {"key_id": ["unhashable"]},
        {"expires_at": "soon"},
        {"version": object()},
        {"aor": "sip:\ud800@x"},
    ],
)
def test_verify_never_raises(paris: SiteKey, junk: dict[str, Any]) -> None:
    signed = sign_binding(unsigned(), paris)
    trust = TrustStore.from_dir(None, paris)
    assert trust.verify(dataclasses.replace(signed, **junk)) is False
    assert trust.verify("not a binding") is False  # type: ignore[arg-type]


def test_filter_keeps_order_and_counts_rejects(paris: SiteKey, oslo: SiteKey) -> None:
    trust = TrustStore.from_dir(None, paris)
    a = sign_binding(unsigned(contact="sip:a@x"), paris)
    b = sign_binding(unsigned(contact="sip:b@x"), paris)
    bad = [sign_binding(unsigned(), oslo), unsigned(), dataclasses.replace(a, version=9)]
    assert trust.filter([bad[0], a, bad[1], b, bad[2]]) == ((a, b), 3)
    assert trust.filter([]) == ((), 0)


def test_trust_store_checks_its_keys(paris: SiteKey, oslo: SiteKey) -> None:
    with pytest.raises(ValueError):
        TrustStore({oslo.key_id: paris.public_bytes})
    with pytest.raises(ValueError):
        TrustStore({key_id(b"short"): b"short"})
    trust = TrustStore({paris.key_id: paris.public_bytes})
    assert len(trust) == 1 and paris.key_id in trust and list(trust) == [paris.key_id]


# -- key files -------------------------------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_and_load_round_trip(tmp_path: Path, paris: SiteKey) -> None:
    data_dir = tmp_path / "a" / "b"
    paris.save(data_dir)
    assert mode_of(data_dir) == 0o700
    assert mode_of(data_dir / "site.key") == 0o600
    loaded = SiteKey.load(data_dir)
    assert loaded == paris and loaded.key_id == paris.key_id
    assert loaded.sign(b"x") == paris.sign(b"x")  # Ed25519 is deterministic
    assert load_public_key(data_dir / "site.pub") == paris.public_bytes
    pem = (data_dir / "site.key").read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert (data_dir / "site.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert sorted(os.listdir(data_dir)) == ["site.key", "site.pub"]  # no temp files left


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077, 0o377])
def test_key_file_is_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        SiteKey.generate().save(tmp_path)
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "site.key") == 0o600
    assert SiteKey.load(tmp_path)


def test_save_refuses_to_replace_another_key(tmp_path: Path, paris: SiteKey, oslo: SiteKey) -> None:
    paris.save(tmp_path)
    paris.save(tmp_path)  # the same key again: fine
    with pytest.raises(KeyFileError) as exc_info:
        oslo.save(tmp_path)
    assert "refusing" in one_line(exc_info.value) and paris.key_id in str(exc_info.value)
    assert SiteKey.load(tmp_path) == paris
    oslo.save(tmp_path, overwrite=True)
    assert SiteKey.load(tmp_path) == oslo
    assert load_public_key(tmp_path / "site.pub") == oslo.public_bytes


def test_load_or_create_is_idempotent(tmp_path: Path) -> None:
    first = SiteKey.load_or_create(tmp_path / "data")
    files = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}
    second = SiteKey.load_or_create(tmp_path / "data")
    assert first == second
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == files
    assert set(files) == {"site.key", "site.pub"}


def test_load_or_create_keeps_an_existing_key_and_repairs_the_pub(
    tmp_path: Path, paris: SiteKey, oslo: SiteKey, caplog: pytest.LogCaptureFixture
) -> None:
    paris.save(tmp_path)
    (tmp_path / "site.pub").unlink()
    assert SiteKey.load_or_create(tmp_path) == paris
    assert load_public_key(tmp_path / "site.pub") == paris.public_bytes
    oslo._save_pub(tmp_path)  # a stale pub from another key
    with caplog.at_level(logging.WARNING):
        assert SiteKey.load_or_create(tmp_path) == paris
    assert load_public_key(tmp_path / "site.pub") == paris.public_bytes
    assert "did not match" in caplog.text


def test_load_or_create_never_replaces_a_bad_key(tmp_path: Path) -> None:
    (tmp_path / "site.key").write_bytes(b"junk")
    with pytest.raises(KeyFileError):
        SiteKey.load_or_create(tmp_path)
    assert (tmp_path / "site.key").read_bytes() == b"junk"


def test_concurrent_load_or_create_agrees_on_one_key(tmp_path: Path) -> None:
    keys: list[SiteKey] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        keys.append(SiteKey.load_or_create(tmp_path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8 and len(set(keys)) == 1
    assert SiteKey.load(tmp_path) == keys[0]


def test_world_readable_key_is_loaded_with_a_warning(
    tmp_path: Path, paris: SiteKey, caplog: pytest.LogCaptureFixture
) -> None:
    paris.save(tmp_path)
    (tmp_path / "site.key").chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert SiteKey.load(tmp_path) == paris
    assert "chmod 600" in caplog.text


def pem_private(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | Ed25519PrivateKey,
                password: bytes | None = None) -> bytes:  # fmt: skip
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "not a PEM file"),
        (b"junk\n\nmore junk\n", "not a PEM file"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not a PEM file"),
        (b"\xff" * 100, "not a PEM file"),
        (pem_private(ec.generate_private_key(ec.SECP256R1())), "EC key, not Ed25519"),
        (pem_private(Ed25519PrivateKey.generate(), b"secret"), "password-protected"),
        (b"x" * 70_000, "too large"),
    ],
)
def test_bad_key_file_is_a_one_line_error(tmp_path: Path, content: bytes, expected: str) -> None:
    (tmp_path / "site.key").write_bytes(content)
    with pytest.raises(KeyFileError) as exc_info:
        SiteKey.load(tmp_path)
    message = one_line(exc_info.value)
    assert str(tmp_path / "site.key") in message and expected in message


def test_rsa_and_public_keys_are_not_site_keys(tmp_path: Path, paris: SiteKey) -> None:
    (tmp_path / "site.key").write_bytes(pem_private(rsa.generate_private_key(65537, 2048)))
    with pytest.raises(KeyFileError, match="RSA key, not Ed25519"):
        SiteKey.load(tmp_path)
    paris.save(tmp_path / "p")
    (tmp_path / "site.key").write_bytes((tmp_path / "p" / "site.pub").read_bytes())
    with pytest.raises(KeyFileError, match="not a PEM file"):
        SiteKey.load(tmp_path)
    with pytest.raises(KeyFileError, match="not a PEM file"):
        load_public_key(tmp_path / "p" / "site.key")  # a private key is not a .pub


def test_missing_or_odd_key_files(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as exc_info:
        SiteKey.load(tmp_path)
    assert "cannot read" in one_line(exc_info.value)
    (tmp_path / "site.key").mkdir()
    with pytest.raises(KeyFileError) as exc_info:
        SiteKey.load(tmp_path)
    one_line(exc_info.value)
    (tmp_path / "site.key").rmdir()
    os.mkfifo(tmp_path / "site.key")  # must not block
    with pytest.raises(KeyFileError, match="not a regular file"):
        SiteKey.load(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(KeyFileError) as exc_info:
        SiteKey.generate().save(tmp_path / "file" / "sub")  # a file where a dir should be
    assert "cannot create" in one_line(exc_info.value)


def test_key_file_error_is_one_line() -> None:
    assert str(KeyFileError("a\nb\r\n  c ")) == "a b c"


# -- trust dirs ------------------------------------------------------------------------


def test_trust_dir(tmp_path: Path, paris: SiteKey, oslo: SiteKey) -> None:
    third = SiteKey.generate()
    trust_dir = tmp_path / "trust"
    trust_dir.mkdir()
    for name, key in (("oslo", oslo), ("third", third)):
        key.save(tmp_path / name)
        (trust_dir / f"{name}.pub").write_bytes((tmp_path / name / "site.pub").read_bytes())
    (trust_dir / "README").write_text("not a key, not *.pub: ignored")
    (trust_dir / ".editor.pub").write_text("hidden: ignored")
    trust = TrustStore.from_dir(trust_dir, paris)
    assert len(trust) == 3
    assert all(k.key_id in trust for k in (paris, oslo, third))
    assert trust.verify(sign_binding(unsigned(), third))
    assert len(TrustStore.from_dir(trust_dir, None)) == 2
    assert len(TrustStore.from_dir(trust_dir, oslo)) == 2  # own key also in the dir


def test_without_a_trust_dir_a_site_trusts_itself(paris: SiteKey, oslo: SiteKey) -> None:
    trust = TrustStore.from_dir(None, paris)
    assert len(trust) == 1 and paris.key_id in trust and oslo.key_id not in trust
    assert len(TrustStore.from_dir(None, None)) == 0


def test_trust_dir_with_a_bad_file(tmp_path: Path, paris: SiteKey) -> None:
    paris.save(tmp_path / "p")
    trust_dir = tmp_path / "trust"
    trust_dir.mkdir()
    (trust_dir / "good.pub").write_bytes((tmp_path / "p" / "site.pub").read_bytes())
    (trust_dir / "bad.pub").write_text("-----BEGIN PUBLIC KEY-----\ngarbage\n")
    with pytest.raises(KeyFileError) as exc_info:
        TrustStore.from_dir(trust_dir, None)
    assert str(trust_dir / "bad.pub") in one_line(exc_info.value)


def test_missing_trust_dir(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as exc_info:
        TrustStore.from_dir(tmp_path / "nope", None)
    message = one_line(exc_info.value)
    assert "trust dir" in message and str(tmp_path / "nope") in message
    (tmp_path / "plain").write_text("x")
    with pytest.raises(KeyFileError):
        TrustStore.from_dir(tmp_path / "plain", None)
