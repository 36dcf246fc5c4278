"""One typed configuration for a site, built from flags, a TOML file and P2PSIP_* variables.

Precedence: command-line flag > environment variable > config file > default. Every
problem is a :class:`ConfigError` with one line saying what is wrong.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .sip.errors import ParseError
from .sip.uri import SipUri, parse_uri


class ConfigError(ValueError):
    """Bad configuration; the message is one line, fit to print as is."""


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_hostport(text: str, what: str, default_port: int | None = None) -> HostPort:
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"{what}: malformed address {text!r}")
        host, port_text = text[1:end], text[end + 1 :].removeprefix(":")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise ConfigError(f"{what}: missing host in {text!r} (expected HOST:PORT)")
    if not port_text:
        if default_port is None:
            raise ConfigError(f"{what}: missing port in {text!r} (expected HOST:PORT)")
        return HostPort(host, default_port)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what}: bad port {port_text!r} in {text!r}")
    return HostPort(host, int(port_text))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class StaticRoute:
    """Requests for ``domain`` go to ``next_hop`` (``--route DOMAIN=HOST:PORT;transport=``)."""

    domain: str
    next_hop: SipUri

    def __str__(self) -> str:
        return f"{self.domain}={self.next_hop}"


def parse_next_hop(text: str, what: str) -> SipUri:
    """``HOST[:PORT][;transport=udp|tcp|tls]``, or a ``sip:``/``sips:`` URI without user."""
    text = text.strip()
    uri_text = text if text.lower().startswith(("sip:", "sips:")) else f"sip:{text}"
    try:
        uri = parse_uri(uri_text)
    except ParseError as exc:
        raise ConfigError(f"{what}: {text!r} is not HOST:PORT[;transport=...] ({exc})") from None
    if not isinstance(uri, SipUri) or uri.user is not None or uri.headers is not None:
        raise ConfigError(f"{what}: {text!r} is not HOST:PORT[;transport=...]")
    extra = [k for k, _ in uri.params if k.lower() not in ("transport", "lr")]
    if extra:
        raise ConfigError(f"{what}: unknown parameter {extra[0]!r} in {text!r}")
    sips_not_tls = uri.scheme == "sips" and uri.transport != "tls"
    if uri.transport not in ("udp", "tcp", "tls") or sips_not_tls:
        raise ConfigError(f"{what}: transport must be udp, tcp or tls in {text!r}")
    return uri


def _route(v: Any, name: str) -> StaticRoute:
    domain, eq, target = _str(v, name).partition("=")
    if not eq:
        raise ConfigError(f"{name}: expected DOMAIN=HOST:PORT[;transport=...], got {v!r}")
    return StaticRoute(_domain(domain, name).rstrip("."), parse_next_hop(target, name))


def _network(v: Any, name: str) -> str:
    try:
        return str(ipaddress.ip_network(_str(v, name).strip().strip("[]"), strict=False))
    except ValueError:
        raise ConfigError(f"{name}: expected ADDRESS[/PREFIX], got {v!r}") from None


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "p2psip"


@dataclass(frozen=True, slots=True)
class Config:
    domains: tuple[str, ...] = ()
    sip_listen: HostPort = field(default_factory=lambda: HostPort("0.0.0.0", 5060))
    advertise: str | None = None  # host/IP put in Via and Record-Route
    # SIP over TLS (RFC 3261 §26): None listens on the SIP host, port 5061 (see
    # tls_listen_of). Without a certificate, a self-signed one is made into data_dir.
    tls_listen: HostPort | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # more CAs for TLS servers that are no member site
    # How other sites reach this one (the home proxy URI in its bindings): udp, tcp, tls.
    home_transport: str = "udp"
    # The DHT node the proxy's adaptor runs (RFC 6940 registers 6084 for RELOAD).
    dht_listen: HostPort = field(default_factory=lambda: HostPort("0.0.0.0", 6084))
    bootstrap: tuple[HostPort, ...] = ()
    trust_dir: Path | None = None  # folder of trusted *.pub site keys; None: trust only us
    # Peering (proxy.resolver, proxy.peers): where other domains live, before DNS
    # (RFC 3263, through dns_server or the system's resolver), and who may skip digest.
    routes: tuple[StaticRoute, ...] = ()
    outbound_proxy: SipUri | None = None
    trusted_peers: tuple[str, ...] = ()  # networks, "192.0.2.7/32"
    dns_server: HostPort | None = None
    failover_timeout: float = 2.0  # a silent target is left for the next one (RFC 3263 §4.3)
    redis_url: str | None = None
    # Worker processes sharing the SIP ports (SO_REUSEPORT; proxy.workers); "auto" or 0
    # in a file, flag or variable means one per core. More than one needs redis_url.
    workers: int = 1
    admin_listen: HostPort = field(default_factory=lambda: HostPort("127.0.0.1", 8080))
    admin_token: str | None = None
    users_file: Path | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    site_id: str = "site"
    log_level: str = "INFO"
    # Registrar (RFC 3261 §10.3)
    min_expires: int = 60
    max_expires: int = 7200
    default_expires: int = 3600
    max_contacts: int = 10
    # Phones behind NAT. RFC 5626 §4.4.1 Flow-Timer for phones registered with outbound
    # over UDP: they send a STUN keep-alive every 80-100% of it, so 48-60 s, well inside
    # the 2 minutes a NAT must keep a UDP mapping (RFC 4787 REQ-5), even with one lost.
    # (Over TCP/TLS the Flow-Timer is 90% of tcp_idle_timeout.)
    flow_timer: int = 60
    # Phones without outbound: the proxy sends an OPTIONS to each UDP binding's flow this
    # often (like Kamailio's nathelper), keeping its NAT pinhole open, and removes the
    # binding after three unanswered in a row; 0 turns it off. 30 s: under the shortest
    # UDP mapping timeouts common in home routers and Linux conntrack (30 s for a flow
    # seen one way), while an OPTIONS and its answer per phone every 30 s costs little.
    nat_keepalive_interval: float = 30.0
    # Transaction timers (RFC 3261 §17) and transport limits
    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    timer_c: float = 180.0
    tcp_idle_timeout: float = 600.0
    tcp_partial_timeout: float = 10.0
    # Digest authentication: the algorithms challenged with, in order (RFC 8760 §2.4).
    # MD5 alone by default: most phones in the field know nothing else, and some
    # (baresip 1.0) give up on any SHA-256 challenge even next to an MD5 one. Credentials
    # computed with SHA-256 are accepted whatever the setting; list SHA-256 (first) when
    # every phone of the site speaks RFC 8760.
    digest_algorithms: tuple[str, ...] = ("MD5",)
    # Brute force: this many failed authentications from one address (or against one
    # AOR from it) within the window block it, for a time that doubles up to the max.
    auth_max_failures: int = 10
    auth_failure_window: float = 300.0
    auth_block_time: float = 60.0
    auth_block_max: float = 3600.0
    # Floods (like Kamailio's pike): more than flood_max_requests messages from one
    # address in flood_window seconds blocks it (dropped silently) for flood_block_time.
    flood_max_requests: int = 400
    flood_window: float = 2.0
    flood_block_time: float = 30.0
    # TCP connections per remote address and in total (also kept under the process's
    # file descriptor limit).
    max_tcp_per_address: int = 64
    max_tcp_connections: int = 4096
    # Overload: new out-of-dialog requests get 503 once this many server transactions
    # are in flight or requests wait this long in the socket before we read them.
    max_transactions: int = 10000
    overload_queue_delay: float = 0.2
    # Input limits (RFC 3261 §20 puts none; these are a proxy's sanity bounds).
    max_message_bytes: int = 65535
    max_headers: int = 128
    max_header_line: int = 8192
    max_via: int = 70  # the Max-Forwards a UA starts with; RFC 4475's longreq has 34
    max_route: int = 32
    # SIGTERM: how long transactions in flight get to finish before the process exits.
    shutdown_grace: float = 10.0
    # Member sites: their home proxies are asked for an answer this often, and a call
    # that hears nothing from a home proxy for home_timeout seconds counts it as down.
    site_probe_interval: float = 5.0
    home_timeout: float = 1.2
    # DHT adaptor
    dht_rpc_timeout: float = 0.5
    dht_republish: float = 600.0
    # seconds a DHT lookup result serves later calls after its last use (ten times as
    # long at most after the lookup); a failed call drops it at once
    dht_cache_ttl: float = 60.0
    dht_lookup_timeout: float = 3.0

    def __repr__(self) -> str:  # never show the admin token
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        if shown["admin_token"]:
            shown["admin_token"] = "***"
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


# name -> (converter, is_list)
def _str(v: Any, name: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{name}: expected a non-empty string, got {v!r}")
    return v


def _int(v: Any, name: str) -> int:
    if isinstance(v, bool):
        raise ConfigError(f"{name}: expected a whole number, got {v!r}")
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a whole number, got {v!r}") from None
    if n < 0:
        raise ConfigError(f"{name}: must not be negative")
    return n


def _float(v: Any, name: str) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number, got {v!r}") from None
    if not x > 0:
        raise ConfigError(f"{name}: must be positive")
    return x


def _float_or_zero(v: Any, name: str) -> float:
    """Seconds, where 0 turns the thing off."""
    if v in (0, "0"):
        return 0.0
    return _float(v, name)


def _domain(v: Any, name: str) -> str:
    d = _str(v, name).strip().lower()
    if any(c in d for c in " /@:;<>") or d.startswith("."):
        raise ConfigError(f"{name}: {v!r} is not a domain name")
    return d


def _redis_url(v: Any, name: str) -> str:
    url = _str(v, name)
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{name}: expected redis://HOST:PORT[/DB], got scheme {parts.scheme!r}")
    return url


_SCALARS: dict[str, Any] = {
    "sip_listen": lambda v, n: parse_hostport(_str(v, n), n, 5060),
    "advertise": _str,
    "tls_listen": lambda v, n: parse_hostport(_str(v, n), n, 5061),
    "tls_cert": lambda v, n: Path(_str(v, n)),
    "tls_key": lambda v, n: Path(_str(v, n)),
    "tls_ca": lambda v, n: Path(_str(v, n)),
    "home_transport": lambda v, n: _home_transport(v, n),
    "dht_listen": lambda v, n: parse_hostport(_str(v, n), n, 6084),
    "trust_dir": lambda v, n: Path(_str(v, n)),
    "outbound_proxy": lambda v, n: parse_next_hop(_str(v, n), n),
    "dns_server": lambda v, n: parse_hostport(_str(v, n), n, 53),
    "failover_timeout": _float,
    "redis_url": _redis_url,
    "workers": lambda v, n: _workers(v, n),
    "admin_listen": lambda v, n: parse_hostport(_str(v, n), n, 8080),
    "admin_token": _str,
    "users_file": lambda v, n: Path(_str(v, n)),
    "data_dir": lambda v, n: Path(_str(v, n)),
    "site_id": _str,
    "log_level": lambda v, n: _log_level(v, n),
    "min_expires": _int,
    "max_expires": _int,
    "default_expires": _int,
    "max_contacts": _int,
    "flow_timer": _int,
    "nat_keepalive_interval": lambda v, n: _float_or_zero(v, n),
    "t1": _float,
    "t2": _float,
    "t4": _float,
    "timer_c": _float,
    "tcp_idle_timeout": _float,
    "tcp_partial_timeout": _float,
    "auth_max_failures": _int,
    "auth_failure_window": _float,
    "auth_block_time": _float,
    "auth_block_max": _float,
    "flood_max_requests": _int,
    "flood_window": _float,
    "flood_block_time": _float,
    "max_tcp_per_address": _int,
    "max_tcp_connections": _int,
    "max_transactions": _int,
    "overload_queue_delay": _float,
    "max_message_bytes": _int,
    "max_headers": _int,
    "max_header_line": _int,
    "max_via": _int,
    "max_route": _int,
    "shutdown_grace": _float,
    "site_probe_interval": _float,
    "home_timeout": _float,
    "dht_rpc_timeout": _float,
    "dht_republish": _float,
    "dht_cache_ttl": _float,
    "dht_lookup_timeout": _float,
}
_LISTS: dict[str, Any] = {
    "domains": _domain,
    "digest_algorithms": lambda v, n: _digest_algorithm(v, n),
    "bootstrap": lambda v, n: parse_hostport(_str(v, n), n, 6084),
    "routes": lambda v, n: _route(v, n),
    "trusted_peers": lambda v, n: _network(v, n),
}
# Names accepted in the TOML file and as P2PSIP_<NAME>; "domain"/"users" alias the lists.
_ALIASES = {
    "domain": "domains",
    "users": "users_file",
    "trust": "trust_dir",
    "listen": "dht_listen",
    "route": "routes",
    "trusted_peer": "trusted_peers",
}


def _digest_algorithm(v: Any, name: str) -> str:
    algorithm = _str(v, name).strip().upper()
    if algorithm not in ("MD5", "SHA-256"):
        raise ConfigError(f"{name}: expected MD5 or SHA-256, got {v!r}")
    return algorithm


MAX_WORKERS = 256


def cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _workers(v: Any, name: str) -> int:
    if isinstance(v, str) and v.strip().lower() == "auto":
        return cores()
    n = _int(v, name)
    if n == 0:
        return cores()
    if n > MAX_WORKERS:
        raise ConfigError(f"{name}: at most {MAX_WORKERS} workers, got {n}")
    return n


def _home_transport(v: Any, name: str) -> str:
    transport = _str(v, name).strip().lower()
    if transport not in ("udp", "tcp", "tls"):
        raise ConfigError(f"{name}: expected udp, tcp or tls, got {v!r}")
    return transport


def tls_listen_of(cfg: Config) -> HostPort:
    """Where SIP over TLS listens: ``tls_listen``, else the SIP listen host on 5061 when
    SIP is on 5060, or on any free port when it is not (so that sites on other ports,
    as in tests, never contend for 5061)."""
    if cfg.tls_listen is not None:
        return cfg.tls_listen
    sip = cfg.sip_listen
    return HostPort(sip.host, 5061 if sip.port == 5060 else 0)


def _log_level(v: Any, name: str) -> str:
    level = _str(v, name).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{name}: expected DEBUG, INFO, WARNING or ERROR, got {v!r}")
    return level


def _convert(name: str, value: Any, origin: str) -> Any:
    label = f"{origin} {name}"
    if name in _LISTS:
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
        return tuple(_LISTS[name](item, label) for item in items)
    if name in _SCALARS:
        return _SCALARS[name](value, label)
    raise ConfigError(f"{origin} unknown setting {name!r}")


def load_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    section = data.get("p2psip", data)
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: [p2psip] must be a table")
    return {k.replace("-", "_"): v for k, v in section.items()}


def build_config(
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Config:
    """Merge the three sources; ``flags`` holds only the options given on the command line."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    if config_file is not None:
        for name, value in load_file(config_file).items():
            name = _ALIASES.get(name, name)
            merged[name] = _convert(name, value, f"config file {config_file}:")
    known = set(_SCALARS) | set(_LISTS) | {"domain", "users", "trust", "route", "trusted_peer"}
    for key, value in env.items():
        if not key.startswith("P2PSIP_") or key == "P2PSIP_CONFIG":
            continue
        name = key[len("P2PSIP_") :].lower()
        if name not in known:
            continue  # other tools' P2PSIP_* variables are not ours to reject
        name = _ALIASES.get(name, name)
        if value == "":
            continue
        merged[name] = _convert(name, value, f"environment {key}:")
    for name, value in flags.items():
        if value is None or value == [] or value == ():
            continue
        merged[name] = _convert(name, value, f"--{name.replace('_', '-')}:")
    cfg = Config(**merged)
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    if cfg.min_expires > cfg.max_expires:
        raise ConfigError("min_expires must not be larger than max_expires")
    if not cfg.min_expires <= cfg.default_expires <= cfg.max_expires:
        raise ConfigError("default_expires must lie between min_expires and max_expires")
    if cfg.max_contacts < 1:
        raise ConfigError("max_contacts must be at least 1")
    if not 10 <= cfg.flow_timer <= 3600:
        raise ConfigError("flow_timer must lie between 10 and 3600 seconds")
    if 0 < cfg.nat_keepalive_interval < 1:
        raise ConfigError("nat_keepalive_interval must be 0 (off) or at least 1 second")
    if not cfg.digest_algorithms or len(set(cfg.digest_algorithms)) != len(cfg.digest_algorithms):
        raise ConfigError("digest_algorithms must name MD5 and/or SHA-256, each once")
    for name in ("auth_max_failures", "flood_max_requests", "max_tcp_per_address",
                 "max_tcp_connections", "max_transactions", "max_headers", "max_via",
                 "max_route"):  # fmt: skip
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1")
    if not 1024 <= cfg.max_message_bytes <= 65535:
        raise ConfigError("max_message_bytes must lie between 1024 and 65535")
    if cfg.max_header_line < 256:
        raise ConfigError("max_header_line must be at least 256")
    if cfg.auth_block_time > cfg.auth_block_max:
        raise ConfigError("auth_block_time must not be larger than auth_block_max")
    if cfg.t1 > cfg.t2:
        raise ConfigError("t1 must not be larger than t2")
    if cfg.workers > 1 and not cfg.redis_url:
        raise ConfigError(
            f"{cfg.workers} workers need --redis-url: they share the bindings and users there"
        )
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise ConfigError("tls_cert and tls_key go together: set both, or neither")
    if not is_loopback(cfg.admin_listen.host) and not cfg.admin_token:
        raise ConfigError(
            f"the admin API on {cfg.admin_listen} is not loopback-only: set --admin-token"
        )
