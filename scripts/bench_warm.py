"""Commits over an emulated long link, with and without warm sessions.

Starts the loopback sshd of the test suite, puts a relay in front of it that delays every byte
by DELAY seconds each way (tests/delay_relay.py), and times N commits of small batches
(FILES files of SIZE bytes, staged beforehand as a transfer would) through hdfmgr's Endpoint,
with one ssh command per step (a new connection each, or sharing one ControlMaster) and
through warm sessions. Each commit's files are
checked in the endpoint buffer. Prints per mode the median and total, and the ratio of the
medians.

    .venv/bin/python scripts/bench_warm.py [--delay 0.05] [--commits 20] [--files 10]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hdfmgr.config import from_mapping  # noqa: E402
from hdfmgr.endpoint import Endpoint, StagedFile  # noqa: E402
from tests.delay_relay import DelayRelay, known_hosts_for  # noqa: E402
from tests.ssh_templates import REMOTE, REMOTE_SHARED, params  # noqa: E402
from tests.sshd_fixture import SshServer, start_sshd  # noqa: E402

MODES = {
    "one ssh per step": (REMOTE, False),
    "shared master": (REMOTE_SHARED, False),
    "warm session": (REMOTE, True),
}


def run(
    root: Path, sshd: SshServer, relay_port: int, known: Path, mode: str, args: argparse.Namespace
) -> list[float]:
    """One mode's commits in a fresh site; each commit's time."""
    template, warm = MODES[mode]
    buffer, holding = root / "buffer", root / "holding"
    ep_buffer, staging = root / "endpoint" / "buffer", root / "endpoint" / "staging"
    for d in (buffer, holding, ep_buffer, staging):
        d.mkdir(parents=True)
    config = from_mapping(
        {
            "handoff": {"buffer": str(buffer), "holding": str(holding)},
            "endpoint": {
                "buffer": str(ep_buffer),
                "staging": str(staging),
                "commands": {"transfer": "cp {batch} {dest}", "remote": template},
                **params(sshd, port=relay_port, known_hosts=str(known), cpath=str(root / "cm-%C")),
            },
            "database": {"engine": "sqlite:///handoff.db"},
            "general": {"name": "bench", "verify": args.verify, "timeout": 60},
        },
        path=root / "config.yaml",
    )
    endpoint = Endpoint(config, generation="g", warm=warm)
    times = []
    try:
        slot = endpoint.slot_dir(0)
        assert endpoint.prepare(slot).ok
        for n in range(args.commits):
            files = []
            for i in range(args.files):
                data = os.urandom(args.size)
                rel = f"v{n}/f{i}.fits"
                path = buffer / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                (Path(slot) / f"f{i}.fits").write_bytes(data)
                digest = hashlib.blake2b(data).hexdigest() if args.verify == "checksum" else None
                files.append(StagedFile(rel, str(path), len(data), digest))
            t0 = time.monotonic()
            result, report = endpoint.commit(slot, None, files, batch=n + 1)
            times.append(time.monotonic() - t0)
            assert result.ok and report is not None and len(report.moved) == args.files, result.describe()
            for f in files:
                assert (ep_buffer / f.rel).read_bytes() == Path(f.path).read_bytes()
    finally:
        endpoint.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--delay", type=float, default=0.05, help="seconds each way (default 0.05)")
    parser.add_argument("--commits", type=int, default=20)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--verify", choices=("size", "checksum"), default="size")
    parser.add_argument("--repeat", type=int, default=3, help="runs of every mode (default 3)")
    args = parser.parse_args()
    medians: dict[str, list[float]] = {mode: [] for mode in MODES}
    logins: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="hdfmgr-warm-") as tmp:
        work = Path(tmp)
        (work / "sshd").mkdir()
        with start_sshd(work / "sshd") as sshd, DelayRelay(sshd.port, args.delay) as relay:
            known = known_hosts_for(sshd.known_hosts, sshd.port, relay.port, work / "known_hosts")
            for r in range(args.repeat):
                for mode in MODES:
                    before = relay.connections
                    times = run(work / f"{r}-{mode.replace(' ', '-')}", sshd, relay.port, known, mode, args)
                    logins[mode] = relay.connections - before
                    medians[mode].append(statistics.median(times))
                    print(f"  run {r + 1} {mode:17} median {medians[mode][-1]:.3f} s", flush=True)
    print(
        f"{args.commits} commits of {args.files} x {args.size} B ({args.verify}), "
        f"round trip {2 * args.delay * 1000:.0f} ms, median of {args.repeat} runs' medians"
    )
    warm = statistics.median(medians["warm session"])
    for mode in MODES:
        m = statistics.median(medians[mode])
        print(
            f"  {mode:17} {m:.3f} s per commit  {m / warm:4.1f}x warm  ssh connections per run {logins[mode]}"
        )


if __name__ == "__main__":
    main()
