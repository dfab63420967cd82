"""Unit tests for hdfmgr.templates: parse once into argv tokens, render per token.

No filename may ever be parsed by a local shell, and every string a remote shell parses is
built with :func:`quote_remote`; the property tests below check both with hostile names.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hdfmgr.templates import RESERVED, Slot, Template, TemplateError, quote_remote

PARAMS = {"user": "jdoe", "host": "example.edu", "port": 22}

# --------------------------------------------------------------------------- parsing


def test_reserved_words() -> None:
    assert frozenset({"batch", "file", "dest", "command"}) == RESERVED


def test_parse_splits_like_a_shell() -> None:
    t = Template.parse("""scp -o 'ProxyCommand ssh -W %h:%p gw' "-Bpq" {batch} {dest}""", {})
    assert t.tokens == (
        ("scp",),
        ("-o",),
        ("ProxyCommand ssh -W %h:%p gw",),
        ("-Bpq",),
        (Slot("batch"),),
        (Slot("dest"),),
    )
    assert t.source.startswith("scp -o")


def test_parameters_are_substituted_at_parse_time() -> None:
    t = Template.parse("scp -P {port} {file} {user}@{host}:{dest}", PARAMS)
    assert t.tokens == (
        ("scp",),
        ("-P",),
        ("22",),
        (Slot("file"),),
        ("jdoe@example.edu:", Slot("dest")),
    )
    assert t.slots == {"file", "dest"}
    assert not t.batched


def test_parameter_values_are_not_split_or_reparsed() -> None:
    params = {"opts": "-o A=1 -o B=2", "weird": "{dest}{{x}}"}
    t = Template.parse("cmd {opts} {weird} {batch} {dest}", params)
    assert t.render(files=["/f"], dest="/d") == ["cmd", "-o A=1 -o B=2", "{dest}{{x}}", "/f", "/d"]


def test_numeric_parameters_render_as_text() -> None:
    t = Template.parse("x {a} {b} {file} {dest}", {"a": 18, "b": 1.5})
    assert t.render(files=["/f"], dest="/d")[:3] == ["x", "18", "1.5"]


def test_triple_braces_are_a_literal_brace_and_a_slot() -> None:
    """As in str.format: ``{{{file}}}`` is a literal brace around the file."""
    t = Template.parse("echo {{{file}}} {dest}", {})
    assert t.render(files=["/f"], dest="/d") == ["echo", "{/f}", "/d"]


def test_empty_placeholder_is_reported_as_undefined() -> None:
    with pytest.raises(TemplateError, match=r"placeholder \{\} is not defined"):
        Template.parse("cp {} {file} {dest}", {})


def test_double_braces_are_literal() -> None:
    t = Template.parse("echo {{dest}} {{ }} a{{b}}c {file} {dest}", {})
    assert t.slots == {"file", "dest"}
    assert t.render(files=["/f"], dest="/d") == ["echo", "{dest}", "{", "}", "a{b}c", "/f", "/d"]


def test_quoted_placeholders_are_still_placeholders() -> None:
    t = Template.parse("""ssh host "{command}" """, {})
    assert t.tokens[-1] == (Slot("command"),)
    t = Template.parse("""cp '{batch}' "{dest}" """, {})
    assert t.batched
    assert t.render(files=["/a", "/b"], dest="/d") == ["cp", "/a", "/b", "/d"]


@pytest.mark.parametrize(
    "text",
    ["cp {batch {dest}", "cp {batch} dest}", "cp } {dest}", "cp {file} {dest}{", "x {{{file}} {dest}}"],
)
def test_unbalanced_braces(text: str) -> None:
    with pytest.raises(TemplateError, match="brace"):
        Template.parse(text, {})


def test_unbalanced_quotes() -> None:
    with pytest.raises(TemplateError, match="cannot split"):
        Template.parse("cp {batch} '{dest}", {})


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_template(text: str) -> None:
    with pytest.raises(TemplateError, match="empty"):
        Template.parse(text, {})


def test_undefined_placeholder_is_named() -> None:
    with pytest.raises(TemplateError, match=r"\{usr\}"):
        Template.parse("scp {file} {usr}@{host}:{dest}", PARAMS)
    with pytest.raises(TemplateError, match="not defined"):
        Template.parse("scp {File} {file} {dest}", PARAMS)


@pytest.mark.parametrize(
    "text",
    [
        "cp x{batch} {dest}",
        "cp {batch}x {dest}",
        "cp {batch}{batch} {dest}",
        "cp {user}{batch} {dest}",
        "cp --files={batch} {dest}",
    ],
)
def test_batch_must_be_a_whole_token(text: str) -> None:
    with pytest.raises(TemplateError, match=r"\{batch\}"):
        Template.parse(text, PARAMS)


def test_reserved_placeholders_win_over_parameters() -> None:
    """Even if a caller passes a reserved name as a parameter, it stays a run-time slot."""
    t = Template.parse("cp {file} {dest}", {"file": "/etc/passwd", "dest": "/tmp"})
    assert t.render(files=["/mine"], dest="/there") == ["cp", "/mine", "/there"]


def test_fixed_length_counts_literal_words() -> None:
    t = Template.parse("cp -p {batch} {dest}", {})
    assert t.fixed_length() == len("cp") + 1 + len("-p") + 1
    t = Template.parse("scp {batch} u@h:{dest}", {})
    assert t.fixed_length() == len("scp") + 1 + len("u@h:") + 1


# --------------------------------------------------------------------------- rendering


def test_batch_expands_to_one_entry_per_file() -> None:
    t = Template.parse("rsync -a {batch} {user}@{host}:{dest}/", PARAMS)
    files = ["/b/a", "/b/with space", "/b/-dash"]
    assert t.render(files=files, dest="/stage/s1") == ["rsync", "-a", *files, "jdoe@example.edu:/stage/s1/"]


def test_batch_with_no_files_renders_no_entries() -> None:
    t = Template.parse("cp {batch} {dest}", {})
    assert t.render(files=[], dest="/d") == ["cp", "/d"]


def test_file_renders_exactly_one() -> None:
    t = Template.parse("scp {file} {dest}", {})
    assert t.render(files=["/b/x"], dest="/d") == ["scp", "/b/x", "/d"]
    with pytest.raises(ValueError):
        t.render(files=["/b/x", "/b/y"], dest="/d")
    with pytest.raises(ValueError):
        t.render(files=[], dest="/d")


def test_file_embedded_in_a_token() -> None:
    t = Template.parse("curl -T {file} --url=sftp://h{dest}/", {})
    assert t.render(files=["/b/a b"], dest="/s") == ["curl", "-T", "/b/a b", "--url=sftp://h/s/"]


def test_dest_embedded_in_a_token() -> None:
    t = Template.parse("scp {batch} {user}@{host}:{dest}", PARAMS)
    assert (
        t.render(files=["/f"], dest="/stage/dir with space")[-1] == "jdoe@example.edu:/stage/dir with space"
    )


def test_command_is_one_argv_entry() -> None:
    t = Template.parse('ssh -p {port} {user}@{host} "{command}"', PARAMS)
    command = "sh -c 'echo $HOME; ls' hdfmgr 'a b'"
    assert t.render(command=command) == ["ssh", "-p", "22", "jdoe@example.edu", command]
    local = Template.parse('sh -c "{command}"', {})
    assert local.render(command=command) == ["sh", "-c", command]


def test_render_does_not_mutate_the_template() -> None:
    t = Template.parse("cp {batch} {dest}", {})
    first = t.render(files=["/a"], dest="/d1")
    second = t.render(files=["/b", "/c"], dest="/d2")
    assert first == ["cp", "/a", "/d1"]
    assert second == ["cp", "/b", "/c", "/d2"]


def test_quote_remote_simple_words_stay_readable() -> None:
    assert quote_remote(["mkdir", "-p", "/data/staging/x"]) == "mkdir -p /data/staging/x"
    assert quote_remote(["echo", "a b", ""]) == "echo 'a b' ''"


# --------------------------------------------------------------------------- properties

HOSTILE = [
    "$(touch pwned)",
    "`touch pwned`",
    "a;b",
    "a|b",
    "a&b",
    "'",
    '"',
    "\n",
    "\t",
    "{dest}",
    "{file}",
    "{{",
    "}",
    "-rf",
    "--",
    "*",
    "?",
    "[a]",
    "~",
    "\\",
    " ",
    "!",
    "#",
    "%s",
    "\x1b",
    "é",
    "\u202e",
]

name_text = st.lists(
    st.one_of(
        st.sampled_from(HOSTILE), st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)
    ),
    min_size=1,
    max_size=5,
).map("".join)
name_bytes = st.binary(min_size=1, max_size=16).filter(lambda b: b"\0" not in b).map(os.fsdecode)
hostile_names = st.one_of(name_text, name_bytes)


@settings(max_examples=200, deadline=None)
@given(files=st.lists(hostile_names, min_size=1, max_size=6), dest=hostile_names)
def test_render_batch_keeps_every_name_intact(files: list[str], dest: str) -> None:
    t = Template.parse("scp -Bpq {batch} {user}@{host}:{dest}", PARAMS)
    argv = t.render(files=files, dest=dest)
    assert argv == ["scp", "-Bpq", *files, f"jdoe@example.edu:{dest}"]


@settings(max_examples=200, deadline=None)
@given(name=hostile_names, dest=hostile_names)
def test_render_file_keeps_the_name_intact(name: str, dest: str) -> None:
    t = Template.parse("cp -- {file} {dest}", {})
    argv = t.render(files=[name], dest=dest)
    assert argv == ["cp", "--", name, dest]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.lists(hostile_names, min_size=1, max_size=6))
def test_quote_remote_round_trips_through_a_real_shell(names: list[str], tmp_path_factory) -> None:
    cwd = tmp_path_factory.mktemp("sh")
    command = quote_remote(["printf", "%s\\0", *names])
    result = subprocess.run(["sh", "-c", command], cwd=cwd, capture_output=True, timeout=10, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(b"\0")[:-1] == [os.fsencode(n) for n in names]
    assert result.stdout.endswith(b"\0")
    assert list(cwd.iterdir()) == [], "the shell ran something from a name"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.lists(hostile_names, min_size=1, max_size=4))
def test_rendered_command_survives_the_local_remote_template(names: list[str], tmp_path_factory) -> None:
    """The way endpoint.py uses it: a quoted command in ``sh -c "{command}"``."""
    cwd = tmp_path_factory.mktemp("sh")
    remote = Template.parse('sh -c "{command}"', {})
    argv = remote.render(command=quote_remote(["printf", "%s\\0", *names]))
    result = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=10, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(b"\0")[:-1] == [os.fsencode(n) for n in names]
    assert list(cwd.iterdir()) == []
