"""Unit tests for hdfmgr.endpoint's remote scripts, run against a LOCAL endpoint.

The endpoint is a pair of directories on this machine, the transfer is ``cp {batch} {dest}``
and the remote command is ``sh -c "{command}"``: the scripts run exactly as they would after
ssh, through two shells, without a network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hdfmgr.config import Config, from_mapping
from hdfmgr.endpoint import (
    BEGIN,
    BOOTSTRAP,
    END,
    LIST_SCRIPT,
    PREPARE_SCRIPT,
    RECEIPT,
    RECEIPT_END,
    SWEEP_SCRIPT,
    CommitReport,
    Endpoint,
    ErrorClass,
    Receipt,
    Requirements,
    StagedFile,
    classify,
    commit_groups,
    commit_payload,
    parse_commit_output,
    program,
    recovered,
)
from hdfmgr.runner import CommandResult, run
from tests.site import slow_mv

HOSTILE = [
    "plain.fits",
    "with space.fits",
    "new\nline",
    "tab\there",
    "single'quote",
    'double"quote',
    "$(touch pwned)",
    "`touch pwned`",
    "a;touch pwned",
    "a|b&c",
    "-leading-dash",
    "--",
    "*",
    "{dest}",
    "back\\slash",
    "trailing space ",
    os.fsdecode(b"latin1-\xe9\xff"),
    "ünïcödé",
]


class Site:
    def __init__(
        self, root: Path, *, verify: str = "size", timeout: float = 30, remote: str = 'sh -c "{command}"'
    ) -> None:
        self.root = root
        self.buffer = root / "buffer"
        self.holding = root / "holding"
        self.ep_buffer = root / "endpoint" / "buffer"
        self.staging = root / "endpoint" / "staging"
        for d in (self.buffer, self.holding, self.ep_buffer, self.staging):
            d.mkdir(parents=True)
        self.config: Config = from_mapping(
            {
                "handoff": {"buffer": str(self.buffer), "holding": str(self.holding)},
                "endpoint": {
                    "buffer": str(self.ep_buffer),
                    "staging": str(self.staging),
                    "commands": {"transfer": "cp {batch} {dest}", "remote": remote},
                },
                "database": {"engine": "sqlite:///handoff.db"},
                "general": {"name": "t1", "verify": verify, "timeout": timeout},
            },
            path=root / "config.yaml",
        )
        self.endpoint = Endpoint(self.config, generation="g1")

    def local(self, rel: str, data: bytes) -> StagedFile:
        """A file in the handoff buffer, described as the endpoint should receive it."""
        path = Path(os.path.join(self.buffer, rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        checksum = hashlib.blake2b(data).hexdigest() if self.config.verify == "checksum" else None
        return StagedFile(rel, str(path), len(data), checksum)

    def slot(self, n: int = 0) -> str:
        slot = self.endpoint.slot_dir(n)
        result = self.endpoint.prepare(slot)
        assert result.ok, result.stderr
        return slot


def stage(slot: str, name: str, data: bytes) -> None:
    """Simulate the transfer of one file into the slot directory."""
    Path(os.path.join(slot, name)).write_bytes(data)


def staged_pair(site: Site) -> tuple[str, list[StagedFile]]:
    """Slot 0 holding good copies of d/a.fits and d/b.fits, as after their transfer."""
    slot = site.slot()
    files = [site.local(rel, rel.encode()) for rel in ("d/a.fits", "d/b.fits")]
    for f in files:
        stage(slot, f.basename, f.rel.encode())
    return slot, files


def listing(directory: Path | str) -> dict[bytes, bytes]:
    d = os.fsencode(directory)
    out = {}
    for name in os.listdir(d):
        with open(os.path.join(d, name), "rb") as f:
            out[name] = f.read()
    return out


def no_pwned(*roots: Path) -> None:
    for root in roots:
        hits = [p for p in root.rglob("*") if p.name == "pwned"]
        assert hits == [], f"a filename was executed: {hits}"


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Site:
    monkeypatch.chdir(tmp_path)  # anything a name might run would land here
    return Site(tmp_path)


@pytest.fixture
def checksum_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Site:
    monkeypatch.chdir(tmp_path)
    return Site(tmp_path, verify="checksum")


# --------------------------------------------------------------------------- layout and prepare


def test_slot_and_final_dirs(site: Site) -> None:
    ep = site.endpoint
    assert ep.slot_dir(0) == f"{site.staging}/hdfmgr.t1.g1.0"
    assert ep.slot_dir(3) == f"{site.staging}/hdfmgr.t1.g1.3"
    assert ep.final_dir("") == str(site.ep_buffer)
    assert ep.final_dir("a/b") == f"{site.ep_buffer}/a/b"
    assert ep.final_dir("./a//b/") == f"{site.ep_buffer}/a/b"


def test_random_generation_by_default(site: Site) -> None:
    a, b = Endpoint(site.config), Endpoint(site.config)
    assert a.generation != b.generation
    assert a.slot_dir(0) != b.slot_dir(0)


def test_remote_argv_is_the_remote_template_with_one_command(site: Site) -> None:
    argv = site.endpoint.remote_argv("echo hi", "a b")
    assert argv[:2] == ["sh", "-c"]
    assert len(argv) == 3


def test_probe(site: Site) -> None:
    assert site.endpoint.probe().ok


def test_the_start_up_probe_requires_a_sync_that_flushes_named_files(site: Site) -> None:
    """The commit flushes what it renames with ``sync -- NAMES`` (a power cut on the endpoint
    must not empty a delivered file): the probe says whether that sync works, and a sync that
    is missing or does not is a reason to refuse, named once."""
    result, found = site.endpoint.requirements()
    assert found is not None and found.sync == "ok", result.stderr
    assert found.problems("size") == []
    # Created by the probe's flock check, and only inspected by its sync check.
    assert os.listdir(site.staging) == []
    old = Requirements(flock="ok", sync="it ignores its file arguments (GNU coreutils >= 8.24 needed)")
    assert old.problems("size") == [f"sync -- FILE does not work ({old.sync})"]
    gone = Requirements(missing=("sync",), flock="ok", sync="missing")
    assert gone.problems("size") == ["not found on the remote PATH: sync"]
    assert Requirements(flock="ok").problems("size") == ["sync -- FILE does not work (not checked)"]


def test_prepare_creates_the_slot(site: Site) -> None:
    slot = site.endpoint.slot_dir(0)
    result = site.endpoint.prepare(slot)
    assert result.ok, result.stderr
    assert Path(slot).is_dir()
    # idempotent
    assert site.endpoint.prepare(slot).ok


def test_a_late_prepare_never_removes_what_a_later_batch_staged(site: Site) -> None:
    """A prepare whose command timed out can still start on the endpoint, later, while the
    slot already carries the next batch. If it replaced the slot directory (``rm -rf`` then
    ``mkdir``), that batch's staged copies would vanish, a listing after a lost commit reply
    would read their absence as "moved", and the files would be held undelivered; a commit
    holding the old directory's lock would not even hold up that listing. So prepare only
    creates: leftovers are the next commit's to delete (strays) or set aside (bad copies)."""
    slot = site.slot()
    stage(slot, "next-batch.fits", b"x")
    inode = os.stat(slot).st_ino
    assert site.endpoint.prepare(slot).ok
    assert os.listdir(slot) == ["next-batch.fits"]
    assert os.stat(slot).st_ino == inode


def test_prepare_creates_missing_staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    site = Site(tmp_path)
    shutil.rmtree(site.staging)
    slot = site.endpoint.slot_dir(0)
    assert site.endpoint.prepare(slot).ok
    assert Path(slot).is_dir()


# --------------------------------------------------------------------------- commit, size mode


def test_commit_moves_exactly_the_verified_files(site: Site) -> None:
    slot = site.slot()
    files = [site.local(f"night/{n}.fits", n.encode() * 100) for n in ("a", "b", "c")]
    for f in files:
        stage(slot, f.basename, Path(f.path).read_bytes())
    final = site.endpoint.final_dir("night")
    result, report = site.endpoint.commit(slot, final, files)
    assert result.ok, result.stderr
    assert report.committed == {"a.fits", "b.fits", "c.fits"}
    assert report.verified == report.committed
    assert report.remaining == set()
    assert listing(final) == {f.basename.encode(): Path(f.path).read_bytes() for f in files}
    assert os.listdir(slot) == []
    # the script's temporary files are gone too; its receipt stays beside the slot
    assert sorted(os.listdir(site.staging)) == ["hdfmgr.t1.g1.0", "hdfmgr.t1.g1.0" + RECEIPT]
    records = Path(slot + RECEIPT).read_bytes().split(b"\0")
    assert records[0] == b"" and records[-1] == b""  # no batch given
    assert sorted(records[1:-1]) == [b"Ia.fits", b"Ib.fits", b"Ic.fits", b"Ma.fits", b"Mb.fits", b"Mc.fits"]


def test_commit_into_the_buffer_root(site: Site) -> None:
    slot = site.slot()
    f = site.local("top.fits", b"top")
    stage(slot, "top.fits", b"top")
    result, report = site.endpoint.commit(slot, site.endpoint.final_dir(""), [f])
    assert result.ok, result.stderr
    assert report.committed == {"top.fits"}
    assert (site.ep_buffer / "top.fits").read_bytes() == b"top"


def test_commit_rejects_a_wrong_size(site: Site) -> None:
    slot = site.slot()
    good = site.local("d/good", b"good data")
    bad = site.local("d/bad", b"complete data")
    stage(slot, "good", b"good data")
    stage(slot, "bad", b"partial")  # a transfer that stopped early
    final = site.endpoint.final_dir("d")
    result, report = site.endpoint.commit(slot, final, [good, bad])
    assert result.ok, result.stderr
    assert report.committed == {"good"}
    assert report.verified == {"good"} and report.remaining == set()
    assert listing(final) == {b"good": b"good data"}
    # The partial copy leaves the slot (clean for the next batch; the retry sends it again) for
    # the place beside it that a listing after a lost reply reads as "not moved".
    assert listing(slot) == {}
    assert listing(slot + ".rejected") == {b"bad": b"partial"}
    result, present = site.endpoint.list_slots([slot])
    assert present == {slot: {"bad"}}, result.stderr
    # The slot's next commit starts by emptying it: that batch's outcome is known by then.
    again = site.local("d/again", b"again")
    stage(slot, "again", b"again")
    result, report = site.endpoint.commit(slot, final, [again])
    assert report is not None and report.committed == {"again"}, result.stderr
    assert not os.path.exists(slot + ".rejected")
    assert sorted(os.listdir(site.staging)) == [os.path.basename(slot), os.path.basename(slot) + RECEIPT]


def test_commit_reports_strays_and_ignores_missing(site: Site) -> None:
    slot = site.slot()
    f = site.local("d/expected", b"1234")
    missing = site.local("d/never-arrived", b"5678")
    stage(slot, "expected", b"1234")
    stage(slot, "stray", b"from an earlier batch")
    final = site.endpoint.final_dir("d")
    result, report = site.endpoint.commit(slot, final, [f, missing])
    assert result.ok, result.stderr
    assert report.committed == {"expected"}
    assert report.remaining == set()
    assert "never-arrived" not in report.verified | report.remaining
    assert listing(final) == {b"expected": b"1234"}
    assert listing(slot) == {}  # a stray never reaches the buffer; it is deleted


def test_commit_with_nothing_staged(site: Site) -> None:
    slot = site.slot()
    f = site.local("d/x", b"x")
    result, report = site.endpoint.commit(slot, site.endpoint.final_dir("d"), [f])
    assert report.committed == set() and report.remaining == set()
    assert not (site.ep_buffer / "d" / "x").exists()
    assert result.returncode == 0, result.stderr


def test_commit_hostile_names_round_trip(site: Site) -> None:
    slot = site.slot()
    files = []
    expected = {}
    for i, name in enumerate(HOSTILE):
        data = f"{i}:".encode() + os.fsencode(name)
        files.append(site.local(f"night/{name}", data))
        stage(slot, name, data)
        expected[os.fsencode(name)] = data
    final = site.endpoint.final_dir("night")
    result, report = site.endpoint.commit(slot, final, files)
    assert result.ok, result.stderr
    assert report.committed == set(HOSTILE)
    assert report.remaining == set()
    assert listing(final) == expected
    no_pwned(site.root)
    assert not Path("pwned").exists()


def test_commit_hostile_final_directory(site: Site) -> None:
    rel_dir = "we ird/$(touch pwned)/new\nline/-x/" + os.fsdecode(b"\xff")
    slot = site.slot()
    f = site.local(f"{rel_dir}/img", b"img")
    stage(slot, "img", b"img")
    final = site.endpoint.final_dir(rel_dir)
    result, report = site.endpoint.commit(slot, final, [f])
    assert result.ok, result.stderr
    assert report.committed == {"img"}
    assert Path(os.path.join(final, "img")).read_bytes() == b"img"
    no_pwned(site.root)


def test_transfer_and_commit_hostile_names(site: Site) -> None:
    """The real transfer command with ``{batch}``: absolute paths, nothing parsed by a shell."""
    slot = site.slot()
    files = [site.local(f"n/{name}", os.fsencode(name) * 3) for name in HOSTILE]
    argvs = site.endpoint.transfer_argvs(files, slot)
    assert len(argvs) == 1
    assert argvs[0] == ["cp", *(f.path for f in files), slot]
    result = site.endpoint.transfer(argvs[0])
    assert result.ok, result.stderr
    result, report = site.endpoint.commit(slot, site.endpoint.final_dir("n"), files)
    assert result.ok, result.stderr
    assert report.committed == set(HOSTILE)
    no_pwned(site.root)


def test_transfer_argvs_one_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    site = Site(tmp_path)
    config = from_mapping(
        {
            **site.config.raw,
            "endpoint": {
                **site.config.raw["endpoint"],
                "commands": {"transfer": "cp -- {file} {dest}/", "remote": 'sh -c "{command}"'},
            },
        },
        path=tmp_path / "config.yaml",
    )
    ep = Endpoint(config, generation="g1")
    files = [site.local("a", b"1"), site.local("b", b"2")]
    assert ep.transfer_argvs(files, "/s") == [
        ["cp", "--", files[0].path, "/s/"],
        ["cp", "--", files[1].path, "/s/"],
    ]


# --------------------------------------------------------------------------- commit, checksum mode


def test_checksum_mode_rejects_same_size_other_content(checksum_site: Site) -> None:
    site = checksum_site
    slot = site.slot()
    good = site.local("d/good", b"the right bytes")
    bad = site.local("d/bad", b"the right bytes")
    stage(slot, "good", b"the right bytes")
    stage(slot, "bad", b"the wrong bytes")  # same size: the size check would pass
    assert good.checksum == hashlib.blake2b(b"the right bytes").hexdigest()
    final = site.endpoint.final_dir("d")
    result, report = site.endpoint.commit(slot, final, [good, bad])
    assert result.ok, result.stderr
    assert report.committed == {"good"}
    assert report.remaining == set()
    assert listing(final) == {b"good": b"the right bytes"}
    assert listing(slot) == {}


def test_checksum_mode_hostile_names(checksum_site: Site) -> None:
    site = checksum_site
    slot = site.slot()
    files = []
    for name in HOSTILE:
        data = b"payload " + os.fsencode(name)
        files.append(site.local(f"c/{name}", data))
        stage(slot, name, data)
    final = site.endpoint.final_dir("c")
    result, report = site.endpoint.commit(slot, final, files)
    assert result.ok, result.stderr
    assert report.committed == set(HOSTILE)
    assert {os.fsdecode(n) for n in os.listdir(os.fsencode(final))} == set(HOSTILE)
    no_pwned(site.root)


# --------------------------------------------------------------------------- list_slots and sweep


def test_list_slots(site: Site) -> None:
    s0, s1 = site.slot(0), site.slot(1)
    missing = site.endpoint.slot_dir(2)
    for name in ("a", "new\nline", "-x", os.fsdecode(b"\xfe")):
        stage(s0, name, b"x")
    os.mkdir(os.path.join(s0, "subdir"))  # not a file: not listed
    result, present = site.endpoint.list_slots([s0, s1, missing])
    assert result.ok, result.stderr
    assert present == {s0: {"a", "new\nline", "-x", os.fsdecode(b"\xfe")}, s1: set()}
    assert missing not in present


def test_list_slots_with_no_slot_existing(site: Site) -> None:
    result, present = site.endpoint.list_slots([site.endpoint.slot_dir(0)])
    assert result.ok
    assert present == {}


def test_list_slots_skips_chatter_and_rejects_a_cut_reply(site: Site) -> None:
    s0 = site.slot(0)
    stage(s0, "a", b"x")
    record = (s0 + "/").encode()
    body = record + b"\0" + (s0 + "/a").encode() + b"\0"

    def replying(stdout: bytes) -> Endpoint:
        def run(argv: list[str], **kwargs: object) -> CommandResult:
            return CommandResult(tuple(argv), 0, stdout, b"", 0.0, 0.1)

        return Endpoint(site.config, generation="g1", run=run)

    _, present = replying(b"motd\n" + framed(body) + b"logout\n").list_slots([s0])
    assert present == {s0: {"a"}}
    _, present = replying(framed(body)[:-3]).list_slots([s0])
    assert present is None


def test_a_listing_waits_for_a_commit_still_moving_files(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit cut off from the daemon (ssh client killed or timed out) can still be moving
    files on the endpoint when the daemon lists the slot to learn what it moved. The listing
    must wait for it: reading a file not yet moved as "not moved" would send it again."""
    slot = site.slot()
    files = [site.local(rel, rel.encode()) for rel in ("d1/a.fits", "d1/b.fits", "d2/c.fits")]
    for f in files:
        stage(slot, f.basename, f.rel.encode())
    started = tmp_path / "mv-started"
    monkeypatch.setenv("PATH", f"{slow_mv(tmp_path / 'shims', 0.5, started)}{os.pathsep}{os.environ['PATH']}")
    committed: list[tuple[CommandResult, CommitReport | None]] = []
    commit = threading.Thread(target=lambda: committed.append(site.endpoint.commit(slot, None, files)))
    commit.start()
    deadline = time.monotonic() + 20
    while not started.exists():
        assert time.monotonic() < deadline, "the commit's first mv never started"
        time.sleep(0.01)
    result, present = site.endpoint.list_slots([slot])  # while the first mv waits
    moved = {str(p.relative_to(site.ep_buffer)) for p in site.ep_buffer.rglob("*") if p.is_file()}
    commit.join(20)
    assert result.ok, result.stderr
    assert present == {slot: set()}, "listed before the commit had moved every file"
    assert moved == {f.rel for f in files}
    assert (
        committed
        and committed[0][1] is not None
        and committed[0][1].committed == {"a.fits", "b.fits", "c.fits"}
    )


def test_a_listing_gives_up_on_a_slot_locked_for_too_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that hangs on the endpoint holds its slot: the listing fails (the daemon
    retries later, the files wait) with a line that says why, before the command's timeout."""
    monkeypatch.chdir(tmp_path)
    site = Site(tmp_path / "site", timeout=4)
    slot = site.slot()
    stage(slot, "a.fits", b"x")
    holder = subprocess.Popen(["flock", slot, "sleep", "30"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["flock", "-n", slot, "true"]).returncode == 0:
            assert time.monotonic() < deadline, "the lock was never taken"
            time.sleep(0.01)
        t0 = time.monotonic()
        result, present = site.endpoint.list_slots([slot])
        waited = time.monotonic() - t0
    finally:
        os.killpg(holder.pid, 9)
        holder.wait()
    assert present is None
    assert not result.timed_out and result.returncode == 1  # its own failure, not the timeout's
    assert b"a commit still holds it after 2.0 s" in result.stderr
    assert waited > 1.9


def test_without_flock_a_commit_moves_nothing_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint without util-linux's flock: a commit cannot lock its slot, so it moves
    nothing and says why (status 92), never read as a lost reply; ``run`` refuses such an
    endpoint at start (the probe). Listings still run, unlocked."""
    monkeypatch.chdir(tmp_path)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tools = (
        "sh",
        "mv",
        "find",
        "sort",
        "comm",
        "cut",
        "xargs",
        "head",
        "tail",
        "mkdir",
        "rm",
        "printf",
        "sync",
    )
    for tool in (*tools, "cat", "cmp", "join", "tr"):
        found = shutil.which(tool)
        assert found is not None, tool
        (bindir / tool).symlink_to(found)
    site = Site(tmp_path / "site", remote=f'env PATH={bindir} sh -c "{{command}}"')
    slot, files = staged_pair(site)
    result, present = site.endpoint.list_slots([slot], fences={slot: 3})
    assert result.ok, result.stderr
    assert present == {slot: {"a.fits", "b.fits"}}
    result, report = site.endpoint.commit(slot, None, files, batch=4)
    assert result.returncode == 92, result.stderr
    assert report is not None and report.aborted is not None and report.aborted[0] == 92
    assert report.committed == set()
    assert listing(site.ep_buffer) == {}
    assert sorted(os.listdir(slot)) == ["a.fits", "b.fits"]


def test_a_listing_fences_off_the_batches_it_decides(site: Site) -> None:
    """A commit whose remote shell starts only after the listing of its slot (its client died
    long before) must move nothing: the listing has already decided that its files are to be
    sent again. The listing leaves the batch number beside the slot; such a commit stops."""
    slot, files = staged_pair(site)
    result, present = site.endpoint.list_slots([slot], fences={slot: 7})
    assert result.ok, result.stderr
    assert present == {slot: {"a.fits", "b.fits"}}
    assert Path(slot + ".fence").read_text() == "7\n"
    for late in (6, 7):
        result, report = site.endpoint.commit(slot, None, files, batch=late)
        assert result.returncode == 95 and report is not None and report.aborted is not None
        assert report.aborted[0] == 95 and report.committed == set()
        assert f"batch {late}: too late, its slot was listed for batch 7".encode() in result.stderr
        assert sorted(os.listdir(slot)) == ["a.fits", "b.fits"]
        assert listing(site.ep_buffer) == {}
    # A later batch of the slot, and a listing that decides nothing, are not held up.
    result, present = site.endpoint.list_slots([slot])
    assert result.ok and present == {slot: {"a.fits", "b.fits"}}
    assert Path(slot + ".fence").read_text() == "7\n"
    result, report = site.endpoint.commit(slot, None, files, batch=8)
    assert result.ok, result.stderr
    assert report is not None and report.committed == {"a.fits", "b.fits"}


def test_list_slots_failure_gives_none(site: Site) -> None:
    def failing(argv: list[str], **kwargs: object) -> CommandResult:
        return CommandResult(tuple(argv), 255, b"", b"ssh: connect: refused", 0.0, 0.1)

    ep = Endpoint(site.config, generation="g1", run=failing)
    result, present = ep.list_slots([ep.slot_dir(0)])
    assert not result.ok
    assert present is None


def test_sweep_removes_only_this_instances_old_generations(site: Site) -> None:
    staging = site.staging
    old_slot = staging / "hdfmgr.t1.g0.0"
    old_slot.mkdir()
    (old_slot / "partial").write_bytes(b"x")
    (staging / "hdfmgr.t1.g0.0.want").write_bytes(b"x")
    (staging / "hdfmgr.t1.older.3").mkdir()
    current = Path(site.slot(0))
    (current / "keep").write_bytes(b"x")
    (staging / "hdfmgr.t1.g1.0.want").write_bytes(b"current temp file")
    (staging / "hdfmgr.t1.g10.0").mkdir()  # another generation whose name starts like ours
    (staging / "hdfmgr.other.g0.0").mkdir()  # another instance sharing the staging area
    (staging / "hdfmgr.t1-2.g0.0").mkdir()
    (staging / "unrelated").mkdir()
    result = site.endpoint.sweep()
    assert result.ok, result.stderr
    assert sorted(os.listdir(staging)) == sorted(
        ["hdfmgr.t1.g1.0", "hdfmgr.t1.g1.0.want", "hdfmgr.other.g0.0", "hdfmgr.t1-2.g0.0", "unrelated"]
    )
    assert (current / "keep").exists()


def test_sweep_on_missing_staging_is_harmless(site: Site) -> None:
    shutil.rmtree(site.staging)
    assert site.endpoint.sweep().ok


# --------------------------------------------------------------------------- pure helpers


def framed(body: bytes) -> bytes:
    """A reply as the scripts write it: begin record, NUL-separated records, end record."""
    return b"\0" + BEGIN.encode() + b"\0" + body + END.encode() + b"\0"


def test_parse_commit_output() -> None:
    report = parse_commit_output(framed(b"V3\0Ka\0Kb c\0Kd\0Ma\0Mb c\0Ed\0"))
    assert report is not None
    assert report.verified == {"a", "b c", "d"}
    assert report.committed == {"a", "b c"}
    assert report.exists == {"d"}
    assert report.remaining == {"d"}
    assert report.unreported == set()


def test_parse_commit_output_only_a_reported_rename_is_a_delivery() -> None:
    """Verified names without an M record are not committed: E, G, F, U, or no record."""
    body = b"V3\0Ka\0Kb\0Kc\0Kd\0Ke\0Ma\0Eb\0Gc\0Fd\0"
    report = parse_commit_output(framed(body))
    assert report is not None and report.committed == {"a"}
    assert (report.exists, report.gone, report.failed) == ({"b"}, {"c"}, {"d"})
    assert report.unreported == {"e"}  # the move step broke off before it: unknown


def test_parse_commit_output_abort() -> None:
    report = parse_commit_output(framed(b"V3\0X98 b2sum failed (missing)\0"))
    assert report is not None and report.aborted == (98, "b2sum failed (missing)")
    assert report.committed == set()


def test_parse_commit_output_edge_cases() -> None:
    assert parse_commit_output(framed(b"V3\0")) == CommitReport(version="3")
    report = parse_commit_output(framed(b"V3\0Knew\nline\0K\xff\xfe\0"))
    assert report is not None and report.verified == {"new\nline", os.fsdecode(b"\xff\xfe")}
    # Another version's reply, or a record this version does not write, is not understood.
    assert parse_commit_output(framed(b"V1\0Ma\0")) is None
    assert parse_commit_output(framed(b"V2\0Ma\0")) is None  # an older program: not this reply
    assert parse_commit_output(framed(b"V3\0Qa\0")) is None
    assert parse_commit_output(framed(b"")) is None


def test_parse_commit_output_skips_what_a_login_shell_prints() -> None:
    """Text from the remote shell's startup (or logout) files around the reply is not a name."""
    chatty = b"Welcome to the data facility\nmodule loaded" + framed(b"V3\0Ka\0Ma\0") + b"bye\n"
    report = parse_commit_output(chatty)
    assert report is not None and report.committed == {"a"}


def test_parse_commit_output_cut_short_is_unknown() -> None:
    """A reply without its end (a dropped connection, a timeout) says nothing was moved or not."""
    whole = framed(b"V3\0Ka\0Kb\0Ma\0Mb\0")
    for cut in range(len(whole) - 1):
        assert parse_commit_output(whole[:cut]) is None, whole[:cut]
    assert parse_commit_output(b"") is None
    assert parse_commit_output(b"a\0/\0") is None  # the unframed format of older versions


def test_commit_payload_size_mode() -> None:
    files = [StagedFile("d/a", "/b/d/a", 10), StagedFile("d/new\nline", "/b/d/new\nline", 0)]
    data, records, plans = commit_payload([("/ep/buffer/d", files)], "size", "/st/slot")
    # The records sorted bytewise (as LC_ALL=C sort -z), then name/final dir, then the slot.
    assert (records, plans) == (2, 2)
    assert data == (
        b"0/new\nline\x0010/a\x00" + b"a//ep/buffer/d\x00new\nline//ep/buffer/d\x00" + b"/st/slot/\x00"
    )


def test_commit_payload_several_directories() -> None:
    one = [StagedFile("x/b", "/b/x/b", 2), StagedFile("x/a", "/b/x/a", 1)]
    two = [StagedFile("y/c", "/b/y/c", 3)]
    data, records, plans = commit_payload([("/ep/x", one), ("/ep/y", two)], "size", "/s")
    assert (records, plans) == (3, 3)
    assert data == b"1/a\0" + b"2/b\0" + b"3/c\0" + b"b//ep/x\0a//ep/x\0c//ep/y\0" + b"/s/\0"


def test_commit_payload_checksum_mode() -> None:
    digest = hashlib.blake2b(b"x").hexdigest()
    name = os.fsdecode(b"d/\xff")
    data, records, _ = commit_payload([("/f", [StagedFile(name, "/b/" + name, 1, digest)])], "checksum", "/s")
    assert records == 1
    assert data == digest.encode() + b"  \xff\0" + b"\xff//f\0" + b"/s/\0"
    assert len(digest) == 128  # the program cuts names at byte 131


def test_commit_payload_checksum_required() -> None:
    with pytest.raises(ValueError, match="no checksum"):
        commit_payload([("/f", [StagedFile("a", "/b/a", 1)])], "checksum", "/s")


def test_commit_payload_non_utf8_final_dir() -> None:
    final = os.fsdecode(b"/ep/\xff")
    f = StagedFile("a", "/b/a", 1)
    assert commit_payload([(final, [f])], "size", "/s") == (b"1/a\0a//ep/\xff\0/s/\0", 1, 1)


def test_commit_names_like_the_scripts_own_words(site: Site) -> None:
    """The move step evals only argument numbers: names that look like them stay names."""
    slot = site.slot()
    names = ["D", "${1}", '"${2}"', "$t", "$l", "-t", "x\\", "*"]
    files = []
    for name in names:
        files.append(site.local(f"d/{name}", os.fsencode(name)))
        stage(slot, name, os.fsencode(name))
    result, report = site.endpoint.commit(slot, None, files)
    assert result.ok, result.stderr
    assert report.committed == set(names)
    assert listing(site.ep_buffer / "d") == {os.fsencode(n): os.fsencode(n) for n in names}
    no_pwned(site.root)


def test_commit_many_directories_and_files(site: Site) -> None:
    """A full batch over many directories: every file lands in its own directory."""
    slot = site.slot()
    files = []
    for d in range(25):
        for i in range(40):
            rel = f"night{d:02d}/img{d:02d}_{i:03d}.fits"
            data = rel.encode() * 5
            files.append(StagedFile(rel, "/unused/" + rel, len(data)))
            stage(slot, os.path.basename(rel), data)
    result, report = site.endpoint.commit(slot, None, files)
    assert result.ok, result.stderr
    assert len(report.committed) == 1000 and report.remaining == set()
    for f in files:
        assert (site.ep_buffer / f.rel).read_bytes() == f.rel.encode() * 5
    assert os.listdir(slot) == []


def test_commit_unwritable_final_directory(site: Site) -> None:
    """A directory that cannot be created: its file is reported not moved (F); the other
    directory still moves."""
    slot = site.slot()
    (site.ep_buffer / "blocked").write_bytes(b"a file where a directory should be")
    bad = StagedFile("blocked/a", "/unused/blocked/a", 1)
    good = StagedFile("ok/b", "/unused/ok/b", 1)
    stage(slot, "a", b"1")
    stage(slot, "b", b"2")
    result, report = site.endpoint.commit(slot, None, [bad, good])
    assert result.ok, result.stderr
    assert report.committed == {"b"}
    assert report.failed == {"a"} and report.remaining == {"a"}
    assert (site.ep_buffer / "ok" / "b").read_bytes() == b"2"


def test_commit_into_several_directories_in_one_command(site: Site) -> None:
    """A batch spanning directories: one flat slot, one remote command, each file home."""
    slot = site.endpoint.slot_dir(0)
    assert site.endpoint.prepare(slot).ok
    files = []
    for rel in ("a/one.fits", "b/c/two.fits", "top.fits", os.fsdecode(b"odd\xff dir/three\nfits")):
        data = rel.encode("utf-8", "surrogateescape") * 3
        (Path(slot) / os.path.basename(rel)).write_bytes(data)
        files.append(StagedFile(rel, "/unused/" + rel, len(data)))
    files.append(StagedFile("b/missing.fits", "/unused/b/missing.fits", 5))
    result, report = site.endpoint.commit(slot, None, files)
    assert result.ok, result.stderr
    assert report.committed == {"one.fits", "two.fits", "top.fits", os.fsdecode(b"three\nfits")}
    for f in files[:-1]:
        final = os.path.join(os.fsencode(site.ep_buffer), os.fsencode(f.rel))
        with open(final, "rb") as delivered:
            assert delivered.read() == f.rel.encode("utf-8", "surrogateescape") * 3
    assert not os.listdir(slot)


def test_staged_file_basename() -> None:
    assert StagedFile("a/b/c.fits", "/x/a/b/c.fits", 1).basename == "c.fits"
    assert StagedFile("c.fits", "/x/c.fits", 1).basename == "c.fits"


@pytest.mark.parametrize(
    ("returncode", "timed_out", "expected"),
    [
        (255, False, ErrorClass.TRANSPORT),
        (1, False, ErrorClass.REMOTE),
        (124, True, ErrorClass.TIMEOUT),
        (255, True, ErrorClass.TIMEOUT),
        (-9, False, ErrorClass.REMOTE),
    ],
)
def test_classify(returncode: int, timed_out: bool, expected: str) -> None:
    result = CommandResult(("x",), returncode, b"", b"", 0.0, 1.0, timed_out)
    assert classify(result) == expected


def test_sweep_creates_the_given_slot_directories(site: Site) -> None:
    old = site.staging / "hdfmgr.t1.g0.1"
    old.mkdir()
    slots = [site.endpoint.slot_dir(0), site.endpoint.slot_dir(1)]
    result = site.endpoint.sweep(slots)
    assert result.ok, result.stderr
    assert not old.exists()
    assert all(Path(slot).is_dir() for slot in slots)
    assert sorted(os.listdir(site.staging)) == ["hdfmgr.t1.g1.0", "hdfmgr.t1.g1.1"]


def cut_after(n: int) -> Callable[..., CommandResult]:
    """The runner, with the command's stdin cut after ``n`` bytes (end-of-file there)."""

    def cut_short(argv: list[str], *, stdin: bytes | None = None, **kw: object) -> CommandResult:
        return run(argv, stdin=stdin[:n] if stdin is not None else None, **kw)  # type: ignore[arg-type]

    return cut_short


@pytest.mark.parametrize("verify", ["size", "checksum"])
def test_a_commit_whose_input_is_cut_never_moves_a_file_astray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verify: str
) -> None:
    """The connection drops while the names are still on their way (or the daemon is killed):
    the remote script gets end-of-file early. Cut at every byte, each staged file must be
    left in staging (sent again later) or be whole at its own final path: never moved into
    another file's directory, never deleted. ``a.fits`` is a prefix of ``a.fits.x``, which
    is planned first, into another directory."""
    monkeypatch.chdir(tmp_path)
    rels = ["d1/a.fits.x", "d1/b.fits", "d2/a.fits"]
    root = tmp_path / "site"  # one path for every cut, so that the stream is the same bytes
    probe = Site(root, verify=verify)
    files = [probe.local(rel, rel.encode() * 7) for rel in rels]
    payload, _, _ = commit_payload(
        commit_groups(files, probe.endpoint.final_dir), verify, probe.endpoint.slot_dir(0)
    )
    text = program("commit.sh").encode()
    full = text + payload
    # The program itself is checked whole by the bootstrap (its length): a sample of cuts in
    # it; every cut in the data.
    for cut in [*range(0, len(text), 509), *range(len(text), len(full))]:
        shutil.rmtree(root)
        site = Site(root, verify=verify)
        staged = [site.local(rel, rel.encode() * 7) for rel in rels]

        site.endpoint = Endpoint(site.config, generation="g1", run=cut_after(cut))
        slot = site.slot()
        for f in staged:
            stage(slot, f.basename, Path(f.path).read_bytes())
        site.endpoint.commit(slot, None, staged)
        for f in staged:
            final = site.ep_buffer / f.rel
            in_slot = (Path(slot) / f.basename).exists()
            assert in_slot != final.exists(), (cut, f.rel, in_slot)
            if final.exists():
                assert final.read_bytes() == f.rel.encode() * 7
        delivered = {str(p.relative_to(site.ep_buffer)) for p in site.ep_buffer.rglob("*") if p.is_file()}
        assert delivered <= set(rels), (cut, delivered)


def test_the_remote_scripts_survive_a_csh_login_shell() -> None:
    """One line, no '!': a tcsh login shell (an endpoint account's may be one) expands '!'
    even inside single quotes and cannot take a newline inside them."""
    for script in (BOOTSTRAP, LIST_SCRIPT, SWEEP_SCRIPT, PREPARE_SCRIPT):
        assert "!" not in script and "\n" not in script


def test_a_staged_file_deleted_after_a_lost_reply_is_sent_again_not_taken_as_moved(site: Site) -> None:
    """The commit's reply is lost, so a listing decides what it did. A staged copy the commit
    did not rename (its final name was taken) and that a tmp cleaner deleted before the
    listing is gone from the slot, but it was never delivered: only the slot's receipt, which
    the commit writes as it renames, is evidence of a move. Absence is unknown: send again."""
    slot, files = staged_pair(site)
    (site.ep_buffer / "d").mkdir()
    (site.ep_buffer / "d" / "b.fits").write_bytes(b"an earlier version, not ingested yet")
    result, report = site.endpoint.commit(slot, None, files, batch=5)
    assert result.ok, result.stderr
    assert report is not None and report.committed == {"a.fits"} and report.exists == {"b.fits"}
    os.unlink(os.path.join(slot, "b.fits"))  # the cleaner, in the window before the listing
    result, present = site.endpoint.list_slots([slot], fences={slot: 5})
    assert result.ok, result.stderr
    assert present == {slot: set()}
    decided = recovered([("d/a.fits", 5), ("d/b.fits", 5)], present[slot], present.receipts.get(slot))
    assert decided.moved == ["d/a.fits"]
    assert decided.resend == ["d/b.fits"]
    assert decided.unknown == ["d/b.fits"]


def test_only_the_receipt_of_a_files_own_batch_proves_its_move(site: Site) -> None:
    """A receipt belongs to the latest commit of its slot: one of another batch proves nothing
    about this batch's files, and a commit stopped by the fence leaves it as it was."""
    slot, files = staged_pair(site)
    result, report = site.endpoint.commit(slot, None, files[:1], batch=3)
    assert result.ok and report is not None and report.committed == {"a.fits"}
    result, present = site.endpoint.list_slots([slot], fences={slot: 4})
    assert result.ok and present is not None
    a = frozenset({"a.fits"})
    assert present.receipts[slot] == Receipt(3, moved=a, intended=a, settled=a)
    result, report = site.endpoint.commit(slot, None, files[1:], batch=4)
    assert result.returncode == 95  # fenced off: renames nothing, leaves the receipt alone
    assert Path(slot + RECEIPT).read_bytes() == b"3\0Ia.fits\0Ma.fits\0"
    decided = recovered([("d/a.fits", 4), ("d/b.fits", 4)], {"b.fits"}, present.receipts[slot])
    assert (decided.moved, decided.resend, decided.unknown) == ([], ["d/a.fits", "d/b.fits"], ["d/a.fits"])
    # The next commit of the slot replaces the receipt before it renames anything.
    stage(slot, "b.fits", b"d/b.fits")  # sent again (the commit of batch 3 took it for a stray)
    result, report = site.endpoint.commit(slot, None, files[1:], batch=6)
    assert result.ok and report is not None and report.committed == {"b.fits"}
    assert Path(slot + RECEIPT).read_bytes() == b"6\0Ib.fits\0Mb.fits\0"


def test_a_commit_that_cannot_write_its_receipt_renames_nothing(site: Site) -> None:
    slot, files = staged_pair(site)
    os.mkdir(slot + RECEIPT)  # not writable as a file
    result, report = site.endpoint.commit(slot, None, files, batch=2)
    assert result.returncode == 94, result.stderr
    assert report is not None and report.aborted is not None and report.aborted[0] == 94
    assert report.committed == set() and listing(site.ep_buffer) == {}
    assert sorted(os.listdir(slot)) == ["a.fits", "b.fits"]


def test_a_receipt_record_cut_short_is_no_evidence(site: Site) -> None:
    """A name the commit could not finish writing into the receipt (a full disk) proves
    nothing; nor does a receipt the listing's reply does not bring whole."""
    s0 = site.slot(0)
    receipt = (s0 + RECEIPT + "/").encode()

    def replying(stdout: bytes) -> Endpoint:
        def run(argv: list[str], **kwargs: object) -> CommandResult:
            return CommandResult(tuple(argv), 0, stdout, b"", 0.0, 0.1)

        return Endpoint(site.config, generation="g1", run=run)

    head = (s0 + "/").encode() + b"\0" + receipt + b"\0"
    end = b"\0" + RECEIPT_END.encode() + b"\0"
    a = frozenset({"a.fits"})
    _, present = replying(framed(head + b"4\0Ia.fits\0Ma.fits\0Mb.fi" + end)).list_slots([s0])
    assert present is not None and present == {s0: set()}
    assert present.receipts == {s0: Receipt(4, moved=a, intended=a, settled=a)}
    _, present = replying(framed(head + b"4\0Ia.fits\0Ma.fits\0" + end)).list_slots([s0])
    assert present is not None and present.receipts == {s0: Receipt(4, moved=a, intended=a, settled=a)}
    _, present = replying(framed(head + b"4\0Ma.fits\0")).list_slots([s0])
    assert present is None
    _, present = replying(framed(head + end)).list_slots([s0])
    assert present is not None and present.receipts == {s0: Receipt(None)}


def test_a_commit_killed_inside_its_mv_leaves_evidence_of_what_it_took() -> None:
    """Killed between the rename and the outcome record (the warm session or the whole process
    session killed), the receipt holds the name's I record without an outcome: a copy gone
    from staging then was taken by that mv; one still staged was not."""
    intended = Receipt(5, intended=frozenset({"a.fits", "b.fits"}))
    entries = [("d/a.fits", 5), ("d/b.fits", 5)]
    decided = recovered(entries, {"b.fits"}, intended)
    assert (decided.moved, decided.resend, decided.unknown) == (["d/a.fits"], ["d/b.fits"], [])
    # Once an outcome was written, only M counts; another batch's receipt proves nothing.
    settled = Receipt(5, intended=frozenset({"a.fits"}), settled=frozenset({"a.fits"}))
    assert recovered(entries[:1], set(), settled).unknown == ["d/a.fits"]
    assert recovered([("d/a.fits", 6)], set(), intended).unknown == ["d/a.fits"]
    assert recovered(entries[:1], None, intended).unknown == ["d/a.fits"]  # no slot directory
