"""``hdfmgr doctor CONFIG`` against the loopback sshd: a good configuration and the failures an
operator meets first (a key the endpoint refuses, staging on another filesystem, a missing
remote tool, a missing holding directory), and the WARN line with the measured cost per file of
an scp transfer command."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.site import Site
from tests.ssh_templates import REMOTE, RSYNC, SCP_BATCH, SCP_EACH, params
from tests.sshd_fixture import SshServer

TRUE_CHECK = "remote command runs `true`"
SAME_FS = "staging and endpoint buffer are on one filesystem"


@pytest.fixture
def site(tmp_path: Path, sshd: SshServer) -> Site:
    site = Site(tmp_path)
    site.configure(transfer=SCP_BATCH, remote=REMOTE, params=params(sshd), verify="checksum")
    return site


def doctor(site: Site) -> tuple[int, list[str]]:
    result = site.hdfmgr("doctor", str(site.config_path))
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout.splitlines()


def failures(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("FAIL ")]


def warnings(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("WARN ")]


PER_FILE = re.compile(
    r"WARN transfer command pays per file: (?P<label>scp \{(?:batch|file)\}) took (?P<one>\d+\.\d+) s "
    r"for 1 file and (?P<many>\d+\.\d+) s for 8 \((?P<extra>\d+\.\d+) s per extra file; a 189-file "
    r"visit would spend ~(?P<visit>\d+(?:\.\d+)?) s on round trips\) -> use rsync "
    r'\(rsync -a -e "ssh \.\.\." \{batch\} \{user\}@\{host\}:\{dest\}\) or transfer: builtin:stream '
    r"\(README, Long links\)"
)


def per_file_warning(lines: list[str]) -> re.Match[str]:
    """The one WARN line of an scp template, its figures consistent with each other."""
    assert len(warnings(lines)) == 1, "\n".join(lines)
    found = PER_FILE.fullmatch(warnings(lines)[0])
    assert found is not None, warnings(lines)[0]
    one, many, extra, visit = (float(found[k]) for k in ("one", "many", "extra", "visit"))
    assert one > 0 and many > 0
    assert extra == pytest.approx(max(0.0, (many - one) / 7), abs=0.01)
    assert visit == pytest.approx(188 * extra, abs=188 * 0.006 + 0.5)
    return found


def test_good_configuration_passes_every_check(site: Site) -> None:
    # Directories that do not exist yet are created, as the daemon would.
    shutil.rmtree(site.root / "endpoint")

    rc, lines = doctor(site)

    assert rc == 0, "\n".join(lines)
    assert failures(lines) == []
    # The seed's scp {batch}: every check passes, and the cost per file is measured and shown.
    assert lines[-1].startswith("WARN transfer command pays per file: ")
    assert per_file_warning(lines)["label"] == "scp {batch}"
    assert lines[0] == f"OK   {TRUE_CHECK}"
    assert f"OK   {SAME_FS}" in lines
    assert any(line.startswith("OK   remote tools found:") and "b2sum" in line for line in lines)
    assert any("transfer command copies a test file into staging" in line for line in lines)
    assert any(line.startswith("OK   endpoint can run the commit") for line in lines)
    assert "OK   writers can be seen in the handoff buffer (read leases)" in lines
    assert any(line.startswith("OK   database commits are on disk") for line in lines)
    assert any(line.startswith("OK   ssh connections are shared (hdfmgr adds") for line in lines)
    assert len(lines) == 15
    assert site.staging.is_dir() and site.ep_buffer.is_dir()
    # The test transfer left nothing behind, and nothing ever reached the endpoint buffer.
    assert list(site.staging.iterdir()) == []
    assert list(site.ep_buffer.iterdir()) == []


def test_a_refused_key_fails_the_first_check(site: Site, sshd: SshServer) -> None:
    stranger = site.root / "stranger_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True, capture_output=True
    )
    site.configure(
        transfer=SCP_BATCH, remote=REMOTE, params=params(sshd, key=str(stranger)), verify="checksum"
    )

    rc, lines = doctor(site)

    assert rc == 1
    first = lines[0]
    assert first.startswith(f"FAIL {TRUE_CHECK}: exit status 255: ")
    assert "Permission denied" in first
    assert "-> the endpoint refused the login: install the public key" in first
    assert str(stranger) in first  # the command to try by hand
    # The remote checks say why they did not run; the local ones still ran.
    assert sum("not checked: the remote command does not work" in line for line in lines) == 6
    assert any(line.startswith("OK   holding ") for line in lines)


@pytest.fixture
def tmpfs_staging(site: Site) -> Iterator[Path]:
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(site.staging)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.fail(
            f"cannot mount a tmpfs on {site.staging} (the test needs root): {mount.stderr.strip()}",
            pytrace=False,
        )
    try:
        yield site.staging
    finally:
        subprocess.run(["umount", str(site.staging)], check=True, capture_output=True)


def test_staging_on_another_filesystem_fails_the_same_filesystem_check(
    site: Site, tmpfs_staging: Path
) -> None:
    assert os.stat(tmpfs_staging).st_dev != os.stat(site.ep_buffer).st_dev

    rc, lines = doctor(site)

    assert rc == 1
    bad = failures(lines)
    assert len(bad) == 1, "\n".join(lines)
    assert bad[0].startswith(f"FAIL {SAME_FS}: staging {tmpfs_staging} is on device ")
    assert "mv would copy, not rename atomically" in bad[0]
    assert "-> put endpoint.staging on the endpoint buffer's filesystem" in bad[0]


def test_missing_remote_b2sum_fails_in_checksum_mode(site: Site, sshd: SshServer) -> None:
    """A remote PATH with every tool but b2sum: fine for size mode, a FAIL for checksum mode."""
    bindir = site.root / "remote-bin"
    bindir.mkdir()
    for tool in ("sh", "true", "mv", "find", "sort", "comm", "cut", "xargs", "head", "tail", "cat", "tr",
                 "mkdir", "rm", "stat", "wc", "scp", "flock", "join", "cmp", "getconf", "grep",
                 "sync"):  # fmt: skip
        found = shutil.which(tool)
        assert found is not None, tool
        (bindir / tool).symlink_to(found)
    remote = REMOTE.replace('"{command}"', f'"env PATH={bindir} {{command}}"')
    site.configure(transfer=SCP_BATCH, remote=remote, params=params(sshd), verify="checksum")

    rc, lines = doctor(site)

    assert rc == 1
    bad = failures(lines)
    assert len(bad) == 1, "\n".join(lines)
    assert bad[0].startswith("FAIL remote tools found: ")
    assert ": not found on the remote PATH: b2sum -> install GNU coreutils" in bad[0]

    site.configure(transfer=SCP_BATCH, remote=remote, params=params(sshd), verify="size")
    rc, lines = doctor(site)
    assert rc == 0, "\n".join(lines)


def test_missing_holding_is_a_local_failure(site: Site) -> None:
    site.holding.rmdir()

    rc, lines = doctor(site)

    assert rc == 1
    assert failures(lines) == [
        f"FAIL holding {site.holding} is writable: no such directory -> create it "
        f"(mkdir -p {site.holding}) or fix handoff.holding"
    ]


def test_a_chatty_remote_shell_fails_the_first_check(site: Site, sshd: SshServer) -> None:
    """Output from the remote login shell breaks scp, sftp and rsync (hdfmgr's replies are framed)."""
    remote = REMOTE.replace('"{command}"', '"echo Welcome; {command}"')
    site.configure(transfer=SCP_BATCH, remote=remote, params=params(sshd))

    rc, lines = doctor(site)

    assert rc == 1
    assert lines[0] == (
        f"FAIL {TRUE_CHECK}: it printed 'Welcome\\n', which breaks scp, sftp and rsync through this "
        "account -> make the remote account's shell startup files print nothing for non-interactive "
        "shells"
    )


def test_an_rsync_transfer_command_is_not_measured(site: Site, sshd: SshServer) -> None:
    site.configure(transfer=RSYNC, remote=REMOTE, params=params(sshd))

    rc, lines = doctor(site)

    assert rc == 0, "\n".join(lines)
    assert all(line.startswith("OK   ") for line in lines), "\n".join(lines)
    assert "OK   transfer program rsync found" in lines
    assert lines[-1] == "OK   transfer command copies a test file into staging"
    assert len(lines) == 14


def test_one_scp_per_file_is_measured_the_same_way(site: Site, sshd: SshServer) -> None:
    site.configure(transfer=SCP_EACH, remote=REMOTE, params=params(sshd))

    rc, lines = doctor(site)

    assert rc == 0, "\n".join(lines)
    assert failures(lines) == []
    assert per_file_warning(lines)["label"] == "scp {file}"
    # The measurement's files went to a slot directory of its own, removed afterwards.
    assert list(site.staging.iterdir()) == []
    assert list(site.ep_buffer.iterdir()) == []


def test_a_failing_scp_is_reported_once(site: Site, sshd: SshServer) -> None:
    """The test transfer's FAIL says it; the cost per file is then not measured, nor warned about."""
    refused = SCP_BATCH.replace("-P {port}", "-P 1")  # nothing listens on port 1
    site.configure(transfer=refused, remote=REMOTE, params=params(sshd))

    rc, lines = doctor(site)

    assert rc == 1
    assert failures(lines) == [line for line in lines if "copies a test file" in line]
    assert len(failures(lines)) == 1
    assert warnings(lines) == []
    assert list(site.staging.iterdir()) == []
