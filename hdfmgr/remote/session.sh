# hdfmgr warm session: one long-lived remote shell that runs hdfmgr's steps one after another,
# so that a step costs one round trip instead of an ssh login (hdfmgr/session.py).
#
# POSIX sh. Started like every hdfmgr program by the constant bootstrap (hdfmgr/endpoint.py)
# as `sh -c PROGRAM hdfmgr-session`. It prints a ready record on stdout and on stderr, then
# reads steps from stdin until end of file. One step on stdin:
#   TOKEN PLEN ALEN DLEN<newline>   a random token (hex) and three byte counts
#   PLEN bytes                      the step's program (ASCII, like the bootstrap's)
#   ALEN bytes                      its arguments as shell-quoted words, $0 first
#   DLEN bytes                      its stdin: the program sees exactly these bytes, then EOF
# It runs `sh -c PROGRAM ARGS...` with stdout and stderr going straight back, then writes an
# end-of-step record carrying the exit status on stdout, NUL-framed:
#   <NUL>/hdfmgr-step/TOKEN/STATUS/<NUL>
# and `<newline>/hdfmgr-step/TOKEN/<newline>` on stderr. The token is new for every step and
# known only to this loop (not exported), so no step's output can end another step early.
#
# Input cut short (the daemon died, the connection dropped): a header, program or argument
# list that did not arrive whole is never run, the loop exits (status 90); data cut short
# reaches the step as an early EOF (the commit program then finds its last record missing and
# moves nothing), and the next read ends the loop. So when the daemon goes, this shell goes.
# A program that stops reading early gets no more: the rest of its data is read and dropped,
# never taken for the next step's header.
set -u
LC_ALL=C
export LC_ALL
printf '\000/hdfmgr-ready/\000'
printf '/hdfmgr-ready/\n' >&2
while IFS=' ' read -r k p a d; do
    case "$k" in '' | *[!0-9a-f]*) exit 91 ;; esac
    for n in "$p" "$a" "$d"; do
        case "$n" in '' | *[!0-9]*) exit 91 ;; esac
    done
    prog=$(head -c "$p") || exit 90
    [ "${#prog}" -eq "$p" ] || exit 90
    args=$(head -c "$a") || exit 90
    [ "${#args}" -eq "$a" ] || exit 90
    eval "set -- $args" || exit 91
    r=0
    head -c "$d" | {
        r=0
        sh -c "$prog" "$@" || r=$?
        cat >/dev/null
        exit "$r"
    } || r=$?
    printf '\000/hdfmgr-step/%s/%s/\000' "$k" "$r"
    printf '\n/hdfmgr-step/%s/\n' "$k" >&2
done
