"""``p2psip lookup`` and ``ping``: short-lived DHT nodes of a site.

The overlay hears only its members, so both prove membership with the site key in
``--data-dir`` (a node's id is bound to it); a missing key is an error (exit status 2).
A node that does not trust this site's key answers nothing: to us it looks dead.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from dht_adaptor.errors import DhtError, DhtUnavailable
from dht_adaptor.keys import KeyFileError, SiteKey, TrustStore
from dht_adaptor.node import DhtNode
from dht_adaptor.record import DhtBinding
from dht_adaptor.record_store import MemoryRecordStore

from .config import Config, HostPort, is_loopback
from .sip.errors import ParseError
from .sip.headers import parse_name_addr
from .sip.uri import aor_of


class LookupError_(Exception):
    """Bad input or no overlay to ask; the message is one line (exit status 2)."""


class LookupUnavailable(Exception):
    """No DHT node answered (exit status 1, like "not found")."""


def normalize_aor(text: str) -> str:
    """``alice@example.com``, ``sip:Alice@Example.COM;x=y`` -> ``sip:Alice@example.com``."""
    text = text.strip()
    if not text.lower().startswith(("sip:", "sips:", "tel:")):
        text = "sip:" + text
    try:
        uri = parse_name_addr(f"<{text}>").uri
        aor = aor_of(uri)
    except ParseError as exc:
        raise LookupError_(f"{text!r} is not an address of record: {exc}") from None
    if "@" not in aor:
        raise LookupError_(f"{text!r} has no user part (expected sip:user@domain)")
    return aor


async def lookup_aor(config: Config, aor_text: str, timeout: float) -> str | None:
    """The JSON text of the bindings found, or None when there are none."""
    if not timeout > 0:
        raise LookupError_("--timeout must be positive")
    aor = normalize_aor(aor_text)
    key, trust = load_member(config.data_dir, config.trust_dir, "lookup")
    node = DhtNode(MemoryRecordStore(trust), trust, key=key, rpc_timeout=config.dht_rpc_timeout)
    host = "127.0.0.1" if all(is_loopback(b.host) for b in config.bootstrap) else "0.0.0.0"
    try:
        await node.listen(host, 0)
        found = await asyncio.wait_for(_find(node, config, aor), timeout)
    except (DhtError, TimeoutError, OSError) as exc:
        reason = str(exc) or f"timed out ({_unheard(key)})"
        raise LookupUnavailable(f"lookup of {aor} failed: {reason}") from None
    finally:
        await node.close()
    if not found:
        return None
    now = time.time()
    return json.dumps(
        {
            "aor": aor,
            "bindings": [
                {
                    "contact": b.contact,
                    "home": b.home,
                    "expires_in": b.expires_in(now),
                    "site": b.site,
                    "q": b.q,
                }
                for b in found
            ],
        },
        indent=2,
    )


def load_member(data_dir: Path, trust_dir: Path | None, command: str) -> tuple[SiteKey, TrustStore]:
    """The site key in ``data_dir`` and the keys trusted with it, or LookupError_."""
    if not (Path(data_dir) / "site.key").exists():
        raise LookupError_(
            f"no site key in {data_dir}: p2psip {command} proves membership of the overlay "
            "with it (give --data-dir of a site whose key the overlay trusts)"
        )
    try:
        key = SiteKey.load(data_dir)
        return key, TrustStore.from_dir(trust_dir, key)
    except KeyFileError as exc:
        raise LookupError_(str(exc)) from None


def _unheard(key: SiteKey) -> str:
    return f"do the nodes trust this site's key {key.key_id}?"


async def _find(node: DhtNode, config: Config, aor: str) -> tuple[DhtBinding, ...]:
    peers = await node.bootstrap([(b.host, b.port) for b in config.bootstrap])
    if peers == 0:
        raise DhtUnavailable(f"no bootstrap node answered ({_unheard(node.member.key)})")
    return await node.get(aor)


async def ping_node(
    addr: HostPort, timeout: float, data_dir: Path, trust_dir: Path | None = None
) -> bool:
    """True if the DHT node at ``addr`` answers a ping within ``timeout`` seconds.

    The ping is signed with the site key in ``data_dir`` (LookupError_ if there is none),
    and the answer must come from a key of ``trust_dir`` or that site key.
    """
    if not timeout > 0:
        raise LookupError_("--timeout must be positive")
    key, trust = load_member(data_dir, trust_dir, "ping")
    node = DhtNode(MemoryRecordStore(trust), trust, key=key, rpc_timeout=timeout)
    try:
        await node.listen("127.0.0.1" if is_loopback(addr.host) else "0.0.0.0", 0)
        return await asyncio.wait_for(node.ping((addr.host, addr.port)), timeout + 1)
    except (OSError, TimeoutError):
        return False
    finally:
        await node.close()
