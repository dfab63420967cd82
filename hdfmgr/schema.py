"""The schema's version, and what hdfmgr does with the database it finds.

Every database is inspected before any command uses it, and found to be one of:

- empty (none of hdfmgr's tables): ``initdb``, ``run`` and ``rescan`` create the schema;
- hdfmgr's, at this version: used as it is;
- hdfmgr's, older (the versions before 5 stored no version; their tables are this version's,
  with other indexes): migrated in place by ``initdb``, ``run`` and ``rescan``;
- the original handoff manager's (``files``, ``transfer_batches``, ``file_transfer_attempts``):
  ``initdb`` takes it over, everything else refuses (the original may still be running);
- anything else (a newer hdfmgr, a table of ours with other columns): refused by every command.

A refusal is a :class:`SchemaError`, one line saying what was found and what to do; the CLI
turns it into exit status 78 (EX_CONFIG), which the systemd units list in
``RestartPreventExitStatus``: retrying cannot help, the operator must act.

The take-over renames the original's tables (``original_files``, ...; never dropped) and
imports their history (:mod:`hdfmgr.importer`), all in one transaction.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import peewee as pw

from . import db as dbm

#: The schema this hdfmgr writes. 1-4 were shipped without a stored version: 1 the first
#: release, 2 added the status indexes, 3 the partial backlog index, 4 the one state index.
SCHEMA_VERSION = 5

VERSION_TABLE = "hdfmgr_schema"

#: The original manager's tables and their columns (its SQLAlchemy declaratives).
ORIGINAL_TABLES: dict[str, frozenset[str]] = {
    "files": frozenset(
        ("id", "relpath", "filename", "checksum", "size_bytes", "created_on", "held_on", "deleted_on")
    ),
    "transfer_batches": frozenset(
        (
            "id",
            "pre_start_time",
            "pre_duration",
            "trans_start_time",
            "trans_duration",
            "post_start_time",
            "post_duration",
            "size_bytes",
            "rate_mbytes_per_sec",
            "status",
            "err_msg",
        )
    ),
    "file_transfer_attempts": frozenset(("files_id", "batch_id")),
}

#: What the original's tables are called once hdfmgr has taken the database over.
ORIGINAL_PREFIX = "original_"


class Found(enum.Enum):
    EMPTY = "empty"
    CURRENT = "current"
    OLDER = "older"
    ORIGINAL = "original"
    NEWER = "newer"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Inspection:
    found: Found
    version: int | None = None
    #: For UNKNOWN: the table and what is wrong with it.
    detail: str = ""


class SchemaError(Exception):
    """The database holds something hdfmgr cannot use; ``str()`` is one line for the operator."""

    def __init__(self, line: str, found: Found) -> None:
        super().__init__(line)
        self.found = found


def _own_tables() -> dict[str, frozenset[str]]:
    return {m._meta.table_name: frozenset(f.column_name for f in m._meta.sorted_fields) for m in dbm.MODELS}


def _columns(db: pw.Database, table: str) -> frozenset[str]:
    return frozenset(c.name for c in db.get_columns(table))


def inspect(db: pw.Database) -> Inspection:
    """What the database holds (read-only; tables of other applications are ignored)."""
    tables = set(db.get_tables())
    if VERSION_TABLE in tables:
        row = db.execute_sql(f'SELECT MAX("version") FROM "{VERSION_TABLE}"').fetchone()
        version = row[0] if row else None
        if not isinstance(version, int):
            return Inspection(Found.UNKNOWN, detail=f"table {VERSION_TABLE} holds no version")
        if version > SCHEMA_VERSION:
            return Inspection(Found.NEWER, version)
        found = Found.CURRENT if version == SCHEMA_VERSION else Found.OLDER
    else:
        version = None
        found = Found.OLDER
    own = _own_tables()
    present = {name: _columns(db, name) for name in own if name in tables}
    if version is None:
        if not present:
            if "files" in tables or "transfer_batches" in tables:
                return _original_or_unknown(db, tables)
            return Inspection(Found.EMPTY)
        if "files" in present and present["files"] == ORIGINAL_TABLES["files"]:
            return _original_or_unknown(db, tables)
    for name, columns in present.items():
        if columns != own[name]:
            return Inspection(Found.UNKNOWN, detail=_mismatch(name, columns, own[name]))
    return Inspection(found, version or 0)


def _original_or_unknown(db: pw.Database, tables: set[str]) -> Inspection:
    for name, expected in ORIGINAL_TABLES.items():
        if name not in tables:
            return Inspection(Found.UNKNOWN, detail=f"table {name} is missing beside the others")
        columns = _columns(db, name)
        if columns != expected:
            return Inspection(Found.UNKNOWN, detail=_mismatch(name, columns, expected))
    clash = [f"{ORIGINAL_PREFIX}{name}" for name in ORIGINAL_TABLES if f"{ORIGINAL_PREFIX}{name}" in tables]
    if clash:
        return Inspection(Found.UNKNOWN, detail=f"the original's tables beside {clash[0]}")
    for model in dbm.MODELS:
        if model._meta.table_name != "files" and model._meta.table_name in tables:
            return Inspection(
                Found.UNKNOWN, detail=f"the original's tables beside hdfmgr's {model._meta.table_name}"
            )
    return Inspection(Found.ORIGINAL)


def _mismatch(table: str, columns: frozenset[str], expected: frozenset[str]) -> str:
    extra, missing = sorted(columns - expected), sorted(expected - columns)
    parts = []
    for what, names in (("without", missing), ("with unknown", extra)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{what} column{'s' if len(names) > 1 else ''} {', '.join(names[:3])}{more}")
    return f"table {table} {' and '.join(parts)}"


def refusal(found: Inspection, location: str, *, initdb: bool) -> str | None:
    """The one line a command prints for a database it cannot use as it is, or None.

    ``initdb``: the caller may create, migrate and take over (initdb); run and rescan may
    create and migrate hdfmgr's own schemas but never take over the original's database.
    """
    if found.found in (Found.CURRENT,):
        return None
    if found.found is Found.NEWER:
        return (
            f"database {location} has hdfmgr schema version {found.version}, newer than this "
            f"hdfmgr's {SCHEMA_VERSION}: upgrade hdfmgr, or point database.engine elsewhere"
        )
    if found.found is Found.UNKNOWN:
        return (
            f"database {location} is not an hdfmgr database nor the original manager's "
            f"({found.detail}): point database.engine at another database, or move that table away"
        )
    if initdb:
        return None
    if found.found is Found.ORIGINAL:
        return (
            f"database {location} is the original handoff manager's (tables files, transfer_batches, "
            "file_transfer_attempts): stop the original manager, then run 'hdfmgr initdb' to import "
            "its history"
        )
    return None


def ensure(
    db: pw.Database, *, source: str, location: str, take_over: bool = False, buffer: str = ""
) -> tuple[bool, str]:
    """Make the database usable by this hdfmgr, or raise :class:`SchemaError`.

    Returns whether anything changed, and what was done (``initdb`` prints it). ``buffer``:
    the handoff buffer, where a take-over looks for the files the original did not deliver.

    In one transaction: several hosts starting at once on a new central database take turns
    (PostgreSQL's CREATE TABLE IF NOT EXISTS is not safe against itself), and a take-over
    interrupted half-way leaves nothing behind.
    """
    with db.atomic():
        if isinstance(db, pw.PostgresqlDatabase):
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (0x6864666D6772,))
        found = inspect(db)
        line = refusal(found, location, initdb=take_over)
        if line is not None:
            raise SchemaError(line, found.found)
        if found.found is Found.CURRENT:
            _create(db)  # indexes a hand-made change may have removed; all IF NOT EXISTS
            return False, f"database ready (schema version {SCHEMA_VERSION}): {location}"
        if found.found is Found.EMPTY:
            _create(db)
            _stamp(db)
            return True, f"database ready (schema version {SCHEMA_VERSION}, created): {location}"
        if found.found is Found.OLDER:
            _create(db)
            _stamp(db)
            before = "an unversioned hdfmgr schema (1-4)" if not found.version else f"version {found.version}"
            return (
                True,
                f"database ready: migrated from {before} to schema version {SCHEMA_VERSION}: {location}",
            )
        from . import importer

        renamed = _rename_original(db)
        _create(db)
        try:
            counts = importer.import_history(db, source=source, tables=renamed, buffer=buffer)
        except (ValueError, TypeError, OverflowError) as exc:
            # Raised inside the transaction: the renames and the new tables roll back with it.
            raise SchemaError(
                f"database {location}: cannot import the original manager's history ({exc}); "
                "nothing was changed: fix or remove that row, then run 'hdfmgr initdb' again",
                Found.ORIGINAL,
            ) from None
        _stamp(db)
        return True, (
            f"database ready: took over the original manager's database {location}: imported "
            f"{counts['files']} files, {counts['batches']} batches and {counts['attempts']} attempts "
            f"as source {source} ({counts['resumed']} undelivered files still in the buffer: hdfmgr "
            f"sends them); its tables are kept as {', '.join(renamed.values())}"
        )


def require(db: pw.Database, *, location: str) -> None:
    """For commands that only read (status, files, show, metrics, report) and retry."""
    found = inspect(db)
    line = refusal(found, location, initdb=False)
    if line is not None:
        raise SchemaError(line, found.found)
    if found.found is Found.EMPTY:
        raise SchemaError(f"no hdfmgr schema in {location}; run 'hdfmgr initdb'", found.found)
    if found.found is Found.OLDER:
        raise SchemaError(
            f"database {location} has an older hdfmgr schema; run 'hdfmgr initdb' (or start the "
            f"daemon) to migrate it to version {SCHEMA_VERSION}",
            found.found,
        )


def _create(db: pw.Database) -> None:
    db.create_tables(dbm.MODELS, safe=True)
    for name in dbm.RETIRED_INDEXES:
        db.execute_sql(f'DROP INDEX IF EXISTS "{name}"')
    db.execute_sql(f'CREATE TABLE IF NOT EXISTS "{VERSION_TABLE}" ("version" INTEGER NOT NULL)')


def _stamp(db: pw.Database) -> None:
    db.execute_sql(f'DELETE FROM "{VERSION_TABLE}"')
    db.execute_sql(f'INSERT INTO "{VERSION_TABLE}" ("version") VALUES ({SCHEMA_VERSION})')


def _rename_original(db: pw.Database) -> dict[str, str]:
    """Rename the original's tables out of the way (hdfmgr's own table is also ``files``).

    On PostgreSQL the indexes and sequences that belong to a table keep their names when it is
    renamed (``files_pkey``, ``files_id_seq``), and hdfmgr's new ``files`` needs exactly those
    names: they are renamed with their table.
    """
    renamed = {name: f"{ORIGINAL_PREFIX}{name}" for name in ORIGINAL_TABLES}
    postgres = isinstance(db, pw.PostgresqlDatabase)
    for old, new in renamed.items():
        owned: list[tuple[str, str]] = []
        if postgres:
            owned = [
                ("INDEX", row[0])
                for row in db.execute_sql(
                    "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                    "WHERE i.indrelid = %s::regclass",
                    (old,),
                ).fetchall()
            ]
            owned += [
                ("SEQUENCE", row[0].split(".")[-1].strip('"'))
                for row in db.execute_sql(
                    "SELECT pg_get_serial_sequence(%s, a.attname) FROM pg_attribute a "
                    "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                    (old, old),
                ).fetchall()
                if row[0]
            ]
        db.execute_sql(f'ALTER TABLE "{old}" RENAME TO "{new}"')
        for kind, name in owned:
            target = ORIGINAL_PREFIX + name
            db.execute_sql(f'ALTER {kind} "{name}" RENAME TO "{target}"')
    return renamed
