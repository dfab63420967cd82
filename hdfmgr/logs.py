"""Logging set-up from the ``logging`` section; SIGHUP reopens the file for logrotate.

State owned: the process's logging handlers (one set-up, reopened on SIGHUP).
"""

from __future__ import annotations

import logging
import logging.handlers
import signal
import sys

from .config import LoggingConfig


class _Reopening:
    """Reopen the log file at the next record once :meth:`request_reopen` was called.

    The SIGHUP handler only sets a flag; the file is closed and reopened inside ``emit``, under
    the handler's lock, so a signal arriving in the middle of a write never loses a line.
    """

    reopen_requested = False
    stream: object

    def request_reopen(self) -> None:
        self.reopen_requested = True

    def emit(self, record: logging.LogRecord) -> None:
        if self.reopen_requested:
            self.reopen_requested = False
            if self.stream is not None:
                self.stream.close()  # type: ignore[attr-defined]
                self.stream = None  # type: ignore[assignment]
        super().emit(record)  # type: ignore[misc]  # reopens the file: after logrotate, a new one


class RotatingFileHandler(_Reopening, logging.handlers.RotatingFileHandler):
    pass


class TimedRotatingFileHandler(_Reopening, logging.handlers.TimedRotatingFileHandler):
    pass


class FileHandler(_Reopening, logging.FileHandler):
    """``rotate: null`` (the original manager's setting): one file, never rotated by hdfmgr."""


def setup(cfg: LoggingConfig, *, level: str | None = None, echo: bool = False) -> logging.Handler:
    """Send the ``hdfmgr`` loggers to stderr or to a rotating file, as configured.

    ``echo`` (database.echo, the original manager's SQLAlchemy option) also sends peewee's
    statement log (logger ``peewee``, DEBUG) to the same place, whatever ``level`` says.
    """
    handler: logging.Handler
    if cfg.file is None:
        handler = logging.StreamHandler(sys.stderr)
    elif cfg.rotate is None:
        handler = FileHandler(cfg.file, encoding="utf-8")
    elif cfg.rotate == "TIME":
        handler = TimedRotatingFileHandler(
            cfg.file, when=cfg.when, interval=cfg.interval, backupCount=cfg.backup_count, encoding="utf-8"
        )
    else:
        handler = RotatingFileHandler(
            cfg.file, maxBytes=cfg.maxbytes, backupCount=cfg.backup_count, encoding="utf-8"
        )
    handler.setFormatter(logging.Formatter(cfg.format))
    root = logging.getLogger("hdfmgr")
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level or cfg.level)
    root.propagate = False
    sql = logging.getLogger("peewee")
    for old in list(sql.handlers):
        sql.removeHandler(old)
    if echo:
        sql.addHandler(handler)
        sql.setLevel(logging.DEBUG)
        sql.propagate = False
    reopening = handler if isinstance(handler, _Reopening) else None

    def reopen(signum: int, frame: object) -> None:
        # Logging to stderr there is nothing to reopen, but SIGHUP (systemctl reload) must
        # not end the process as its default action would.
        if reopening is not None:
            reopening.request_reopen()

    signal.signal(signal.SIGHUP, reopen)
    return handler
