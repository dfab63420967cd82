# hdfmgr start-up probe: can this endpoint run the commit program the configuration needs?
#
# POSIX sh, started like every hdfmgr program by the constant bootstrap (hdfmgr/endpoint.py)
# as `sh -c PROGRAM hdfmgr-probe STAGING MODE DIGEST [stream]`; stdin after the program holds
# a few bytes whose BLAKE2b is DIGEST. `stream`: the built-in stream transfer is configured.
# `hdfmgr run`, `rescan` and `doctor` all ask this one command.
# Reply on stdout, NUL-separated `key=value` records between /hdfmgr-begin/ and /hdfmgr-end/:
#   version=3         this probe's version (first record)
#   arg_max=N         the endpoint's argument limit (getconf ARG_MAX; empty if unknown)
#   missing=TOOL      one per tool the commit needs that is not on the remote PATH
#   b2sum=ok|...      checksum mode: `b2sum -z` exists and computes the expected digest
#   flock=ok|...      a real lock on the staging directory succeeds (fails on Lustre
#                     mounted without flock, for example)
#   sync=ok|...       `sync -- DIR` flushes a named directory, and fails on a missing name
#                     (GNU coreutils >= 8.24: an older sync ignores its arguments, which the
#                     commit relies on to flush the copies it renames)
#   tar=ok|...        with `stream`: GNU tar, which the receive program unpacks batches with
# It changes nothing but creating STAGING when it is missing (as a start-up would anyway).
set -u
export LC_ALL=C
printf '\000%s\000' /hdfmgr-begin/
printf 'version=3\000'
s=$1 m=$2 h=$3 k=${4-}

a=$(getconf ARG_MAX 2>/dev/null) || a=
printf 'arg_max=%s\000' "$a"

for tool in sh mv find sort comm cut xargs head tail join cmp cat tr grep sed uniq mkdir rmdir rm flock sync getconf; do
    command -v "$tool" >/dev/null 2>&1 || printf 'missing=%s\000' "$tool"
done

if [ "$m" = checksum ]; then
    if ! command -v b2sum >/dev/null 2>&1; then
        printf 'missing=b2sum\000'
        b=missing
    elif ! b2sum -z /dev/null >/dev/null 2>&1; then
        b="it does not take -z (GNU coreutils >= 8.26 needed)"
    elif out=$(b2sum 2>&1); then
        if [ "${out%% *}" = "$h" ]; then b=ok; else b="wrong digest: $out"; fi
    else
        b="it fails: $out"
    fi
    printf 'b2sum=%s\000' "$b"
fi

if ! command -v flock >/dev/null 2>&1; then
    f=missing
elif ! mkdir -p -- "$s" 2>/dev/null; then
    f="cannot create staging $s"
elif out=$(flock -n -E 93 "$s" true 2>&1); then
    f=ok
else
    r=$?
    if [ "$r" -eq 93 ]; then f=ok; else f="flock $s: $out"; fi
fi
printf 'flock=%s\000' "$f"

# Staging exists now (unless it cannot be created: then the flock record says so).
n=$s/.hdfmgr-probe-no-such-directory/x
if ! command -v sync >/dev/null 2>&1; then
    y=missing
elif ! out=$(sync -- "$s" 2>&1); then
    y="it cannot flush $s (GNU coreutils >= 8.24 needed): $out"
elif [ ! -e "$n" ] && sync -- "$n" >/dev/null 2>&1; then
    y="it ignores its file arguments (GNU coreutils >= 8.24 needed)"
else
    y=ok
fi
printf 'sync=%s\000' "$y"

if [ "$k" = stream ]; then
    if ! command -v tar >/dev/null 2>&1; then
        printf 'missing=tar\000'
        t=missing
    else
        v=$(tar --version 2>/dev/null | head -n 1) || v=
        case "$v" in
        *"GNU tar"*) t=ok ;;
        *) t="not GNU tar (${v:-no version}): the stream transfer needs GNU tar" ;;
        esac
    fi
    printf 'tar=%s\000' "$t"
fi
printf '/hdfmgr-end/\000'
