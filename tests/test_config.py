"""Unit tests for hdfmgr.config: loading, defaults and the strict validation of issue 2.

Every failure must be a :class:`ConfigError` whose ``str()`` is one line naming the key, so
that an operator sees exactly what to fix.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hdfmgr import __version__, cli, config, sharing
from hdfmgr.config import DEFAULTS, TIMEOUT_CEILING, ConfigError, from_mapping, load, sqlite_path

# --------------------------------------------------------------------------- helpers


def seed_yaml(buffer: Path | str, holding: Path | str) -> str:
    """The seed quickstart's example configuration, with local handoff directories."""
    return textwrap.dedent(
        f"""\
        handoff:
          buffer: {buffer}
          holding: {holding}
        endpoint:
          buffer: /data/buffer
          staging: /data/staging
          commands:
            transfer: "scp -Bpq {{file}} {{user}}@{{host}}:{{dest}}"
            remote: "ssh {{user}}@{{host}} \\"{{command}}\\""
          user: jdoe
          host: example.edu
        database:
          engine: "sqlite:///handoff.db"
        """
    )


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory with ``buffer`` and ``holding`` subdirectories."""
    (tmp_path / "buffer").mkdir()
    (tmp_path / "holding").mkdir()
    return tmp_path


def good_mapping(site: Path) -> dict[str, Any]:
    """A minimal valid configuration as parsed YAML."""
    return {
        "handoff": {"buffer": str(site / "buffer"), "holding": str(site / "holding")},
        "endpoint": {
            "buffer": "/data/buffer",
            "staging": "/data/staging",
            "commands": {
                "transfer": "scp -Bpq -P {port} {batch} {user}@{host}:{dest}",
                "remote": 'ssh -p {port} {user}@{host} "{command}"',
            },
            "user": "jdoe",
            "host": "example.edu",
            "port": 22,
        },
        "database": {"engine": "sqlite:///handoff.db"},
    }


def build(site: Path, mutate: Callable[[dict[str, Any]], object] | None = None) -> config.Config:
    data = copy.deepcopy(good_mapping(site))
    if mutate is not None:
        mutate(data)
    return from_mapping(data, path=site / "config.yaml")


def assert_one_line_error(excinfo: pytest.ExceptionInfo[ConfigError], *names: str) -> str:
    message = str(excinfo.value)
    assert message, "a ConfigError must say something"
    assert "\n" not in message and "\r" not in message, f"not one line: {message!r}"
    for name in names:
        assert name in message, f"{name!r} not named in {message!r}"
    return message


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _set(*keys: str, value: object) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value

    return mutate


def _del(*keys: str) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        node = data
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]

    return mutate


# --------------------------------------------------------------------------- loading


def test_seed_example_loads(site: Path) -> None:
    path = write(site / "config.yaml", seed_yaml(site / "buffer", site / "holding"))
    cfg = load(path)
    assert cfg.path == path.resolve()
    assert cfg.buffer == (site / "buffer").resolve()
    assert cfg.holding == (site / "holding").resolve()
    assert cfg.endpoint_buffer == "/data/buffer"
    assert cfg.staging == "/data/staging"
    assert dict(cfg.params) == {"user": "jdoe", "host": "example.edu"}
    assert cfg.transfer.slots == {"file", "dest"}
    assert not cfg.transfer.batched
    assert cfg.remote.slots == {"command"}
    # hdfmgr adds ssh connection sharing to the seed's ssh and scp (general.share_connections).
    added = sharing.options(cfg.control_dir or "", cfg.control_tag)
    assert cfg.control_dir is not None and len(added) == 6
    assert cfg.transfer.render(files=["/b/x y"], dest="/data/staging/s") == [
        "scp",
        *added,
        "-Bpq",
        "/b/x y",
        "jdoe@example.edu:/data/staging/s",
    ]
    assert cfg.remote.render(command="mkdir -p '/a b'") == [
        "ssh",
        *added,
        "jdoe@example.edu",
        "mkdir -p '/a b'",
    ]
    assert cfg.database == "sqlite:///handoff.db"
    assert sqlite_path(cfg.database, cfg.path.parent) == site / "handoff.db"


def test_batched_mapping_loads(site: Path) -> None:
    cfg = build(site)
    assert cfg.transfer.batched
    assert cfg.transfer.render(files=["/b/1", "/b/2"], dest="/s") == [
        "scp",
        *sharing.options(cfg.control_dir or "", cfg.control_tag),
        "-Bpq",
        "-P",
        "22",
        "/b/1",
        "/b/2",
        "jdoe@example.edu:/s",
    ]


def test_config_is_frozen(site: Path) -> None:
    cfg = build(site)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.chunk_size = 5  # type: ignore[misc]


def test_defaults_applied(site: Path) -> None:
    cfg = build(site, _del("database"))
    general = DEFAULTS["general"]
    assert cfg.chunk_size == general["chunk_size"]
    assert cfg.num_threads == general["num_threads"]
    assert cfg.timeout == general["timeout"]
    assert cfg.pause == general["pause"]
    assert cfg.expiration_time == general["expiration_time"]
    assert cfg.exclude == ()
    assert cfg.settle == general["settle"]
    assert cfg.stable_age == general["stable_age"]
    assert cfg.observer == general["observer"]
    assert cfg.verify == general["verify"]
    assert cfg.retry_initial == general["retry_initial"]
    assert cfg.retry_max == general["retry_max"]
    assert cfg.breaker_threshold == general["breaker_threshold"]
    assert cfg.database == DEFAULTS["database"]["engine"]
    assert cfg.database_timeout == DEFAULTS["database"]["timeout"]
    logging_defaults = DEFAULTS["logging"]
    assert cfg.logging.file is None
    assert cfg.logging.level == logging_defaults["level"]
    assert cfg.logging.rotate == logging_defaults["rotate"]
    assert cfg.logging.maxbytes == logging_defaults["maxbytes"]
    assert cfg.logging.backup_count == logging_defaults["backup_count"]
    assert cfg.logging.when == logging_defaults["when"]
    assert cfg.logging.interval == logging_defaults["interval"]
    assert cfg.logging.format == logging_defaults["format"]
    # the default instance name is a safe token that tells buffers apart
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cfg.name)


def test_default_name_differs_per_buffer(tmp_path: Path) -> None:
    names = set()
    for sub in ("a", "b"):
        (tmp_path / sub / "buffer").mkdir(parents=True)
        (tmp_path / sub / "holding").mkdir()
        names.add(build(tmp_path / sub).name)
    assert len(names) == 2


def test_explicit_values_override_defaults(site: Path) -> None:
    cfg = build(
        site,
        lambda d: d.update(
            general={
                "chunk_size": 10,
                "num_threads": 4,
                "timeout": 30,
                "pause": 5,
                "exclude_list": [r"\.tmp$", r"(^|/)\."],
                "verify": "checksum",
                "observer": "polling",
                "name": "cam-1",
            },
            logging={"level": "debug", "rotate": "time", "when": "W3"},
        ),
    )
    assert (cfg.chunk_size, cfg.num_threads, cfg.timeout, cfg.pause) == (10, 4, 30.0, 5.0)
    assert isinstance(cfg.timeout, float)
    assert (cfg.verify, cfg.observer, cfg.name) == ("checksum", "polling", "cam-1")
    assert cfg.logging.level == "DEBUG"
    assert cfg.logging.rotate == "TIME"
    assert cfg.excluded("night/x.fits.tmp")
    assert cfg.excluded("night/.hidden")
    assert not cfg.excluded("night/x.fits")


def test_timeout_null_means_the_ceiling(site: Path) -> None:
    cfg = build(site, _set("general", "timeout", value=None))
    assert cfg.timeout == TIMEOUT_CEILING


def test_timeout_is_capped_at_the_ceiling(site: Path) -> None:
    cfg = build(site, _set("general", "timeout", value=TIMEOUT_CEILING * 10))
    assert cfg.timeout == TIMEOUT_CEILING


def test_empty_sections_take_defaults(site: Path) -> None:
    path = write(
        site / "config.yaml",
        seed_yaml(site / "buffer", site / "holding") + "logging:\ngeneral:\n  exclude_list:\n",
    )
    cfg = load(path)
    assert cfg.exclude == ()
    assert cfg.logging.level == DEFAULTS["logging"]["level"]


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data" / "buffer").mkdir(parents=True)
    (tmp_path / "data" / "holding").mkdir()
    (tmp_path / "etc" / "logs").mkdir(parents=True)
    path = write(
        tmp_path / "etc" / "hdfmgr.yaml",
        seed_yaml("../data/buffer", "../data/holding") + "logging:\n  file: logs/hdfmgr.log\n",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load(path)
    assert cfg.buffer == (tmp_path / "data" / "buffer").resolve()
    assert cfg.holding == (tmp_path / "data" / "holding").resolve()
    assert cfg.logging.file == tmp_path / "etc" / "logs" / "hdfmgr.log"
    assert sqlite_path(cfg.database, cfg.path.parent) == tmp_path / "etc" / "handoff.db"
    # a relative path to the config file itself works too
    monkeypatch.chdir(tmp_path)
    assert load(Path("etc/hdfmgr.yaml")).buffer == cfg.buffer


def test_sqlite_absolute_url(site: Path) -> None:
    (site / "db").mkdir()
    cfg = build(site, _set("database", "engine", value=f"sqlite:///{site}/db/h.db"))
    assert sqlite_path(cfg.database, site) == site / "db" / "h.db"


def test_postgresql_url_is_accepted(site: Path) -> None:
    cfg = build(site, _set("database", "engine", value="postgresql://hdf@db.example.edu/handoff"))
    assert cfg.database.startswith("postgresql://")


def test_tilde_is_expanded(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(site))
    cfg = build(site, lambda d: d["handoff"].update(buffer="~/buffer", holding="~/holding"))
    assert cfg.buffer == (site / "buffer").resolve()


def test_check_paths_false_accepts_missing_directories(tmp_path: Path) -> None:
    data = good_mapping(tmp_path / "nowhere")
    cfg = from_mapping(data, path=tmp_path / "config.yaml", check_paths=False)
    assert cfg.buffer == tmp_path / "nowhere" / "buffer"


def test_symlinked_holding_inside_buffer_is_caught(site: Path) -> None:
    (site / "buffer" / "held").mkdir()
    (site / "alias").symlink_to(site / "buffer" / "held")
    with pytest.raises(ConfigError) as excinfo:
        build(site, _set("handoff", "holding", value=str(site / "alias")))
    assert_one_line_error(excinfo, "handoff.holding")


# --------------------------------------------------------------------------- YAML 1.1 pitfalls


def test_yaml_octal_port_is_an_int(site: Path) -> None:
    """YAML 1.1 reads ``port: 022`` as octal 18. It is allowed: a parameter may be a number."""
    text = seed_yaml(site / "buffer", site / "holding").replace(
        "  host: example.edu\n", "  host: h\n  port: 022\n"
    )
    cfg = load(write(site / "config.yaml", text))
    assert cfg.params["port"] == 18


def test_yaml_quoted_port_stays_a_string(site: Path) -> None:
    """Quoting is how an operator keeps ``022`` as written."""
    text = seed_yaml(site / "buffer", site / "holding")
    text = text.replace("  host: example.edu\n", '  host: h\n  port: "022"\n')
    text = text.replace("scp -Bpq {file}", "scp -Bpq -P {port} {file}")
    cfg = load(write(site / "config.yaml", text))
    assert cfg.params["port"] == "022"
    assert cfg.transfer.render(files=["/f"], dest="/d")[3 + len(sharing.options("d"))] == "022"


def test_yaml_bool_parameter_is_rejected(site: Path) -> None:
    """``port: yes`` is a YAML 1.1 boolean, never a port number."""
    text = seed_yaml(site / "buffer", site / "holding").replace(
        "  host: example.edu\n", "  host: h\n  port: yes\n"
    )
    with pytest.raises(ConfigError) as excinfo:
        load(write(site / "config.yaml", text))
    assert_one_line_error(excinfo, "endpoint.port")


def test_yaml_string_chunk_size_is_rejected(site: Path) -> None:
    text = seed_yaml(site / "buffer", site / "holding") + 'general:\n  chunk_size: "10"\n'
    with pytest.raises(ConfigError) as excinfo:
        load(write(site / "config.yaml", text))
    assert_one_line_error(excinfo, "general.chunk_size")


def test_yaml_sqlite_url_with_two_slashes_is_rejected(site: Path) -> None:
    text = seed_yaml(site / "buffer", site / "holding").replace("sqlite:///handoff.db", "sqlite://handoff.db")
    with pytest.raises(ConfigError) as excinfo:
        load(write(site / "config.yaml", text))
    assert_one_line_error(excinfo, "database.engine", "sqlite://handoff.db")


def test_invalid_yaml_is_one_line(site: Path) -> None:
    path = write(site / "config.yaml", "handoff:\n  buffer: [unclosed\n  holding: x\n")
    with pytest.raises(ConfigError) as excinfo:
        load(path)
    assert_one_line_error(excinfo, str(path), "invalid YAML")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(tmp_path / "absent.yaml")
    assert_one_line_error(excinfo, "absent.yaml", "not found")


@pytest.mark.parametrize("text", ["", "just a string\n", "- a\n- b\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load(write(tmp_path / "config.yaml", text))
    assert_one_line_error(excinfo, "mapping")


# --------------------------------------------------------------------------- validation

# (id, mutation, names the message must contain)
INVALID: list[tuple[str, Callable[[dict[str, Any]], object], tuple[str, ...]]] = [
    # missing sections and keys
    ("no-handoff", _del("handoff"), ("handoff",)),
    ("no-endpoint", _del("endpoint"), ("endpoint",)),
    ("null-handoff", _set("handoff", value=None), ("handoff",)),
    ("handoff-not-mapping", _set("handoff", value=["/a"]), ("handoff",)),
    ("general-not-mapping", _set("general", value=[1]), ("general",)),
    ("no-handoff.buffer", _del("handoff", "buffer"), ("handoff.buffer",)),
    ("no-handoff.holding", _del("handoff", "holding"), ("handoff.holding",)),
    ("no-endpoint.buffer", _del("endpoint", "buffer"), ("endpoint.buffer",)),
    ("no-endpoint.staging", _del("endpoint", "staging"), ("endpoint.staging",)),
    ("no-commands", _del("endpoint", "commands"), ("endpoint.commands",)),
    ("commands-not-mapping", _set("endpoint", "commands", value="scp"), ("endpoint.commands",)),
    ("no-transfer", _del("endpoint", "commands", "transfer"), ("endpoint.commands.transfer",)),
    ("no-remote", _del("endpoint", "commands", "remote"), ("endpoint.commands.remote",)),
    ("empty-transfer", _set("endpoint", "commands", "transfer", value="  "), ("endpoint.commands.transfer",)),
    # unknown keys: typos must not be ignored
    ("typo-general", _set("general", "chunk_sise", value=10), ("general.chunk_sise",)),
    ("unknown-section", _set("genral", value={"chunk_size": 10}), ("genral",)),
    ("typo-handoff", _set("handoff", "bufer", value="/x"), ("handoff.bufer",)),
    ("typo-commands", _set("endpoint", "commands", "trasnfer", value="x"), ("endpoint.commands.trasnfer",)),
    ("typo-logging", _set("logging", "levle", value="INFO"), ("logging.levle",)),
    ("typo-database", _set("database", "engin", value="sqlite:///x.db"), ("database.engin",)),
    # wrong types
    ("param-bool", _set("endpoint", "port", value=True), ("endpoint.port",)),
    ("param-null", _set("endpoint", "port", value=None), ("endpoint.port",)),
    ("param-list", _set("endpoint", "port", value=[22]), ("endpoint.port",)),
    ("chunk-string", _set("general", "chunk_size", value="10"), ("general.chunk_size",)),
    ("chunk-float", _set("general", "chunk_size", value=10.5), ("general.chunk_size",)),
    ("chunk-bool", _set("general", "chunk_size", value=True), ("general.chunk_size",)),
    ("timeout-bool", _set("general", "timeout", value=True), ("general.timeout",)),
    ("pause-string", _set("general", "pause", value="60"), ("general.pause",)),
    ("threads-bool", _set("general", "num_threads", value=False), ("general.num_threads",)),
    ("exclude-string", _set("general", "exclude_list", value=r"\.tmp$"), ("general.exclude_list",)),
    ("exclude-number", _set("general", "exclude_list", value=[1]), ("general.exclude_list",)),
    ("observer", _set("general", "observer", value="inotfy"), ("general.observer",)),
    ("verify", _set("general", "verify", value="md5"), ("general.verify",)),
    ("name", _set("general", "name", value="no spaces please"), ("general.name",)),
    ("engine-number", _set("database", "engine", value=5), ("database.engine",)),
    ("db-timeout-string", _set("database", "timeout", value="30"), ("database.timeout",)),
    ("level-number", _set("logging", "level", value=10), ("logging.level",)),
    ("log-file-number", _set("logging", "file", value=5), ("logging.file",)),
    ("maxbytes-string", _set("logging", "maxbytes", value="10M"), ("logging.maxbytes",)),
    # ranges
    ("threads-0", _set("general", "num_threads", value=0), ("general.num_threads",)),
    ("threads-65", _set("general", "num_threads", value=65), ("general.num_threads",)),
    ("chunk-0", _set("general", "chunk_size", value=0), ("general.chunk_size",)),
    ("timeout-0", _set("general", "timeout", value=0), ("general.timeout",)),
    ("timeout-negative", _set("general", "timeout", value=-5), ("general.timeout",)),
    ("settle-negative", _set("general", "settle", value=-1), ("general.settle",)),
    ("pause-tiny", _set("general", "pause", value=0.5), ("general.pause",)),
    ("breaker-0", _set("general", "breaker_threshold", value=0), ("general.breaker_threshold",)),
    ("maxbytes-negative", _set("logging", "maxbytes", value=-1), ("logging.maxbytes",)),
    ("interval-0", _set("logging", "interval", value=0), ("logging.interval",)),
    # endpoint directories
    ("staging-relative", _set("endpoint", "staging", value="data/staging"), ("endpoint.staging",)),
    ("staging-is-buffer", _set("endpoint", "staging", value="/data/buffer"), ("endpoint.staging",)),
    ("staging-is-buffer-slash", _set("endpoint", "staging", value="/data/buffer/"), ("endpoint.staging",)),
    ("staging-in-buffer", _set("endpoint", "staging", value="/data/buffer/.staging"), ("endpoint.staging",)),
    (
        "staging-in-buffer-dots",
        _set("endpoint", "staging", value="/data/x/../buffer/s"),
        ("endpoint.staging",),
    ),
    # commands
    (
        "transfer-no-dest",
        _set("endpoint", "commands", "transfer", value="cp {batch} /x"),
        ("endpoint.commands.transfer", "{dest}"),
    ),
    (
        "transfer-no-file",
        _set("endpoint", "commands", "transfer", value="cp /x {dest}"),
        ("endpoint.commands.transfer", "{file}", "{batch}"),
    ),
    (
        "transfer-both",
        _set("endpoint", "commands", "transfer", value="cp {file} {batch} {dest}"),
        ("endpoint.commands.transfer",),
    ),
    (
        "transfer-command",
        _set("endpoint", "commands", "transfer", value="cp {batch} {dest} {command}"),
        ("endpoint.commands.transfer", "{command}"),
    ),
    (
        "remote-no-command",
        _set("endpoint", "commands", "remote", value="ssh {host}"),
        ("endpoint.commands.remote", "{command}"),
    ),
    (
        "remote-with-dest",
        _set("endpoint", "commands", "remote", value="ssh {host} {dest} {command}"),
        ("endpoint.commands.remote",),
    ),
    (
        "undefined-placeholder",
        _set("endpoint", "commands", "transfer", value="scp {batch} {usr}@{host}:{dest}"),
        ("endpoint.commands.transfer", "{usr}"),
    ),
    (
        "undefined-in-remote",
        _set("endpoint", "commands", "remote", value="ssh -p {prt} {host} {command}"),
        ("endpoint.commands.remote", "{prt}"),
    ),
    (
        "unbalanced-brace",
        _set("endpoint", "commands", "transfer", value="scp {batch {dest}"),
        ("endpoint.commands.transfer",),
    ),
    (
        "unbalanced-quote",
        _set("endpoint", "commands", "transfer", value="scp {batch} '{dest}"),
        ("endpoint.commands.transfer",),
    ),
    (
        "batch-inside-token",
        _set("endpoint", "commands", "transfer", value="scp x{batch} {dest}"),
        ("endpoint.commands.transfer", "{batch}"),
    ),
    # reserved words as parameters
    ("reserved-batch", _set("endpoint", "batch", value="x"), ("endpoint.batch", "reserved")),
    ("reserved-file", _set("endpoint", "file", value="x"), ("endpoint.file", "reserved")),
    ("reserved-dest", _set("endpoint", "dest", value="/x"), ("endpoint.dest", "reserved")),
    ("reserved-command", _set("endpoint", "command", value="ls"), ("endpoint.command", "reserved")),
    # exclude_list
    (
        "bad-regex",
        _set("general", "exclude_list", value=[r"\.tmp$", "(unclosed"]),
        ("general.exclude_list", "(unclosed"),
    ),
    ("bad-regex-star", _set("general", "exclude_list", value=["*.tmp"]), ("general.exclude_list",)),
    # database URLs
    ("mysql", _set("database", "engine", value="mysql://u@h/db"), ("database.engine", "mysql://")),
    ("sqlite-two-slashes", _set("database", "engine", value="sqlite://handoff.db"), ("database.engine",)),
    ("sqlite-no-path", _set("database", "engine", value="sqlite:///"), ("database.engine",)),
    ("sqlite-bare", _set("database", "engine", value="handoff.db"), ("database.engine",)),
    (
        "sqlite-missing-dir",
        _set("database", "engine", value="sqlite:////nonexistent/hdfmgr/h.db"),
        ("database.engine", "/nonexistent/hdfmgr"),
    ),
    # logging
    ("level", _set("logging", "level", value="verbose"), ("logging.level", "verbose")),
    ("rotate", _set("logging", "rotate", value="weekly"), ("logging.rotate", "weekly")),
    ("when", _set("logging", "when", value="yearly"), ("logging.when",)),
    ("log-file-missing-dir", _set("logging", "file", value="/nonexistent/hdfmgr/h.log"), ("logging.file",)),
]


@pytest.mark.parametrize(("mutate", "names"), [pytest.param(m, n, id=i) for i, m, n in INVALID])
def test_invalid_configuration(
    site: Path, mutate: Callable[[dict[str, Any]], object], names: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        build(site, mutate)
    assert_one_line_error(excinfo, *names)


def test_handoff_buffer_missing_directory(site: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        build(site, _set("handoff", "buffer", value=str(site / "absent")))
    assert_one_line_error(excinfo, "handoff.buffer", "absent")


def test_handoff_holding_missing_directory(site: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        build(site, _set("handoff", "holding", value=str(site / "absent")))
    assert_one_line_error(excinfo, "handoff.holding", "absent")


def test_handoff_buffer_is_a_file(site: Path) -> None:
    (site / "plain").write_text("x")
    with pytest.raises(ConfigError) as excinfo:
        build(site, _set("handoff", "buffer", value=str(site / "plain")))
    assert_one_line_error(excinfo, "handoff.buffer")


def test_holding_inside_buffer(site: Path) -> None:
    (site / "buffer" / "held").mkdir()
    with pytest.raises(ConfigError) as excinfo:
        build(site, _set("handoff", "holding", value=str(site / "buffer" / "held")))
    assert_one_line_error(excinfo, "handoff.holding", "handoff.buffer")


def test_holding_equal_to_buffer(site: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        build(site, _set("handoff", "holding", value=str(site / "buffer")))
    assert_one_line_error(excinfo, "handoff.holding")


def test_buffer_inside_holding(site: Path) -> None:
    (site / "holding" / "incoming").mkdir()
    with pytest.raises(ConfigError) as excinfo:
        build(site, _set("handoff", "buffer", value=str(site / "holding" / "incoming")))
    assert_one_line_error(excinfo, "handoff.buffer", "handoff.holding")


def test_sibling_with_common_prefix_is_not_inside(site: Path) -> None:
    """``/x/buffer2`` is not inside ``/x/buffer``: the check is by path components."""
    (site / "buffer2").mkdir()
    cfg = build(site, _set("handoff", "holding", value=str(site / "buffer2")))
    assert cfg.holding == (site / "buffer2").resolve()
    cfg = build(site, _set("endpoint", "staging", value="/data/buffer2"))
    assert cfg.staging == "/data/buffer2"


def test_sqlite_database_under_a_regular_file(site: Path) -> None:
    """A database 'directory' that is a regular file can never hold the database."""
    (site / "plain").write_text("x")
    with pytest.raises(ConfigError) as excinfo:
        build(site, _set("database", "engine", value=f"sqlite:///{site}/plain/h.db"))
    assert_one_line_error(excinfo, "database.engine")


def test_unwritable_database_directory(site: Path) -> None:
    """Unwritable by permission (root ignores permissions, so a missing tree stands in for it)."""
    locked = site / "locked"
    locked.mkdir(mode=0o500)
    url = f"sqlite:///{locked}/h.db" if not os.access(locked, os.W_OK) else f"sqlite:///{locked}/no/h.db"
    with pytest.raises(ConfigError) as excinfo:
        build(site, _set("database", "engine", value=url))
    assert_one_line_error(excinfo, "database.engine")


def test_log_file_under_a_regular_file(site: Path) -> None:
    (site / "plain").write_text("x")
    with pytest.raises(ConfigError) as excinfo:
        build(site, _set("logging", "file", value=str(site / "plain" / "h.log")))
    assert_one_line_error(excinfo, "logging.file")


def test_unknown_key_with_a_newline_is_still_one_line(site: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        build(site, _set("general", "chunk\nsize", value=1))
    assert_one_line_error(excinfo, "general.")


def test_directory_with_a_newline_is_still_one_line(site: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        build(site, _set("handoff", "buffer", value=str(site / "new\nline")))
    assert_one_line_error(excinfo, "handoff.buffer")


def test_parameter_with_a_space_stays_one_word(site: Path) -> None:
    """Parameters are substituted after the split: a value never becomes two argv words."""
    cfg = build(site, _set("endpoint", "user", value="j doe"))
    assert cfg.transfer.render(files=["/f"], dest="/d")[-1] == "j doe@example.edu:/d"


def test_escaped_braces_are_not_placeholders(site: Path) -> None:
    cfg = build(site, _set("endpoint", "commands", "transfer", value="cp --suffix={{dest}} {batch} {dest}"))
    assert cfg.transfer.render(files=["/f"], dest="/d") == ["cp", "--suffix={dest}", "/f", "/d"]


# --------------------------------------------------------------------------- CLI


def test_cli_validate_good(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(site / "config.yaml", seed_yaml(site / "buffer", site / "holding"))
    assert cli.main(["validate", str(path)]) == cli.EX_OK == 0
    out, err = capsys.readouterr()
    assert "configuration OK" in out
    assert str(path.resolve()) in out
    assert err == ""


SCP_WARNING = (
    "  warning   endpoint.commands.transfer: {cost} (over a 100 ms round trip the seed's scp {{batch}} "
    "delivered a 189-file visit in 139.8 s, rsync -a in 3.4 s) -> use rsync "
    '(rsync -a -e "ssh ..." {{batch}} {{user}}@{{host}}:{{dest}}) or transfer: builtin:stream '
    "(README, Long links)"
)


@pytest.mark.parametrize(
    ("transfer", "cost"),
    [
        ("scp -Bpq {file} {user}@{host}:{dest}", "one scp per file pays a new ssh connection or channel "
         "and a few round trips per file"),
        ("/usr/bin/scp -Bpq {batch} {user}@{host}:{dest}", "scp pays a few round trips per file"),
        ('rsync -a -e "ssh -p 22" {batch} {user}@{host}:{dest}', None),
    ],
    ids=["scp-file", "scp-batch-full-path", "rsync"],
)  # fmt: skip
def test_cli_validate_warns_about_scp(
    site: Path, capsys: pytest.CaptureFixture[str], transfer: str, cost: str | None
) -> None:
    """scp pays round trips per file: a warning line after the settings, exit status still 0."""
    text = seed_yaml(site / "buffer", site / "holding").replace(
        '"scp -Bpq {file} {user}@{host}:{dest}"', yaml_quote(transfer)
    )
    path = write(site / "config.yaml", text)
    assert cli.main(["validate", str(path)]) == cli.EX_OK
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == f"configuration OK: {path.resolve()}"
    assert f"  transfer  {transfer}  (" in out
    warned = [line for line in lines if line.startswith("  warning ")]
    # ssh-based templates: hdfmgr says it adds connection sharing (general.share_connections).
    assert [line for line in lines if line.startswith("  sharing ")] == [
        "  sharing   ssh connections shared, added by hdfmgr: -o ControlMaster=auto -o ControlPath="
        f"{sharing.control_dir()}/{sharing.tag(str(path.resolve()))}-%C -o ControlPersist=60"
    ]
    if cost is None:
        assert warned == []
        assert len(lines) == 8
    else:
        assert warned == [SCP_WARNING.format(cost=cost)]
        assert lines[-1] == warned[0] and len(lines) == 9


def yaml_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_cli_validate_bad(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = seed_yaml(site / "buffer", site / "holding") + "general:\n  chunk_sise: 10\n"
    path = write(site / "config.yaml", text)
    assert cli.main(["validate", str(path)]) == cli.EX_CONFIG == 78
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "general.chunk_sise" in lines[0]


def test_cli_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(tmp_path / "absent.yaml")]) == 78
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "absent.yaml" in err


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["--version"])
    assert excinfo.value.code in (None, 0)
    assert capsys.readouterr().out.strip() == __version__


@pytest.mark.parametrize("argv", [["bogus"], ["validate"], ["validate", "a", "b"], ["--no-such-option"]])
def test_cli_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == cli.EX_USAGE == 64
    captured = capsys.readouterr()
    assert "Usage:" in captured.out + captured.err
