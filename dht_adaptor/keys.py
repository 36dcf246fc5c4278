"""Site keys and the trust store: who may publish bindings into the DHT.

Every site has one Ed25519 key. ``DIR/site.key`` (PEM PKCS#8, mode 0600) is secret;
``DIR/site.pub`` (PEM SubjectPublicKeyInfo) is copied into the trust directory of every
other site. A binding counts only if its ``key_id`` names a trusted key and its signature
over :meth:`DhtBinding.signing_bytes` verifies; anything else any DHT node returns is
dropped. The DHT itself is open, so signatures, not node ids, decide what is believed.

Errors reading or writing key files are :class:`KeyFileError` with a one-line message
naming the file, fit to print before exiting (``p2psip`` exits 2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dht_adaptor.record import DhtBinding

log = logging.getLogger(__name__)

KEY_FILE = "site.key"
PUB_FILE = "site.pub"
MAX_KEY_FILE_BYTES = 64 * 1024  # a PEM Ed25519 key is about 120 bytes
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class KeyFileError(Exception):
    """A key file or trust dir that cannot be read/written/parsed.

    The message is one line fit for the operator (the CLI prints it and exits 2).
    """

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s+", " ", message).strip())


def key_id(public_bytes: bytes) -> str:
    """16 hex characters of sha256 over the raw 32-byte public key."""
    return hashlib.sha256(public_bytes).hexdigest()[:16]


@dataclass(frozen=True, eq=False, repr=False)
class SiteKey:
    """This site's signing key. Compares and prints by public key only."""

    private: Ed25519PrivateKey
    public_bytes: bytes  # raw 32 bytes

    def __post_init__(self) -> None:
        if self.private.public_key().public_bytes(*_RAW) != self.public_bytes:
            raise ValueError("public_bytes is not the public half of the private key")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SiteKey):
            return NotImplemented
        return self.public_bytes == other.public_bytes

    def __hash__(self) -> int:
        return hash(self.public_bytes)

    def __repr__(self) -> str:
        return f"SiteKey(key_id={self.key_id!r})"

    @property
    def key_id(self) -> str:
        return key_id(self.public_bytes)

    @classmethod
    def generate(cls) -> SiteKey:
        return cls._of(Ed25519PrivateKey.generate())

    @classmethod
    def _of(cls, private: Ed25519PrivateKey) -> SiteKey:
        return cls(private=private, public_bytes=private.public_key().public_bytes(*_RAW))

    @classmethod
    def load(cls, data_dir: Path) -> SiteKey:
        """The key in ``DIR/site.key``."""
        path = Path(data_dir) / KEY_FILE
        data = _read(path)
        with _refusing(path, "an Ed25519 private key"):
            private = serialization.load_pem_private_key(data, password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise KeyFileError(f"{path}: holds a {_algorithm(private)} key, not Ed25519")
        return cls._of(private)

    def save(self, data_dir: Path, *, overwrite: bool = False) -> None:
        """Write ``DIR/site.key`` (0600) and ``DIR/site.pub``, creating ``DIR`` (0700).

        Each file appears atomically, complete or not at all. An existing ``site.key``
        holding a different key is kept (KeyFileError) unless ``overwrite``: other sites
        trust the old public key, so replacing it silently would cut this site off.
        """
        directory = _make_dir(data_dir)
        path = directory / KEY_FILE
        if not _create(path, self._private_pem(), 0o600, overwrite=overwrite):
            existing = SiteKey.load(directory)
            if existing != self:
                raise KeyFileError(
                    f"{path}: already holds key {existing.key_id}; refusing to replace it"
                )
        self._save_pub(directory)

    @classmethod
    def load_or_create(cls, data_dir: Path) -> SiteKey:
        """The key in ``DIR/site.key``, generated and saved first if there is none.

        Safe against a concurrent start: the first writer's key wins and everyone loads
        it. ``site.pub`` is rewritten if it is missing or does not match. An unreadable
        ``site.key`` is an error, never replaced.
        """
        directory = _make_dir(data_dir)
        if not (directory / KEY_FILE).exists():
            _create(directory / KEY_FILE, cls.generate()._private_pem(), 0o600, overwrite=False)
        key = cls.load(directory)
        pub = directory / PUB_FILE
        try:
            current = load_public_key(pub)
        except KeyFileError:
            current = b""
        if current != key.public_bytes:
            if pub.exists():
                log.warning("%s did not match %s; rewriting it", pub, KEY_FILE)
            key._save_pub(directory)
        return key

    def _private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def _save_pub(self, directory: Path) -> None:
        pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        _create(directory / PUB_FILE, pem, 0o644, overwrite=True)

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)


def load_public_key(path: Path) -> bytes:
    """The raw 32 bytes of the Ed25519 public key in a PEM ``*.pub`` file."""
    path = Path(path)
    data = _read(path)
    with _refusing(path, "an Ed25519 public key"):
        public = serialization.load_pem_public_key(data)
    if not isinstance(public, Ed25519PublicKey):
        raise KeyFileError(f"{path}: holds a {_algorithm(public)} key, not Ed25519")
    return public.public_bytes(*_RAW)


VERIFIED_CACHE_SIZE = 65_536  # bindings remembered as verified (about 30 MB at most)


class TrustStore:
    """The public keys whose bindings this site believes, by key id."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._verified: dict[DhtBinding, None] = {}  # insertion-ordered: oldest first
        for kid, public_bytes in keys.items():
            if len(public_bytes) != 32 or key_id(public_bytes) != kid:
                raise ValueError(f"key id {kid!r} does not match its 32-byte public key")
            self._keys[kid] = Ed25519PublicKey.from_public_bytes(public_bytes)

    @classmethod
    def from_dir(cls, trust_dir: Path | None, own: SiteKey | None) -> TrustStore:
        """Every ``DIR/*.pub`` (dot-files skipped) plus ``own``.

        Without a trust dir only ``own`` is trusted: a single site trusts itself. A
        missing dir, or any file in it that is not an Ed25519 public key, is an error
        naming it; a typo in the trust setup must not silently distrust a site.
        """
        keys: dict[str, bytes] = {}
        if trust_dir is not None:
            directory = Path(trust_dir)
            try:
                names = sorted(p for p in directory.iterdir() if p.suffix == ".pub")
            except OSError as exc:
                raise KeyFileError(f"cannot read trust dir {directory}: {_reason(exc)}") from None
            for path in names:
                if not path.name.startswith("."):
                    public = load_public_key(path)
                    keys[key_id(public)] = public
        if own is not None:
            keys[own.key_id] = own.public_bytes
        return cls(keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def public_bytes(self, kid: str) -> bytes | None:
        """The raw 32-byte public key of a trusted key id, or None."""
        public = self._keys.get(kid)
        return None if public is None else public.public_bytes_raw()

    def verify_signature(self, kid: str, data: bytes, signature: bytes) -> bool:
        """Did the trusted key ``kid`` sign ``data``? Never raises (no cache: callers
        sign distinct messages)."""
        public = self._keys.get(kid)
        if public is None or len(signature) != 64:
            return False
        try:
            public.verify(signature, data)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    def verify(self, b: DhtBinding) -> bool:
        """True iff ``b.key_id`` is trusted and its signature is valid. Never raises.

        Bindings that verified are remembered (a bounded cache keyed by the whole
        binding, signature included): a record is checked when it is put, stored,
        read and merged, and an Ed25519 verification costs a few hundred microseconds.
        Only successes are cached, so junk cannot fill the cache.
        """
        try:
            if b in self._verified or (b in _SIGNED_HERE and b.key_id in self._keys):
                return True
            public = self._keys.get(b.key_id)
            if public is None or not isinstance(b.signature, bytes) or len(b.signature) != 64:
                return False
            public.verify(b.signature, b.signing_bytes())
        except (InvalidSignature, AttributeError, TypeError, ValueError):
            return False  # AttributeError etc.: not a binding, or one with junk fields
        _remember(self._verified, b)
        return True

    def filter(self, bindings: Iterable[DhtBinding]) -> tuple[tuple[DhtBinding, ...], int]:
        """(the verified bindings, in order; how many were rejected)."""
        good: list[DhtBinding] = []
        rejected = 0
        for b in bindings:
            if self.verify(b):
                good.append(b)
            else:
                rejected += 1
        return tuple(good), rejected


def sign_binding(b: DhtBinding, key: SiteKey) -> DhtBinding:
    """A copy of ``b`` with ``key_id`` set to ``key``'s and signed by it.

    The result is remembered as correctly signed, so that this process's own trust
    stores (the site's DHT node checks every binding it puts and stores) need not verify
    it again: a verification costs more than the signature.
    """
    unsigned = dataclasses.replace(b, key_id=key.key_id, signature=b"")
    signed = dataclasses.replace(unsigned, signature=key.sign(unsigned.signing_bytes()))
    _remember(_SIGNED_HERE, signed)
    return signed


# Bindings this process signed itself; TrustStore.verify accepts them when it trusts
# their key id (a key id is a hash of the public key that made the signature).
_SIGNED_HERE: dict[DhtBinding, None] = {}


def _remember(cache: dict[DhtBinding, None], b: DhtBinding) -> None:
    if len(cache) >= VERIFIED_CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[b] = None


# -- files -----------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    try:
        # O_NONBLOCK: a FIFO planted as a key file must not hang the start-up.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise KeyFileError(f"{path}: not a regular file")
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {_reason(exc)}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: too large for a key file")
    if path.name == KEY_FILE and mode & 0o077:
        log.warning("%s is readable by other users (mode %o); chmod 600 it", path, mode & 0o777)
    return data


def _make_dir(data_dir: Path) -> Path:
    directory = Path(data_dir)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create {directory}: {_reason(exc)}") from None
    return directory


def _create(path: Path, data: bytes, mode: int, *, overwrite: bool) -> bool:
    """Write ``path`` atomically with ``mode``; False if it exists and not ``overwrite``.

    The bytes go to a temporary file in the same directory first, so readers never see
    a half-written key. Without ``overwrite`` it is hard-linked into place, which fails
    if ``path`` exists: two processes creating a key at once cannot both win.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
            os.fchmod(f.fileno(), mode)  # whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        created = _link_or_replace(tmp, path, overwrite)
        with contextlib.suppress(OSError):  # durability of the new name, where supported
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return created
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {_reason(exc)}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _link_or_replace(tmp: Path, path: Path, overwrite: bool) -> bool:
    if overwrite:
        os.replace(tmp, path)
        return True
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        if path.exists():  # no hard links on this file system: a narrower race
            return False
        os.replace(tmp, path)
    return True


@contextlib.contextmanager
def _refusing(path: Path, what: str) -> Iterator[None]:
    """Turn cryptography's parse errors into a one-line KeyFileError naming ``path``."""
    try:
        yield
    except TypeError:  # the PEM is encrypted
        raise KeyFileError(f"{path}: is password-protected; store it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path}: is not a PEM file holding {what}") from None


def _algorithm(key: object) -> str:
    return type(key).__name__.removeprefix("_").replace("PrivateKey", "").replace("PublicKey", "")


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
