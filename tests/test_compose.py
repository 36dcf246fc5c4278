"""docker-compose.yml is the tested deployment: its services and commands are the ones the
multi-site tests run (tests/support/deployment.py), and every setting it passes is one
p2psip understands. No Docker engine runs here, so this reads the file."""

from __future__ import annotations

import re

import pytest

from proxy.cli import _parser
from proxy.config import ConfigError, build_config, tls_listen_of
from tests.support.deployment import COMPOSE_FILE, SITE_SERVICES, compose, service_command
from tests.support.site import ROOT

# What the compose file's ${VAR...} references stand for when an admin fills them in.
SAMPLE_ENV = {
    "P2PSIP_SITE_ID": "paris",
    "P2PSIP_DOMAIN": "example.com",
    "P2PSIP_ADVERTISE": "192.0.2.10",
    "P2PSIP_BOOTSTRAP": "192.0.2.20:6084",
    "P2PSIP_ADMIN_TOKEN": "s3cret",
}
_REF = re.compile(r"\$\{(\w+)(:?[-+?][^}]*)?\}")


def interpolate(value: str) -> str:
    """The subset of compose interpolation the file uses: ${V}, ${V:-d}, ${V:+x}, ${V:?m}."""

    def one(m: re.Match[str]) -> str:
        name, op = m.group(1), m.group(2) or ""
        have = SAMPLE_ENV.get(name, "")
        if op.startswith(":+"):
            return op[2:] if have else ""
        if op.startswith(":-"):
            return have or op[2:]
        return have

    return _REF.sub(one, value)


def test_a_site_is_redis_a_dht_node_and_the_proxy() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", *SITE_SERVICES}
    # The harness runs every p2psip service; anything else would be untested.
    assert SITE_SERVICES == ("dht", "proxy")


def test_every_command_is_a_p2psip_command_that_parses() -> None:
    for name in SITE_SERVICES:
        command = service_command(name)
        args = _parser().parse_args(command)  # exits 2 (failing the test) if it does not parse
        assert args.command in ("run", "dht")
    assert service_command("dht")[0] == "dht"
    assert service_command("proxy")[0] == "run"


@pytest.mark.parametrize("name", SITE_SERVICES)
def test_every_setting_is_one_p2psip_understands(name: str) -> None:
    env = {k: interpolate(str(v)) for k, v in compose()["services"][name]["environment"].items()}
    assert all(k.startswith("P2PSIP_") for k in env)
    # build_config rejects values it cannot use; unknown P2PSIP_ names would be ignored,
    # so check those against the settings it knows too.
    try:
        cfg = build_config({}, env=env)
    except ConfigError as exc:  # pragma: no cover - the message is the assertion
        pytest.fail(f"service {name}: {exc}")
    known = {f"P2PSIP_{k.upper()}" for k in type(cfg).__dataclass_fields__}
    known |= {"P2PSIP_DOMAIN", "P2PSIP_TRUST", "P2PSIP_USERS"}
    assert set(env) <= known, set(env) - known


def test_persistence_health_and_ports() -> None:
    data = compose()
    services = data["services"]
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    for name in ("redis", *SITE_SERVICES):
        assert "healthcheck" in services[name], f"{name} has no healthcheck"
    volumes = set(data["volumes"])
    for name in ("redis", *SITE_SERVICES):
        named = {v.split(":")[0] for v in services[name]["volumes"] if not v.startswith(".")}
        assert named and named <= volumes, f"{name} keeps state outside named volumes"
    ports = services["proxy"]["ports"]
    assert "5060:5060/udp" in ports and "5060:5060/tcp" in ports
    assert "5061:5061/tcp" in ports  # SIP over TLS, where tls_listen_of puts it by default
    proxy_env = {k: interpolate(str(v)) for k, v in services["proxy"]["environment"].items()}
    assert tls_listen_of(build_config({}, env=proxy_env)).port == 5061
    assert any(p.endswith("/udp") and p.startswith("6084") for p in services["dht"]["ports"])
    # Both p2psip services run the image the Dockerfile builds.
    assert services["dht"]["build"] == "."
    assert services["proxy"]["image"] == services["dht"]["image"]


def test_the_dockerfile_installs_the_packages_and_runs_p2psip() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for package in ("proxy", "dht_adaptor", "admin_api"):
        assert f"COPY {package}" in text
    assert 'ENTRYPOINT ["p2psip"]' in text
    assert COMPOSE_FILE.exists()
