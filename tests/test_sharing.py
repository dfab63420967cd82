"""Connection sharing added by hdfmgr (hdfmgr/sharing.py, general.share_connections).

The rewriting of templates without any ssh; the socket directory's checks; then the daemon
through a relay in front of the loopback sshd, counting the connections it opens.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from hdfmgr import sharing
from hdfmgr.config import ConfigError
from hdfmgr.templates import Template
from tests.delay_relay import DelayRelay, known_hosts_for
from tests.site import Site, content
from tests.ssh_templates import REMOTE, RSYNC, RSYNC_SHARED, params
from tests.sshd_fixture import SshServer

ADDED = sharing.options("/run/x", "t")


def rendered(text: str) -> list[str] | None:
    template = sharing.shared(Template.parse(text, {}), "/run/x", "t")
    return None if template is None else template.render(files=["/b/f"], dest="/s", command="C")


def test_ssh_scp_and_rsync_e_ssh_get_sharing_first_on_their_command_line() -> None:
    assert rendered('ssh -p 22 u@h "{command}"') == ["ssh", *ADDED, "-p", "22", "u@h", "C"]
    assert rendered("/usr/bin/scp -Bpq {batch} u@h:{dest}") == [
        "/usr/bin/scp",
        *ADDED,
        "-Bpq",
        "/b/f",
        "u@h:/s",
    ]
    rsh = "ssh " + " ".join(ADDED) + " -p 22 -i '/k y'"
    assert rendered('rsync -a -e "ssh -p 22 -i \'/k y\'" {batch} u@h:{dest}') == [
        "rsync", "-a", "-e", rsh, "/b/f", "u@h:/s",
    ]  # fmt: skip
    assert rendered("rsync -avze ssh {batch} h:{dest}") == [
        "rsync",
        "-avze",
        "ssh " + " ".join(ADDED),
        "/b/f",
        "h:/s",
    ]
    assert rendered('rsync -a --rsh="ssh -p 2" {batch} h:{dest}') == [
        "rsync", "-a", "--rsh=ssh " + " ".join(ADDED) + " -p 2", "/b/f", "h:/s",
    ]  # fmt: skip
    assert ADDED[3] == "ControlPath=/run/x/t-%C"


@pytest.mark.parametrize(
    "text",
    [
        'ssh -o ControlMaster=no h "{command}"',
        'ssh -S none h "{command}"',
        'ssh -oControlPath=/mine/%C h "{command}"',
        "scp -o controlpersist=5 {batch} h:{dest}",
        'rsync -a -e "ssh -o ControlMaster=auto -o ControlPath=/p" {batch} h:{dest}',
        'rsync -a -e "ssh -S /p" {batch} h:{dest}',
        "rsync -a {batch} h:{dest}",  # its shell may come from RSYNC_RSH: left alone
        'rsync -a -e "rsh" {batch} h:{dest}',
        "cp {batch} {dest}",
        'sh -c "{command}"',
    ],
)
def test_a_template_that_speaks_of_sharing_or_runs_no_ssh_is_left_alone(text: str) -> None:
    assert rendered(text) is None


def test_the_socket_directory_must_be_this_users_alone(tmp_path: Path) -> None:
    new = tmp_path / "new"
    assert sharing.unsafe(str(new)) is None
    assert (new.stat().st_mode & 0o777) == 0o700
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    assert "open to other users" in (sharing.unsafe(str(open_dir)) or "")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    assert "belongs to uid 65534" in (sharing.unsafe(str(theirs)) or "")
    link = tmp_path / "link"
    link.symlink_to(new)
    assert "not a directory" in (sharing.unsafe(str(link)) or "")
    assert "cannot create" in (sharing.unsafe(str(tmp_path / "no" / "such")) or "")


def test_the_directory_is_systemds_runtime_directory_when_there_is_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/hdfmgr")
    assert sharing.control_dir() == "/run/hdfmgr/ssh"
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert sharing.control_dir() == "/run/user/1000/hdfmgr-ssh"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/a/very/long/runtime/directory/for/a/socket/path")
    assert sharing.control_dir() == f"/tmp/hdfmgr-ssh-{os.getuid()}"


def test_an_unsafe_directory_means_no_sharing_and_validate_says_why(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    from hdfmgr import cli, config

    theirs = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short enough for socket paths
    request.addfinalizer(lambda: shutil.rmtree(theirs))
    (theirs / "ssh").mkdir(mode=0o700)
    os.chown(theirs / "ssh", 65534, 65534)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(theirs))
    site = Site(tmp_path / "site")
    site.configure(transfer="scp {batch} h:{dest}", remote='ssh h "{command}"')
    loaded = config.load(site.config_path)
    assert loaded.control_dir is None and "belongs to uid 65534" in (loaded.sharing_problem or "")
    assert loaded.transfer.render(files=["/f"], dest="/d") == ["scp", "/f", "h:/d"]
    assert cli.main(["validate", str(site.config_path)]) == 0
    assert f"  sharing   not added: {theirs}/ssh belongs to uid 65534" in capsys.readouterr().out
    site.configure(transfer="scp {batch} h:{dest}", remote='ssh h "{command}"', share_connections="yes")
    with pytest.raises(ConfigError, match=r"general\.share_connections"):
        config.load(site.config_path)


@pytest.mark.parametrize("share", [True, False])
def test_the_daemon_opens_one_connection_for_every_command_when_sharing(
    tmp_path: Path, sshd: SshServer, share: bool
) -> None:
    """rsync and the remote steps, one command each, no warm sessions: with the sharing hdfmgr
    adds, the first command's connection carries every later one."""
    with DelayRelay(sshd.port, 0.005) as relay:
        known = known_hosts_for(sshd.known_hosts, sshd.port, relay.port, tmp_path / "known_hosts")
        site = Site(tmp_path / "site")
        site.configure(
            transfer=RSYNC,
            remote=REMOTE,
            params=params(sshd, port=relay.port, known_hosts=str(known)),
            warm_sessions=False,
            share_connections=share,
            chunk_size=2,
            num_threads=1,
        )
        names = [f"d/f{i}.fits" for i in range(8)]
        site.write_many({rel: content(rel) for rel in names})
        result = site.hdfmgr("rescan", str(site.config_path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert set(site.delivered()) == set(names)
        batches = site.query("select count(*) from batches")[0][0]
        assert batches == 4
        if share:
            assert relay.connections == 1
        else:
            assert relay.connections >= 2 * batches  # a transfer and a commit each, at least


def test_a_template_with_its_own_sharing_keeps_it_and_none_is_added_to_the_other(
    tmp_path: Path, sshd: SshServer
) -> None:
    from hdfmgr import config

    site = Site(tmp_path / "site")
    site.configure(transfer=RSYNC_SHARED, remote=REMOTE, params=params(sshd, cpath=str(tmp_path / "cm-%C")))
    loaded = config.load(site.config_path)
    assert loaded.control_dir is None and loaded.sharing_problem is None
    argv = loaded.transfer.render(files=["/f"], dest="/d")
    assert sum("ControlPath" in word for word in argv) == 1 and str(tmp_path / "cm-%C") in " ".join(argv)
    assert not any("Control" in word for word in loaded.remote.render(command="C"))
