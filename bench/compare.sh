#!/usr/bin/env bash
# compare.sh - herald against nginx+nchan and Node ws on every fan-out scenario.
#
# usage: bench/compare.sh [--scenarios LIST] [--servers LIST] [--runs N] [--duration S]
#                         [--warmup S] [--publish http|ws|redis] [--out DIR]
#   --scenarios  comma-separated, from: latency,throughput,scale,large,channels (default: all)
#   --servers    comma-separated, from: herald,nchan,ws (default: all)
#   --runs N     runs of each scenario on each server (default 3); the table shows medians
#   --duration S measured seconds per run (default 10), after --warmup S (default 2)
#   --publish    http (default: POST /pub/<channel>, every server), or ws / redis (herald only:
#                a /ws publishing socket, or PUBLISH to a redis-server started for the run)
#   --out DIR    where the per-run JSON goes (default bench/results/<date-time>)
#
# Installs the peers when missing (apt: nginx libnginx-mod-nchan nodejs npm; npm ci in
# bench/peers), builds herald-bench (and herald unless build/herald exists) in build-bench/, then
# for each scenario alternates the servers run by run (herald, nchan, ws, herald, ...), each on a
# fresh server on a free port. Prints a Markdown table of medians with herald's ratio to each peer,
# and writes bench/results/summary.json, bench/results/summary.md and bench/results/chart.svg.
# Every server it starts is stopped, on Ctrl-C too.
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"

scenarios=${SCENARIOS// /,}
servers=herald,nchan,ws
runs=3 duration=10 warmup=2 out="" publish=http

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --scenarios) scenarios="$2"; shift 2 ;;
    --servers) servers="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --publish) publish="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) log "unknown option $1"; usage >&2; exit 2 ;;
  esac
done
for s in ${scenarios//,/ }; do
  scenario_flags "$s" herald >/dev/null || { log "unknown scenario $s ($SCENARIOS)"; exit 2; }
done
for s in ${servers//,/ }; do
  case "$s" in herald|nchan|ws) ;; *) log "unknown server $s (herald, nchan, ws)"; exit 2 ;; esac
done
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { log "--runs wants a positive integer"; exit 2; }
case "$publish" in
  http) ;;
  ws|redis)
    case ",$servers," in *,herald,*) ;; *) log "--publish $publish: only herald takes it"; exit 2 ;; esac
    [ "$servers" != herald ] && log "--publish $publish: only herald takes it; running herald alone"
    servers=herald ;;
  *) log "--publish wants http, ws or redis"; exit 2 ;;
esac

PY=python3
[ -x /usr/bin/python3 ] && PY=/usr/bin/python3
results_root="$BENCH_DIR/results"
out=${out:-$results_root/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"

lg=""
cleanup() {
  if [ -n "$lg" ]; then
    kill -INT "$lg" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$lg" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$lg" 2>/dev/null || true
    lg=""
  fi
  stop_server
  [ -n "$BENCH_TMP" ] && rm -rf "$BENCH_TMP"
  BENCH_TMP=""
}
trap cleanup EXIT
trap 'log "interrupted; stopping"; exit 130' INT TERM

peers=${servers//herald/}
ensure_peers "$peers"
case ",$servers," in *,herald,*) build_tools 1 ;; *) build_tools 0 ;; esac
[ -n "$HERALD_BIN" ] && log "herald: $HERALD_BIN ($("$HERALD_BIN" --version 2>&1 | head -1))"
log "results in $out"
check_quiet_machine

run_one() {
  local scenario="$1" server="$2" run="$3" flags base limit subs rate rc=0
  flags=$(scenario_flags "$scenario" "$server")
  base="$out/${scenario}__${server}__${run}"
  if ! start_server "$server" "$publish"; then
    log "$scenario/$server run $run: the server did not start"
    return 0
  fi
  subs=$(sed -n 's/.*--subscribers \([0-9]*\).*/\1/p' <<<"$flags")
  rate=$(sed -n 's/.*--connect-rate \([0-9]*\).*/\1/p' <<<"$flags")
  limit=$(awk -v d="$duration" -v w="$warmup" -v n="${subs:-1000}" -v r="${rate:-2000}" \
    'BEGIN { printf "%d", d + w + n / r + 60 }')
  # shellcheck disable=SC2086
  timeout --signal=INT --kill-after=10 "$limit" "$LOADGEN" --host 127.0.0.1 --port "$SERVER_PORT" \
    --server-pid "$SERVER_PIDS" --duration "$duration" --warmup "$warmup" --quiet \
    --label "$scenario/$server" --json "$base.json" --publish "$publish" \
    ${REDIS_PORT:+--redis 127.0.0.1:$REDIS_PORT} $flags >"$base.txt" 2>"$base.log" &
  lg=$!
  wait "$lg" || rc=$?
  lg=""
  stop_server
  if [ ! -s "$base.json" ]; then
    log "$scenario/$server run $run: no result (exit $rc); see $base.log"
    tail -3 "$base.log" >&2 || true
    rm -f "$base.json"
    return 0
  fi
  "$PY" - "$base.json" "$scenario" "$server" "$run" <<'EOF' >&2
import json, sys
r = json.load(open(sys.argv[1]))
s = r.get("server") or {}
l = r["latency_us"]
print(f"bench: {sys.argv[2]:10} {sys.argv[3]:6} run {sys.argv[4]}: {r['deliveries_per_s']:12.0f} deliveries/s "
      f"{r['mb_per_s']:9.2f} MB/s  p50 {l['p50']:9.0f} us  p99 {l['p99']:9.0f} us  "
      f"rss/conn {s.get('rss_per_connection_bytes', 0):6.0f} B  cpu {s.get('cpu_pct', 0):5.1f}%  "
      f"losses {r['losses']}  subs {r['subscribers_ready']}/{r['params']['subscribers']}"
      + (f"  ({r['first_error'] or r['publish_error']})" if r['first_error'] or r['publish_error'] else ""))
EOF
}

for scenario in ${scenarios//,/ }; do
  for run in $(seq 1 "$runs"); do
    for server in ${servers//,/ }; do
      run_one "$scenario" "$server" "$run"
    done
  done
done

echo
"$PY" "$BENCH_DIR/report.py" "$out" --json "$out/summary.json" --svg "$out/chart.svg" \
  --markdown "$out/summary.md"
cp "$out/summary.json" "$out/summary.md" "$out/chart.svg" "$results_root/"
log "wrote $results_root/summary.md, summary.json and chart.svg (runs in $out)"
