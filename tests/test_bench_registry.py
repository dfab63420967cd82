"""The benchmark's package: workloads and transports are found by themselves (one module
each), every transport builds seed-format templates, and the long-link floor balances its
streams by bytes. Pure: no sshd, no daemon."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


def benchlib(name: str) -> ModuleType:
    scripts = str(ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.append(scripts)
    return importlib.import_module(f"benchlib.{name}")


def test_every_workload_module_is_found_in_run_order() -> None:
    names = [w.name for w in benchlib("workloads").registry()]
    assert names[:4] == ["backlog", "big", "trickle", "scale"]
    assert set(names) >= {"visit", "bigvisit", "slowtrickle"}
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("name", "family", "program"),
    [
        ("local", "local", "cp"),
        ("scp", "scp", "scp"),
        ("scp+share", "scp", "scp"),
        ("rsync+share", "rsync-ssh", "rsync"),
        ("stream", "rsync-ssh", "builtin:stream"),
    ],
)
def test_every_transport_builds_templates_for_its_link(name: str, family: str, program: str) -> None:
    transports = benchlib("transports")
    server = SimpleNamespace(user="u", host="127.0.0.1", port=2222, key="/k", known_hosts="/kh")
    link = transports.Link(server, Path("/tmp/ctl"), 100.0)
    transport = transports.build(name, link)
    assert transport.name == name and transport.family == family
    assert transport.transfer.split()[0] == program
    assert (
        "{batch}" in transport.transfer or transport.transfer == "builtin:stream"
    ) and "{command}" in transport.remote
    if name != "local":
        assert transport.params["port"] == 2222 and transport.rtt_ms == 100.0
        assert ("cpath" in transport.params) == name.endswith("+share")
    with pytest.raises(ValueError, match="unknown transport"):
        transports.build("carrier-pigeon", link)


def test_a_transport_without_a_transfer_command_leaves_it_out_of_the_configuration() -> None:
    site = benchlib("site")
    assert site.Transport("stream", "", "ssh h {command}").commands() == {"remote": "ssh h {command}"}


def test_the_floor_balances_its_streams_by_bytes() -> None:
    longlink = benchlib("workloads.longlink")
    sizes = {f"night/f{i}": s for i, s in enumerate([32, 1, 1, 1, 30, 2, 2, 3])}
    groups = longlink.balanced(sorted(sizes), sizes, 2)
    loads = sorted(sum(sizes[r] for r in g) for g in groups)
    assert loads == [36, 36]
    assert sorted(r for g in groups for r in g) == sorted(sizes)
    assert longlink.balanced(["a"], {"a": 5}, 2) == [["a"]]  # never an empty stream
