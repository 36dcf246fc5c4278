"""The ``p2psip`` command-line contract and the configuration it is built from.

Start-up failures run the real command as a subprocess: what an operator sees is one line
on stderr and exit status 2, never a traceback. Precedence (flag > environment > file >
default) is checked on :func:`proxy.config.build_config` directly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from dht_adaptor.keys import SiteKey
from dht_adaptor.trust_folder import Endorsement, load_public_key, public_pem, read_folder
from proxy.config import Config, ConfigError, HostPort, build_config, load_file
from tests.support.site import free_port, sip_options

ROOT = Path(__file__).resolve().parents[1]


def p2psip(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path = ROOT, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("P2PSIP_")}
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    (line,) = lines
    # "p2psip: error: ..." or, from a sub-command's parser, "p2psip run: error: ...".
    assert line.startswith("p2psip") and ": error: " in line, line
    for needle in needles:
        assert needle in line, line
    assert proc.stdout == ""
    return line


@pytest.fixture
def loopback_args(tmp_path: Path) -> list[str]:
    """Flags that keep a site on loopback and inside the test's folder (should a test
    that expects a failure start a site after all). A later --sip-listen overrides."""
    return [
        "--sip-listen",
        f"127.0.0.1:{free_port()}",
        "--data-dir",
        str(tmp_path / "data"),
        "--admin-listen",
        f"127.0.0.1:{free_port()}",
    ]


# --- start-up failures: one line, exit status 2 ---------------------------------------------


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (":5060", "missing host"),
        ("127.0.0.1:99999", "bad port"),
        ("127.0.0.1:http", "bad port"),
        ("[::1", "malformed address"),
    ],
)
def test_bad_sip_listen(value: str, needle: str, loopback_args: list[str]) -> None:
    assert_one_line_error(p2psip("run", *loopback_args, "--sip-listen", value), needle, value)


def test_sip_port_in_use(loopback_args: list[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        proc = p2psip("run", *loopback_args, "--sip-listen", f"127.0.0.1:{port}")
    # Not a configuration error: logging is on by then, and start-up warnings (such as
    # "no users file") may come first. The failure itself is still one clean last line.
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("p2psip: error: cannot listen on"), last
    assert str(port) in last


def test_unknown_config_file(tmp_path: Path, loopback_args: list[str]) -> None:
    missing = tmp_path / "nope.toml"
    assert_one_line_error(
        p2psip("run", "--config", str(missing), *loopback_args), str(missing), "does not exist"
    )


def test_config_file_that_is_a_directory(tmp_path: Path, loopback_args: list[str]) -> None:
    assert_one_line_error(p2psip("run", "--config", str(tmp_path), *loopback_args), str(tmp_path))


def test_malformed_toml_config(tmp_path: Path, loopback_args: list[str]) -> None:
    bad = tmp_path / "site.toml"
    bad.write_text('sip_listen = "127.0.0.1:5070"\n[unclosed\n')
    assert_one_line_error(p2psip("run", "--config", str(bad), *loopback_args), str(bad), "line 2")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("colour = 'blue'\n", "unknown setting 'colour'"),
        ("min_expires = 'soon'\n", "min_expires"),
        ("sip_listen = 5060\n", "sip_listen"),
        ("domains = ['a b.com']\n", "not a domain name"),
        ("p2psip = 3\n", "must be a table"),
    ],
)
def test_bad_values_in_the_config_file(
    body: str, needle: str, tmp_path: Path, loopback_args: list[str]
) -> None:
    path = tmp_path / "site.toml"
    path.write_text(body)
    assert_one_line_error(p2psip("run", "--config", str(path), *loopback_args), needle)


def test_config_file_named_by_the_environment(tmp_path: Path, loopback_args: list[str]) -> None:
    missing = tmp_path / "from-env.toml"
    proc = p2psip("run", *loopback_args, env={"P2PSIP_CONFIG": str(missing)})
    assert_one_line_error(proc, str(missing), "does not exist")


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("P2PSIP_SIP_LISTEN", "127.0.0.1:port", "P2PSIP_SIP_LISTEN"),
        ("P2PSIP_MAX_EXPIRES", "lots", "P2PSIP_MAX_EXPIRES"),
        ("P2PSIP_MIN_EXPIRES", "-5", "must not be negative"),
        ("P2PSIP_T1", "0", "must be positive"),
        ("P2PSIP_LOG_LEVEL", "LOUD", "P2PSIP_LOG_LEVEL"),
        ("P2PSIP_REDIS_URL", "http://localhost:6379", "redis://"),
        ("P2PSIP_DOMAIN", "a.com,b/c", "not a domain name"),
    ],
)
def test_bad_environment_variable(
    name: str, value: str, needle: str, loopback_args: list[str]
) -> None:
    assert_one_line_error(p2psip("run", *loopback_args, env={name: value}), needle)


def test_missing_users_file(tmp_path: Path, loopback_args: list[str]) -> None:
    missing = tmp_path / "users.toml"
    proc = p2psip("run", *loopback_args, "--users", str(missing))
    assert_one_line_error(proc, str(missing))


def test_malformed_users_file(tmp_path: Path, loopback_args: list[str]) -> None:
    users = tmp_path / "users.toml"
    users.write_text("[users.alice\npassword = 'x'\n")
    proc = p2psip("run", *loopback_args, "--users", str(users))
    assert_one_line_error(proc, str(users))


@pytest.mark.parametrize("admin", ["0.0.0.0:8080", "192.0.2.1:9000", "[::]:8080"])
def test_admin_api_off_loopback_needs_a_token(admin: str, tmp_path: Path) -> None:
    proc = p2psip(
        "run", "--sip-listen", f"127.0.0.1:{free_port()}", "--admin-listen", admin,
        "--data-dir", str(tmp_path),
    )  # fmt: skip
    assert_one_line_error(proc, "--admin-token")


def test_inconsistent_registrar_limits(loopback_args: list[str]) -> None:
    proc = p2psip(
        "run", *loopback_args, env={"P2PSIP_MIN_EXPIRES": "600", "P2PSIP_MAX_EXPIRES": "60"}
    )
    assert_one_line_error(proc, "min_expires")


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--bogus"],
        ["run", "--sip-listen"],  # missing value
        ["frobnicate"],
        [],
    ],
)
def test_bad_command_line(argv: list[str]) -> None:
    assert_one_line_error(p2psip(*argv))


# --- what works --------------------------------------------------------------------------


def test_run_help() -> None:
    proc = p2psip("run", "--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: p2psip run")
    for flag in (
        "--sip-listen",
        "--domain",
        "--config",
        "--dht-listen",
        "--bootstrap",
        "--trust",
        "--admin-token",
        "--site-id",
        "--users",
    ):
        assert flag in proc.stdout
    assert proc.stderr == ""


def test_top_level_help() -> None:
    proc = p2psip("--help")
    assert proc.returncode == 0
    assert "run" in proc.stdout


def test_site_starts_with_every_flag_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    trust = tmp_path / "trust"
    trust.mkdir()
    cmd = [
        sys.executable, "-m", "proxy.cli", "run",
        "--sip-listen", f"127.0.0.1:{port}",
        "--domain", "example.com",
        "--domain", "example.org",
        "--advertise", "127.0.0.1",
        "--dht-listen", f"127.0.0.1:{free_port()}",
        "--bootstrap", "127.0.0.1:4001",
        "--bootstrap", "127.0.0.1:4002",
        "--trust", str(trust),
        "--admin-listen", f"127.0.0.1:{free_port()}",
        "--admin-token", "s3cret-token",
        "--site-id", "paris",
        "--data-dir", str(tmp_path / "data"),
        "--log-level", "debug",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PSIP_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 15
        reply = None
        while time.monotonic() < deadline and proc.poll() is None:
            reply = sip_options("127.0.0.1", port, 0.2)
            if reply is not None:
                break
        assert proc.poll() is None, proc.communicate()[1]
        assert reply is not None and reply.startswith(b"SIP/2.0 200"), reply
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "s3cret-token" not in err  # never log credentials


# --- precedence: flag > environment > file > default ----------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults() -> None:
    cfg = build_config({}, env={})
    assert cfg == Config()
    assert cfg.sip_listen == HostPort("0.0.0.0", 5060)
    assert cfg.admin_listen == HostPort("127.0.0.1", 8080)
    assert cfg.domains == ()
    assert (cfg.min_expires, cfg.max_expires, cfg.default_expires) == (60, 7200, 3600)


def test_file_beats_default(tmp_path: Path) -> None:
    f = write(tmp_path / "c.toml", 'sip_listen = "10.0.0.1:5070"\nmax_contacts = 3\n')
    cfg = build_config({}, env={}, config_file=f)
    assert cfg.sip_listen == HostPort("10.0.0.1", 5070)
    assert cfg.max_contacts == 3
    assert cfg.min_expires == 60  # untouched settings keep their defaults


def test_env_beats_file(tmp_path: Path) -> None:
    f = write(tmp_path / "c.toml", 'sip_listen = "10.0.0.1:5070"\nmax_contacts = 3\n')
    cfg = build_config({}, env={"P2PSIP_SIP_LISTEN": "10.0.0.2:5080"}, config_file=f)
    assert cfg.sip_listen == HostPort("10.0.0.2", 5080)
    assert cfg.max_contacts == 3


def test_flag_beats_env_and_file(tmp_path: Path) -> None:
    f = write(tmp_path / "c.toml", 'sip_listen = "10.0.0.1:5070"\n')
    cfg = build_config(
        {"sip_listen": "10.0.0.3:5090"}, env={"P2PSIP_SIP_LISTEN": "10.0.0.2:5080"}, config_file=f
    )
    assert cfg.sip_listen == HostPort("10.0.0.3", 5090)


def test_flags_left_unset_do_not_override(tmp_path: Path) -> None:
    # argparse gives None (or an empty list) for every flag not on the command line.
    f = write(tmp_path / "c.toml", 'domains = ["file.example"]\nsite_id = "from-file"\n')
    cfg = build_config(
        {"domains": None, "site_id": None, "bootstrap": []},
        env={"P2PSIP_SITE_ID": "from-env"},
        config_file=f,
    )
    assert cfg.domains == ("file.example",)
    assert cfg.site_id == "from-env"


def test_lists_from_each_source_replace_not_merge(tmp_path: Path) -> None:
    f = write(tmp_path / "c.toml", 'domains = ["File.Example"]\n')
    assert build_config({}, env={}, config_file=f).domains == ("file.example",)
    env = {"P2PSIP_DOMAIN": "a.example,b.example"}
    assert build_config({}, env=env, config_file=f).domains == ("a.example", "b.example")
    flags = {"domains": ["c.example"]}
    assert build_config(flags, env=env, config_file=f).domains == ("c.example",)


def test_bootstrap_list(tmp_path: Path) -> None:
    cfg = build_config({"bootstrap": ["10.0.0.1:4000", "[2001:db8::1]:4001"]}, env={})
    assert cfg.bootstrap == (HostPort("10.0.0.1", 4000), HostPort("2001:db8::1", 4001))
    # Without a port, a bootstrap node is at the default DHT port.
    assert build_config({"bootstrap": ["10.0.0.1"]}, env={}).bootstrap == (
        HostPort("10.0.0.1", 6084),
    )
    with pytest.raises(ConfigError, match="bad port"):
        build_config({"bootstrap": ["10.0.0.1:x"]}, env={})


def test_empty_env_value_is_ignored(tmp_path: Path) -> None:
    f = write(tmp_path / "c.toml", 'site_id = "from-file"\n')
    assert build_config({}, env={"P2PSIP_SITE_ID": ""}, config_file=f).site_id == "from-file"


def test_foreign_p2psip_variables_are_not_ours_to_reject() -> None:
    env = {"P2PSIP_PHONE_LOG_LEVEL": "5", "P2PSIP_CONFIG": "/elsewhere.toml"}
    assert build_config({}, env=env) == Config()


def test_file_under_a_p2psip_table_with_dashed_keys(tmp_path: Path) -> None:
    f = write(
        tmp_path / "c.toml",
        '[p2psip]\nsip-listen = "10.0.0.1:5070"\ndomain = ["x.example"]\nusers = "u.toml"\n',
    )
    cfg = build_config({}, env={}, config_file=f)
    assert cfg.sip_listen == HostPort("10.0.0.1", 5070)
    assert cfg.domains == ("x.example",)
    assert cfg.users_file == Path("u.toml")


def test_trust_comes_from_any_source(tmp_path: Path) -> None:
    f = write(tmp_path / "c.toml", 'trust = "/keys/file"\n')
    assert build_config({}, env={}, config_file=f).trust_dir == Path("/keys/file")
    env = {"P2PSIP_TRUST": "/keys/env"}
    assert build_config({}, env=env, config_file=f).trust_dir == Path("/keys/env")
    assert build_config({"trust_dir": "/keys/flag"}, env=env).trust_dir == Path("/keys/flag")


def test_sip_listen_without_port_means_5060() -> None:
    assert build_config({"sip_listen": "10.0.0.9"}, env={}).sip_listen == HostPort("10.0.0.9", 5060)


def test_admin_token_from_env_allows_a_public_admin_api() -> None:
    with pytest.raises(ConfigError, match="admin-token"):
        build_config({"admin_listen": "0.0.0.0:8080"}, env={})
    env = {"P2PSIP_ADMIN_TOKEN": "Zq7-secret"}
    cfg = build_config({"admin_listen": "0.0.0.0:8080"}, env=env)
    assert cfg.admin_token == "Zq7-secret"
    assert "Zq7-secret" not in repr(cfg)  # never shown


def test_unknown_file_setting_is_one_clean_line(tmp_path: Path) -> None:
    f = write(tmp_path / "c.toml", "colour = 'blue'\n")
    with pytest.raises(ConfigError) as info:
        build_config({}, env={}, config_file=f)
    message = str(info.value)
    assert "\n" not in message
    assert "::" not in message
    assert "colour" in message


def test_load_file_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_file(tmp_path / "missing.toml")
    with pytest.raises(ConfigError):
        load_file(write(tmp_path / "bad.toml", "= 1\n"))


# --- keygen --rotate ---------------------------------------------------------------------


def test_keygen_rotate_writes_a_new_key_the_old_one_endorses(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert p2psip("keygen", "--data-dir", str(data)).returncode == 0
    old = SiteKey.load(data)
    rotated = p2psip("keygen", "--rotate", "--data-dir", str(data))
    assert rotated.returncode == 0, rotated.stderr
    new = SiteKey.load(data)
    assert new != old and load_public_key(data / "site.pub") == new.public_bytes
    assert SiteKey.load_or_create(data) == new
    backup = data / f"site-{old.key_id}.key"
    assert backup.stat().st_mode & 0o777 == 0o600
    assert backup.read_bytes() == old.private_pem()  # to roll back
    path = data / f"{old.key_id}-{new.key_id}.endorsement"
    endorsement = Endorsement.decode(path.read_bytes())
    assert endorsement.verify(old.public_bytes) and endorsement.new_public == new.public_bytes
    out = rotated.stdout
    assert str(path) in out and new.key_id in out and old.key_id in out and "restart" in out

    # Dropped into a trust folder that trusts the old key (with a scope), it trusts the new.
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "paris.pub").write_bytes(public_pem(old.public_bytes))
    (trust / "paris.scope").write_text("example.com\n")
    (trust / path.name).write_bytes(path.read_bytes())
    table = read_folder(trust)
    assert table[new.key_id].endorsed_by == old.key_id
    assert table[new.key_id].scope == table[old.key_id].scope

    again = p2psip("keygen", "--rotate", "--data-dir", str(data))  # chains: new -> newer
    assert again.returncode == 0, again.stderr
    newer = SiteKey.load(data)
    (trust / f"{new.key_id}-{newer.key_id}.endorsement").write_bytes(
        (data / f"{new.key_id}-{newer.key_id}.endorsement").read_bytes()
    )
    assert read_folder(trust)[newer.key_id].endorsed_by == new.key_id


def test_keygen_rotate_needs_a_key(tmp_path: Path) -> None:
    proc = p2psip("keygen", "--rotate", "--data-dir", str(tmp_path / "none"))
    assert_one_line_error(proc, "to rotate", "run keygen first")
    assert not (tmp_path / "none" / "site.key").exists()


def test_keygen_rotate_and_force_exclude_each_other(tmp_path: Path) -> None:
    proc = p2psip("keygen", "--rotate", "--force", "--data-dir", str(tmp_path))
    assert_one_line_error(proc, "not allowed with")


@pytest.mark.parametrize(
    "argv", [["ping", "127.0.0.1:9"], ["lookup", "sip:a@example.com", "--bootstrap", "127.0.0.1:9"]]
)
def test_ping_and_lookup_need_the_site_key(argv: list[str], tmp_path: Path) -> None:
    # They prove membership of the overlay with it (tests/test_dht_process.py: with one).
    assert_one_line_error(p2psip(*argv, "--data-dir", str(tmp_path)), f"no site key in {tmp_path}")
