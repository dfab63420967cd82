"""hdfmgr: move files from a handoff buffer to an endpoint buffer, atomically and verified.

Usage:
  hdfmgr run CONFIG
  hdfmgr rescan [--wait=SECONDS] CONFIG
  hdfmgr initdb CONFIG
  hdfmgr dropdb --yes CONFIG
  hdfmgr (run | initdb | dropdb) (--validate | --no-validate) [--yes] CONFIG
  hdfmgr validate CONFIG
  hdfmgr files [--state=S] [--since=T] [--name=GLOB] [--limit=N] [--json] [--all] CONFIG
  hdfmgr show [--json] [--all] CONFIG PATH
  hdfmgr retry CONFIG [PATH...]
  hdfmgr metrics [--all] [--output=FILE] CONFIG
  hdfmgr report [--since=T] [--all] --output=FILE CONFIG
  hdfmgr status [--json] [--all] CONFIG
  hdfmgr doctor CONFIG
  hdfmgr -h | --help
  hdfmgr --version

Commands:
  run       Watch the buffer and deliver every file until SIGTERM (same as hdfmgr-watch).
  rescan    One pass: deliver what is waiting, then exit (same as hdfmgr-rescan). If a watcher
            runs on the same buffer, ask it to rescan (SIGUSR1) and wait for the files instead.
  initdb    Create the database schema, migrate an older hdfmgr schema in place, or take over
            the original manager's database and import its history (run and rescan also
            create and migrate, but never take over).
  dropdb    Drop the schema and the whole audit trail (asks for --yes).
  validate  Check the configuration and print the effective settings.
  files     List recorded file versions, newest first (filters: state, detection time, name).
  show      One file's story: each version, each attempt with its batch's timings and rate.
            PATH is relative to the buffer, or absolute in the buffer or in holding.
  retry     Re-queue quarantined and failed files (all, or the PATHs named) that are in the
            buffer; a running watcher is asked (SIGUSR1) to pick them up at once.
  metrics   Prometheus metrics computed from the database, printed, or with --output
            written atomically for node-exporter's textfile collector.
  report    A PNG of throughput, backlog and latency over time (since 24h ago unless
            --since); needs matplotlib (pip install 'hdfmgr[report]').
  status    Files by state, backlog, last success and recent failures.
  doctor    Pre-flight: check the endpoint, its tools and directories, and the local paths;
            one OK/FAIL line per check; exit status 1 if any check fails.

Options:
  --wait=SECONDS  How long rescan waits for a running watcher to deliver [default: 600].
  --json          Machine-readable output.
  --all           Every source in the database, not only this buffer's.
  --state=S       Only files in this state (ready, staging, committing, committed, held,
                  failed, quarantined).
  --since=T       Only files detected since T: an age (90s, 30m, 24h, 2d) or a local date or
                  time (2026-11-27, 2026-11-27T18:30).
  --name=GLOB     Only files whose path relative to the buffer matches GLOB (* matches / too).
  --limit=N       At most N files [default: 50].
  --output=FILE   Write to FILE (atomically) instead of standard output.
  --validate      Only validate the configuration, as 'hdfmgr validate' does (the original
                  manager's option of run, initdb and dropdb; --no-validate is the default).
  --yes           dropdb: yes, drop the schema and the whole audit trail.
  -h --help       Show this text.
  --version       Show the version.

Exit status: 0 success; 64 usage error; 65 rescan left files undelivered; 69 the running
watcher could not be signalled; 70 internal error; 73 database cannot be opened (or has no
schema yet: run initdb); 74 a database statement failed during rescan, or while stopping (a
watcher retries instead); 75 another process holds this buffer; 78 configuration error, or a
database hdfmgr cannot use: another application's tables, a newer hdfmgr's schema, the
original manager's before 'hdfmgr initdb' took it over, or a file that is not a database.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from docopt import DocoptExit, docopt

from . import __version__, logs, longlinks, sharing
from . import config as config_mod

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_CONFIG = 78

log = logging.getLogger("hdfmgr")

#: Commands answered from the audit trail by hdfmgr/audit.py (and status.py).
AUDIT_COMMANDS = ("files", "show", "retry", "metrics", "report")

WATCH_USAGE = """hdfmgr-watch: watch the handoff buffer and deliver every file until SIGTERM.

Usage:
  hdfmgr-watch CONFIG
  hdfmgr-watch -h | --help
  hdfmgr-watch --version
"""

RESCAN_USAGE = """hdfmgr-rescan: one pass over the handoff buffer: deliver what is waiting, then exit.

Usage:
  hdfmgr-rescan [--wait=SECONDS] CONFIG
  hdfmgr-rescan -h | --help
  hdfmgr-rescan --version

Options:
  --wait=SECONDS  How long to wait for a running watcher to deliver [default: 600].
"""


def main(argv: Sequence[str] | None = None) -> int:
    return _main(__doc__ or "", argv)


def watch_main(argv: Sequence[str] | None = None) -> int:
    return _main(WATCH_USAGE, argv, command="run")


def rescan_main(argv: Sequence[str] | None = None) -> int:
    return _main(RESCAN_USAGE, argv, command="rescan")


def _main(doc: str, argv: Sequence[str] | None, command: str | None = None) -> int:
    try:
        return _parse_and_dispatch(doc, argv, command)
    except BrokenPipeError:
        # `hdfmgr files ... | head`: the reader has what it wanted. Nothing more may reach
        # the closed pipe, not even the interpreter's flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_OK


def _parse_and_dispatch(doc: str, argv: Sequence[str] | None, command: str | None) -> int:
    """Every write to standard output, the last flush included, happens in here: a pipe
    whose reader is gone raises BrokenPipeError where :func:`_main` catches it. Left to the
    interpreter's flush at exit (stdout to a pipe is block-buffered unless PYTHONUNBUFFERED
    is set), it printed "Exception ignored ... BrokenPipeError" and exited 120."""
    try:
        args = docopt(doc, argv=list(argv) if argv is not None else None, version=__version__)
    except DocoptExit as exc:
        print(str(exc), file=sys.stderr)
        return EX_USAGE
    except SystemExit:
        sys.stdout.flush()  # --help and --version, which docopt printed
        raise
    command = command or next((c for c in AUDIT_COMMANDS if args.get(c)), None)
    if command is None:
        commands = ("run", "rescan", "initdb", "dropdb", "validate", "status", "doctor")
        command = next(c for c in commands if args.get(c))
    try:
        status = _dispatch(command, args)
    except config_mod.ConfigError as exc:
        print(f"hdfmgr: configuration error: {exc}", file=sys.stderr)
        status = EX_CONFIG
    except KeyboardInterrupt:
        status = EX_OK
    sys.stdout.flush()
    return status


def _dispatch(command: str, args: dict) -> int:
    path = args["CONFIG"]
    if command == "doctor":
        from . import doctor

        return doctor.main(path)
    config = config_mod.load(path)
    if command == "validate" or args.get("--validate"):
        return _validate(config)
    if command == "dropdb" and not args.get("--yes"):
        print("hdfmgr: dropdb deletes the whole audit trail; add --yes to confirm", file=sys.stderr)
        return EX_USAGE
    if command in ("run", "rescan"):
        logs.setup(config.logging, echo=config.database_echo)
    dbm = _database_module(config)
    try:
        database = dbm.connect(config)
    except Exception as exc:  # peewee wraps the driver's errors in many types
        location = dbm.database_location(config)
        if dbm.not_a_database(exc):
            print(
                f"hdfmgr: database {location} is not a database (the file holds something else): "
                "point database.engine at another file, or move that file away",
                file=sys.stderr,
            )
            return EX_CONFIG
        print(f"hdfmgr: cannot open database {location}: {exc}", file=sys.stderr)
        return EX_CANTCREAT
    from .schema import Found, SchemaError

    try:
        return _with_database(command, config, database, args)
    except SchemaError as exc:
        database.close()
        print(f"hdfmgr: {exc}", file=sys.stderr)
        return EX_CANTCREAT if exc.found is Found.EMPTY else EX_CONFIG
    except dbm.errors() as exc:
        print(
            f"hdfmgr: database {dbm.database_location(config)} failed: {dbm.describe_error(exc)}",
            file=sys.stderr,
        )
        return EX_IOERR


def _with_database(command: str, config: config_mod.Config, database: Any, args: dict) -> int:
    """Every command that uses the database checks what it holds first (hdfmgr/schema.py)."""
    from . import db as dbm
    from . import schema
    from .schema import Found, SchemaError

    location = dbm.database_location(config)
    if command == "initdb":
        _, done = schema.ensure(
            database, source=config.name, location=location, take_over=True, buffer=str(config.buffer)
        )
        print(done)
        return EX_OK
    if command == "dropdb":
        found = schema.inspect(database)
        if found.found not in (Found.CURRENT, Found.OLDER, Found.EMPTY):
            raise SchemaError(
                schema.refusal(found, location, initdb=False) or f"database {location}: not hdfmgr's schema",
                found.found,
            )
        dbm.drop_schema(database)
        print(f"database schema dropped: {location}")
        return EX_OK
    if command in ("run", "rescan"):
        # Creates or migrates hdfmgr's own schema; refuses the rest before the daemon starts
        # (a refusal under systemd is exit status 78: RestartPreventExitStatus, no loop).
        try:
            changed, done = schema.ensure(database, source=config.name, location=location)
        except dbm.errors():
            # Transient (a lock held too long, the server away): the pipeline meets it again
            # and pauses and retries (run) or stops with one line (rescan), as for any failure.
            changed, done = False, ""
        if changed:
            log.info("%s", done)
        database.close()
        wait = _seconds(args.get("--wait") or "600")
        return _run(config, once=command == "rescan", wait=wait)
    schema.require(database, location=location)
    if command == "status":
        return _status(config, database, as_json=args["--json"], everything=args["--all"])
    return _audit(command, config, database, args)


def _database_module(config: config_mod.Config) -> ModuleType:
    """``hdfmgr.db``; on SQLite, peewee is imported without its PostgreSQL driver.

    peewee imports psycopg2 whenever it is installed: about 10 MB of memory and 10 ms of
    start-up that a daemon on SQLite never uses.
    """
    blocked = (
        "peewee" not in sys.modules
        and "psycopg2" not in sys.modules
        and not config.database.startswith("postgres")
    )
    if blocked:
        sys.modules["psycopg2"] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        from . import db
    finally:
        if blocked:
            del sys.modules["psycopg2"]
    return db


def _run(config: config_mod.Config, *, once: bool, wait: float) -> int:
    from .db import DatabaseFailure, database_location
    from .endpoint import EndpointUnfit
    from .lock import LockBusy, LockUnavailable
    from .pipeline import Outcome, Pipeline
    from .schema import Found, SchemaError
    from .supervise import watch

    stop = threading.Event()
    progress = None
    on_breaker = None
    if once and sys.stderr.isatty():
        from .progress import Progress

        progress = Progress()
    if not once and config.metrics_port is not None and _serve_metrics(config):
        from . import metrics

        on_breaker = metrics.breaker_state

    def show(p: Pipeline) -> None:
        if progress is None or not progress.due():
            return
        waiting, waiting_bytes = p.waiting()
        progress.update(
            done=p.counters.delivered,
            done_bytes=p.counters.bytes,
            waiting=waiting,
            waiting_bytes=waiting_bytes,
        )

    def make() -> Pipeline:
        pipeline = Pipeline(config, once=once, stop=stop)
        if progress is not None:
            pipeline.on_progress = show
        pipeline.on_breaker = on_breaker
        return pipeline

    location = database_location(config)
    try:
        if once:
            pipeline = make()
            outcome = pipeline.run()
        else:
            outcome = watch(make, stop, location=location, initial=min(config.retry_initial, 5.0))
    except LockBusy as busy:
        if not once or busy.pid is None:
            # No pid: the holder keeps its lock file elsewhere (another HDFMGR_LOCK_DIR).
            who = "another hdfmgr" if busy.pid is None else f"another hdfmgr (pid {busy.pid})"
            print(f"hdfmgr: {who} is already running on {config.buffer}", file=sys.stderr)
            return EX_TEMPFAIL
        return _delegate_rescan(config, busy.pid, wait)
    except SchemaError as exc:
        print(f"hdfmgr: {exc}", file=sys.stderr)
        return EX_CANTCREAT if exc.found is Found.EMPTY else EX_CONFIG
    except LockUnavailable as exc:
        print(f"hdfmgr: {exc}", file=sys.stderr)
        return EX_CANTCREAT
    except EndpointUnfit as exc:
        print(f"hdfmgr: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except DatabaseFailure as exc:
        print(
            f"hdfmgr: database {location} failed: {exc}; stopped (the next run resumes every file)",
            file=sys.stderr,
        )
        return EX_IOERR
    except Exception:
        log.exception("internal error")
        return EX_SOFTWARE
    if progress is not None:
        progress.finish()
    if once:
        undelivered = pipeline._undelivered()
        print(
            f"rescan: {pipeline.counters.delivered} delivered ({pipeline.counters.bytes / 1e6:.1f} MB), "
            f"{len(undelivered)} undelivered"
        )
        return EX_OK if outcome is Outcome.DRAINED else EX_DATAERR
    return EX_OK


def _report(source: str | None, output: str, since: float) -> int:
    try:
        import matplotlib  # noqa: F401

        from . import report
    except ImportError:
        print("hdfmgr: report needs matplotlib: pip install 'hdfmgr[report]'", file=sys.stderr)
        return EX_UNAVAILABLE
    data = report.make(source, output, since=since)
    print(
        f"report: {output}: {data['committed']} files, {data['bytes'] / 1e9:.2f} GB committed since "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(since))}"
    )
    return EX_OK


def _serve_metrics(config: config_mod.Config) -> bool:
    """general.metrics_port: serve /metrics; a failure to bind is logged, never fatal."""
    from . import metrics

    try:
        server = metrics.serve(
            config.name,
            address=config.metrics_address,
            port=config.metrics_port or 0,
            breaker_threshold=config.breaker_threshold,
        )
    except OSError as exc:
        log.error("cannot serve metrics on %s:%s: %s", config.metrics_address, config.metrics_port, exc)
        return False
    host, port = server.server_address[:2]
    log.info("metrics: http://%s:%d/metrics", host, port)
    return True


def _signal_watcher(pid: int) -> bool:
    """SIGUSR1 to the running watcher: rescan now (and pick up re-queued files)."""
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError as exc:
        print(f"hdfmgr: cannot signal the running watcher (pid {pid}): {exc.strerror}", file=sys.stderr)
        return False
    return True


def _delegate_rescan(config: config_mod.Config, pid: int | None, wait: float) -> int:
    """A watcher owns the buffer: ask it to rescan and wait for what is waiting now."""
    from .detect import scan

    if pid is None:
        print("hdfmgr: the buffer is locked by a process whose pid is unknown", file=sys.stderr)
        return EX_UNAVAILABLE
    buffer = os.fspath(config.buffer)
    waiting = {rel for rel, snap in scan(buffer) if snap is not None and not config.excluded(rel)}
    if not _signal_watcher(pid):
        return EX_UNAVAILABLE
    print(f"rescan: watcher pid {pid} is running; asked it to rescan, waiting for {len(waiting)} file(s)")
    deadline = time.monotonic() + wait
    while waiting and time.monotonic() < deadline:
        waiting = {rel for rel in waiting if os.path.lexists(os.path.join(buffer, rel))}
        if waiting:
            time.sleep(0.2)
    if waiting:
        print(f"rescan: {len(waiting)} file(s) still in the buffer after {wait:.0f} s", file=sys.stderr)
        return EX_DATAERR
    print("rescan: every waiting file was delivered by the watcher")
    return EX_OK


def _status(config: config_mod.Config, database: object, *, as_json: bool, everything: bool) -> int:
    from . import status
    from .lock import published

    info = status.summary(None if everything else config.name, breaker_threshold=config.breaker_threshold)
    info["daemon"] = published(config.buffer)
    print(json.dumps(info, indent=2) if as_json else status.render(info))
    return EX_OK


def _audit(command: str, config: config_mod.Config, database: object, args: dict) -> int:
    """hdfmgr files, show and retry (queries and output in hdfmgr/audit.py)."""
    from . import audit
    from . import db as dbm

    source = None if args.get("--all") else config.name
    if command == "metrics":
        from . import metrics

        scope, threshold = ([source] if source else None), config.breaker_threshold
        if args["--output"]:
            metrics.write_textfile(args["--output"], scope, breaker_threshold=threshold)
        else:
            sys.stdout.write(metrics.exposition(scope, breaker_threshold=threshold).decode())
        return EX_OK
    paths = args.get("PATH") or []
    paths = [paths] if isinstance(paths, str) else list(paths)
    try:
        if command == "report":
            return _report(source, args["--output"], audit.parse_since(args["--since"] or "24h"))
        if command == "files":
            state = args["--state"]
            if state is not None and state not in {s.value for s in dbm.State}:
                raise ValueError(f"--state: unknown state {state!r}")
            limit = int(args["--limit"] or 50)
            since = audit.parse_since(args["--since"]) if args["--since"] else None
            rows = audit.files(source, state=state, since=since, name=args["--name"], limit=limit)
            text = json.dumps(rows, indent=2) if args["--json"] else None
            print(text or audit.render_files(rows, with_source=source is None))
            return EX_OK
        rels = [audit.resolve(p, buffer=config.buffer, holding=config.holding) for p in paths]
    except ValueError as exc:
        print(f"hdfmgr: {exc}", file=sys.stderr)
        return EX_USAGE
    if command == "show":
        rel, in_holding = rels[0]
        versions = audit.show(source, rel, in_holding=in_holding)
        print(json.dumps(versions, indent=2) if args["--json"] else audit.render_show(rel, versions))
        return EX_OK if versions else EX_DATAERR
    result = audit.retry(config.name, [rel for rel, _ in rels] if rels else None, buffer=config.buffer)
    print(f"retry: {len(result['requeued'])} file(s) re-queued")
    for key, what in (
        ("missing", "not in the buffer (put it back first)"),
        ("superseded", "an older version; the path was registered again since"),
        ("unknown", "no record for this source"),
        ("not_retryable", "neither quarantined nor failed"),
    ):
        for name in result[key]:
            print(f"  skipped {name!r}: {what}")
    if result["requeued"]:
        pid = audit.watcher_pid(config.buffer)
        if pid is None:
            print("retry: no watcher is running; the next hdfmgr-watch or hdfmgr-rescan sends them")
        else:
            if not _signal_watcher(pid):
                return EX_UNAVAILABLE
            print(f"retry: asked the running watcher (pid {pid}) to pick them up")
    skipped = any(result[k] for k in ("missing", "unknown", "not_retryable"))
    return EX_DATAERR if paths and skipped else EX_OK


def _validate(config: config_mod.Config) -> int:
    dbm = _database_module(config)
    print(f"configuration OK: {config.path}")
    print(f"  buffer    {config.buffer} -> holding {config.holding}")
    print(f"  endpoint  staging {config.staging} -> buffer {config.endpoint_buffer}")
    if config.stream:
        how = "one tar stream per batch through the remote command"
    else:
        how = "batched" if config.transfer.batched else "one per file"
    print(f"  transfer  {config.transfer.source}  ({how})")
    print(f"  remote    {config.remote.source}")
    if config.control_dir is not None:
        added = " ".join(sharing.options(config.control_dir, config.control_tag))
        print(f"  sharing   ssh connections shared, added by hdfmgr: {added}")
    elif config.sharing_problem is not None:
        print(f"  sharing   not added: {config.sharing_problem}")
    print(f"  database  {dbm.database_location(config)}")
    print(
        f"  general   chunk_size={config.chunk_size} num_threads={config.num_threads} "
        f"timeout={config.timeout:g}s pause={config.pause:g}s settle={config.settle:g}s "
        f"verify={config.verify} observer={config.observer}"
    )
    for note in config.original_notes:
        print(f"  original  {note}")
    scp = longlinks.scp_transfer(config.transfer)
    if scp is not None:
        print(f"  warning   endpoint.commands.transfer: {longlinks.scp_why(scp)} -> {longlinks.FIX}")
    return EX_OK


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise config_mod.ConfigError(f"--wait: {text!r} is not a number of seconds") from None
    return value
