"""Transfer commands that pay round trips per file, which ``validate`` and ``doctor`` warn about.

scp waits for the endpoint's reply to each file's header and to its data before the next
file, so over a long link it moves a few files a second whatever the bandwidth (README, Long
links). A ``{file}`` template runs one scp, i.e. one more ssh connection or channel, per file
on top of that.

State owned: none: a pure look at a parsed template, and the wording both commands share.
"""

from __future__ import annotations

import posixpath

from .templates import Slot, Template

#: The measurement behind the warning (README, Long links): a visit of 189 files over a 100 ms
#: round trip, delivered with the seed's ``scp -Bpq {batch}`` template, with bare ``rsync -a``.
VISIT_FILES = 189
RTT_MS = 100
SCP_SECONDS = 139.8
RSYNC_SECONDS = 3.4

#: What to use instead: a command that streams a batch.
FIX = (
    'use rsync (rsync -a -e "ssh ..." {batch} {user}@{host}:{dest}) or transfer: builtin:stream '
    "(README, Long links)"
)


def scp_transfer(template: Template) -> str | None:
    """``"scp {batch}"`` or ``"scp {file}"`` when the template's program is scp, else None.

    The program is the first word (a full path such as ``/usr/bin/scp`` counts by its
    basename).
    """
    first = "".join(seg for seg in template.tokens[0] if not isinstance(seg, Slot))
    if posixpath.basename(first) != "scp":
        return None
    return "scp {batch}" if template.batched else "scp {file}"


def scp_why(label: str) -> str:
    """Why ``label`` (from :func:`scp_transfer`) is slow over a long link, with the measurement."""
    cost = (
        "scp pays a few round trips per file"
        if label == "scp {batch}"
        else "one scp per file pays a new ssh connection or channel and a few round trips per file"
    )
    return (
        f"{cost} (over a {RTT_MS} ms round trip the seed's scp {{batch}} delivered a "
        f"{VISIT_FILES}-file visit in {SCP_SECONDS:g} s, rsync -a in {RSYNC_SECONDS:g} s)"
    )
