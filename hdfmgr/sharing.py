"""Connection sharing for ssh-based command templates, applied by hdfmgr itself.

Over a long link a new ssh connection costs about 8 round trips before its first byte; a
template without sharing pays that for every transfer. With ``general.share_connections``
(``auto``, the default) hdfmgr adds OpenSSH's connection sharing to each template that runs
``ssh``, ``scp``, or ``rsync -e ssh`` and says nothing about it itself: the first command
becomes the master and every later one a channel inside it.

What keeps it unsurprising:

* A template that mentions any ``Control*`` option or ``-S`` is the operator's choice and is
  left alone; so is rsync without ``-e`` (its remote shell may come from ``RSYNC_RSH``).
* The sockets live in a directory only this user can use (:func:`control_dir`): created with
  mode 0700, or, when it exists, a real directory owned by this user that no one else can
  enter. Anything else means no sharing (a socket another user planted would receive every
  command), and the reason is logged and shown by ``doctor``.
* ``ControlPersist`` is short (:data:`PERSIST` seconds): a master outlives the daemon by at
  most that long and ends by itself.

State owned: none: template words rewritten once at configuration time, and the socket
directory checked (created when missing) there.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import stat

from .templates import Segment, Template

#: Seconds a master stays after its last channel closed.
PERSIST = 60
#: Longest directory for the sockets: a Unix socket path holds 107 bytes, and ssh adds
#: ``/<tag>-%C`` (9 + 40 characters) and a temporary suffix of 17 while it creates one.
MAX_DIR = 38

_CONTROL = re.compile(r"control(master|path|persist)", re.IGNORECASE)


def options(directory: str, tag: str = "") -> list[str]:
    """The ssh options hdfmgr adds. ``tag`` (from the configuration file's path) keeps one
    configuration's master from serving another's commands: ``%C`` hashes only the user,
    host and port, not the key or the options a master was opened with."""
    return [
        "-o",
        "ControlMaster=auto",
        "-o",
        f"ControlPath={directory}/{tag + '-' if tag else ''}%C",
        "-o",
        f"ControlPersist={PERSIST}",
    ]


def _literal(token: tuple[Segment, ...]) -> str | None:
    return token[0] if len(token) == 1 and isinstance(token[0], str) else None


def _program(token: tuple[Segment, ...]) -> str:
    text = _literal(token)
    return os.path.basename(text) if text else ""


def mentions_sharing(template: Template) -> bool:
    """The template sets connection sharing itself (on or off): a ``Control*`` option
    anywhere, or ssh's own ``-S`` (in scp and rsync ``-S`` means something else)."""
    texts = ["".join(seg for seg in token if isinstance(seg, str)) for token in template.tokens]
    if any(_CONTROL.search(text) for text in texts):
        return True
    return _program(template.tokens[0]) == "ssh" and any(t.startswith("-S") for t in texts[1:])


#: rsync short options bundled with ``e`` last (``-e``, ``-ae``, ``-avze``): the value follows.
_SHORT_E = re.compile(r"-[A-Za-z]*e")


def _rsh_index(template: Template) -> tuple[int, str] | None:
    """Where rsync's remote shell is given: the token's index and the prefix before the
    value in it ("" when the value is a token of its own, ``--rsh=`` when attached)."""
    tokens = template.tokens
    for i, token in enumerate(tokens[1:], 1):
        text = _literal(token)
        if text is None:
            continue
        if (text == "--rsh" or _SHORT_E.fullmatch(text)) and i + 1 < len(tokens):
            return (i + 1, "") if _literal(tokens[i + 1]) is not None else None
        if text.startswith("--rsh="):
            return i, "--rsh="
    return None


def tag(config_path: str) -> str:
    """Eight hex digits naming one configuration file's masters."""
    return hashlib.blake2b(os.fsencode(config_path), digest_size=4).hexdigest()


def shared(template: Template, directory: str, tag: str = "") -> Template | None:
    """``template`` with connection sharing added, or None where hdfmgr cannot or must not
    add it (not ssh-based, or it already speaks of sharing)."""
    if mentions_sharing(template):
        return None
    tokens = list(template.tokens)
    program = _program(tokens[0])
    added = [(word,) for word in options(directory, tag)]
    if program in ("ssh", "scp"):
        return Template(template.source, (tokens[0], *added, *tokens[1:]))
    if program != "rsync":
        return None
    found = _rsh_index(template)
    if found is None:
        return None
    index, prefix = found
    text = _literal(tokens[index])
    assert text is not None
    try:
        words = shlex.split(text[len(prefix) :])
    except ValueError:
        return None
    if not words or os.path.basename(words[0]) != "ssh" or any(w.startswith("-S") for w in words[1:]):
        return None
    rsh = shlex.join([words[0], *options(directory, tag), *words[1:]])
    tokens[index] = (prefix + rsh,)
    return Template(template.source, tuple(tokens))


def control_dir() -> str:
    """Where the sockets go: systemd's ``RuntimeDirectory=`` when set, else the user's runtime
    directory, else ``/tmp/hdfmgr-<uid>``; short enough for a socket path."""
    candidates = []
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        candidates.append(os.path.join(runtime, "ssh"))
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg:
        candidates.append(os.path.join(xdg, "hdfmgr-ssh"))
    for candidate in candidates:
        if len(candidate) <= MAX_DIR and os.path.isabs(candidate) and "%" not in candidate:
            return candidate
    return f"/tmp/hdfmgr-ssh-{os.getuid()}"


def unsafe(directory: str) -> str | None:
    """Create ``directory`` (mode 0700) if missing; the reason it cannot hold the sockets
    safely, or None when it can."""
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        return f"cannot create {directory}: {exc.strerror}"
    try:
        st = os.lstat(directory)
    except OSError as exc:
        return f"cannot read {directory}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is not a directory"
    if st.st_uid != os.getuid():
        return f"{directory} belongs to uid {st.st_uid}, not to this user"
    if st.st_mode & 0o077:
        return f"{directory} is open to other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None
