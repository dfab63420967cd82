# hdfmgr receive program: unpack one batch, sent as a tar stream, into its slot directory.
#
# POSIX sh. Runs on the endpoint as `sh -c PROGRAM hdfmgr-receive SLOT WAIT`, started by the
# constant bootstrap command line or fed to a warm session (hdfmgr/endpoint.py); the tar
# stream follows the program on stdin (hdfmgr/stream.py writes it: regular files only, each
# member named by its basename, no directory, no link, owner 0).
#   SLOT   the slot directory in staging (its name carries no data)
#   WAIT   seconds to wait for the slot's lock
#
# It creates the slot directory (so a batch needs no prepare step) and extracts into it while
# holding the slot's lock, the same lock the commit takes: a commit or a receive of an earlier
# batch whose client died and that still runs on the endpoint finishes before this one writes
# a byte. It renames nothing into the endpoint buffer: what arrives here is only a staged
# copy, verified and moved by the commit program later, and a stream cut short leaves at most
# a partial staged copy, which fails that verification. File names never reach a shell or a
# command line: they travel inside the stream, and GNU tar writes them byte for byte.
#
# Exit status: tar's (0 all extracted, 2 a stream cut short or a file that cannot be
# written: staging full, read-only); 93 the lock stayed busy past WAIT; 94 the slot
# directory cannot be created; 97 it cannot be entered; 92 flock or tar missing.
set -eu
export LC_ALL=C
s=$1 w=$2
for tool in flock tar; do
    command -v "$tool" >/dev/null 2>&1 || { echo "hdfmgr receive: $tool not found on the PATH" >&2; exit 92; }
done
mkdir -p -- "$s" || { echo "hdfmgr receive: cannot create $s" >&2; exit 94; }
cd -- "$s" || exit 97
# --no-same-owner: the files belong to the endpoint's user, as with scp or rsync; times and
# modes are kept (as scp -p). tar replaces a leftover of an earlier failed batch by unlinking
# it first, so nothing is ever written through a link.
exec flock -w "$w" -E 93 . tar -x -f - --no-same-owner
