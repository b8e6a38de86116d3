#!/bin/sh
# Entry point of every FedFly container.
#
#   entrypoint.sh health PORT...  exit 0 if processes here listen on every TCP PORT given (the
#                               health check: it reads /proc/net/tcp*, so it opens no connection
#                               and no role logs a failed handshake for it; several ports: the
#                               device host's container, one per device)
#   entrypoint.sh CMD [ARG...]  run CMD. With FEDFLY_CERTS_FOR set (a testbed file), first
#                               make the TLS certificates it names that are missing
#                               (python -m scripts.certs; the central's container does it
#                               before it listens, so every other container finds them).
#                               With FEDFLY_LINGER_S > 0, a CMD that succeeds keeps
#                               the container up that many more seconds, so that in
#                               `docker compose up --exit-code-from central` the central is
#                               the first to exit (compose then stops the rest and returns
#                               the central's status); a CMD that fails exits at once, which
#                               stops the whole run.
set -u

if [ "${1:-}" = health ]; then
    shift
    [ "$#" -gt 0 ] || { echo "usage: entrypoint.sh health PORT..." >&2; exit 2; }
    tables=
    for t in /proc/net/tcp /proc/net/tcp6; do [ -r "$t" ] && tables="$tables $t"; done
    for port in "$@"; do
        port=$(printf '%04X' "$port") || exit 2
        # local_address is field 2 (ADDR:PORT in hex), st is field 4 (0A = LISTEN)
        # shellcheck disable=SC2086
        awk -v p=":$port" 'FNR > 1 && substr($2, length($2) - 4) == p && $4 == "0A" { found = 1 }
                           END { exit !found }' $tables || exit 1
    done
    exit 0
fi

[ "$#" -gt 0 ] || { echo "usage: entrypoint.sh CMD [ARG...] | entrypoint.sh health PORT" >&2; exit 2; }
if [ -n "${FEDFLY_CERTS_FOR:-}" ]; then
    python -m scripts.certs --config "$FEDFLY_CERTS_FOR" >/dev/null || exit 2
fi
linger=${FEDFLY_LINGER_S:-0}
[ "$linger" -gt 0 ] 2>/dev/null || exec "$@"

"$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
status=0
wait "$child" || status=$?
while kill -0 "$child" 2>/dev/null; do   # a trapped signal interrupted wait: wait for the end
    status=0
    wait "$child" || status=$?
done
[ "$status" -eq 0 ] || exit "$status"
trap 'exit 0' TERM INT
sleep "$linger" &
wait $!
exit 0
