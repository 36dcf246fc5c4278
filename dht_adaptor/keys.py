"""Site keys and the trust store: who may publish bindings into the DHT, and for which AORs.

Every site has one Ed25519 key. ``DIR/site.key`` (PEM PKCS#8, mode 0600) is secret;
``DIR/site.pub`` (PEM SubjectPublicKeyInfo) is copied into the trust folder of every
other site (:mod:`dht_adaptor.trust_folder` describes the folder: keys, their scopes,
endorsements of rotated keys). A binding counts only if its ``key_id`` names a trusted
key, the key's scope allows its AOR, and its signature over
:meth:`DhtBinding.signing_bytes` verifies; anything else any DHT node returns is dropped,
and anything else a node is sent is refused.

The :class:`TrustStore` is one object shared by the site's DHT node, record store and
relays. Its trust changes at run time (the folder is polled, SIGHUP, the admin API):
:meth:`TrustStore.reload` swaps its key table in one assignment, and every check reads
the table of the moment, so a removed key stops counting at once, cached verifications
included.

Errors reading or writing key files are :class:`KeyFileError` with a one-line message
naming the file, fit to print before exiting (``p2psip`` exits 2).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dht_adaptor.record import DhtBinding
from dht_adaptor.trust_folder import (
    MAX_KEY_FILE_BYTES,
    RAW,
    Endorsement,
    Fingerprint,
    KeyFileError,
    Scope,
    TrustedKey,
    algorithm,
    fingerprint,
    key_id,
    load_public_key,
    make_dir,
    public_pem,
    read_file,
    read_folder,
    refusing,
    write_file,
)

__all__ = [
    "MAX_KEY_FILE_BYTES",
    "Endorsement",
    "KeyFileError",
    "Scope",
    "SiteKey",
    "TrustChange",
    "TrustStore",
    "TrustedKey",
    "endorse",
    "key_id",
    "load_public_key",
    "rotate",
    "sign_binding",
]

log = logging.getLogger(__name__)

KEY_FILE = "site.key"
PUB_FILE = "site.pub"
WATCH_INTERVAL = 2.0  # seconds between two looks at the trust folder


@dataclass(frozen=True, eq=False, repr=False)
class SiteKey:
    """This site's signing key. Compares and prints by public key only."""

    private: Ed25519PrivateKey
    public_bytes: bytes  # raw 32 bytes

    def __post_init__(self) -> None:
        if self.private.public_key().public_bytes(*RAW) != self.public_bytes:
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
        return cls(private=private, public_bytes=private.public_key().public_bytes(*RAW))

    @classmethod
    def load(cls, data_dir: Path) -> SiteKey:
        """The key in ``DIR/site.key``."""
        path = Path(data_dir) / KEY_FILE
        data = read_file(path, secret=True)
        with refusing(str(path), "an Ed25519 private key"):
            private = serialization.load_pem_private_key(data, password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise KeyFileError(f"{path}: holds a {algorithm(private)} key, not Ed25519")
        return cls._of(private)

    def save(self, data_dir: Path, *, overwrite: bool = False) -> None:
        """Write ``DIR/site.key`` (0600) and ``DIR/site.pub``, creating ``DIR`` (0700).

        Each file appears atomically, complete or not at all. An existing ``site.key``
        holding a different key is kept (KeyFileError) unless ``overwrite``: other sites
        trust the old public key, so replacing it silently would cut this site off.
        """
        directory = make_dir(data_dir)
        path = directory / KEY_FILE
        if not write_file(path, self.private_pem(), 0o600, overwrite=overwrite):
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
        directory = make_dir(data_dir)
        if not (directory / KEY_FILE).exists():
            write_file(directory / KEY_FILE, cls.generate().private_pem(), 0o600, overwrite=False)
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

    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def _save_pub(self, directory: Path) -> None:
        write_file(directory / PUB_FILE, public_pem(self.public_bytes), 0o644, overwrite=True)

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)


def endorse(old: SiteKey, new_public: bytes) -> Endorsement:
    """``old``'s endorsement of the key ``new_public``: whoever trusts ``old`` trusts it."""
    signature = old.sign(Endorsement.signing_bytes(old.public_bytes, new_public))
    return Endorsement(old.key_id, key_id(new_public), new_public, signature)


@dataclass(frozen=True, slots=True)
class Rotation:
    """What :func:`rotate` wrote."""

    old: SiteKey
    new: SiteKey
    endorsement: Endorsement
    endorsement_path: Path
    backup: Path  # the old private key


def rotate(data_dir: Path) -> Rotation:
    """Replace the key in ``DIR`` by a new one that the old one endorses.

    Writes, in this order (each atomically): ``DIR/site-OLDID.key``, a copy of the old
    key (to roll back); ``DIR/OLDID-NEWID.endorsement``; the new ``site.key`` and
    ``site.pub``. A running site keeps signing with the key it loaded until restarted.
    """
    directory = Path(data_dir)
    old = SiteKey.load(directory)
    new = SiteKey.generate()
    endorsement = endorse(old, new.public_bytes)
    backup = directory / f"site-{old.key_id}.key"
    write_file(backup, old.private_pem(), 0o600, overwrite=True)
    endorsement_path = directory / endorsement.file_name
    write_file(endorsement_path, endorsement.encode(), 0o644, overwrite=True)
    new.save(directory, overwrite=True)
    return Rotation(old, new, endorsement, endorsement_path, backup)


# -- the trust store -------------------------------------------------------------------

VERIFIED_CACHE_SIZE = 65_536  # bindings remembered as verified (about 30 MB at most)


@dataclass(frozen=True, slots=True)
class TrustChange:
    """Key ids that became trusted, stopped being trusted, or got another scope."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    rescoped: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.rescoped)


class _Entry(NamedTuple):
    key: TrustedKey
    public: Ed25519PublicKey


class TrustStore:
    """The public keys whose bindings this site believes, by key id, with their scopes."""

    def __init__(
        self, keys: Mapping[str, bytes], *, scopes: Mapping[str, Scope] | None = None
    ) -> None:
        """A fixed set of keys (no folder); ``scopes`` limits some of them."""
        table: dict[str, TrustedKey] = {}
        for kid, public_bytes in keys.items():
            if len(public_bytes) != 32 or key_id(public_bytes) != kid:
                raise ValueError(f"key id {kid!r} does not match its 32-byte public key")
            table[kid] = TrustedKey(kid, public_bytes, (scopes or {}).get(kid))
        self._table: Mapping[str, _Entry] = {}
        self._verified: dict[DhtBinding, bytes] = {}  # -> the public key; oldest first
        self._folder: Path | None = None
        self._own: SiteKey | None = None
        self._seen: Fingerprint = ()
        self._error: str | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[TrustChange], object]] = []
        self._install(table)

    @classmethod
    def from_dir(cls, trust_dir: Path | None, own: SiteKey | None) -> TrustStore:
        """The keys of a trust folder plus ``own``; :meth:`reload` reads the folder again.

        Without a trust dir only ``own`` is trusted: a single site trusts itself. A
        missing dir, or any bad file in it, is a KeyFileError naming it; a typo in the
        trust setup must not silently distrust a site.
        """
        store = cls({})
        store._folder = None if trust_dir is None else Path(trust_dir)
        store._own = own
        store.load()
        return store

    # -- reading the table (every check reads the table of the moment) -----------------

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._table

    def __len__(self) -> int:
        return len(self._table)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._table))

    def get(self, kid: str) -> TrustedKey | None:
        entry = self._table.get(kid)
        return None if entry is None else entry.key

    def entries(self) -> tuple[TrustedKey, ...]:
        """Every trusted key, by key id."""
        table = self._table
        return tuple(table[kid].key for kid in sorted(table))

    @property
    def folder(self) -> Path | None:
        """The trust folder, if the trust comes from one (and may change)."""
        return self._folder

    @property
    def error(self) -> str | None:
        """Why the last reload of the folder failed (the previous trust was kept)."""
        return self._error

    def public_bytes(self, kid: str) -> bytes | None:
        """The raw 32-byte public key of a trusted key id, or None (whatever its scope)."""
        entry = self._table.get(kid)
        return None if entry is None else entry.key.public_bytes

    def allows(self, kid: str, aor: str) -> bool:
        """Is ``kid`` trusted, and may it publish bindings of ``aor``? Never raises."""
        try:
            entry = self._table.get(kid)
        except TypeError:  # an unhashable kid
            return False
        return entry is not None and entry.key.allows(aor)

    def verify_signature(self, kid: str, data: bytes, signature: bytes) -> bool:
        """Did the trusted key ``kid`` sign ``data``? Never raises (no cache: callers
        sign distinct messages; no scope: nothing here names an AOR)."""
        entry = self._table.get(kid)
        if entry is None or len(signature) != 64:
            return False
        try:
            entry.public.verify(signature, data)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    def verify(self, b: DhtBinding) -> bool:
        """True iff ``b.key_id`` is trusted, its scope allows ``b.aor`` and the signature
        is valid. Never raises. A binding outside its key's scope is refused like a forged
        one.

        Bindings that verified are remembered (a bounded cache keyed by the whole
        binding, signature included): a record is checked when it is put, stored,
        read and merged, and an Ed25519 verification costs a few hundred microseconds.
        Only successes are cached, so junk cannot fill the cache. A hit counts only while
        the key it was verified with is trusted and its scope allows the AOR: trust that
        changed is honoured at once.
        """
        try:
            entry = self._table.get(b.key_id)
            if entry is None or not entry.key.allows(b.aor):
                return False
            public = entry.key.public_bytes
            if self._verified.get(b) == public or _SIGNED_HERE.get(b) == public:
                return True
            if not isinstance(b.signature, bytes) or len(b.signature) != 64:
                return False
            entry.public.verify(b.signature, b.signing_bytes())
        except (InvalidSignature, AttributeError, TypeError, ValueError):
            return False  # AttributeError etc.: not a binding, or one with junk fields
        _remember(self._verified, b, public)
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

    # -- changing the table ------------------------------------------------------------

    def replace(self, keys: Iterable[TrustedKey]) -> TrustChange:
        """Trust exactly ``keys`` from now on (one assignment: checks see the old table or
        the new one). The site's own key, if any, stays."""
        table = {k.key_id: k for k in keys}
        own = self._own
        if own is not None and own.key_id not in table:
            table[own.key_id] = TrustedKey(own.key_id, own.public_bytes, own=True)
        return self._install(table)

    def on_change(self, listener: Callable[[TrustChange], object]) -> None:
        """Call ``listener(change)`` after every change of the table (e.g. to drop what a
        cache holds of keys that were removed). A listener that fails is logged."""
        self._listeners.append(listener)

    def _install(self, table: Mapping[str, TrustedKey]) -> TrustChange:
        old = self._table
        new: dict[str, _Entry] = {}
        for kid, key in table.items():
            held = old.get(kid)
            public = (
                held.public
                if held is not None and held.key.public_bytes == key.public_bytes
                else Ed25519PublicKey.from_public_bytes(key.public_bytes)
            )
            new[kid] = _Entry(key, public)
        self._table = new
        change = TrustChange(
            added=tuple(sorted(new.keys() - old.keys())),
            removed=tuple(sorted(old.keys() - new.keys())),
            rescoped=tuple(
                sorted(k for k in new.keys() & old.keys() if new[k].key.scope != old[k].key.scope)
            ),
        )
        for listener in self._listeners if change else ():
            try:
                listener(change)
            except Exception:  # the new trust holds whatever a listener does
                log.exception("a listener of trust changes failed")
        return change

    def load(self, why: str | None = None) -> TrustChange:
        """Read the trust folder again and trust what it says, logging what changed if
        ``why`` is given; KeyFileError (the previous trust kept) if a file in it is bad."""
        folder = self._folder
        seen = fingerprint(folder) if folder is not None else ()
        try:
            table = read_folder(folder, None if self._own is None else self._own.public_bytes)
        except KeyFileError as exc:
            self._seen, self._error = seen, str(exc)
            raise
        self._seen, self._error = seen, None
        change = self._install(table)
        if why is not None:
            self._log_change(change, why)
        return change

    def reload(self, why: str = "reload") -> TrustChange | None:
        """:meth:`load`, or (one line, never a traceback) why the folder was not read and
        the previous trust kept. None if nothing was read."""
        if self._folder is None:
            log.info("%s: no trust folder (--trust) to reload", why)
            return None
        try:
            return self.load(why)
        except KeyFileError as exc:
            log.error("trust folder %s not reloaded (%s); still trusting the %d key(s) "
                      "trusted before: %s", self._folder, why, len(self), exc)  # fmt: skip
            return None

    def _log_change(self, change: TrustChange, why: str) -> None:
        parts = []
        for word, kids in (("added", change.added), ("removed", change.removed),
                           ("rescoped", change.rescoped)):  # fmt: skip
            if kids:
                parts.append(f"{word} {', '.join(self._describe(k) for k in kids)}")
        log.info("trust folder %s reloaded (%s): %s; %d key(s) trusted", self._folder, why,
                 "; ".join(parts) or "no change", len(self))  # fmt: skip

    def _describe(self, kid: str) -> str:
        key = self.get(kid)
        if key is None or key.file is None:
            return kid
        scope = "any AOR" if key.scope is None else " ".join(key.scope.patterns) or "no AOR"
        return f"{kid} ({key.file}; {scope})"

    # -- watching the folder -----------------------------------------------------------

    def start_watching(self, interval: float = WATCH_INTERVAL) -> None:
        """Look at the folder every ``interval`` seconds (names, sizes and mtimes of its
        key files) and reload it when they change. Needs a running loop."""
        if self._folder is not None and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(interval))

    async def stop_watching(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def _watch(self, interval: float) -> None:
        assert self._folder is not None
        while True:
            await asyncio.sleep(interval)
            if fingerprint(self._folder) != self._seen:
                try:
                    self.reload("the folder changed")
                except Exception:  # the watcher must outlive one bad reload
                    log.exception("reloading the trust folder %s failed", self._folder)


def sign_binding(b: DhtBinding, key: SiteKey) -> DhtBinding:
    """A copy of ``b`` with ``key_id`` set to ``key``'s and signed by it.

    The result is remembered as correctly signed, so that this process's own trust
    stores (the site's DHT node checks every binding it puts and stores) need not verify
    it again: a verification costs more than the signature.
    """
    unsigned = dataclasses.replace(b, key_id=key.key_id, signature=b"")
    signed = dataclasses.replace(unsigned, signature=key.sign(unsigned.signing_bytes()))
    _remember(_SIGNED_HERE, signed, key.public_bytes)
    return signed


# Bindings this process signed itself, with the public key that signed them;
# TrustStore.verify accepts them while it trusts that key for their AOR.
_SIGNED_HERE: dict[DhtBinding, bytes] = {}


def _remember(cache: dict[DhtBinding, bytes], b: DhtBinding, public: bytes) -> None:
    if len(cache) >= VERIFIED_CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[b] = public
