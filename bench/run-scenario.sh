#!/usr/bin/env bash
# run-scenario.sh - one benchmark scenario against one server, on a fresh server.
#
# usage: bench/run-scenario.sh SCENARIO TARGET [--duration S] [--warmup S] [--json FILE]
#                              [--publish http|ws|redis] [-- extra herald-bench flags]
#   SCENARIO  latency | throughput | scale | large | channels
#   TARGET    herald | nchan | ws   (started fresh on a free port, stopped afterwards), or
#             HOST:PORT of a server already running (then pass --server-pid yourself after --,
#             and for the channels scenario --sub ws when it is herald)
#   --publish  how messages are published: HTTP POST (default; every server), a /ws socket or
#             Redis PUBLISH (herald only; redis starts a redis-server of its own)
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

[ $# -ge 2 ] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac
scenario="$1" target="$2"
shift 2
duration=10 warmup=2 json="" publish=http extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --json) json="$2"; shift 2 ;;
    --publish) publish="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) log "unknown option $1"; usage >&2; exit 2 ;;
  esac
done

server=external
case "$target" in
  herald|nchan|ws) server="$target" ;;
  *:*) ;;
  *) log "TARGET is herald, nchan, ws or HOST:PORT"; exit 2 ;;
esac
case "$publish" in
  http) ;;
  ws|redis) [ "$server" = herald ] || [ "$server" = external ] || { log "--publish $publish: herald only"; exit 2; } ;;
  *) log "--publish wants http, ws or redis"; exit 2 ;;
esac
[ "$publish" = redis ] && [ "$server" = external ] && { log "--publish redis needs TARGET herald"; exit 2; }
flags=$(scenario_flags "$scenario" "$server") || { log "unknown scenario $scenario ($SCENARIOS)"; exit 2; }

cleanup() {
  stop_server
  [ -n "$BENCH_TMP" ] && rm -rf "$BENCH_TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$server" = external ]; then
  build_tools 0
  host=${target%:*} port=${target##*:}
  pidargs=()
else
  [ "$server" = herald ] || ensure_peers "$server"
  build_tools "$([ "$server" = herald ] && echo 1 || echo 0)"
  check_quiet_machine
  start_server "$server" "$publish"
  host=127.0.0.1 port=$SERVER_PORT
  pidargs=(--server-pid "$SERVER_PIDS")
  [ "$publish" = redis ] && pidargs+=(--redis "127.0.0.1:$REDIS_PORT")
  log "$server listening on $port (pids $SERVER_PIDS)"
fi

args=(--host "$host" --port "$port" --duration "$duration" --warmup "$warmup" --label "$scenario/$target"
  --publish "$publish")
[ -n "$json" ] && args+=(--json "$json")
# shellcheck disable=SC2086
"$LOADGEN" "${args[@]}" "${pidargs[@]}" $flags "${extra[@]}" &
lg=$!
trap 'kill -INT $lg 2>/dev/null; sleep 3; kill -KILL $lg 2>/dev/null; exit 130' INT TERM
rc=0
wait $lg || rc=$?
exit $rc
