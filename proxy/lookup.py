"""``p2psip lookup``: join the overlay as a short-lived node and print an AOR's bindings."""

from __future__ import annotations

import asyncio
import json
import time

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
    try:
        own = SiteKey.load(config.data_dir) if (config.data_dir / "site.key").exists() else None
        trust = TrustStore.from_dir(config.trust_dir, own)
    except KeyFileError as exc:
        raise LookupError_(str(exc)) from None
    if len(trust) == 0:
        raise LookupError_("no trusted keys: give --trust DIR or --data-dir of a site")
    node = DhtNode(MemoryRecordStore(trust), trust, rpc_timeout=config.dht_rpc_timeout)
    host = "127.0.0.1" if all(is_loopback(b.host) for b in config.bootstrap) else "0.0.0.0"
    try:
        await node.listen(host, 0)
        found = await asyncio.wait_for(_find(node, config, aor), timeout)
    except (DhtError, TimeoutError, OSError) as exc:
        raise LookupUnavailable(f"lookup of {aor} failed: {exc or 'timed out'}") from None
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


async def _find(node: DhtNode, config: Config, aor: str) -> tuple[DhtBinding, ...]:
    peers = await node.bootstrap([(b.host, b.port) for b in config.bootstrap])
    if peers == 0:
        raise DhtUnavailable("no bootstrap node answered")
    return await node.get(aor)


async def ping_node(addr: HostPort, timeout: float) -> bool:
    """True if the DHT node at ``addr`` answers a ping within ``timeout`` seconds."""
    if not timeout > 0:
        raise LookupError_("--timeout must be positive")
    trust = TrustStore({})
    node = DhtNode(MemoryRecordStore(trust), trust, rpc_timeout=timeout)
    try:
        await node.listen("127.0.0.1" if is_loopback(addr.host) else "0.0.0.0", 0)
        return await asyncio.wait_for(node.ping((addr.host, addr.port)), timeout + 1)
    except (OSError, TimeoutError):
        return False
    finally:
        await node.close()
