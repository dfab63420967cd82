"""How the endpoint programs travel: a constant bootstrap command line, the program and then
its data on one stdin; and the commit program under both dash and bash.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hdfmgr.endpoint import BOOTSTRAP, program
from tests.test_endpoint_script import HOSTILE, Site, listing, no_pwned, stage

SHELLS = [sh for sh in ("dash", "bash") if shutil.which(sh)]
READER = 'x=$(head -c 3); echo "got [$x]"; cat | wc -c'


def test_dash_sh_s_reads_ahead_so_data_cannot_follow_the_program() -> None:
    """Why not ``sh -s``: dash reads its script from a pipe in blocks, so a command in the
    script that reads stdin misses the data the shell already took (bash reads byte by byte)."""
    if "dash" not in SHELLS:
        pytest.fail("dash is not installed (Debian's /bin/sh; apt-get install dash)")
    out = subprocess.run(
        ["dash", "-s"], input=READER.encode() + b"\nXYZ" + b"Q" * 1000, capture_output=True
    ).stdout
    assert b"got [XYZ]" not in out


@pytest.mark.parametrize("shell", SHELLS)
def test_the_bootstrap_runs_the_program_and_leaves_it_the_data(shell: str) -> None:
    data = b"XYZ" + b"Q" * 100_000
    argv = [shell, "-c", BOOTSTRAP, "hdfmgr", str(len(READER)), "hdfmgr-test"]
    result = subprocess.run(argv, input=READER.encode() + data, capture_output=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"got [XYZ]\n100000\n"


@pytest.mark.parametrize("shell", SHELLS)
def test_a_program_cut_short_never_runs(shell: str, tmp_path: Path) -> None:
    """The bootstrap runs a program only when all of it arrived (exit 90 otherwise)."""
    text = f"touch {tmp_path}/ran"
    for cut in range(len(text)):
        argv = [shell, "-c", BOOTSTRAP, "hdfmgr", str(len(text)), "hdfmgr-test"]
        result = subprocess.run(argv, input=text[:cut].encode(), capture_output=True)
        assert result.returncode == 90, (cut, result)
        assert not (tmp_path / "ran").exists()


def test_the_programs_are_plain_ascii_posix_sh_without_nul() -> None:
    for name in ("commit.sh", "probe.sh"):
        text = program(name)
        assert text.isascii() and "\0" not in text and not text.endswith("\n")
        # dash (Debian's sh) parses it: syntax only, nothing runs.
        for shell in SHELLS:
            subprocess.run([shell, "-n", "-c", text], check=True)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("verify", ["size", "checksum"])
def test_the_commit_program_under_each_shell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shell: str, verify: str
) -> None:
    """The same program as ``sh`` = dash and ``sh`` = bash, hostile names, two directories."""
    monkeypatch.chdir(tmp_path)
    bin_dir = tmp_path / "shbin"
    bin_dir.mkdir()
    (bin_dir / "sh").symlink_to(shutil.which(shell))  # type: ignore[arg-type]
    site = Site(
        tmp_path / "site",
        verify=verify,
        remote=f'env PATH={bin_dir}:{os.environ["PATH"]} sh -c "{{command}}"',
    )
    slot = site.slot()
    files = []
    for i, name in enumerate(HOSTILE):
        data = f"{i}:".encode() + os.fsencode(name)
        f = site.local(f"{'ab'[i % 2]}/{name}", data)
        stage(slot, f.basename, data)
        files.append(f)
    result, report = site.endpoint.commit(slot, None, files, batch=1)
    assert result.ok, result.stderr
    assert report is not None and report.committed == set(HOSTILE)
    for d in "ab":
        assert listing(site.ep_buffer / d) == {
            os.fsencode(n): f"{i}:".encode() + os.fsencode(n)
            for i, n in enumerate(HOSTILE)
            if "ab"[i % 2] == d
        }
    assert os.listdir(slot) == []
    no_pwned(tmp_path)


@pytest.mark.parametrize("verify", ["size", "checksum"])
def test_a_csh_login_shell_parses_only_the_bootstrap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verify: str
) -> None:
    """The remote login shell is tcsh: it parses the one-line command (``ssh host "{command}"``
    hands it over as one string); the program and the hostile names never reach it."""
    tcsh = shutil.which("tcsh")
    if tcsh is None:
        pytest.fail("tcsh is not installed (scripts/test installs it: apt-get install tcsh)")
    monkeypatch.chdir(tmp_path)
    site = Site(tmp_path / "site", verify=verify, remote=f'{tcsh} -f -c "{{command}}"')
    slot = site.slot()
    files = []
    for i, name in enumerate(HOSTILE):
        data = f"{i}!".encode() + os.fsencode(name)
        f = site.local(f"night!/{name}", data)
        stage(slot, f.basename, data)
        files.append(f)
    result, report = site.endpoint.commit(slot, None, files, batch=3)
    assert result.ok, result.stderr
    assert report is not None and report.committed == set(HOSTILE)
    assert listing(site.ep_buffer / "night!") == {
        os.fsencode(n): f"{i}!".encode() + os.fsencode(n) for i, n in enumerate(HOSTILE)
    }
    found, requirements = site.endpoint.requirements()
    assert requirements is not None and requirements.problems(verify) == [], found.stderr
    no_pwned(tmp_path)
