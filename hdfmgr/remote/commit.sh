# hdfmgr commit program: verify the staged copies of one batch and rename the good ones into
# the endpoint buffer, reporting per file what it verified and what it renamed.
#
# POSIX sh. Runs on the endpoint as `sh -c PROGRAM hdfmgr-commit SLOT MODE WAIT BATCH NREC
# NPLAN`, started by the constant bootstrap command line (hdfmgr/endpoint.py): the program and
# then its data arrive on stdin, so the login shell only ever parses the bootstrap.
#   SLOT   the slot directory in staging (its name carries no data)
#   MODE   size or checksum
#   WAIT   seconds to wait for the slot's lock
#   BATCH  the batch number (empty: no fence check)
#   NREC   how many expected records come first on stdin
#   NPLAN  how many plan records follow them
# Stdin, NUL-separated: NREC records, each what the listing of a good staged copy shows
# (`<size>/<name>` or `<b2sum>  <name>`), sorted as `LC_ALL=C sort -z` sorts; NPLAN plan
# records `<name>/<final directory>` (a name never contains '/'); then SLOT with '/' appended,
# so that a stream cut short is recognised. The input is stored in a file, never turned into
# one command's arguments: no argument limit can split it.
#
# Reply on stdout, NUL-separated, between the records /hdfmgr-begin/ and /hdfmgr-end/; each
# record is one letter and its text:
#   V<version>  this program's version (first record)
#   K<name>     the staged copy was verified (its size or BLAKE2b is the expected one)
#   M<name>     renamed into the endpoint buffer: the only evidence of a delivery (also
#               written to SLOT.receipt, which a listing reads when this reply is lost)
#   E<name>     verified, not renamed: the final name exists (an earlier version the
#               endpoint manager has not ingested yet); never overwritten
#   G<name>     verified, but gone from staging before the rename: not delivered
#   F<name>     verified, not renamed: its directory could not be made, or mv failed on it
#   U<name>     mv failed for its group and the name left staging anyway, or it was renamed
#               but its final directory could not be flushed to disk: unknown (sent again)
#   X<status> <reason>  the commit stopped before renaming anything: nothing was moved
# A verified name with no M/E/G/F/U record (the move step broke off) is unknown too.
#
# Exit status: 0 the program ran to its end (each file's outcome is in the reply). Otherwise
# nothing was renamed but what an M record says:
#   88 ran to its end, but a final directory could not be flushed after its rename: its
#      names are U, not M (the reply's records still say what happened to each file)
#   89 the verified staged copies cannot be flushed to disk (sync missing, without file
#      arguments, or an I/O error): nothing was moved
#   91 wrong arguments          92 the slot's lock cannot be taken here (flock missing/failing)
#   93 lock busy past WAIT      94 staging cannot be written (full, read-only, I/O error;
#                                  also when the receipt cannot be written)
#   95 fenced off: a listing has decided this batch      96 input cut short
#   97 no slot directory        98 a verification tool failed (b2sum, find, sort, comm, ...)
#   99 the move step broke off (the M records say what was renamed)
#
# Strict: `set -eu`, no pipelines (a pipeline's status is only its last command's), every
# intermediate list is a file whose write is checked, and every step before the first rename
# is guarded by `|| stop`: a failure there ends the commit with nothing moved.
#
# Durable: an M record (in the reply or the receipt) is written only once the rename it
# reports is on disk, so that a power cut on the endpoint cannot undo a delivery the daemon
# has recorded. Before the first rename the verified copies' data is flushed (`sync --
# NAMES`, fsync per file: delayed allocation would otherwise leave a renamed file empty or
# short after a cut); a directory this program creates is flushed with the one it was created
# in before anything is renamed into it; after the last group's mv every final directory and
# the slot directory are flushed (`sync -- DIRS .`), before any outcome record is written. A
# flush that fails after its mv turns the group's M into U: the file may well be in the endpoint
# buffer, so sending it again risks a duplicate, never a loss. The receipt needs no flush of
# its own: a record of it lost in a cut is lost evidence, which a listing reads as "send
# again", and no M in it can outlast the rename it reports.
set -eu
VERSION=3
B=/hdfmgr-begin/
E=/hdfmgr-end/
export LC_ALL=C

printf '\000%s\000' "$B"
printf 'V%s\000' "$VERSION"

locked=
stop() {
    # stop STATUS REASON: report that nothing was moved, remove this commit's lists (only
    # once it holds the lock: before, they may be an earlier commit's), and end.
    [ -z "$locked" ] || rm -f -- "$t".* 2>/dev/null || :
    printf 'X%s %s\000' "$1" "$2"
    printf '%s\000' "$E"
    echo "hdfmgr commit: $2" >&2
    exit "$1"
}

[ "$#" -eq 6 ] || stop 91 "expected 6 arguments, got $#"
s=$1 m=$2 w=$3 batch=$4 nrec=$5 nplan=$6
case $m in size | checksum) ;; *) stop 91 "unknown verification mode: $m" ;; esac

# Every list lives beside the slot directory, in staging: when staging is full the write
# fails, and the commit stops there.
t=$s.tmp
q=$s.rejected
cd -- "$s" 2>/dev/null || stop 97 "no slot directory $s"

# The slot lock (see hdfmgr/endpoint.py): the open slot directory on descriptor 9, inherited
# by every process this program starts, so it lasts exactly as long as the commit.
command -v flock >/dev/null 2>&1 || stop 92 "flock not found: the slot cannot be locked"
# (The lock belongs to the open file description, which the command substitution's
# process shares: it stays held after that process ends.)
[ -r . ] && [ -x . ] || stop 92 "cannot open the slot directory $s"
exec 9<.
if err=$(flock -w "$w" -E 93 9 2>&1); then
    locked=1
else
    r=$?
    [ "$r" -ne 93 ] || stop 93 "a listing or an earlier commit still holds the slot after $w s"
    stop 92 "flock fails on staging: $err"
fi

# The fence: a listing has decided this batch's outcome without it.
if [ -n "$batch" ] && [ -f "$s.fence" ]; then
    read -r f <"$s.fence" || stop 94 "cannot read $s.fence"
    [ "$f" -lt "$batch" ] || stop 95 "batch $batch: too late, its slot was listed for batch $f"
fi

# The receipt, beside the slot (NUL-separated): the batch number; then, per group of names
# to rename, I<name> for each just before its mv, and after it each name's outcome record
# (M<name> renamed, or E, F, U as in the reply). A listing after a lost reply reads it as the
# only evidence of a move (hdfmgr/endpoint.py); so it is replaced here, under the lock, before
# anything moves, and a commit (or group) that cannot write it renames nothing.
printf '%s\000' "$batch" >"$s.receipt" || stop 94 "cannot write $s.receipt"

# The input, whole or not at all.
cat >"$t.in" || stop 94 "cannot store the commit input in staging"
head -z -n "$nrec" "$t.in" >"$t.want" || stop 94 "cannot write $t.want"
tail -z -n "+$((nrec + 1))" "$t.in" >"$t.rest" || stop 94 "cannot write $t.rest"
head -z -n "$nplan" "$t.rest" >"$t.plan" || stop 94 "cannot write $t.plan"
tail -z -n "+$((nplan + 1))" "$t.rest" >"$t.end" || stop 94 "cannot write $t.end"
printf '%s/\000' "$s" >"$t.last" || stop 94 "cannot write $t.last"
cmp -s "$t.end" "$t.last" || stop 96 "commit input cut short"

names() {
    # names FILE: the names in a file of listing records.
    if [ "$m" = checksum ]; then cut -z -b 131- "$1"; else cut -z -d/ -f 2- "$1"; fi
}

# What is staged, listed the way the expected records are written.
if [ "$m" = checksum ]; then
    find . -mindepth 1 -maxdepth 1 -type f -printf '%f\000' >"$t.found" || stop 98 "find failed"
    xargs -0 -r b2sum -z -- <"$t.found" >"$t.raw" ||
        stop 98 "b2sum failed (missing, an I/O error, or no -z)"
    # One digest per staged file, or the tool is not the b2sum this program knows.
    tr -cd '\000' <"$t.found" >"$t.n1" || stop 94 "cannot write $t.n1"
    tr -cd '\000' <"$t.raw" >"$t.n2" || stop 94 "cannot write $t.n2"
    cmp -s "$t.n1" "$t.n2" || stop 98 "b2sum printed a wrong number of digests"
else
    find . -mindepth 1 -maxdepth 1 -type f -printf '%s/%f\000' >"$t.raw" || stop 98 "find failed"
fi
sort -z -o "$t.have" "$t.raw" || stop 98 "sort failed"

# Verified: the staged records equal to expected ones. Nothing else is ever renamed.
comm -z -12 "$t.have" "$t.want" >"$t.ok" || stop 98 "comm failed"
names "$t.ok" >"$t.okn.raw" || stop 98 "cut failed"
sort -z -t/ -k1,1 -o "$t.okn" "$t.okn.raw" || stop 98 "sort failed"

# A staged copy of a file of the batch that does not match is set aside beside the slot
# (a listing after a lost reply counts it as not moved); a stray is deleted.
comm -z -23 "$t.have" "$t.want" >"$t.bad" || stop 98 "comm failed"
rm -rf -- "$q" || stop 94 "cannot empty $q"
if [ -s "$t.bad" ]; then
    names "$t.want" >"$t.wn.raw" || stop 98 "cut failed"
    sort -z -o "$t.wn" "$t.wn.raw" || stop 98 "sort failed"
    names "$t.bad" >"$t.bn.raw" || stop 98 "cut failed"
    sort -z -o "$t.bn" "$t.bn.raw" || stop 98 "sort failed"
    comm -z -23 "$t.bn" "$t.wn" >"$t.stray" || stop 98 "comm failed"
    comm -z -12 "$t.bn" "$t.wn" >"$t.reject" || stop 98 "comm failed"
    xargs -0 -r rm -f -- <"$t.stray" || stop 94 "cannot delete strays"
    if [ -s "$t.reject" ]; then
        mkdir -- "$q" || stop 94 "cannot make $q"
        xargs -0 -r mv -f -t "$q" -- <"$t.reject" || stop 94 "cannot set rejected copies aside"
    fi
fi

# The renames to make: each verified name with its final directory, grouped by directory.
sort -z -t/ -k1,1 -o "$t.plans" "$t.plan" || stop 98 "sort failed"
join -z -t/ "$t.okn" "$t.plans" >"$t.mv.raw" || stop 98 "join failed"
sort -z -t/ -k2 -o "$t.mv" "$t.mv.raw" || stop 98 "sort failed"

# The data of every copy about to be renamed on disk before the first rename (GNU sync >=
# 8.24 fsyncs each named file; the start-up probe refuses a sync that ignores its arguments).
cut -z -d/ -f 1 "$t.mv" >"$t.sync" || stop 98 "cut failed"
xargs -0 -r sync -- <"$t.sync" ||
    stop 89 "sync failed: the staged copies cannot be flushed to disk (missing, no file arguments, or an I/O error)"
xargs -0 -r printf 'K%s\000' <"$t.okn" || stop 98 "printf failed"

# From here on files move, and every report is per file. MOVER gets `<name>/<final dir>`
# records as arguments (xargs may split them over several runs: each run is complete in
# itself). Per group of names with the same final directory it checks each name with
# builtins (still staged, final name free), runs one `mv -n` (never overwrite) on the names
# that passed, and reports each name. The receipt gets the group's I records before its mv
# and every outcome record after it, all before the run writes a byte to stdout, so that the
# evidence outlives a lost reply (a reply cut short ends the run at its first write: SIGPIPE).
# M needs that mv to have succeeded and the name to have left staging (`mv -n` leaves a name
# whose final name appeared meanwhile where it was).
# GNU mv (9.1) given several names stats each final name right after renaming it, and fails
# when the endpoint manager has already taken the file away: so a failed mv whose every
# complaint is such a stat of a final path (absolute: quoted, it starts with '/ or "/;
# names are relative and every complaint about a source names it) has renamed all the names
# that left staging. Otherwise a name that left staging is M only if its final name exists
# now (it did not before), and U (unknown, sent again) if not. After the last group's mv every
# final directory and the slot are flushed, in one sync (one per group only when that fails,
# to tell the groups apart); a group whose flush fails has its M turned into U (see Durable
# above) and T.unflushed tells the main program, which then exits 88.
MOVER='
set -u
j=0 g=0 d= l= moved=
made() {
    # made DIR: mkdir -p DIR, then flush the directories it created and the one it created
    # them in, so that DIR is on disk before anything is renamed into it.
    p=$1 u=0
    while [ ! -d "$p" ]; do
        u=$((u + 1))
        eval "up$u=\$p"
        case $p in */*) p=${p%/*} && p=${p:-/} ;; *) p=. ;; esac
    done
    mkdir -p -- "$1" || return 1
    set -- "$p"
    while [ "$u" -gt 0 ]; do
        eval "set -- \"\$@\" \"\$up$u\""
        u=$((u - 1))
    done
    sync -- "$@"
}
group() {
    if [ -n "$l" ]; then
        # The intent first: a name gone from staging after it, with no outcome, was renamed
        # by a commit killed in its mv. Without it, nothing of the group moves.
        if ! (eval "set -- $l" && printf "I%s\000" "$@" >>"$R"); then
            echo "hdfmgr commit: cannot write the receipt $R: not renamed" >&2
            eval "ok$g=0"
        else
            if eval "mv -n -t \"\$d\" -- $l" 2>"$T.err"; then
                eval "ok$g=1"
            elif [ -s "$T.err" ] && ! grep -q -v "^mv: cannot stat [\"'"'"']/" "$T.err"; then
                eval "ok$g=1"
            else
                eval "ok$g=0"
            fi
            cat "$T.err" >&2 || :
            # Whatever mv did, nothing of it is reported before it is on disk: the directory of
            # each group is flushed after the last mv (flushed, below), before any outcome.
            eval "dd$g=\$d"
            moved="$moved \"\$dd$g\""
        fi
    fi
}
flushed() {
    # One sync for every directory renamed into, and the slot. Only if it fails, one per
    # group, so that a group whose flush fails is told apart: its M become U.
    [ -n "$moved" ] || return 0
    eval "sync -- $moved ." && return 0
    i=0
    while [ "$i" -lt "$g" ]; do
        i=$((i + 1))
        eval "z=\${dd$i-}"
        [ -n "$z" ] || continue
        if ! sync -- "$z" .; then
            eval "fl$i=0"
            echo "hdfmgr commit: cannot flush $z after renaming into it: its files are U" >&2
            : >"$T.unflushed" || :
        fi
    done
}
for r do
    j=$((j + 1)) n=${r%%/*} x=${r#*/}
    if [ "$g" -eq 0 ] || [ "$x" != "$d" ]; then
        group
        g=$((g + 1)) d=$x l=
        eval "ok$g=0 fl$g=1"
        if [ -d "$d" ] || made "$d"; then eval "dir$g=1"; else eval "dir$g=0"; fi
    fi
    eval "n$j=\$n grp$j=0"
    if [ -f "./$n" ] && [ ! -L "./$n" ] && [ ! -e "$d/$n" ] && [ ! -L "$d/$n" ]; then
        if eval "[ \"\$dir$g\" = 1 ]"; then l="$l \"\$n$j\""; eval "grp$j=$g"; fi
    fi
done
group
flushed
j=0
for r do
    j=$((j + 1)) n=${r%%/*} x=${r#*/}
    eval "k=\$grp$j"
    if [ "$k" -eq 0 ]; then
        if [ ! -f "./$n" ]; then c=G
        elif [ -e "$x/$n" ] || [ -L "$x/$n" ]; then c=E
        else c=F; fi
    else
        eval "o=\$ok$k"
        if [ -e "./$n" ] || [ -L "./$n" ]; then
            if [ "$o" = 1 ]; then c=E; else c=F; fi
        elif [ "$o" = 1 ] || [ -e "$x/$n" ]; then c=M
        else c=U; fi
        eval "[ \"\$fl$k\" = 1 ]" || [ "$c" != M ] || c=U
    fi
    if [ "$k" -ne 0 ]; then
        printf "%s%s\000" "$c" "$n" >>"$R" || echo "hdfmgr commit: cannot add to $R" >&2
    fi
    eval "c$j=\$c"
done
j=0
for r do
    j=$((j + 1))
    eval "c=\$c$j n=\$n$j"
    printf "%s%s\000" "$c" "$n"
done
'
r=0
T=$t R=$s.receipt xargs -0 -r sh -c "$MOVER" hdfmgr-move <"$t.mv" || r=99
[ ! -e "$t.unflushed" ] || [ "$r" -ne 0 ] || r=88
rm -f -- "$t".* || :
printf '%s\000' "$E"
exit "$r"
