# hdfmgr receive program: unpack one batch, sent as a tar stream, into its slot directory.
#
# POSIX sh. Runs on the endpoint as `sh -c PROGRAM hdfmgr-receive SLOT WAIT BATCH`, started
# by the constant bootstrap command line or fed to a warm session (hdfmgr/endpoint.py); the
# tar stream follows the program on stdin (hdfmgr/stream.py writes it: regular files only,
# each member named by its basename, no directory, no link, owner 0, owner-readable).
#   SLOT   the slot directory in staging (its name carries no data)
#   WAIT   seconds to wait for the slot's lock
#   BATCH  the batch number
#
# It creates the slot directory (so a batch needs no prepare step) and extracts into it while
# holding the slot's lock, the same lock the commit takes: a commit or a receive of an earlier
# batch whose client died and that still runs on the endpoint finishes before this one writes
# a byte. And a receive that got the lock late (its client died while it waited) never writes
# over a later batch's copies: under the lock it records BATCH beside the slot (SLOT.received)
# and refuses a batch that is not above the one recorded there (exit 95). It renames nothing
# into the endpoint buffer: what arrives here is only a staged copy, verified and moved by the
# commit program later, and a stream cut short leaves at most a partial staged copy, which
# fails that verification. File names never reach a shell or a command line: they travel
# inside the stream, and GNU tar writes them byte for byte.
#
# Exit status: tar's (0 all extracted, 2 a stream cut short or a file that cannot be
# written: staging full, read-only); 93 the lock stayed busy past WAIT; 94 the slot
# directory or its record cannot be written; 95 a later batch was received here; 97 the slot
# cannot be entered; 92 flock or tar missing; 91 wrong arguments.
set -eu
export LC_ALL=C
[ "$#" -eq 3 ] || exit 91
s=$1 w=$2 b=$3
case "$b" in '' | *[!0-9]*) exit 91 ;; esac
for tool in flock tar; do
    command -v "$tool" >/dev/null 2>&1 || { echo "hdfmgr receive: $tool not found on the PATH" >&2; exit 92; }
done
mkdir -p -- "$s" || { echo "hdfmgr receive: cannot create $s" >&2; exit 94; }
cd -- "$s" || exit 97
# The endpoint account's TAR_OPTIONS (--skip-old-files, --keep-old-files, ...) must not change
# what lands in the slot.
unset TAR_OPTIONS
# --unlink-first: a leftover of an earlier batch is removed before its name is extracted, so
# nothing is kept or written through a link. --no-same-owner: the files belong to the
# endpoint's user, as with scp or rsync; times and modes are kept (as scp -p).
exec flock -w "$w" -E 93 . sh -c '
r=$1.received
if [ -f "$r" ]; then
    last=$(cat -- "$r") || exit 94
    case "$last" in "" | *[!0-9]*) last=0 ;; esac
    if [ "$last" -ge "$2" ]; then
        echo "hdfmgr receive: batch $2 is not above batch $last, already received here" >&2
        exit 95
    fi
fi
printf "%s\n" "$2" > "$r.tmp" && mv -f -- "$r.tmp" "$r" || exit 94
exec tar -x -f - --unlink-first --no-same-owner
' hdfmgr-receive "$s" "$b"
