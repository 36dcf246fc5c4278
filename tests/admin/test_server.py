"""uvicorn serving the admin app inside the site's event loop: real HTTP on port 0, no
signal handlers of its own, a clean stop, a port in use as a one-line start-up error."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from admin_api.app import create_app
from admin_api.server import AdminServer
from proxy.config import Config
from proxy.site import StartupError, admin_token
from tests.support.site import ROOT, free_port

from .conftest import AUTH, LiveSite


async def test_serves_real_http_in_the_running_loop(site: LiveSite) -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = AdminServer(create_app(site.services), "127.0.0.1", 0)
    port = await server.start()
    try:
        assert port > 0
        # uvicorn left SIGINT/SIGTERM to the site (run_site stops on them).
        assert {sig: signal.getsignal(sig) for sig in before} == before
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/health")).json() == {"status": "ok"}
            assert (await client.get("/stats")).status_code == 401
            r = await client.get("/stats", headers=AUTH)
            assert r.status_code == 200 and "sip" in r.json()
    finally:
        await server.stop()
    assert {sig: signal.getsignal(sig) for sig in before} == before
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


async def test_a_port_in_use_is_an_oserror(site: LiveSite) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = AdminServer(create_app(site.services), "127.0.0.1", busy.getsockname()[1])
        with pytest.raises(OSError):
            await server.start()
        await server.stop()  # nothing to stop: harmless


def test_p2psip_run_with_the_admin_port_in_use_exits_2(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = [
            sys.executable, "-m", "proxy.cli", "run",
            "--sip-listen", f"127.0.0.1:{free_port()}",
            "--dht-listen", f"127.0.0.1:{free_port()}",
            "--data-dir", str(tmp_path / "data"),
            "--admin-listen", f"127.0.0.1:{port}",
        ]  # fmt: skip
        proc = subprocess.run(
            argv,
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(f"p2psip: error: cannot listen on 127.0.0.1:{port} (admin API)"), last


def test_without_a_token_the_site_makes_its_own(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path / "data")
    token = admin_token(config)
    path = tmp_path / "data" / "admin.token"
    assert len(token) >= 32 and path.read_text().strip() == token
    assert path.stat().st_mode & 0o077 == 0
    assert admin_token(config) == token  # kept across restarts
    assert admin_token(Config(data_dir=tmp_path / "data", admin_token="given")) == "given"


def test_an_unwritable_token_file_is_a_startup_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StartupError, match="admin token"):
        admin_token(Config(data_dir=blocker / "data"))
