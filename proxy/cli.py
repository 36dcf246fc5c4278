"""The ``p2psip`` command. Bad input gets one line on stderr and exit status 2.

``run``     a site: SIP proxy and registrar, with its DHT adaptor and the admin API
``dht``     a standalone DHT node (the ``dht`` service of a site's compose file)
``keygen``  the site's Ed25519 key pair, DIR/site.key and DIR/site.pub (``--rotate``: a
            new pair, endorsed by the old key, for rotation without a gap)
``lookup``  the verified bindings the DHT holds for an AOR, as JSON (exit 1: none)
``ping``    does a DHT node answer? (exit 0 if it does, 1 if not: a healthcheck)

``dht``, ``lookup`` and ``ping`` prove membership of the overlay with the site key in
``--data-dir`` (``dht`` creates one if there is none; the others need it: exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from .config import Config, ConfigError, build_config


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file")
    p.add_argument("--data-dir", metavar="DIR", help="site state: keys, nonce secret")
    p.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR")


def _dht_options(p: argparse.ArgumentParser, *, listen_flag: str) -> None:
    p.add_argument(
        listen_flag,
        dest="dht_listen",
        metavar="HOST:PORT",
        help="DHT node address, UDP (default 0.0.0.0:6084)",
    )
    p.add_argument(
        "--bootstrap",
        action="append",
        metavar="HOST:PORT",
        help="a DHT node to join through (repeatable)",
    )
    p.add_argument(
        "--trust",
        dest="trust_dir",
        metavar="DIR",
        help="folder of trusted site keys (*.pub); default: only this site's key",
    )


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="p2psip", description="A SIP proxy and registrar on a Kademlia DHT.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a site: SIP proxy and registrar")
    _common(run)
    run.add_argument(
        "--domain",
        dest="domains",
        action="append",
        metavar="D",
        help="SIP domain served (repeatable; default: any)",
    )
    run.add_argument("--sip-listen", metavar="HOST:PORT", help="default 0.0.0.0:5060, UDP and TCP")
    run.add_argument("--advertise", metavar="HOST", help="address put in Via/Record-Route")
    run.add_argument(
        "--tls-listen",
        metavar="HOST:PORT",
        help="SIP over TLS (default: the --sip-listen host, port 5061)",
    )
    run.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (chain) for phones")
    run.add_argument("--tls-key", metavar="FILE", help="its PEM private key")
    run.add_argument(
        "--tls-ca", metavar="FILE", help="PEM CAs for TLS servers that are no member site"
    )
    run.add_argument(
        "--home-transport",
        metavar="T",
        help="how other sites reach this one: udp (default), tcp or tls",
    )
    run.add_argument(
        "--route",
        dest="routes",
        action="append",
        metavar="DOMAIN=HOST:PORT[;transport=T]",
        help="send requests for DOMAIN to this peer, before DNS (repeatable)",
    )
    run.add_argument(
        "--outbound-proxy",
        metavar="HOST:PORT[;transport=T]",
        help="send requests for other domains without a --route here instead of using DNS",
    )
    run.add_argument(
        "--trusted-peer",
        dest="trusted_peers",
        action="append",
        metavar="ADDRESS[/PREFIX]",
        help="a SIP server whose requests skip digest and may be relayed (repeatable)",
    )
    _dht_options(run, listen_flag="--dht-listen")
    run.add_argument("--redis-url", metavar="URL", help="redis://HOST:PORT/DB for persistence")
    run.add_argument(
        "--workers",
        metavar="N",
        help="worker processes sharing the SIP ports (default 1; 0 or auto: one per core; "
        "more than 1 needs --redis-url)",
    )
    run.add_argument("--admin-listen", metavar="HOST:PORT", help="default 127.0.0.1:8080")
    run.add_argument("--admin-token", metavar="TOKEN")
    run.add_argument("--users", dest="users_file", metavar="FILE", help="TOML users file")
    run.add_argument("--site-id", metavar="NAME")

    dht = sub.add_parser("dht", help="run a standalone DHT node")
    _common(dht)
    _dht_options(dht, listen_flag="--listen")
    dht.add_argument("--redis-url", metavar="URL", help="keep the node's records in Redis")

    keygen = sub.add_parser("keygen", help="create the site's key pair in DIR")
    keygen.add_argument("--data-dir", metavar="DIR", help="where site.key and site.pub go")
    replace = keygen.add_mutually_exclusive_group()
    replace.add_argument("--force", action="store_true", help="replace an existing key pair")
    replace.add_argument(
        "--rotate",
        action="store_true",
        help="replace the key pair by a new one that the old key endorses (writes "
        "DIR/OLDID-NEWID.endorsement for the other sites' trust folders)",
    )

    lookup = sub.add_parser("lookup", help="look an AOR up in the DHT; print JSON")
    _common(lookup)
    lookup.add_argument("aor", metavar="AOR", help="e.g. sip:alice@example.com")
    lookup.add_argument("--bootstrap", action="append", metavar="HOST:PORT", required=True)
    lookup.add_argument("--trust", dest="trust_dir", metavar="DIR")
    lookup.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")

    ping = sub.add_parser("ping", help="check that a DHT node answers (exit 1 if not)")
    ping.add_argument("node", metavar="HOST:PORT")
    ping.add_argument("--data-dir", metavar="DIR", help="the site whose key signs the ping")
    ping.add_argument(
        "--trust",
        dest="trust_dir",
        metavar="DIR",
        help="folder of trusted site keys (*.pub); default: only this site's key",
    )
    ping.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    own = {"command", "config", "aor", "timeout", "force", "rotate", "node"}
    flags = {k: v for k, v in vars(args).items() if k not in own}
    config_file = getattr(args, "config", None)
    if config_file is None and os.environ.get("P2PSIP_CONFIG"):
        config_file = Path(os.environ["P2PSIP_CONFIG"])  # like every option, from the env too
    try:
        config = build_config(flags, config_file=config_file)
    except ConfigError as exc:
        return _fail(str(exc))
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if config.log_level != "DEBUG":
        # The DHT engine logs every lookup at INFO; our node logs what matters.
        for noisy in ("kademlia", "rpcudp"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "keygen":
        return _rotate(config) if args.rotate else _keygen(config, args.force)
    if args.command == "lookup":
        return _lookup(config, args.aor, args.timeout)
    if args.command == "ping":
        return _ping(config, args.node, args.timeout)
    if args.command == "run" and config.workers > 1:
        from .workers import run_workers

        return run_workers(config)
    from .app import StartupError, run_dht, run_site

    try:
        asyncio.run(run_site(config) if args.command == "run" else run_dht(config))
    except StartupError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        pass
    return 0


def _fail(message: str) -> int:
    print(f"p2psip: error: {message}", file=sys.stderr)
    return 2


def _keygen(config: Config, force: bool) -> int:
    from dht_adaptor.keys import KeyFileError, SiteKey

    path = config.data_dir / "site.key"
    if path.exists() and not force:
        return _fail(f"{path} already exists (use --force to replace it)")
    try:
        key = SiteKey.generate()
        key.save(config.data_dir, overwrite=force)
    except KeyFileError as exc:
        return _fail(str(exc))
    print(f"wrote {path} and {config.data_dir / 'site.pub'} (key id {key.key_id})")
    return 0


def _rotate(config: Config) -> int:
    from dht_adaptor.keys import KeyFileError, rotate

    if not (config.data_dir / "site.key").exists():
        return _fail(f"no {config.data_dir / 'site.key'} to rotate (run keygen first)")
    try:
        r = rotate(config.data_dir)
    except KeyFileError as exc:
        return _fail(str(exc))
    old, new, pub = r.old.key_id, r.new.key_id, config.data_dir / "site.pub"
    print(f"wrote a new key pair in {config.data_dir} (key id {new}), endorsed by the old key "
          f"{old} (kept as {r.backup})")  # fmt: skip
    print(f"1. copy {r.endorsement_path} into every site's trust folder (or POST it to "
          f"/trust/keys) and check that each site lists key {new}")  # fmt: skip
    print("2. restart this site: it signs with the new key from then on")
    print(f"3. in every trust folder, replace the old key's .pub by {pub} and remove "
          f"{r.endorsement_path.name}: the old key's records stop counting")  # fmt: skip
    return 0


def _lookup(config: Config, aor_text: str, timeout: float) -> int:
    from .lookup import LookupError_, LookupUnavailable, lookup_aor

    try:
        text = asyncio.run(lookup_aor(config, aor_text, timeout))
    except LookupError_ as exc:
        return _fail(str(exc))
    except LookupUnavailable as exc:
        print(f"p2psip: {exc}", file=sys.stderr)
        return 1
    if text is None:
        print(f"p2psip: no bindings found for {aor_text}", file=sys.stderr)
        return 1
    print(text)
    return 0


def _ping(config: Config, node: str, timeout: float) -> int:
    from .config import parse_hostport
    from .lookup import LookupError_, ping_node

    try:
        addr = parse_hostport(node, "ping", 6084)
        ok = asyncio.run(ping_node(addr, timeout, config.data_dir, config.trust_dir))
    except (ConfigError, LookupError_) as exc:
        return _fail(str(exc))
    if not ok:
        print(
            f"p2psip: no DHT node answered at {addr} (a node that does not trust the key in "
            f"{config.data_dir}, or one we do not trust, looks dead)",
            file=sys.stderr,
        )
        return 1
    print(f"DHT node at {addr} answered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
