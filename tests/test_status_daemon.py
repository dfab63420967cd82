"""``hdfmgr status`` tells whether a daemon runs and what its slots do; a closed pipe is quiet."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.site import Site, slow_mv, wait_for


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path / "site")


def test_status_shows_the_daemon_and_a_slot_stuck_in_committing(site: Site, tmp_path: Path) -> None:
    started = tmp_path / "mv-started"
    shims = slow_mv(tmp_path / "shims", 20, started)
    site.configure(num_threads=1, timeout=60)
    assert site.hdfmgr("initdb", str(site.config_path)).returncode == 0
    before = site.hdfmgr("status", str(site.config_path))
    assert "daemon:   not running" in before.stdout, before.stdout
    daemon = site.start(env={"PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"})
    try:
        site.write("slow.fits", b"s")
        wait_for(started.exists, 20, "the commit's mv to start")
        wait_for(lambda: site.states().get("slow.fits") == "committing", 10, "committing recorded")

        def status() -> str | None:
            result = site.hdfmgr("status", str(site.config_path))
            assert result.returncode == 0, result.stderr
            return result.stdout if "committing batch" in result.stdout else None

        text = wait_for(status, 10, "the slot")
        assert f"daemon:   running, pid {daemon.proc.pid}" in text, text
        assert "version" in text
        assert "slot 0: committing batch 1 (1 file" in text, text
        assert "committing 1 (oldest" in text, text
        info = json.loads(site.hdfmgr("status", "--json", str(site.config_path)).stdout)
        assert info["daemon"]["pid"] == daemon.proc.pid
        assert info["daemon"]["slots"][0]["state"] == "committing"
        assert info["oldest"]["committing"] >= 0
    finally:
        daemon.kill()
    after = site.hdfmgr("status", str(site.config_path))
    assert "daemon:   not running" in after.stdout


def test_status_shows_a_suspended_slot_and_why_then_frees_it(site: Site, tmp_path: Path) -> None:
    """A commit whose reply is lost suspends its slot until a listing of its staging directory
    tells what the commit did; while the listings fail, status shows the slot suspended with
    the reason, and the slot is free again once a listing gets through."""
    lost, failing = tmp_path / "lose-reply", tmp_path / "fail-listing"
    remote = tmp_path / "remote"
    remote.write_text(
        "#!/bin/sh\n"
        f'if [ -e {lost} ] && echo "$1" | grep -q hdfmgr-commit; then rm -f {lost}; sh -c "$1" >/dev/null; '
        "exit 255; fi\n"
        f'if [ -e {failing} ] && echo "$1" | grep -q "%h/%f"; then\n'
        '    echo "connection reset" >&2; exit 255\nfi\n'
        'exec sh -c "$1"\n'
    )
    remote.chmod(0o755)
    site.configure(remote=f"{remote} {{command}}", num_threads=2)
    config = str(site.config_path)
    lost.touch()
    failing.touch()
    site.write("a.fits", b"a")
    daemon = site.start()
    try:

        def suspended() -> str | None:
            result = site.hdfmgr("status", config)
            assert result.returncode == 0, result.stderr
            return result.stdout if "listing(s) of its staging directory failed" in result.stdout else None

        text = wait_for(suspended, 20, "the suspended slot and its reason")
        assert re.search(
            r"slot \d: suspended batch 1 \(1 file\(s\), [^)]*\) for \d+ s: commit reply lost", text
        )
        assert "1 suspended" in text and "committing 1 (oldest" in text, text
        info = json.loads(site.hdfmgr("status", "--json", config).stdout)
        (slot,) = [s for s in info["daemon"]["slots"] if s["state"] == "suspended"]
        assert slot["batch"] == 1 and "exit status 255" in slot["reason"], slot
        failing.unlink()
        wait_for(lambda: site.states().get("a.fits") == "held", 20, "the listing to settle it")

        def freed() -> str | None:
            result = site.hdfmgr("status", config)
            return result.stdout if "suspended" not in result.stdout else None

        wait_for(freed, 10, "the slot freed")
    finally:
        assert daemon.stop() == 0
    assert site.delivered() == {"a.fits": b"a"}


def test_a_closed_pipe_ends_the_output_quietly(site: Site) -> None:
    """``hdfmgr files ... | head -1``: no traceback, no 'Exception ignored', status 0."""
    site.write_many({f"f{i:05d}.fits": b"x" for i in range(3000)})
    assert site.hdfmgr("rescan", str(site.config_path), timeout=120).returncode == 0
    result = subprocess.run(
        f"{sys.executable} -m hdfmgr files --limit 3000 {site.config_path} | head -1;"
        " exit ${PIPESTATUS[0]}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=site.root,
    )
    assert result.stderr == ""
    assert result.returncode == 0
    assert len(result.stdout.splitlines()) == 1


def test_status_piped_into_head_exits_quietly(site: Site) -> None:
    """``hdfmgr status | head -1``, as an operator types it, with the daemon running."""
    daemon = site.start()
    try:
        result = subprocess.run(
            f"{sys.executable} -m hdfmgr status {site.config_path} | head -1; exit ${{PIPESTATUS[0]}}",
            shell=True,
            executable="/bin/bash",
            capture_output=True,
            text=True,
            timeout=60,
            cwd=site.root,
        )
    finally:
        assert daemon.stop() == 0
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("source:")


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "--json"],
        ["files", "--all"],
        ["files", "--json"],
        ["show", "a.fits"],
        ["metrics"],
        ["validate"],
        ["--help"],
    ],
    ids=lambda a: "-".join(a),
)
@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_any_command_whose_reader_is_gone_exits_quietly(site: Site, args: list[str], buffered: bool) -> None:
    """The worst case of a closed pipe: the reader is gone before the first write, so the
    very first line meets EPIPE (with ``| head`` that depends on timing). Buffered (as under
    systemd or a plain shell) the write happens in the final flush; unbuffered
    (PYTHONUNBUFFERED) in the first print."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    site.write("a.fits", b"a")
    assert site.hdfmgr("rescan", str(site.config_path)).returncode == 0
    command = [*args, str(site.config_path)] if args != ["--help"] else args
    if args[0] == "show":
        command = ["show", str(site.config_path), *args[1:]]
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "hdfmgr", *command],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            cwd=site.root,
            env=env,
        )
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (0, "")


def test_render_marks_slots_past_their_deadline_and_says_why_one_is_suspended() -> None:
    now = 1_800_000_000.0
    info = {
        "source": "cam1",
        "generated_at": now,
        "states": {"ready": 0, "committing": 3},
        "backlog": {"files": 0, "bytes": 0, "oldest": None, "oldest_age_seconds": None},
        "last_commit": None,
        "throughput": {},
        "oldest": {"committing": 900.0},
        "recent_failures": [],
        "daemon": {
            "pid": 42,
            "version": "1.0.0",
            "started_at": now - 7200,
            "updated_at": now - 1,
            "breaker": "open",
            "slots": [
                {
                    "slot": 0,
                    "state": "committing",
                    "batch": 7,
                    "files": 3,
                    "bytes": 3e6,
                    "since": now - 900,
                    "due": now - 300,
                },
                {
                    "slot": 1,
                    "state": "suspended",
                    "batch": 8,
                    "files": 2,
                    "since": now - 60,
                    "reason": "commit reply lost (exit status 255); out of use until a listing",
                },
                {"slot": 2, "state": "free"},
            ],
        },
    }
    from hdfmgr import status

    text = status.render(info)
    assert "daemon:   running, pid 42 since" in text and "version 1.0.0" in text
    assert "circuit breaker open" in text
    assert "slots:    1 committing, 1 free, 1 suspended" in text
    assert (
        "slot 0: committing batch 7 (3 file(s), 3.0 MB) for 15 min, STUCK: past its deadline by 5 min" in text
    )
    assert "slot 1: suspended batch 8 (2 file(s), 0.0 MB) for 60 s: commit reply lost" in text
    assert "slot 2" not in text
    assert "oldest:   committing 3 (oldest 15 min)" in text
