"""The ``p2psip`` command. Bad input gets one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from .config import ConfigError, build_config


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="p2psip", description="A SIP proxy and registrar on a Kademlia DHT.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run a site: SIP proxy and registrar")
    run.add_argument("--config", type=Path, help="TOML config file")
    run.add_argument("--domain", dest="domains", action="append", metavar="D",
                     help="SIP domain served (repeatable; default: any)")
    run.add_argument("--sip-listen", metavar="HOST:PORT", help="default 0.0.0.0:5060, UDP and TCP")
    run.add_argument("--advertise", metavar="HOST", help="address put in Via/Record-Route")
    run.add_argument("--dht-listen", metavar="HOST:PORT")
    run.add_argument("--bootstrap", action="append", metavar="HOST:PORT")
    run.add_argument("--trust", metavar="DIR", help="folder of trusted site keys (DHT)")
    run.add_argument("--redis-url", metavar="URL", help="redis://HOST:PORT/DB for persistence")
    run.add_argument("--admin-listen", metavar="HOST:PORT", help="default 127.0.0.1:8080")
    run.add_argument("--admin-token", metavar="TOKEN")
    run.add_argument("--users", dest="users_file", metavar="FILE", help="TOML users file")
    run.add_argument("--data-dir", metavar="DIR")
    run.add_argument("--site-id", metavar="NAME")
    run.add_argument("--log-level", metavar="LEVEL")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    return 2


def _run(args: argparse.Namespace) -> int:
    from .app import StartupError, run_site

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    config_file = args.config
    if config_file is None and os.environ.get("P2PSIP_CONFIG"):
        config_file = Path(os.environ["P2PSIP_CONFIG"])  # like every option, from the env too
    try:
        config = build_config(flags, config_file=config_file)
    except ConfigError as exc:
        print(f"p2psip: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(run_site(config))
    except StartupError as exc:
        print(f"p2psip: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
