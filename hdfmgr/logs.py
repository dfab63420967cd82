"""Logging set-up from the ``logging`` section; SIGHUP reopens the file for logrotate."""

from __future__ import annotations

import logging
import logging.handlers
import signal
import sys

from .config import LoggingConfig


def setup(cfg: LoggingConfig, *, level: str | None = None) -> logging.Handler:
    """Send the ``hdfmgr`` loggers to stderr or to a rotating file, as configured."""
    handler: logging.Handler
    if cfg.file is None:
        handler = logging.StreamHandler(sys.stderr)
    elif cfg.rotate == "TIME":
        handler = logging.handlers.TimedRotatingFileHandler(
            cfg.file, when=cfg.when, interval=cfg.interval, backupCount=cfg.backup_count, encoding="utf-8"
        )
    else:
        handler = logging.handlers.RotatingFileHandler(
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
    if isinstance(handler, logging.FileHandler):

        def reopen(signum: int, frame: object) -> None:
            # FileHandler reopens its file on the next record once closed: after logrotate
            # moved the old file away, the next line goes to a new one.
            handler.acquire()
            try:
                handler.close()
            finally:
                handler.release()

        signal.signal(signal.SIGHUP, reopen)
    return handler
