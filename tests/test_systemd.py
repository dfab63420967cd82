"""The systemd units in etc/ and the readiness notification.

``systemd-analyze verify`` checks the units where it is installed (it is on the CI machines);
the structural checks below run everywhere, so a machine without systemd still checks the keys
that matter: Type=notify, KillMode=mixed, restarts except on configuration errors, a stop
timeout longer than general.timeout.
"""

from __future__ import annotations

import configparser
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hdfmgr import sdnotify
from hdfmgr.config import DEFAULTS
from tests.site import Site

ETC = Path(__file__).resolve().parent.parent / "etc"
UNITS = ["hdfmgr.service", "hdfmgr@.service"]


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((ETC / name).read_text())
    return parser


@pytest.mark.parametrize("name", UNITS)
def test_unit_has_the_keys_that_matter(name: str) -> None:
    service = unit(name)["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert "hdfmgr-watch " in service["ExecStart"]
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > DEFAULTS["general"]["timeout"]
    assert service["Restart"] == "on-failure"
    assert "78" in service["RestartPreventExitStatus"].split()
    assert service["ExecReload"].endswith("kill -HUP $MAINPID")
    assert unit(name)["Install"]["WantedBy"] == "multi-user.target"
    if "@" in name:
        assert "%i" in service["ExecStart"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify_accepts_the_unit(name: str, tmp_path: Path) -> None:
    watch = Path(sys.executable).parent / "hdfmgr-watch"
    assert watch.exists(), "hdfmgr-watch is installed next to the interpreter"
    text = (ETC / name).read_text().replace("/usr/local/bin/hdfmgr-watch", str(watch))
    target = tmp_path / (name.replace("@.", "@camera1.") if "@" in name else name)
    target.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(target)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    # Unknown keys and bad values are only warnings (exit 0): none may concern our unit.
    ours = [line for line in result.stderr.splitlines() if target.name in line or str(tmp_path) in line]
    assert not ours, result.stderr


def test_notify_sends_to_the_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.notify("READY=1", "STATUS=watching")
        assert server.recv(4096) == b"READY=1\nSTATUS=watching"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert not sdnotify.notify("READY=1")  # never raises
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sdnotify.notify("READY=1")


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"hdfmgr-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1")
        assert server.recv(64) == b"READY=1"


def test_watch_reports_ready_after_the_startup_rescan(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.write_many({f"pre{i}.fits": b"p" for i in range(5)})
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(30)
        daemon = site.start(env={"NOTIFY_SOCKET": str(path)})
        try:
            messages = server.recv(4096).decode()
            assert "READY=1" in messages
            assert "started:" in daemon.output()  # the rescan came first
        finally:
            assert daemon.stop() == 0
