"""Configuration: one loader, one defaults table, strict validation, frozen dataclasses.

The file format is the seed quickstart's (sections ``handoff``, ``endpoint``, ``database``,
``logging``, ``general``). Every key is checked before anything runs, so that a typo such as
``chunk_sise`` is an error that names the key instead of a default silently used.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import sharing
from .templates import RESERVED, Template, TemplateError


class ConfigError(ValueError):
    """A configuration problem; ``str()`` is one line naming the culprit."""

    def __str__(self) -> str:
        # Keys and paths come from the operator: a newline in one must not split the line.
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in super().__str__())


#: Upper bound on every external command when ``general.timeout`` is null.
TIMEOUT_CEILING = 3600.0

#: ``endpoint.commands.transfer`` naming the built-in stream transfer instead of a template.
STREAM = "builtin:stream"

#: Every optional key with its default. ``etc/config.yaml`` documents the same table.
DEFAULTS: dict[str, dict[str, Any]] = {
    # echo and pool_type come from the original manager's configuration (SQLAlchemy's
    # create_engine options): echo logs every SQL statement; pool_type is accepted and has no
    # effect (each thread keeps one connection; see ORIGINAL_KEYS).
    "database": {"engine": "sqlite:///handoff.db", "timeout": 30.0, "echo": False, "pool_type": None},
    "logging": {
        "file": None,
        "format": "%(asctime)s %(levelname)s %(name)s: %(message)s",
        "level": "INFO",
        "rotate": "SIZE",
        "maxbytes": 10 * 1024 * 1024,
        "backup_count": 5,
        "when": "midnight",
        "interval": 1,
    },
    "general": {
        "chunk_size": 5000,
        "num_threads": 2,
        "timeout": 600.0,
        "min_rate": 1.0,
        "pause": 60.0,
        "expiration_time": 86400.0,
        "exclude_list": [],
        "settle": 0.1,
        "stable_age": 2.0,
        "observer": "auto",
        "verify": "size",
        "retry_initial": 5.0,
        "retry_max": 600.0,
        "breaker_threshold": 3,
        "quarantine_after": 10,
        "name": None,
        "metrics_port": None,
        "metrics_address": "127.0.0.1",
        "warm_sessions": "auto",
        "share_connections": "auto",
    },
}

#: Keys only the original manager's configuration has, and what hdfmgr makes of them
#: (``hdfmgr validate`` prints one line for each key a file sets).
ORIGINAL_KEYS: dict[str, str] = {
    "database.echo": "the original's key: true logs every SQL statement at DEBUG in the daemon's log",
    "database.pool_type": "the original's key: accepted, no effect (one connection per thread)",
}

#: The original's way of writing "none" for a key hdfmgr gives a default, and its meaning here.
ORIGINAL_NULLS: dict[str, str] = {
    "logging.rotate": "null, as in the original: the log file is never rotated (SIGHUP reopens it)",
    "general.timeout": f"null, as in the original: commands are bounded by the {TIMEOUT_CEILING:g} s ceiling",
    "general.exclude_list": "null, as in the original: no file is excluded",
}

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_ENDPOINT_KEYS = ("buffer", "staging", "commands")


@dataclass(frozen=True)
class LoggingConfig:
    file: Path | None
    format: str
    level: str
    #: SIZE, TIME, or None: never rotated (the original's ``rotate: null``).
    rotate: str | None
    maxbytes: int
    backup_count: int
    when: str
    interval: int


@dataclass(frozen=True)
class Config:
    """Everything the daemon needs, validated. Paths are absolute."""

    path: Path
    buffer: Path
    holding: Path
    endpoint_buffer: str
    staging: str
    transfer: Template
    remote: Template
    params: Mapping[str, object]
    database: str
    database_timeout: float
    logging: LoggingConfig
    chunk_size: int
    num_threads: int
    timeout: float
    pause: float
    expiration_time: float
    exclude: tuple[re.Pattern[str], ...]
    settle: float
    stable_age: float
    observer: str
    verify: str
    retry_initial: float
    retry_max: float
    breaker_threshold: int
    quarantine_after: int
    name: str
    raw: Mapping[str, Any] = field(repr=False, default_factory=dict)
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"
    #: database.echo: log every SQL statement (the original's SQLAlchemy ``echo``).
    database_echo: bool = False
    #: One line per original-only key or original-style null the file uses (for ``validate``).
    original_notes: tuple[str, ...] = ()
    #: MB/s a transfer is allowed at the least: its deadline is ``timeout`` plus its bytes at
    #: this rate (see :meth:`deadline`).
    min_rate: float = 1.0

    def deadline(self, nbytes: int) -> float:
        """Seconds a command that moves or reads ``nbytes`` may take: ``timeout`` is the fixed
        part (connection, start-up), the rest grows with the bytes."""
        return self.timeout + nbytes / (self.min_rate * 1e6)

    #: Run hdfmgr's own remote steps through warm sessions (hdfmgr/session.py).
    warm_sessions: bool = False
    #: ``transfer: builtin:stream``: each batch travels as one tar stream through the
    #: ``remote`` command (hdfmgr/stream.py), no transfer command of its own.
    stream: bool = False
    #: Where hdfmgr's shared ssh connections keep their sockets (hdfmgr/sharing.py); None:
    #: it added no sharing to the templates.
    control_dir: str | None = None
    #: This configuration's part of the socket names (its masters serve no other's commands).
    control_tag: str = ""
    #: Why sharing was wanted but not added (an unsafe socket directory), for logs and doctor.
    sharing_problem: str | None = None

    def excluded(self, relpath: str) -> bool:
        """True when ``relpath`` (relative to the buffer) matches an exclude pattern."""
        return bool(self.exclude) and any(p.search(relpath) for p in self.exclude)


def load(path: str | os.PathLike[str], *, check_paths: bool = True) -> Config:
    """Read and validate a configuration file; raise :class:`ConfigError` on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    return from_mapping(data, path=path.resolve(), check_paths=check_paths)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice (PyYAML would silently keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def from_mapping(data: Any, *, path: Path, check_paths: bool = True) -> Config:
    """Validate an already-parsed configuration mapping (the loader's second half)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping with sections handoff, endpoint, ...")
    known_sections = {"handoff", "endpoint", *DEFAULTS}
    for section in data:
        if section not in known_sections:
            raise ConfigError(
                f"unknown section '{section}' (expected one of {', '.join(sorted(known_sections))})"
            )
    base = path.parent
    handoff = _section(data, "handoff", required=True)
    _no_unknown(handoff, "handoff", ("buffer", "holding"))
    endpoint = _section(data, "endpoint", required=True)
    sections = {name: _merged(data, name) for name in DEFAULTS}

    buffer = _local_dir(handoff, "handoff.buffer", base, check_paths)
    holding = _local_dir(handoff, "handoff.holding", base, check_paths)
    if _inside(holding, buffer):
        raise ConfigError(f"handoff.holding ({holding}) must not be inside handoff.buffer ({buffer})")
    if _inside(buffer, holding):
        raise ConfigError(f"handoff.buffer ({buffer}) must not be inside handoff.holding ({holding})")

    ep_buffer = _remote_dir(endpoint, "endpoint.buffer")
    staging = _remote_dir(endpoint, "endpoint.staging")
    if _inside(Path(staging), Path(ep_buffer)):
        raise ConfigError(
            f"endpoint.staging ({staging}) must not be endpoint.buffer or inside it: the endpoint "
            "manager would ingest partial files"
        )
    params: dict[str, object] = {}
    for key, value in endpoint.items():
        if key in _ENDPOINT_KEYS:
            continue
        if key in RESERVED:
            raise ConfigError(f"endpoint.{key}: '{key}' is a reserved word and cannot be a parameter")
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"endpoint.{key}: a parameter must be a string or a number")
        params[key] = value
    commands = endpoint.get("commands")
    if not isinstance(commands, dict):
        raise ConfigError("endpoint.commands: missing (needs 'transfer' and 'remote')")
    _no_unknown(commands, "endpoint.commands", ("transfer", "remote"))
    stream = commands.get("transfer") == STREAM
    if (
        isinstance(commands.get("transfer"), str)
        and commands["transfer"].startswith("builtin:")
        and not stream
    ):
        raise ConfigError(
            f"endpoint.commands.transfer: {commands['transfer']!r} is not a built-in transfer "
            f"(the one there is: {STREAM})"
        )
    transfer = Template.parse(STREAM, {}) if stream else _template(commands, "transfer", params)
    remote = _template(commands, "remote", params)
    slots = {"dest", "batch"} if stream else transfer.slots
    if "dest" not in slots:
        raise ConfigError("endpoint.commands.transfer: must contain {dest}")
    if ("file" in slots) == ("batch" in slots):
        raise ConfigError("endpoint.commands.transfer: must contain exactly one of {file} or {batch}")
    if "command" in slots:
        raise ConfigError("endpoint.commands.transfer: {command} belongs in the remote command")
    if remote.slots != {"command"}:
        raise ConfigError("endpoint.commands.remote: must contain {command} and no other reserved word")
    control_dir: str | None = None
    control_tag = ""
    sharing_problem: str | None = None
    share = _share_connections(sections["general"]["share_connections"])
    # A template that configures sharing itself: the operator's choice for both.
    if share and not any(sharing.mentions_sharing(t) for t in (transfer, remote)):
        directory, tag = sharing.control_dir(), sharing.tag(os.fspath(path))
        shared_transfer = None if stream else sharing.shared(transfer, directory, tag)
        shared_remote = sharing.shared(remote, directory, tag)
        if shared_transfer is not None or shared_remote is not None:
            sharing_problem = sharing.unsafe(directory)
            if sharing_problem is None:
                transfer = shared_transfer or transfer
                remote = shared_remote or remote
                control_dir, control_tag = directory, tag

    database = sections["database"]
    _no_unknown(database, "database", DEFAULTS["database"])
    engine = _string(database, "database", "engine")
    _check_database_url(engine, base, check_paths)
    db_timeout = _number(database, "database", "timeout", minimum=0.1)
    echo = database["echo"]
    if not isinstance(echo, bool):
        raise ConfigError(f"database.echo: must be true or false, got {echo!r}")
    pool_type = database["pool_type"]
    if pool_type is not None and not isinstance(pool_type, str):
        raise ConfigError(f"database.pool_type: must be a name (it has no effect) or null, got {pool_type!r}")

    log = sections["logging"]
    _no_unknown(log, "logging", DEFAULTS["logging"])
    level = _string(log, "logging", "level").upper()
    if level not in _LOG_LEVELS:
        raise ConfigError(f"logging.level: unknown level {log['level']!r} (one of {', '.join(_LOG_LEVELS)})")
    rotate = None if log["rotate"] is None else _string(log, "logging", "rotate").upper()
    if rotate not in ("SIZE", "TIME", None):
        raise ConfigError(f"logging.rotate: {log['rotate']!r} is neither SIZE, TIME nor null")
    log_file = log["file"]
    if log_file is not None:
        if not isinstance(log_file, str) or not log_file:
            raise ConfigError("logging.file: must be a path or null (stderr)")
        log_file = _absolute(log_file, base)
        if check_paths and not (log_file.parent.is_dir() and os.access(log_file.parent, os.W_OK)):
            raise ConfigError(f"logging.file: directory {log_file.parent} does not exist or is not writable")
    when = _string(log, "logging", "when")
    if when.upper() not in ("S", "M", "H", "D", "MIDNIGHT") and not re.fullmatch(r"[Ww][0-6]", when):
        raise ConfigError(f"logging.when: {when!r} is not one of S, M, H, D, MIDNIGHT, W0-W6")
    logging_config = LoggingConfig(
        file=log_file,
        format=_string(log, "logging", "format"),
        level=level,
        rotate=rotate,
        maxbytes=_integer(log, "logging", "maxbytes", minimum=0),
        backup_count=_integer(log, "logging", "backup_count", minimum=0),
        when=when,
        interval=_integer(log, "logging", "interval", minimum=1),
    )

    gen = sections["general"]
    _no_unknown(gen, "general", DEFAULTS["general"])
    timeout_value = gen["timeout"]
    timeout = TIMEOUT_CEILING if timeout_value is None else _number(gen, "general", "timeout", minimum=0.1)
    exclude_list = gen["exclude_list"]
    if exclude_list is None:
        exclude_list = []
    if not isinstance(exclude_list, list) or not all(isinstance(p, str) for p in exclude_list):
        raise ConfigError("general.exclude_list: must be a list of regular expressions (strings)")
    exclude = []
    for pattern in exclude_list:
        try:
            exclude.append(re.compile(pattern))
        except re.error as exc:
            raise ConfigError(
                f"general.exclude_list: invalid regular expression {pattern!r}: {exc}"
            ) from None
    observer = _choice(gen, "observer", ("auto", "inotify", "polling"))
    verify = _choice(gen, "verify", ("size", "checksum"))
    name = gen["name"]
    if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name)):
        raise ConfigError("general.name: must be 1-64 characters of letters, digits, '_' or '-'")
    return Config(
        path=path,
        buffer=buffer,
        holding=holding,
        endpoint_buffer=ep_buffer,
        staging=staging,
        transfer=transfer,
        remote=remote,
        params=params,
        database=engine,
        database_timeout=db_timeout,
        logging=logging_config,
        chunk_size=_integer(gen, "general", "chunk_size", minimum=1),
        num_threads=_integer(gen, "general", "num_threads", minimum=1, maximum=64),
        timeout=min(timeout, TIMEOUT_CEILING),
        pause=_number(gen, "general", "pause", minimum=1.0),
        expiration_time=_number(gen, "general", "expiration_time", minimum=0.0),
        exclude=tuple(exclude),
        settle=_number(gen, "general", "settle", minimum=0.0, maximum=3600.0),
        stable_age=_number(gen, "general", "stable_age", minimum=0.0, maximum=86400.0),
        observer=observer,
        verify=verify,
        retry_initial=_number(gen, "general", "retry_initial", minimum=0.01),
        retry_max=_number(gen, "general", "retry_max", minimum=0.01),
        breaker_threshold=_integer(gen, "general", "breaker_threshold", minimum=1),
        quarantine_after=_integer(gen, "general", "quarantine_after", minimum=1),
        name=name or _default_name(buffer),
        raw=data,
        metrics_port=_optional_port(gen, "metrics_port"),
        metrics_address=_string(gen, "general", "metrics_address"),
        database_echo=echo,
        original_notes=original_notes(data),
        min_rate=_number(gen, "general", "min_rate", minimum=0.001),
        warm_sessions=_warm_sessions(gen["warm_sessions"], remote),
        stream=stream,
        control_dir=control_dir,
        control_tag=control_tag,
        sharing_problem=sharing_problem,
    )


def original_notes(data: Mapping[str, Any]) -> tuple[str, ...]:
    """``key: meaning`` for each original-only key and original-style null in ``data``.

    Pure: the loader has checked the values; this only says how each is read, so that a site
    coming from the original manager sees what its file means to hdfmgr.
    """
    notes = []
    for dotted, meaning in ORIGINAL_KEYS.items():
        section, key = dotted.split(".")
        if key in (data.get(section) or {}):
            notes.append(f"{dotted}: {meaning}")
    for dotted, meaning in ORIGINAL_NULLS.items():
        section, key = dotted.split(".")
        values = data.get(section) or {}
        if key in values and values[key] is None:
            notes.append(f"{dotted}: {meaning}")
    return tuple(notes)


def _warm_sessions(value: object, remote: Template) -> bool:
    """``auto`` turns warm sessions on where they cannot surprise: a remote template that runs
    ``ssh`` itself (it passes stdin through and keeps a connection open as any command does).
    A wrapper script or another tool is left to one command per step unless asked."""
    if isinstance(value, bool):
        return value
    if value != "auto":
        raise ConfigError(f"general.warm_sessions: {value!r} is not one of true, false, auto")
    first = remote.tokens[0]
    return len(first) == 1 and isinstance(first[0], str) and os.path.basename(first[0]) == "ssh"


def _share_connections(value: object) -> bool:
    """``auto`` (or true): add ssh connection sharing where hdfmgr can (hdfmgr/sharing.py)."""
    if value is False:
        return False
    if value is True or value == "auto":
        return True
    raise ConfigError(f"general.share_connections: {value!r} is not one of auto, true, false")


def _default_name(buffer: Path) -> str:
    """A name that tells one handoff host and buffer from another in a shared database."""
    node = re.sub(r"[^A-Za-z0-9_-]", "_", os.uname().nodename)[:40] or "host"
    digest = hashlib.blake2b(os.fsencode(buffer), digest_size=4).hexdigest()
    return f"{node}-{digest}"


def _section(data: dict[str, Any], name: str, *, required: bool) -> dict[str, Any]:
    value = data.get(name)
    if value is None:
        if required:
            raise ConfigError(f"section '{name}' is missing")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"section '{name}' must be a mapping")
    return value


def _merged(data: dict[str, Any], name: str) -> dict[str, Any]:
    section = _section(data, name, required=False)
    unknown = [key for key in section if key not in DEFAULTS[name]]
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key (known: {', '.join(DEFAULTS[name])})")
    return {**DEFAULTS[name], **section}


def _no_unknown(section: Mapping[str, Any], name: str, known: Any) -> None:
    for key in section:
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(known)})")


def _absolute(value: str, base: Path) -> Path:
    return Path(os.path.normpath(base / os.path.expanduser(value)))


def _local_dir(section: dict[str, Any], key: str, base: Path, check: bool) -> Path:
    value = section.get(key.split(".")[1])
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: missing (a directory path is required)")
    path = _absolute(value, base)
    if check:
        if not path.is_dir():
            raise ConfigError(f"{key}: directory {path} does not exist")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}: directory {path} is not writable")
    return path.resolve() if check else path


def _remote_dir(section: dict[str, Any], key: str) -> str:
    value = section.get(key.split(".")[1])
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: missing (an absolute path on the endpoint host is required)")
    if not value.startswith("/"):
        raise ConfigError(f"{key}: {value!r} must be an absolute path on the endpoint host")
    if "\n" in value or "\0" in value:
        raise ConfigError(f"{key}: must not contain a newline or NUL")
    return os.path.normpath(value)


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _template(commands: dict[str, Any], key: str, params: Mapping[str, object]) -> Template:
    text = commands.get(key)
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"endpoint.commands.{key}: missing (a command template is required)")
    try:
        return Template.parse(text, params)
    except TemplateError as exc:
        raise ConfigError(f"endpoint.commands.{key}: {exc}") from None


def _string(section: Mapping[str, Any], name: str, key: str) -> str:
    value = section[key]
    if not isinstance(value, str):
        raise ConfigError(f"{name}.{key}: must be a string, got {value!r}")
    return value


def _number(
    section: Mapping[str, Any], name: str, key: str, *, minimum: float, maximum: float | None = None
) -> float:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name}.{key}: must be a number, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ConfigError(f"{name}.{key}: {value} is out of range (must be {bound})")
    return float(value)


def _integer(
    section: Mapping[str, Any], name: str, key: str, *, minimum: int, maximum: int | None = None
) -> int:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}.{key}: must be a whole number, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ConfigError(f"{name}.{key}: {value} is out of range (must be {bound})")
    return value


def _optional_port(section: Mapping[str, Any], key: str) -> int | None:
    if section[key] is None:
        return None
    return _integer(section, "general", key, minimum=0, maximum=65535)


def _choice(section: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = section[key]
    if value not in choices:
        raise ConfigError(f"general.{key}: {value!r} is not one of {', '.join(choices)}")
    return value


def _check_database_url(url: str, base: Path, check: bool) -> None:
    """Reject URLs peewee would misread (``sqlite://x.db`` silently means in-memory)."""
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///") or url == "sqlite:///":
            raise ConfigError(
                f"database.engine: {url!r} is not a valid SQLite URL; use sqlite:///relative.db "
                "or sqlite:////absolute/path.db"
            )
        target = sqlite_path(url, base)
        if check and not (target.parent.is_dir() and os.access(target.parent, os.W_OK)):
            raise ConfigError(f"database.engine: directory {target.parent} does not exist or is not writable")
        return
    if re.match(r"(postgres|postgresql)(\+\w+)?://", url):
        return
    raise ConfigError(f"database.engine: unsupported URL {url!r} (use sqlite:///... or postgresql://...)")


def sqlite_path(url: str, base: Path) -> Path:
    """The file behind a ``sqlite:///`` URL.

    A relative path is resolved against the configuration file's directory, not the working
    directory, so that the same config means the same database under systemd and in a shell.
    """
    raw = url[len("sqlite:///") :].split("?", 1)[0]
    return _absolute(raw, base)
