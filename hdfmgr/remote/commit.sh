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
#   F<name>     verified, not renamed: its directory could not be made or is on another
#               filesystem than staging (mv would copy, not rename), or mv failed on it
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
#      arguments, or an I/O error), or a new final directory can be neither flushed nor
#      removed again: nothing was moved
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
# Cheap per file: the checks before and after the renames are made for the whole batch at
# once (listings of staging and of the final directories, compared by sort, join and comm),
# so that the shell does no more per name than build the argument lists of one `mv` per
# final directory: a commit starts a fixed number of processes and one `mv` per directory,
# whatever its number of names.
#
# Durable: an M record (in the reply or the receipt) is written only once the rename it
# reports is on disk, so that a power cut on the endpoint cannot undo a delivery the daemon
# has recorded. Before the first rename the verified copies' data is flushed (`sync --
# NAMES`, fsync per file: delayed allocation would otherwise leave a renamed file empty or
# short after a cut); the directories this program creates are flushed with the ones they were
# created in (one `sync` for all) before anything is renamed into them, and so are the
# directories every final directory is in (one made by a commit killed before its flush is not
# taken as on disk); after the last group's mv every final directory and the slot directory
# are flushed (`sync -- DIRS .`), before any outcome record is written. A
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
command exec 9<. || stop 92 "cannot open the slot directory $s"
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
    # As ./NAME: b2sum reads its standard input for a file named "-".
    find . -mindepth 1 -maxdepth 1 -type f -printf './%f\000' >"$t.found" || stop 98 "find failed"
    xargs -0 -r b2sum -z -- <"$t.found" >"$t.b2" ||
        stop 98 "b2sum failed (missing, an I/O error, or no -z)"
    sed -z 's|^\([0-9a-f]\{128\}  \)\./|\1|' "$t.b2" >"$t.raw" || stop 98 "sed failed"
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

# The final directories, each once. DIRS gets them as arguments (xargs may split them over
# several runs: each run is complete in itself). It makes the missing ones with one `mkdir
# -p` and flushes each new one with every directory it was created in (the nearest one that
# existed included) with one `sync`, so that a directory is on disk before anything is renamed
# into it. A directory that cannot be made gets nothing renamed into it: the move step finds
# it missing, and its names are F. When that one flush fails, each new directory is flushed on
# its own, the deepest first; one that still cannot be is removed again (it is empty: nothing
# was renamed yet; the directories it was made in are then flushed, or removed too when
# empty), and if even that fails the run exits 89 and the commit stops with nothing moved.
DIRS='
set -u
k=0 m=0 all=
n=0 anc= prev=
for d do
    # The directories it is in, up to the root, each that exists, once (the arguments are
    # sorted: a directory in the one before it was listed with that one).
    p=$d
    while [ "$p" != / ] && [ "$p" != . ]; do
        case $p in */*) p=${p%/*} && p=${p:-/} ;; *) p=. ;; esac
        if [ "$p" != "$prev" ]; then
            case $prev/ in "$p"/*) break ;; esac
        fi
        [ -d "$p" ] || continue
        n=$((n + 1))
        eval "y$n=\$p"
        anc="$anc \"\$y$n\""
    done
    prev=$d
    [ ! -d "$d" ] || continue
    p=$d u=0
    while [ ! -d "$p" ]; do
        u=$((u + 1))
        eval "c$u=\$p"
        case $p in */*) p=${p%/*} && p=${p:-/} ;; *) p=. ;; esac
    done
    m=$((m + 1)) k=$((k + 1))
    eval "v$k=\$p"
    l="\"\$v$k\"" r=
    while [ "$u" -gt 0 ]; do
        k=$((k + 1))
        eval "v$k=\$c$u"
        l="$l \"\$v$k\""
        [ "$u" -eq 1 ] || r="\"\$v$k\" $r"
        u=$((u - 1))
    done
    # chain: the directory it is made in, then each one made, down to it; above: those
    # made above it, the deepest first.
    eval "new$m=\$d chain$m=\$l above$m=\$r"
    all="$all $l"
done
# An existing final directory may have been made by a commit killed before its flush: the
# directories it is in are flushed too, before anything is renamed into it (as far as they
# can be: one that cannot be opened is left to the file system).
[ -z "$anc" ] || eval "sync -- $anc" 2>/dev/null || :
[ "$m" -gt 0 ] || exit 0
i=0 made=
while [ "$i" -lt "$m" ]; do
    i=$((i + 1))
    made="$made \"\$new$i\""
done
eval "mkdir -p -- $made" || :
present() {
    # present WORDS: those of the quoted variable references WORDS that name a directory now.
    o=
    for w in $1; do
        if eval "[ -d $w ]"; then o="$o $w"; fi
    done
}
present "$all"
[ -z "$o" ] || eval "sync -- $o" && exit 0
i=$m
while [ "$i" -gt 0 ]; do
    eval "d=\$new$i l=\$chain$i r=\$above$i"
    i=$((i - 1))
    [ -d "$d" ] || continue
    present "$l"
    eval "sync -- $o" && continue
    rmdir -- "$d" 2>/dev/null || :
    # What it was made in stays, and may be used later: flushed, or removed too (deepest
    # first; one that holds anything stays).
    present "$l"
    [ -z "$o" ] || eval "sync -- $o" 2>/dev/null || [ -z "$r" ] || eval "rmdir -- $r" 2>/dev/null || :
    if [ -d "$d" ]; then
        echo "hdfmgr commit: cannot flush the new directory $d, nor remove it" >&2
        exit 89
    fi
    echo "hdfmgr commit: cannot flush the new directory $d: nothing is renamed into it" >&2
done
exit 0
'
cut -z -d/ -f 2- "$t.mv" >"$t.d.raw" || stop 98 "cut failed"
uniq -z "$t.d.raw" "$t.dirs" || stop 98 "uniq failed"
xargs -0 -r sh -c "$DIRS" hdfmgr-dirs <"$t.dirs" ||
    stop 89 "a new final directory can be neither flushed to disk nor removed again"
xargs -0 -r printf 'K%s\000' <"$t.okn" || stop 98 "printf failed"

# What the move step may rename: the verified copies still staged as regular files (the
# others are G: gone before the rename), whose final names are free (the others are E: an
# earlier version the endpoint manager has not ingested yet; never overwritten). Each list is
# taken once for the whole commit. `mv -n` closes the race with a final name that appears
# after the listing; the listing of staging after the renames tells which names left.
find . -mindepth 1 -maxdepth 1 -type f -printf '%f\000' >"$t.st.raw" || stop 98 "find failed"
sort -z -o "$t.st" "$t.st.raw" || stop 98 "sort failed"
sort -z -t/ -k1,1 -o "$t.mvn" "$t.mv" || stop 98 "sort failed"
join -z -t/ "$t.st" "$t.mvn" >"$t.cand.raw" || stop 98 "join failed"
join -z -t/ -v 2 "$t.st" "$t.mvn" >"$t.gone" || stop 98 "join failed"
# Every entry of the final directories, as `<name>/<final dir>` like the plan. A directory
# that cannot be listed lists nothing: `mv -n` still never overwrites.
true >"$t.tk.raw" || stop 94 "cannot write $t.tk.raw"
xargs -0 -r sh -c 'exec find -H "$@" -mindepth 1 -maxdepth 1 -printf "%f/%H\000"' hdfmgr-find \
    <"$t.dirs" >"$t.tk.raw" 2>/dev/null || :
sort -z -o "$t.tk" "$t.tk.raw" || stop 98 "sort failed"
# The final directories on the slot's filesystem (`-H`: a symbolic link's target), each as
# given; those not among them (T.dirs is sorted: by the plan's directory key) (elsewhere, or missing) go to T.far, which the move step checks
# again one by one, only when there is any.
sdev=$(find . -maxdepth 0 -printf %D) || stop 98 "find failed"
true >"$t.dev" || stop 94 "cannot write $t.dev"
xargs -0 -r sh -c 'exec find -H "$@" -maxdepth 0 -printf "%D/%p\000"' hdfmgr-dev \
    <"$t.dirs" >"$t.dev" 2>/dev/null || :
sed -z -n "s|^$sdev/||p" "$t.dev" >"$t.near.raw" || stop 98 "sed failed"
sort -z -o "$t.near" "$t.near.raw" || stop 98 "sort failed"
comm -z -23 "$t.dirs" "$t.near" >"$t.far" || stop 98 "comm failed"
sort -z -o "$t.cand" "$t.cand.raw" || stop 98 "sort failed"
comm -z -12 "$t.cand" "$t.tk" >"$t.taken" || stop 98 "comm failed"
comm -z -23 "$t.cand" "$t.tk" >"$t.go.raw" || stop 98 "comm failed"
sort -z -t/ -k2 -o "$t.go" "$t.go.raw" || stop 98 "sort failed"
# The outcomes known before anything moves (written out last, with the others).
{ cut -z -d/ -f 1 "$t.gone" >"$t.g.n" && cut -z -d/ -f 1 "$t.taken" >"$t.e.n" &&
    sed -z 's/^/G/' "$t.g.n" && sed -z 's/^/E/' "$t.e.n"; } >"$t.before" || stop 98 "cannot list outcomes"

# From here on files move. MOVER gets `<name>/<final dir>` records as arguments, grouped by
# final directory (xargs may split them over several runs: each run is complete in itself).
# Per group it writes the group's I records to the receipt, then runs one `mv -n` (never
# overwrite) on its names; after the last group's mv every final directory and the slot are
# flushed, in one sync (one per group only when that fails, to tell the groups apart; a group
# whose flush fails turns its M into U, see Durable above, and T.unflushed tells the main
# program, which then exits 88). Only then does it settle each name, in memory (nothing after
# the renames needs space in staging, which another slot may be filling): of a group whose mv
# succeeded, gone from staging M, still there E (`mv -n` left it for a final name that
# appeared meanwhile); of a group whose mv failed, still staged F, gone with its final name
# present M, gone without it U; of a group without its directory F. It adds every outcome of
# the run to the receipt, then writes them to the reply (a reply cut short ends the run at its
# first write: SIGPIPE). GNU mv (9.1) given several names stats each final name right after
# renaming it, and fails when the endpoint manager has already taken the file away: so a
# failed mv whose every complaint is such a stat of a final path (absolute: quoted, it starts
# with '/ or "/; names are relative and every complaint about a source names it) has renamed
# all the names that left staging.
# (Lists grow by 64 names at a time: appending to a long string copies it, which name by name
# would cost the square of a large group.)
MOVER='
set -u
i=0 g=0 c=0 d= l= p= a=1 moved=
group() {
    # group RECORDS: rename the names that l refers to (of RECORDS, from the a-th on) into d.
    [ -n "$l" ] || return 0
    g=$((g + 1))
    eval "l$g=\$l a$g=\$a dd$g=\$d ok$g=0 fl$g=1"
    # Nothing is renamed into a missing directory, nor into one on another filesystem than
    # staging (a symbolic link or a mount point in the endpoint buffer: mv would copy, and
    # the final name would appear before its data is whole). T.far lists the directories not
    # found on the slot filesystem; it is empty unless one is missing or elsewhere.
    if [ ! -d "$d" ] ||
        { [ -s "$T.far" ] && [ "$(find -H "$d" -maxdepth 0 -printf %D 2>/dev/null)" != "$S" ]; }; then
        eval "ok$g=n"
        return 0
    fi
    # The intent first: a name gone from staging after it, with no outcome, was renamed by a
    # commit killed in its mv. Without it, nothing of the group moves.
    if ! { eval "printf \"I%s\\000\" $l"; } >>"$R"; then
        echo "hdfmgr commit: cannot write the receipt $R: not renamed" >&2
        return 0
    fi
    if { eval "mv -n -t \"\$d\" -- $l"; } 2>"$T.err"; then
        eval "ok$g=1"
    elif [ -s "$T.err" ] && ! grep -q -v "^mv: cannot stat [\"'"'"']/" "$T.err"; then
        eval "ok$g=1"
    else
        # A failed mv: a name gone from staging without its final name may have been deleted
        # there before the mv (a tmp cleaner). Its U goes to the receipt now, before the flush:
        # a commit killed in that flush must not leave its I record alone (a listing takes
        # an I with no outcome and no staged copy for a rename).
        j=$a u=
        eval "for n in $l; do unsure; done"
        [ -z "$u" ] || { eval "printf \"U%s\\000\" $u"; } >>"$R" 2>/dev/null || :
    fi
    [ ! -s "$T.err" ] || cat "$T.err" >&2 || :
    moved="$moved \"\$dd$g\""
}
unsure() {
    # unsure: add a reference to the j-th argument (the name n) to u when n has left staging
    # without reaching d.
    [ -e "./$n" ] || [ -L "./$n" ] || [ -e "$d/$n" ] || [ -L "$d/$n" ] || u="$u \"\${$j%%/*}\""
    j=$((j + 1))
}
for r do
    i=$((i + 1))
    x=${r#*/}
    if [ "$x" != "$d" ]; then
        l=$l$p
        group "$@"
        d=$x l= p= c=0 a=$i
    fi
    p="$p \"\${$i%%/*}\"" c=$((c + 1))
    [ "$c" -lt 64 ] || l=$l$p p= c=0
done
l=$l$p
group "$@"
if [ -n "$moved" ] && ! eval "sync -- $moved ."; then
    k=0
    while [ "$k" -lt "$g" ]; do
        k=$((k + 1))
        eval "z=\$dd$k o=\$ok$k"
        [ "$o" != n ] || continue
        if ! sync -- "$z" .; then
            eval "fl$k=0"
            echo "hdfmgr commit: cannot flush $z after renaming into it: its files are U" >&2
            { true >"$T.unflushed"; } 2>/dev/null || :
        fi
    done
fi
settle() {
    # settle: the outcome c of the name n, the j-th argument, of a group (o its mv, f its
    # flush, x its directory), added to w as a letter and a reference to the argument.
    if [ "$o" = n ]; then c=F
    elif [ -e "./$n" ] || [ -L "./$n" ]; then
        if [ "$o" = 1 ]; then c=E; else c=F; fi
    elif [ "$o" = 1 ] || [ -e "$x/$n" ]; then c=M
    else c=U; fi
    [ "$f" = 1 ] || [ "$c" != M ] || c=U
    keep
}
renamed() {
    # renamed: settle for a group whose mv succeeded and was flushed (the common case).
    if [ -e "./$n" ] || [ -L "./$n" ]; then c=E; else c=M; fi
    keep
}
keep() {
    # keep: add c and a reference to the j-th argument to w.
    q="$q $c \"\${$j%%/*}\"" h=$((h + 1)) j=$((j + 1))
    [ "$h" -lt 64 ] || w=$w$q q= h=0
}
k=0
while [ "$k" -lt "$g" ]; do
    k=$((k + 1))
    eval "o=\$ok$k f=\$fl$k l=\$l$k x=\$dd$k j=\$a$k"
    w= q= h=0
    if [ "$o$f" = 11 ]; then
        eval "for n in $l; do renamed; done"
    else
        eval "for n in $l; do settle; done"
    fi
    w=$w$q
    eval "w$k=\$w"
    [ "$o" = n ] || { eval "printf \"%s%s\\000\" $w"; } >>"$R" 2>/dev/null ||
        echo "hdfmgr commit: cannot add to $R" >&2
done
k=0
while [ "$k" -lt "$g" ]; do
    k=$((k + 1))
    eval "w=\$w$k"
    eval "printf \"%s%s\\000\" $w"
done
'
r=0
S=$sdev T=$t R=$s.receipt xargs -0 -r sh -c "$MOVER" hdfmgr-move <"$t.go" || r=99
[ ! -e "$t.unflushed" ] || [ "$r" -ne 0 ] || r=88
cat "$t.before" || :
rm -f -- "$t".* || :
printf '%s\000' "$E"
exit "$r"
