"""Soak: a steady random flow for N minutes with random kills and outages, then the invariants.

Not part of the test suite. Usage (through the wrapper, which sets up the virtualenv)::

    scripts/soak --minutes 10 [--rate 20] [--seed 1] [--workdir DIR] [--ssh]

By default the endpoint is local, reached through wrapper commands that can play an outage
(exit 255 as ssh does) while a flag file exists; a remote command during which an outage
begins loses its reply after doing its work, as over a connection that drops mid-commit.
With ``--ssh`` the endpoint is a real sshd on 127.0.0.1, reached with rsync over one shared
connection (the recommended transport): an outage stops sshd and starts it again on the same
port, a dropped connection kills sshd's connection processes, whatever they were doing (a
transfer, a commit whose reply is then lost, the shared master's session), and a corrupt copy
is made by the endpoint's rsync (``--rsync-path``: a wrapper that appends a byte to one file it
received).

A consumer ingests and removes each file the instant it appears, as the endpoint manager does,
checking every byte. Faults, at random moments: kill -9 of the daemon's whole session (then a
restart), outages of random length, dropped replies or connections, a staged copy that
arrives corrupt, and (local endpoint) a flaky link: for a while, 2 of every 3 transfer calls
fail as a dropped connection does (exit 255), the link's fault and never the files'.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hdfmgr.endpoint import FENCE, RECEIPT, RECEIVED, REJECTED
from tests.site import Consumer, Site, content, wait_for
from tests.ssh_templates import REMOTE_SHARED, RSYNC_SHARED, params
from tests.sshd_fixture import SshServer, drop_connections, restart_sshd, start_sshd

NAME_PARTS = ["img", "flat field", "bias'q", 'dark"x', "$(x)", "-lead", "tab\tx", "ü", "semi;c"]


def make_name(rng: random.Random, i: int) -> str:
    night = f"night{i // 500:03d}"
    part = rng.choice(NAME_PARTS)
    return f"{night}/{part}-{i:06d}.fits"


def write_file(site: Site, rel: str, rng: random.Random) -> None:
    data = content(rel)
    roll = rng.random()
    if roll < 0.02:
        data = data * 50  # an occasional large file (up to ~13 MB)
    elif roll < 0.05:
        data = b""
    site.write(rel, data)
    EXPECTED[rel] = data


EXPECTED: dict[str, bytes] = {}

#: Daemon settings of every soak: small batches and quick retries, so that faults land often.
GENERAL = {
    "chunk_size": 50,
    "retry_initial": 0.5,
    "retry_max": 5.0,
    "breaker_threshold": 3,
    "timeout": 30,
}


class LocalEndpoint:
    """A local endpoint behind a wrapper command that plays outages, dropped replies and
    corrupt copies."""

    def __init__(self, site: Site) -> None:
        root = site.root
        self.down = root / "endpoint-down"
        self.drop = root / "drop-next-commit-reply"
        self.corrupt = root / "corrupt-next-copy"
        self.flaky_flag = root / "link-flaky"
        self.calls = root / "flaky-calls"
        self.calls.write_text("0")
        wrapper = root / "endpoint-cmd"
        wrapper.write_text(
            "#!/bin/sh\n"
            f"if [ -e {self.down} ]; then echo 'ssh: connect to host endpoint: Connection timed out' >&2; "
            "exit 255; fi\n"
            # A flaky link: 2 of every 3 transfer calls fail (counted under a lock; the count is
            # replaced by a rename, so that flaky_calls never reads it half-written: a read
            # between the truncation and the write reported a phase of 0 calls).
            f'if [ "$1" != --remote ] && [ -e {self.flaky_flag} ]; then exec 9>>{self.calls}.lock; flock 9\n'
            f"  n=$(($(cat {self.calls}) + 1)); echo $n > {self.calls}.new\n"
            f"  mv {self.calls}.new {self.calls}\n"
            "  flock -u 9; exec 9>&-\n"
            '  if [ $((n % 3)) -ne 0 ]; then echo "connection reset by peer" >&2; exit 255; fi; fi\n'
            # An outage that begins while a remote command runs drops its reply: the script did
            # its work, the daemon gets exit 255 and no answer (a connection lost mid-commit).
            f'if [ "$1" = --remote ] && [ -e {self.drop} ] && echo "$2" | grep -q "hdfmgr-commit"; then\n'
            f'  rm -f {self.drop}; sh -c "$2" >/dev/null; echo "ssh: connection reset" >&2; exit 255; fi\n'
            'if [ "$1" = --remote ]; then out=$(mktemp); sh -c "$2" > "$out"; rc=$?\n'
            f"  if [ -e {self.down} ]; then rm -f \"$out\"; echo 'ssh: connection reset' >&2; exit 255; fi\n"
            '  cat "$out"; rm -f "$out"; exit $rc; fi\n'
            # A staged copy that arrives corrupt (verification sets it aside; it is sent again).
            'cp "$@" || exit\n'
            f"if [ -e {self.corrupt} ]; then rm -f {self.corrupt}; "
            'for d; do :; done; printf x >> "$d/${1##*/}"; fi\n'
        )
        wrapper.chmod(0o755)
        site.configure(
            transfer=f"{wrapper} {{batch}} {{dest}}",
            remote=f"{wrapper} --remote {{command}}",
            logging={"level": "INFO"},
            **GENERAL,
        )

    def drop_reply(self) -> str:
        self.drop.touch()  # the next commit does its work and loses its reply
        return "commit reply dropped"

    def corrupt_copy(self) -> str | None:
        self.corrupt.touch()
        return "next staged copy corrupted"

    def go_down(self) -> None:
        self.down.touch()

    def flaky(self, on: bool) -> bool:
        """A link that drops 2 of every 3 transfer calls while ``on``."""
        if on:
            self.flaky_flag.touch()
        else:
            self.flaky_flag.unlink(missing_ok=True)
        return True

    def flaky_calls(self) -> int:
        return int(self.calls.read_text() or 0)

    def come_back(self) -> None:
        self.down.unlink()

    def close(self) -> None:
        pass


class SshEndpoint:
    """The same directories behind a real loopback sshd, reached with rsync over one shared
    connection; faults are done to sshd itself."""

    def __init__(self, site: Site, *, stream: bool = False) -> None:
        workdir = site.root / "sshd"
        workdir.mkdir()
        self.server: SshServer = start_sshd(workdir)
        self.cpath = f"{workdir}/cm-%C"
        # The endpoint's rsync (run by sshd, as '<rsync-path> --server ... DEST') or, with the
        # stream transfer, its tar (run in the slot directory): while the flag exists, the
        # first non-empty file it received arrives with a byte too many.
        self.corrupt = site.root / "corrupt-next-copy"
        corrupt = (
            f'if [ "$rc" -eq 0 ] && [ -e {self.corrupt} ]; then rm -f {self.corrupt}; for d; do :; done\n'
            '  find "$d" -maxdepth 1 -type f -size +0 -exec sh -c \'printf x >> "$1"\' sh {} \\; -quit; fi\n'
            "exit $rc\n"
        )
        if stream:
            shims = site.root / "endpoint-bin"
            shims.mkdir()
            (shims / "tar").write_text(f'#!/bin/sh\n/bin/tar "$@"; rc=$?\nset -- .\n{corrupt}')
            (shims / "tar").chmod(0o755)
            transfer = "builtin:stream"
            remote = REMOTE_SHARED.replace('"{command}"', f'"PATH={shims}:$PATH {{command}}"')
        else:
            receiver = site.root / "endpoint-rsync"
            receiver.write_text(f'#!/bin/sh\nrsync "$@"; rc=$?\n{corrupt}')
            receiver.chmod(0o755)
            transfer = RSYNC_SHARED.replace("rsync -a ", f"rsync -a --rsync-path={receiver} ", 1)
            remote = REMOTE_SHARED
        site.configure(
            transfer=transfer,
            remote=remote,
            params=params(self.server, cpath=self.cpath),
            logging={"level": "INFO"},
            **GENERAL,
        )

    def drop_reply(self) -> str:
        return f"connections dropped ({drop_connections(self.server)} sshd processes killed)"

    def corrupt_copy(self) -> str | None:
        self.corrupt.touch()
        return "next staged copy corrupted (by the endpoint's rsync)"

    def go_down(self) -> None:
        self.server.stop()  # the shared master's connection goes with it

    def flaky(self, on: bool) -> bool:
        return False  # not played over a real sshd

    def flaky_calls(self) -> int:
        return 0

    def come_back(self) -> None:
        self.server = restart_sshd(self.server)

    def close(self) -> None:
        # The master outlives the daemon (ControlPersist); end it, then sshd.
        argv = ["ssh", "-F", "/dev/null", "-o", f"ControlPath={self.cpath}", "-O", "exit"]
        subprocess.run([*argv, "-p", str(self.server.port), self.server.destination], capture_output=True)
        self.server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=20.0, help="files per second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory after a pass")
    parser.add_argument("--ssh", action="store_true", help="a real sshd on 127.0.0.1, rsync, one connection")
    parser.add_argument(
        "--stream", action="store_true", help="as --ssh, with the built-in stream transfer instead of rsync"
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="hdfmgr-soak-"))
    site = Site(root)
    args.ssh = args.ssh or args.stream
    endpoint = SshEndpoint(site, stream=args.stream) if args.ssh else LocalEndpoint(site)
    try:
        ok = soak(args, rng, root, site, endpoint)
    finally:
        endpoint.close()
    if ok and not args.keep and args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


def soak(
    args: argparse.Namespace,
    rng: random.Random,
    root: Path,
    site: Site,
    endpoint: LocalEndpoint | SshEndpoint,
) -> bool:
    consumer = Consumer(site.ep_buffer, expect=EXPECTED.get)
    consumer.start()
    stop = threading.Event()
    written: list[str] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            rel = make_name(rng, i)
            write_file(site, rel, rng)
            written.append(rel)
            i += 1
            stop.wait(rng.expovariate(args.rate))

    flow = threading.Thread(target=writer, daemon=True)
    daemon = site.start()
    flow.start()
    try:
        deadline = time.monotonic() + args.minutes * 60
        kills = outages = drops = corruptions = flaky_phases = 0
        outage_seconds = flaky_seconds = 0.0
        events: list[str] = []
        fault_rng = random.Random(args.seed + 1)

        def flaky_phase(length: float) -> None:
            nonlocal flaky_phases, flaky_seconds
            flaky_phases += 1
            flaky_seconds += length
            before = endpoint.flaky_calls()
            events.append(f"{time.strftime('%H:%M:%S')} flaky link {length:.0f} s")
            stop.wait(length)
            endpoint.flaky(False)
            events[-1] += f" ({endpoint.flaky_calls() - before} transfer calls, 2 in 3 failed)"

        # Every soak of the local endpoint starts with a flaky link (a quarter of the run, at
        # most a minute): the flow must go on, batches whole, nothing pinned on a file.
        if endpoint.flaky(True):
            flaky_phase(min(60.0, args.minutes * 15))
        while time.monotonic() < deadline:
            stop.wait(fault_rng.uniform(5, 25))
            if time.monotonic() >= deadline:
                break
            roll = fault_rng.random()
            if roll < 0.15:
                drops += 1
                events.append(f"{time.strftime('%H:%M:%S')} {endpoint.drop_reply()}")
            elif roll < 0.25 and (corrupted := endpoint.corrupt_copy()) is not None:
                corruptions += 1
                events.append(f"{time.strftime('%H:%M:%S')} {corrupted}")
            elif roll < 0.4 and endpoint.flaky(True):
                flaky_phase(fault_rng.uniform(10, 40))
            elif roll < 0.6:
                daemon.kill()
                kills += 1
                events.append(f"{time.strftime('%H:%M:%S')} kill -9")
                daemon = site.start()
            else:
                length = fault_rng.uniform(2, 20)
                endpoint.go_down()
                outages += 1
                outage_seconds += length
                events.append(f"{time.strftime('%H:%M:%S')} outage {length:.0f} s")
                stop.wait(length)
                endpoint.come_back()
        stop.set()
        flow.join(10)
        drain_started = time.monotonic()
        wait_for(lambda: not site.waiting(), 300, "the buffer to drain")
        wait_for(lambda: len(set(consumer.arrivals)) >= len(written), 60, "the consumer")
        drain = time.monotonic() - drain_started
        rc = daemon.stop(60)
    except BaseException:
        daemon.kill()  # never leave a daemon behind
        raise
    consumer.stop_event.set()
    consumer.join(5)

    counts = collections.Counter(consumer.arrivals)
    duplicates = sorted(rel for rel, n in counts.items() if n > 1)
    missing = sorted(set(written) - set(counts))
    held = site.held()
    states = dict(site.query("select state, count(*) from files group by state"))
    # Copies that failed verification wait beside their slot until its next commit, or the
    # next start's sweep: litter, not a loss (they were sent again). So do the fences that
    # listings after a lost reply leave beside a slot (a batch number each).
    left = [p for p in site.staging.rglob("*") if p.is_file()]
    rejected_left = [p for p in left if p.parent.name.endswith(REJECTED)]
    beside = (FENCE, RECEIPT, RECEIVED)
    fences_left = [p for p in left if p.name.endswith(beside) and p.parent == site.staging]
    staged_left = [p for p in left if p not in rejected_left and p not in fences_left]
    attempts = site.query("select sum(attempts), max(attempts) from files")[0]
    batches = dict(site.query("select status, count(*) from batches group by status"))
    lost = site.query("select count(distinct batch_id) from attempts where error like 'commit reply lost%'")[
        0
    ][0]
    result = {
        "endpoint": ("ssh, stream" if args.stream else "ssh") if args.ssh else "local",
        "minutes": args.minutes,
        "files_written": len(written),
        "bytes_written": sum(len(EXPECTED[r]) for r in written),
        "kills": kills,
        "outages": outages,
        "outage_seconds": round(outage_seconds, 1),
        "flaky_link_phases": flaky_phases,
        "flaky_link_seconds": round(flaky_seconds, 1),
        "flaky_transfer_calls": endpoint.flaky_calls(),
        "files_pinned_on_their_own": site.query(
            "select count(*) from files where last_error like '%on its own%'"
        )[0][0],
        "delivered_unique": len(counts),
        "duplicates": len(duplicates),
        "missing": len(missing),
        "partial_or_wrong_seen": len(consumer.bad),
        "held": len(held),
        "held_byte_identical": all(held.get(r) == EXPECTED[r] for r in written),
        "left_in_buffer": len(site.waiting()),
        "db_states": states,
        "db_attempts_total_max": attempts,
        "batches": batches,
        ("connections_dropped" if args.ssh else "commit_replies_dropped"): drops,
        "copies_corrupted": corruptions,
        "commit_replies_lost": lost,
        "staging_files_left": len(staged_left),
        "rejected_copies_left": len(rejected_left),
        "fences_left": len(fences_left),
        "drain_seconds_after_flow": round(drain, 1),
        "final_stop_status": rc,
        "workdir": str(root),
    }
    ok = (
        not result["files_pinned_on_their_own"]
        and not duplicates
        and not missing
        and not consumer.bad
        and result["held_byte_identical"]
        and len(held) == len(written)
        and states == {"held": len(written)}
        and not staged_left
        and rc == 0
    )
    result["invariants"] = "PASS" if ok else "FAIL"
    print("\n".join(events))
    print(json.dumps(result, indent=2))
    return ok


if __name__ == "__main__":
    sys.exit(main())
