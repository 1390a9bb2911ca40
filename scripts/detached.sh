#!/usr/bin/env bash
# Run a long benchmark on a machine reached through calls that each have a time limit (a lent GPU
# machine without network, say). `start` runs the command in a process session of its own (setsid),
# so the end of the call that started it does not stop it. `wait` waits up to SECONDS for it to end
# and then copies what it has so far to a folder the call brings back: files as they are, folders
# as FOLDER.tgz without checkpoints and memories. A later call can `wait` again while the
# machine is still up.
#
#   bash scripts/detached.sh start DIR -- COMMAND [ARGS...]   # its output in DIR/log, its exit status in DIR/rc
#   bash scripts/detached.sh wait DIR SECONDS TO [PATH...]     # prints the status and the log's end
set -uo pipefail
fail() { echo "detached.sh: $*" >&2; exit 2; }
[ $# -ge 2 ] || fail "usage: detached.sh start DIR -- COMMAND... | detached.sh wait DIR SECONDS TO [PATH...]"
verb=$1 dir=$2
shift 2
case "$verb" in
start)
    [ "${1:-}" = "--" ] && [ $# -ge 2 ] || fail "start needs -- and a command"
    shift
    [ -e "$dir/log" ] && [ ! -e "$dir/rc" ] && fail "$dir holds a command that has not ended"
    mkdir -p "$dir" && rm -f "$dir/rc" && : > "$dir/log"  # the log exists once start returns
    setsid bash -c '"$@" >> "$0/log" 2>&1; echo $? > "$0/rc"' "$dir" "$@" < /dev/null > /dev/null 2>&1 &
    echo "started at $(date -u +%T): $*"
    ;;
wait)
    [ $# -ge 2 ] || fail "wait needs SECONDS and TO"
    seconds=$1 to=$2
    shift 2
    [[ "$seconds" =~ ^[0-9]+$ ]] || fail "SECONDS must be a whole number, not '$seconds'"
    [ -e "$dir/log" ] || fail "nothing was started in $dir"
    mkdir -p "$to"
    start=$SECONDS
    while [ ! -f "$dir/rc" ] && [ $(( SECONDS - start )) -lt "$seconds" ]; do sleep 2; done
    for path in "$dir/log" "$@"; do
        if [ -d "$path" ]; then
            tar -czf "$to/$(basename "$path").tgz" --exclude=checkpoints --exclude=memories -C "$(dirname "$path")" "$(basename "$path")"
        elif [ -f "$path" ]; then
            cp "$path" "$to/"
        fi
    done
    echo "status: $(cat "$dir/rc" 2>/dev/null | sed 's/^/ended, exit /' || echo 'still running') after waiting $(( SECONDS - start )) s"
    tail -c 2000 "$dir/log" | tr '\r' '\n' | tail -n 15
    ;;
*)
    fail "unknown verb '$verb': start or wait"
    ;;
esac
