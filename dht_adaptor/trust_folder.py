"""Key files and the trust folder: their formats, reading them, writing them atomically.

A site's trust folder (``--trust DIR``) holds, besides anything else (ignored), and
skipping dot-files (editors' and our own temporary files):

``NAME.pub``
    A trusted site key: PEM SubjectPublicKeyInfo, Ed25519 (a copy of a site's
    ``site.pub``).
``NAME.scope``
    Optional, next to ``NAME.pub``: the AORs that key may publish bindings for, one
    pattern a line; ``#`` starts a comment. Without it the key may publish for any AOR
    (right for a federation of one domain). A pattern is either

    * a domain, ``example.com``: every AOR ``sip:USER@example.com`` (not subdomains),
      or a domain glob, ``*.example.com`` (every subdomain, not ``example.com``); or
    * an AOR glob, ``sip:*@example.com``, ``sip:+33*@example.com``: ``*`` and ``?``
      as in shell globs, the user part case-sensitive, the host not.

    AORs are compared as the registrar normalizes them (``sip:user@host``, ``sips``
    folded into ``sip``, no port). A scope file with no pattern allows no AOR: the key
    still authenticates its site (relays, DHT messages) but publishes nothing.
``NAME.endorsement``
    A rotated key: an old key's signature over a new public key (JSON, see
    :class:`Endorsement`). While the old key is trusted here, the new key is trusted
    too, with the old key's scope; endorsements chain (old -> new -> newer).

Every error is :class:`KeyFileError`, one line naming the file, so that a bad file can
be reported (and the previous trust kept) without a traceback.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fnmatch
import hashlib
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dht_adaptor.strict_json import StrictJson, dump, kind

log = logging.getLogger(__name__)

PUB_SUFFIX = ".pub"
SCOPE_SUFFIX = ".scope"
ENDORSEMENT_SUFFIX = ".endorsement"
MAX_KEY_FILE_BYTES = 64 * 1024  # a PEM Ed25519 key is about 120 bytes
MAX_FOLDER_FILES = 1024  # .pub, .scope and .endorsement files in one trust folder
MAX_SCOPE_PATTERNS = 256
RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw

# A scope pattern, as checked here and described by the admin API's schema (a test holds
# the two equal). Hosts are DNS names or IPv4 addresses, maybe with * and ?; a user part
# is the characters a normalized AOR's user part has (RFC 3261 §25.1 unreserved,
# user-unreserved and escapes), maybe with * and ?.
_HOST_GLOB = r"[A-Za-z0-9*?][A-Za-z0-9.*?-]{0,252}"
_USER_GLOB = r"[A-Za-z0-9._~!*?'()&=+$,;/%-]{1,128}"
SCOPE_PATTERN = rf"^(?:(?:[sS][iI][pP][sS]?:)?{_USER_GLOB}@)?{_HOST_GLOB}$"
_SCOPE_RE = re.compile(SCOPE_PATTERN)
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")


class KeyFileError(Exception):
    """A key file or trust dir that cannot be read/written/parsed.

    The message is one line fit for the operator (the CLI prints it and exits 2).
    """

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s+", " ", message).strip())


def key_id(public_bytes: bytes) -> str:
    """16 hex characters of sha256 over the raw 32-byte public key."""
    return hashlib.sha256(public_bytes).hexdigest()[:16]


def is_key_id(text: object) -> bool:
    return isinstance(text, str) and _KEY_ID_RE.fullmatch(text) is not None


# -- scopes ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scope:
    """The AORs a key may publish for: normalized patterns (see the module docstring)."""

    patterns: tuple[str, ...]

    @classmethod
    def parse(cls, patterns: Iterable[str]) -> Scope:
        """Check and normalize patterns; ValueError naming the first bad one."""
        out: list[str] = []
        for pattern in patterns:
            if not isinstance(pattern, str) or not _SCOPE_RE.fullmatch(pattern):
                raise ValueError(f"not a domain or sip:user@domain glob: {pattern!r}")
            user, at, host = pattern.rpartition("@")
            if at:
                user = user.split(":", 1)[1] if ":" in user else user
                normalized = f"sip:{user}@{host.lower()}"
            else:
                normalized = host.lower()
            if normalized not in out:
                out.append(normalized)
        if len(out) > MAX_SCOPE_PATTERNS:
            raise ValueError(f"more than {MAX_SCOPE_PATTERNS} patterns")
        return cls(tuple(out))

    @classmethod
    def read(cls, path: Path) -> Scope:
        """The scope in a ``.scope`` file."""
        data = read_file(path)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise KeyFileError(f"{path}: is not UTF-8 text") from None
        patterns: list[str] = []
        for number, line in enumerate(text.splitlines(), 1):
            pattern = line.split("#", 1)[0].strip()
            if not pattern:
                continue
            try:
                patterns.extend(cls.parse([pattern]).patterns)
            except ValueError as exc:
                raise KeyFileError(f"{path}:{number}: {exc}") from None
        try:
            return cls.parse(patterns)
        except ValueError as exc:
            raise KeyFileError(f"{path}: {exc}") from None

    def text(self) -> bytes:
        """The scope as a ``.scope`` file."""
        return "".join(f"{p}\n" for p in self.patterns).encode("utf-8")

    def allows(self, aor: object) -> bool:
        """May a key with this scope publish bindings of ``aor``? Never raises."""
        if not isinstance(aor, str):
            return False
        scheme, colon, rest = aor.partition(":")
        if not colon or scheme.lower() not in ("sip", "sips"):
            return False
        user, at, host = rest.rpartition("@")
        host = host.lower()
        for pattern in self.patterns:
            if pattern.startswith("sip:"):
                want_user, _, want_host = pattern[4:].rpartition("@")
                matched = fnmatch.fnmatchcase(user, want_user) and fnmatch.fnmatchcase(
                    host, want_host
                )
                if at and matched:
                    return True
            elif fnmatch.fnmatchcase(host, pattern):
                return True
        return False


# -- endorsements ----------------------------------------------------------------------

_ENDORSEMENT_DOMAIN = b"p2psip-key-endorsement-v1\0"
_ENDORSEMENT_FIELDS = ("v", "old_key_id", "new_key_id", "new_public_key", "signature")


class EndorsementError(ValueError):
    """Bytes that are not an endorsement."""


_JSON = StrictJson(EndorsementError, version=1)


@dataclass(frozen=True, slots=True)
class Endorsement:
    """The old key's signature over the new public key: "trust this key as you trust me".

    The file (and the admin API's body) is JSON::

        {"v":1,"old_key_id":"0123456789abcdef","new_key_id":"fedcba9876543210",
         "new_public_key":"<base64 of the raw 32 bytes>","signature":"<base64, 64 bytes>"}

    The signature is over ``"p2psip-key-endorsement-v1\\0" + old public key + new public
    key`` (raw bytes, fixed lengths), made with ``keys.endorse``.
    """

    old_key_id: str
    new_key_id: str
    new_public: bytes
    signature: bytes

    @staticmethod
    def signing_bytes(old_public: bytes, new_public: bytes) -> bytes:
        return _ENDORSEMENT_DOMAIN + old_public + new_public

    @property
    def file_name(self) -> str:
        return f"{self.old_key_id}-{self.new_key_id}{ENDORSEMENT_SUFFIX}"

    def verify(self, old_public: bytes) -> bool:
        """Did the key ``old_public`` (whose id is ``old_key_id``) sign this? Never raises."""
        if key_id(old_public) != self.old_key_id:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(old_public).verify(
                self.signature, self.signing_bytes(old_public, self.new_public)
            )
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    def encode(self) -> bytes:
        return (
            dump(
                {
                    "v": 1,
                    "old_key_id": self.old_key_id,
                    "new_key_id": self.new_key_id,
                    "new_public_key": base64.b64encode(self.new_public).decode("ascii"),
                    "signature": base64.b64encode(self.signature).decode("ascii"),
                }
            )
            + b"\n"
        )

    @classmethod
    def decode(cls, data: bytes) -> Endorsement:
        """An endorsement from untrusted bytes (its signature not yet checked)."""
        obj = _JSON.load(data, MAX_KEY_FILE_BYTES)
        _JSON.check_keys(obj, required=_ENDORSEMENT_FIELDS, allowed=_ENDORSEMENT_FIELDS,
                         where="endorsement")  # fmt: skip
        return cls.of(obj["old_key_id"], obj["new_key_id"], obj["new_public_key"], obj["signature"])

    @classmethod
    def of(cls, old: object, new: object, public: object, signature: object) -> Endorsement:
        """From the fields as text (base64 keys and signature); EndorsementError if bad."""
        for name, value in (("old_key_id", old), ("new_key_id", new)):
            if not is_key_id(value):
                raise EndorsementError(f"'{name}' must be 16 lowercase hex digits")
        raw_public = _base64(public, "new_public_key", 32)
        if key_id(raw_public) != new:
            raise EndorsementError("'new_key_id' is not the id of 'new_public_key'")
        if old == new:
            raise EndorsementError("a key cannot endorse itself")
        assert isinstance(old, str) and isinstance(new, str)
        return cls(old, new, raw_public, _base64(signature, "signature", 64))

    @classmethod
    def read(cls, path: Path) -> Endorsement:
        try:
            return cls.decode(read_file(path))
        except EndorsementError as exc:
            raise KeyFileError(f"{path}: {exc}") from None


def _base64(value: object, name: str, size: int) -> bytes:
    if not isinstance(value, str):
        raise EndorsementError(f"'{name}' must be a string, not {kind(value)}")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise EndorsementError(f"'{name}' is not base64") from None
    if len(raw) != size:
        raise EndorsementError(f"'{name}' must be {size} bytes, not {len(raw)}")
    return raw


# -- the folder ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """One key a site trusts, and why."""

    key_id: str
    public_bytes: bytes  # raw 32 bytes
    scope: Scope | None = None  # None: may publish for any AOR
    file: str | None = None  # the .pub or .endorsement file in the trust folder
    endorsed_by: str | None = None  # the key id that signed the endorsement
    own: bool = False  # this site's own key (trusted whatever the folder says)

    def allows(self, aor: object) -> bool:
        return self.scope is None or self.scope.allows(aor)


def read_folder(directory: Path | None, own: bytes | None = None) -> dict[str, TrustedKey]:
    """The keys a trust folder (and ``own``, this site's public key) make trusted.

    Raises KeyFileError naming the first bad file: a missing folder, a ``.pub`` that is
    not an Ed25519 key, a bad ``.scope``, an endorsement that cannot be read or whose
    signature does not verify although its signer is trusted, one key in two ``.pub``
    files with different scopes. A typo in the trust setup must not silently distrust
    (or trust) a site.
    """
    table: dict[str, TrustedKey] = {}
    endorsements: list[tuple[Path, Endorsement]] = []
    if directory is not None:
        files = _folder_files(Path(directory))
        for stem, path in sorted(files[PUB_SUFFIX].items()):
            public = load_public_key(path)
            scope_path = files[SCOPE_SUFFIX].get(stem)
            scope = None if scope_path is None else Scope.read(scope_path)
            found = TrustedKey(key_id(public), public, scope, path.name)
            held = table.setdefault(found.key_id, found)
            if held.scope != scope:
                raise KeyFileError(
                    f"{path}: holds the key of {held.file} with another scope; keep one"
                )
        for stem in files[SCOPE_SUFFIX].keys() - files[PUB_SUFFIX].keys():
            log.debug("%s: no %s%s next to it; ignored", files[SCOPE_SUFFIX][stem], stem,
                      PUB_SUFFIX)  # fmt: skip
        endorsements = [
            (p, Endorsement.read(p)) for _, p in sorted(files[ENDORSEMENT_SUFFIX].items())
        ]
    if own is not None:
        kid = key_id(own)
        in_folder = table.get(kid)
        table[kid] = TrustedKey(kid, own, own=True) if in_folder is None else _own(in_folder)
    _endorse(table, endorsements)
    return table


def _own(key: TrustedKey) -> TrustedKey:
    return TrustedKey(key.key_id, key.public_bytes, key.scope, key.file, key.endorsed_by, True)


def _endorse(table: dict[str, TrustedKey], endorsements: list[tuple[Path, Endorsement]]) -> None:
    """Add the keys endorsed by trusted keys, chains included, until nothing changes."""
    pending = list(endorsements)
    progress = True
    while progress:
        progress = False
        for path, e in list(pending):
            signer = table.get(e.old_key_id)
            if signer is None:
                continue
            pending.remove((path, e))
            progress = True
            if not e.verify(signer.public_bytes):
                raise KeyFileError(f"{path}: is not signed by key {e.old_key_id}")
            if e.new_key_id not in table:
                table[e.new_key_id] = TrustedKey(
                    e.new_key_id, e.new_public, signer.scope, path.name, e.old_key_id
                )
    for path, e in pending:
        log.debug("%s: key %s is not trusted here; ignored", path, e.old_key_id)


def _folder_files(directory: Path) -> dict[str, dict[str, Path]]:
    """{suffix: {stem: path}} of the folder's key files (dot-files skipped)."""
    files: dict[str, dict[str, Path]] = {PUB_SUFFIX: {}, SCOPE_SUFFIX: {}, ENDORSEMENT_SUFFIX: {}}
    count = 0
    try:
        for path in directory.iterdir():
            if path.name.startswith(".") or path.suffix not in files:
                continue
            count += 1
            if count > MAX_FOLDER_FILES:
                raise KeyFileError(f"trust dir {directory}: more than {MAX_FOLDER_FILES} key files")
            files[path.suffix][path.stem] = path
    except OSError as exc:
        raise KeyFileError(f"cannot read trust dir {directory}: {reason(exc)}") from None
    return files


Fingerprint = tuple[tuple[str, int, int, int], ...] | str


def fingerprint(directory: Path) -> Fingerprint:
    """The names, sizes, inodes and mtimes of the folder's key files (or why it cannot
    be read): what the watcher compares every poll. Never raises."""
    try:
        with os.scandir(directory) as entries:
            seen = []
            for entry in entries:
                name = entry.name
                if name.startswith(".") or Path(name).suffix not in _SUFFIXES:
                    continue
                try:
                    st = entry.stat()
                except OSError:
                    continue  # removed meanwhile: the next poll sees it gone
                seen.append((name, st.st_mtime_ns, st.st_size, st.st_ino))
                if len(seen) > MAX_FOLDER_FILES:
                    break
    except OSError as exc:
        return f"unreadable: {reason(exc)}"
    return tuple(sorted(seen))


_SUFFIXES = frozenset({PUB_SUFFIX, SCOPE_SUFFIX, ENDORSEMENT_SUFFIX})


def files_of(directory: Path, kid: str, key: TrustedKey | None = None) -> list[Path]:
    """The files that make ``kid`` trusted: its ``.pub`` files (each followed by its
    ``.scope``) and the endorsements of it."""
    out: list[Path] = []
    files = _folder_files(directory)
    for path in files[PUB_SUFFIX].values():
        with contextlib.suppress(KeyFileError):
            if key_id(load_public_key(path)) == kid:
                out += [path, path.with_suffix(SCOPE_SUFFIX)]
    for path in files[ENDORSEMENT_SUFFIX].values():
        with contextlib.suppress(KeyFileError):
            if Endorsement.read(path).new_key_id == kid:
                out.append(path)
    if key is not None and key.file is not None and directory / key.file not in out:
        out.append(directory / key.file)
    return out


# -- files -----------------------------------------------------------------------------


def load_public_key(path: Path) -> bytes:
    """The raw 32 bytes of the Ed25519 public key in a PEM ``*.pub`` file."""
    path = Path(path)
    return parse_public_key(read_file(path), str(path))


def parse_public_key(data: bytes, where: str) -> bytes:
    with refusing(where, "an Ed25519 public key"):
        public = serialization.load_pem_public_key(data)
    if not isinstance(public, Ed25519PublicKey):
        raise KeyFileError(f"{where}: holds a {algorithm(public)} key, not Ed25519")
    return public.public_bytes(*RAW)


def public_pem(public_bytes: bytes) -> bytes:
    return Ed25519PublicKey.from_public_bytes(public_bytes).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def read_file(path: Path, *, secret: bool = False) -> bytes:
    """A key file's bytes (bounded; regular files only). ``secret``: warn if others may
    read it."""
    try:
        # O_NONBLOCK: a FIFO planted as a key file must not hang the start-up.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise KeyFileError(f"{path}: not a regular file")
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {reason(exc)}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: too large for a key file")
    if secret and mode & 0o077:
        log.warning("%s is readable by other users (mode %o); chmod 600 it", path, mode & 0o777)
    return data


def make_dir(data_dir: Path) -> Path:
    directory = Path(data_dir)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create {directory}: {reason(exc)}") from None
    return directory


def write_file(path: Path, data: bytes, mode: int, *, overwrite: bool) -> bool:
    """Write ``path`` atomically with ``mode``; False if it exists and not ``overwrite``.

    The bytes go to a temporary dot-file in the same directory first, so readers (and the
    trust folder's watcher) never see a half-written file. Without ``overwrite`` it is
    hard-linked into place, which fails if ``path`` exists: two processes creating a key
    at once cannot both win.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
            os.fchmod(f.fileno(), mode)  # whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        created = _link_or_replace(tmp, path, overwrite)
        _sync_dir(path.parent)
        return created
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {reason(exc)}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def remove_file(path: Path) -> bool:
    """Remove ``path`` if it exists; True if it did."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise KeyFileError(f"cannot remove {path}: {reason(exc)}") from None
    _sync_dir(path.parent)
    return True


def _sync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # durability of the new name, where supported
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


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
def refusing(where: str, what: str) -> Iterator[None]:
    """Turn cryptography's parse errors into a one-line KeyFileError naming the file."""
    try:
        yield
    except TypeError:  # the PEM is encrypted
        raise KeyFileError(f"{where}: is password-protected; store it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{where}: is not a PEM file holding {what}") from None


def algorithm(key: object) -> str:
    return type(key).__name__.removeprefix("_").replace("PrivateKey", "").replace("PublicKey", "")


def reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
