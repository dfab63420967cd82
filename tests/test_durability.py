"""The database writes that precede a side effect must survive a power cut.

In WAL mode ``synchronous=NORMAL`` does not sync the log at commit: a power cut may roll back
the ``committing`` checkpoint written just before the remote ``mv``, and the restart would send
the file again (a duplicate) or count it lost. With ``FULL`` every commit syncs the log first.
"""

from __future__ import annotations

from pathlib import Path

from hdfmgr import db as dbm
from hdfmgr.config import load
from hdfmgr.record import Recorder
from tests.site import Site

#: ``PRAGMA synchronous`` answers: 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA.
FULL = 2


def test_the_daemons_sqlite_connection_syncs_every_commit(tmp_path: Path) -> None:
    site = Site(tmp_path / "site")
    config = load(site.config_path)
    database = dbm.connect(config)
    try:
        dbm.create_schema(database)
        recorder = Recorder(database, config.name)
        # The connection the recorder writes its checkpoints through.
        assert recorder.db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert recorder.db.execute_sql("PRAGMA synchronous").fetchone()[0] >= FULL
        # And inside a transaction like the one written before the remote mv.
        with recorder._transaction():
            assert recorder.db.execute_sql("PRAGMA synchronous").fetchone()[0] >= FULL
    finally:
        database.close()
