"""Command templates: parsed into argv once, rendered per token.

A template such as ``scp -Bpq {batch} {user}@{host}:{dest}`` is never rendered into one
string and handed to a shell: a filename like ``$(rm -rf ~)`` would then run. Instead the
template is split into tokens with :func:`shlex.split` when the configuration is loaded, user
parameters are substituted then (they are static), and the reserved placeholders are
substituted per token at run time. A ``{batch}`` token becomes one argv entry per file.

State owned: none: a template parsed once into argv words, rendered per batch.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: Placeholders whose value hdfmgr supplies at run time; they may not be user parameters.
RESERVED = frozenset({"batch", "file", "dest", "command"})

_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


class TemplateError(ValueError):
    """A template that cannot be used; the message names the problem."""


@dataclass(frozen=True)
class Slot:
    """A reserved placeholder inside a token."""

    name: str


Segment = str | Slot


@dataclass(frozen=True)
class Template:
    """A command split into tokens, each a sequence of literal text and reserved slots."""

    source: str
    tokens: tuple[tuple[Segment, ...], ...]

    @classmethod
    def parse(cls, text: str, params: Mapping[str, object]) -> Template:
        """Split ``text`` into argv tokens and substitute the user parameters.

        Raises :class:`TemplateError` for an unknown placeholder, unbalanced braces or quotes,
        or a ``{batch}`` that is not a whole token.
        """
        try:
            words = shlex.split(text)
        except ValueError as exc:
            raise TemplateError(f"cannot split {text!r}: {exc}") from None
        if not words:
            raise TemplateError("empty command")
        tokens = []
        for word in words:
            tokens.append(_parse_token(word, params))
        for token in tokens:
            if Slot("batch") in token and len(token) != 1:
                raise TemplateError("{batch} must stand alone as one word (it becomes one word per file)")
        return cls(text, tuple(tokens))

    @property
    def slots(self) -> frozenset[str]:
        """Names of the reserved placeholders the template uses."""
        return frozenset(seg.name for token in self.tokens for seg in token if isinstance(seg, Slot))

    @property
    def batched(self) -> bool:
        """True when one invocation carries many files (``{batch}``)."""
        return "batch" in self.slots

    def fixed_length(self) -> int:
        """Bytes the template's own words take in argv, for staying under ARG_MAX."""
        return sum(
            len(seg.encode("utf-8", "surrogateescape")) + 1
            for token in self.tokens
            for seg in token
            if isinstance(seg, str)
        )

    def render(
        self,
        *,
        files: Sequence[str] = (),
        dest: str = "",
        command: str = "",
    ) -> list[str]:
        """Return the argv for one invocation.

        ``files`` fills ``{batch}`` (one argv entry each) or ``{file}`` (exactly one file).
        """
        if "file" in self.slots and len(files) != 1:
            raise ValueError("a {file} template renders exactly one file")
        argv: list[str] = []
        for token in self.tokens:
            if token == (Slot("batch"),):
                argv.extend(files)
                continue
            parts = []
            for seg in token:
                if isinstance(seg, str):
                    parts.append(seg)
                elif seg.name == "file":
                    parts.append(files[0])
                elif seg.name == "dest":
                    parts.append(dest)
                elif seg.name == "command":
                    parts.append(command)
            argv.append("".join(parts))
        return argv


def _parse_token(word: str, params: Mapping[str, object]) -> tuple[Segment, ...]:
    segments: list[Segment] = []
    literal: list[str] = []
    pos = 0
    for match in _FIELD.finditer(word):
        literal.append(word[pos : match.start()])
        pos = match.end()
        text = match.group(0)
        if text == "{{":
            literal.append("{")
        elif text == "}}":
            literal.append("}")
        elif text in ("{", "}"):
            raise TemplateError(f"unbalanced brace in {word!r} (write {{{{ or }}}} for a literal one)")
        else:
            name = match.group(1)
            if name in RESERVED:
                if "".join(literal):
                    segments.append("".join(literal))
                literal = []
                segments.append(Slot(name))
            elif name in params:
                literal.append(str(params[name]))
            else:
                raise TemplateError(f"placeholder {{{name}}} is not defined as a parameter")
    literal.append(word[pos:])
    if "".join(literal):
        segments.append("".join(literal))
    return tuple(segments)


def quote_remote(args: Sequence[str]) -> str:
    """Join ``args`` into one string for a remote POSIX shell, each word quoted."""
    return " ".join(shlex.quote(arg) for arg in args)
