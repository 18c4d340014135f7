#!/usr/bin/env bash
# End-to-end load benchmark: llm-edge (API-call route, the same with tracing on for every call,
# and pass-through route) against nginx, a minimal Pingora proxy (the framework's floor) and a
# direct connection, all in front of the same mock upstream. See benches/README.md.
#
#   benches/e2e/run.sh            full run (3 rounds, ~13 min on 2 cores)
#   QUICK=1 benches/e2e/run.sh    quick run (1 round, about 1.5 minutes once built)
#
# Environment: QUICK=1, ROUNDS=N, PROXY_CPU (default 1), LOAD_CPU (mock + clients, default 0),
# SKIP_BUILD=1 (use the binaries already built), KEEP_TMP=1 (keep the temp dir), ONLY="s1 s3".
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
REPO=$PWD
E2E=benches/e2e
TOOLS_DIR=$E2E/tools
TOOLS=$TOOLS_DIR/target/release
EDGE_BIN=${CARGO_TARGET_DIR:-target}/release/llm-edge
OUT_DIR=$E2E/out
PATH=$PATH:/usr/sbin:/sbin

QUICK=${QUICK:-0}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
if [[ $QUICK == 1 ]]; then
  ROUNDS=${ROUNDS:-1}
  WRK_SECS=2      # S1, S2 measured seconds
  WARM_SECS=1     # S1, S2 warm-up seconds
  S3_STREAMS=2000 # as in full runs: fewer gave unstable CPU figures
  S4_SECS=2
else
  ROUNDS=${ROUNDS:-3}
  WRK_SECS=10
  WARM_SECS=2
  S3_STREAMS=2000
  S4_SECS=10
fi
S5_STREAMS=1000
# ONLY="s3 s5" runs a subset (for development; the table then has only those rows).
read -ra SCENARIOS <<<"${ONLY:-s1 s2 s3 s3l s4 s5}"
TARGETS=(direct nginx pingora-min edge-api edge-traced edge-pass)
# The llm-edge targets, each its own process: (re)started, checked and stopped alike.
EDGE_TARGETS=(edge-api edge-traced edge-pass)
# Every proxied target (all but direct).
PROXIES=(nginx pingora-min "${EDGE_TARGETS[@]}")

# runs_in TARGET SCENARIO: whether the target is measured in the scenario. edge-traced (edge-api
# with a trace record written for every call) runs only in S1, S3 and S3L, and S3L (S3 with
# vLLM-shaped chunks, for the tracing cost) only on direct, nginx, edge-api and edge-traced, to
# keep the run time down; elsewhere the cells in the table are "-".
runs_in() {
  case $1 in
    edge-traced) [[ $2 == s1 || $2 == s3 || $2 == s3l ]] ;;
    pingora-min | edge-pass) [[ $2 != s3l ]] ;;
    *) true ;;
  esac
}

log() { printf '[e2e %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# ---------------------------------------------------------------------------------------------
# Prerequisites and builds

install_missing() {
  local pkgs=()
  command -v nginx >/dev/null || pkgs+=(nginx-light)
  command -v wrk >/dev/null || pkgs+=(wrk)
  command -v taskset >/dev/null || pkgs+=(util-linux)
  command -v curl >/dev/null || pkgs+=(curl) # edge-traced: POST /admin/traces/flush
  if [[ $SKIP_BUILD != 1 ]]; then
    # Building llm-edge and bench-pingora (Pingora) needs cmake, see README.md.
    command -v cmake >/dev/null || pkgs+=(cmake)
  fi
  ((${#pkgs[@]})) || return 0
  log "installing ${pkgs[*]}"
  local sudo=()
  ((EUID == 0)) || sudo=(sudo)
  "${sudo[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q "${pkgs[@]}"
}

build() {
  if [[ $SKIP_BUILD == 1 ]]; then
    log "SKIP_BUILD=1: using the binaries already built"
  else
    log "building llm-edge (release)"
    cargo build --release
    log "building the bench tools (release)"
    cargo build --release --manifest-path "$TOOLS_DIR/Cargo.toml" --target-dir "$TOOLS_DIR/target"
  fi
  local b
  for b in "$EDGE_BIN" "$TOOLS/bench-mock" "$TOOLS/bench-sse" "$TOOLS/bench-report" \
    "$TOOLS/bench-pingora"; do
    [[ -x $b ]] || die "$b is missing (build it, or run without SKIP_BUILD=1)"
  done
}

SKIP_BUILD=${SKIP_BUILD:-0}
install_missing
build

(($(nproc) > PROXY_CPU && $(nproc) > LOAD_CPU)) ||
  die "needs CPUs $LOAD_CPU and $PROXY_CPU (this machine has $(nproc)); set PROXY_CPU/LOAD_CPU"
[[ $PROXY_CPU != "$LOAD_CPU" ]] || die "PROXY_CPU and LOAD_CPU must differ"

# 1,000 streams through a proxy: 2,000 sockets in the proxy, 1,000 in the client and the mock.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
(($(ulimit -n) >= 4096)) || die "open-file limit $(ulimit -n) is too low (need 4096)"

CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------------------------
# Processes: everything started here is recorded and stopped on exit. Each proxied target has
# a process of its own (edge-api, edge-traced and edge-pass run the same llm-edge binary; edge-api
# and edge-pass the same config, edge-traced that config plus tracing), so CPU time and peak RSS
# are per target.

TMP=$(mktemp -d "${TMPDIR:-/tmp}/llm-edge-e2e.XXXXXX")
PIDS=()             # every process started, in order
declare -A STOP_SIG # how to stop it: Pingora processes stop fast on SIGINT, gracefully on TERM
declare -A PID_OF   # mock, nginx, pingora-min, edge-api, edge-traced, edge-pass -> pid
declare -A PORT_OF  # same keys -> loopback port

# stop_pid PID: its stop signal, up to 3 s to exit, then SIGKILL.
stop_pid() {
  local pid=$1
  kill "-${STOP_SIG[$pid]:-TERM}" "$pid" 2>/dev/null || true
  for _ in {1..30}; do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do
    kill "-${STOP_SIG[$pid]:-TERM}" "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    stop_pid "$pid"
  done
  if [[ ${KEEP_TMP:-0} == 1 ]]; then
    log "temp dir kept: $TMP"
  else
    rm -rf "$TMP"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

USED_PORTS=" "
free_port() {
  local p
  for _ in {1..100}; do
    p=$((20000 + RANDOM % 12000))
    [[ $USED_PORTS == *" $p "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      USED_PORTS+="$p "
      echo "$p"
      return
    fi
  done
  die "no free loopback port found"
}

# wait_ready PID PORT NAME: until PORT accepts connections; fails if PID exits first.
wait_ready() {
  local pid=$1 port=$2 name=$3
  for _ in {1..200}; do
    kill -0 "$pid" 2>/dev/null || die "$name exited at start-up (see its log in $TMP)"
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return
    fi
    sleep 0.05
  done
  die "$name did not listen on 127.0.0.1:$port within 10 s"
}

# Assigned in the main shell (free_port runs in a subshell and cannot record what it chose).
for name in mock "${PROXIES[@]}" "${EDGE_TARGETS[@]/%/-admin}"; do
  PORT_OF[$name]=$(USED_PORTS="$USED_PORTS${PORT_OF[*]} " free_port)
done
MOCK_ADDR=127.0.0.1:${PORT_OF[mock]}
# edge-traced writes one JSON line per call here (truncated around each measured run).
TRACES=$TMP/edge-traced-traces.jsonl

write_configs() {
  local user="" name
  ((EUID != 0)) || user="user $(id -un) $(id -gn);"
  mkdir -p "$TMP/nginx-client-body" "$TMP/nginx-proxy"
  sed -e "s|@USER@|$user|" -e "s|@TMP@|$TMP|g" -e "s|@MOCK@|$MOCK_ADDR|" \
    -e "s|@NOFILE@|$(ulimit -n)|" -e "s|@LISTEN@|127.0.0.1:${PORT_OF[nginx]}|" \
    "$E2E/nginx.conf.tmpl" >"$TMP/nginx.conf"
  for name in "${EDGE_TARGETS[@]}"; do
    cat >"$TMP/$name.yaml" <<EOF
# Written by benches/e2e/run.sh.
listen: ["127.0.0.1:${PORT_OF[$name]}"]
admin: {listen: "127.0.0.1:${PORT_OF[$name-admin]}"}
# nginx authenticates nobody in this comparison, so neither does llm-edge.
auth: {mode: open}
server: {threads: 1, pid_file: "$TMP/$name.pid", upgrade_sock: "$TMP/$name-upgrade.sock"}
upstreams:
  mock:
    kind: vllm
    endpoints: ["http://$MOCK_ADDR"]
models:
  # API-call route: the body is read, "model" renamed (a top-level edit), then forwarded.
  - name: bench
    upstream: mock
    model: bench-upstream
routes:
  # Pass-through route: Pingora's own proxy path.
  - prefix: /pass/
    upstream: mock
    strip_prefix: true
EOF
    if [[ $name == edge-traced ]]; then
      cat >>"$TMP/$name.yaml" <<EOF
# edge-api plus a trace record for every call (conf/README.md, tracing).
tracing: {mode: always, jsonl: "$TRACES"}
EOF
    fi
    "$EDGE_BIN" -t -c "$TMP/$name.yaml" >/dev/null || die "llm-edge rejected $TMP/$name.yaml"
  done
}

# start NAME: starts mock, nginx, pingora-min or an llm-edge target and waits until it listens.
start() {
  local name=$1 pid
  case $name in
    mock)
      taskset -c "$LOAD_CPU" "$TOOLS/bench-mock" --listen "$MOCK_ADDR" >>"$TMP/mock.log" 2>&1 &
      pid=$!
      ;;
    nginx)
      taskset -c "$PROXY_CPU" nginx -p "$TMP" -c "$TMP/nginx.conf" -e "$TMP/nginx-error.log" \
        >>"$TMP/nginx-stdout.log" 2>&1 &
      pid=$!
      ;;
    pingora-min)
      taskset -c "$PROXY_CPU" "$TOOLS/bench-pingora" --listen "127.0.0.1:${PORT_OF[$name]}" \
        --upstream "$MOCK_ADDR" --tmp "$TMP" >>"$TMP/$name.log" 2>&1 &
      pid=$!
      STOP_SIG[$pid]=INT
      ;;
    edge-*)
      LLM_EDGE_LOG=warn taskset -c "$PROXY_CPU" "$EDGE_BIN" -c "$TMP/$name.yaml" \
        >>"$TMP/$name.log" 2>&1 &
      pid=$!
      STOP_SIG[$pid]=INT
      ;;
  esac
  PIDS+=("$pid")
  PID_OF[$name]=$pid
  wait_ready "$pid" "${PORT_OF[$name]}" "$name"
}

# restart NAME: a fresh process (before S5, so its peak RSS is that of S5 alone).
restart() {
  stop_pid "${PID_OF[$1]}"
  start "$1"
}

ensure_running() {
  local name
  kill -0 "${PID_OF[mock]}" 2>/dev/null || die "bench-mock died (see $TMP/mock.log)"
  for name in "${PROXIES[@]}"; do
    if ! kill -0 "${PID_OF[$name]}" 2>/dev/null; then
      log "$name is not running: restarting it (its log: $TMP/$name.log)"
      start "$name"
    fi
  done
}

# ---------------------------------------------------------------------------------------------
# /proc readings

# pids_of TARGET: the proxy processes of a target (none for direct).
pids_of() {
  case $1 in
    direct) ;;
    nginx)
      # The master and its worker(s).
      local master=${PID_OF[nginx]} children=()
      echo "$master"
      if [[ -r /proc/$master/task/$master/children ]]; then
        read -ra children <"/proc/$master/task/$master/children" || true
      fi
      ((${#children[@]} == 0)) || printf '%s\n' "${children[@]}"
      ;;
    pingora-min | edge-*) echo "${PID_OF[$1]}" ;;
  esac
}

# cpu_ticks PID...: utime + stime (clock ticks, all threads) summed over the processes.
cpu_ticks() {
  local pid line f total=0
  for pid in "$@"; do
    line=$(<"/proc/$pid/stat") || continue
    read -ra f <<<"${line##*) }"
    total=$((total + f[11] + f[12]))
  done
  echo "$total"
}

# cpu_ns PID...: on-CPU time of every thread (/proc/PID/task/*/schedstat, ns) summed over the
# processes. Same quantity as utime + stime at ns instead of 10 ms resolution, which the short
# stream scenarios need; threads that exit during a measurement would be missed (the proxies
# here keep a fixed set of threads).
cpu_ns() {
  local pid f ns _rest total=0
  for pid in "$@"; do
    for f in /proc/"$pid"/task/*/schedstat; do
      read -r ns _rest <"$f" 2>/dev/null || continue
      total=$((total + ns))
    done
  done
  echo "$total"
}

# reset_hwm PID...: restart the peak-RSS (VmHWM) accounting of the processes.
reset_hwm() {
  local pid
  for pid in "$@"; do
    echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true
  done
}

# rss_kb PID...: VmHWM (peak RSS) summed over the processes, in kB.
rss_kb() {
  local pid k v total=0
  for pid in "$@"; do
    while read -r k v _; do
      [[ $k == VmHWM: ]] && total=$((total + v))
    done <"/proc/$pid/status" || true
  done
  echo "$total"
}

all_alive() {
  local pid
  for pid in "$@"; do
    kill -0 "$pid" 2>/dev/null || return 1
  done
}

# ---------------------------------------------------------------------------------------------
# Request bodies (the same bytes for every target)

make_bodies() {
  local sys='You are a helpful assistant. Answer briefly and precisely.'
  local q='Summarise the main differences between HTTP/1.1 keep-alive and HTTP/2 multiplexing.'
  # ~300 B non-stream chat.
  printf '{"model":"bench","messages":[{"role":"system","content":"%s"},{"role":"user","content":"%s"}],"temperature":0.7,"max_tokens":256,"user":"bench-user-0001"}' \
    "$sys" "$q" >"$TMP/body-300.json"
  # The same, streamed.
  printf '{"model":"bench","stream":true,"messages":[{"role":"system","content":"%s"},{"role":"user","content":"%s"}],"temperature":0.7,"max_tokens":256,"user":"bench-user-0001"}' \
    "$sys" "$q" >"$TMP/body-stream.json"
  # ~100 KB: a long conversation (200 turns of ~500 B).
  local turn i
  turn=$(printf 'Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua. %.0s' {1..4})
  {
    printf '{"model":"bench","messages":[{"role":"system","content":"%s"}' "$sys"
    for ((i = 0; i < 200; i++)); do
      if ((i % 2)); then
        printf ',{"role":"assistant","content":"Turn %d. %s"}' "$i" "$turn"
      else
        printf ',{"role":"user","content":"Turn %d. %s"}' "$i" "$turn"
      fi
    done
    printf '],"temperature":0.7,"max_tokens":256,"user":"bench-user-0001"}'
  } >"$TMP/body-100k.json"
}

# ---------------------------------------------------------------------------------------------
# Load

url_of() {
  case $1 in
    direct) echo "http://$MOCK_ADDR/v1/chat/completions" ;;
    nginx) echo "http://127.0.0.1:${PORT_OF[nginx]}/v1/chat/completions" ;;
    pingora-min) echo "http://127.0.0.1:${PORT_OF[pingora-min]}/v1/chat/completions" ;;
    edge-api | edge-traced) echo "http://127.0.0.1:${PORT_OF[$1]}/v1/chat/completions" ;;
    edge-pass) echo "http://127.0.0.1:${PORT_OF[edge-pass]}/pass/v1/chat/completions" ;;
  esac
}

# The model the mock sees: renamed by the API-call route only (nginx, pingora-min and the
# pass-through route forward the body untouched).
model_seen_by_mock() {
  case $1 in
    edge-api | edge-traced) echo bench-upstream ;;
    *) echo bench ;;
  esac
}

# wrk_json CONNS SECS BODY URL: a wrk run on the load CPU; prints its JSON summary or "null".
wrk_json() {
  local out
  out=$(BENCH_BODY=$TMP/$3 taskset -c "$LOAD_CPU" wrk -t1 -c"$1" -d"$2"s --timeout 10s \
    -s "$REPO/$E2E/wrk-post.lua" "$4" 2>>"$TMP/client.log") || true
  out=$(sed -n 's/^WRK_JSON //p' <<<"$out")
  echo "${out:-null}"
}

# sse_json URL QUERY MODEL ARGS...: a bench-sse run on the load CPU; prints its JSON or "null".
sse_json() {
  local url=$1 query=$2 model=$3 out
  shift 3
  out=$(taskset -c "$LOAD_CPU" "$TOOLS/bench-sse" --url "$url?$query" \
    --body-file "$TMP/body-stream.json" --expect-model "$model" --timeout 60 "$@" \
    2>>"$TMP/client.log") || true
  echo "${out:-null}"
}

S3_QUERY="chunks=20"
# S3L: S3 with the chunks vLLM sends with logprobs and token ids (per-token logprobs, token ids,
# prompt token ids in the first event), which edge-traced parses.
S3L_QUERY="chunks=20&logprobs=1"
S4_QUERY="chunks=20&first_ms=50&gap_ms=20"
S5_QUERY="chunks=25&first_ms=200&gap_ms=200"

# warm_up SCENARIO TARGET: fills connection pools; not measured.
warm_up() {
  local url model
  url=$(url_of "$2")
  model=$(model_seen_by_mock "$2")
  case $1 in
    s1) wrk_json 32 "$WARM_SECS" body-300.json "$url" >/dev/null ;;
    s2) wrk_json 8 "$WARM_SECS" body-100k.json "$url" >/dev/null ;;
    s3) sse_json "$url" "$S3_QUERY" "$model" --concurrency 16 --streams 200 >/dev/null ;;
    s3l) sse_json "$url" "$S3L_QUERY" "$model" --concurrency 16 --streams 200 >/dev/null ;;
    s4) sse_json "$url" "chunks=2" "$model" --concurrency 64 --streams 128 >/dev/null ;;
    s5) ;; # 1,000 fresh connections are part of what S5 measures
  esac
}

# load SCENARIO TARGET: the measured run; prints the tool's JSON.
load() {
  local url model
  url=$(url_of "$2")
  model=$(model_seen_by_mock "$2")
  case $1 in
    s1) wrk_json 32 "$WRK_SECS" body-300.json "$url" ;;
    s2) wrk_json 8 "$WRK_SECS" body-100k.json "$url" ;;
    s3) sse_json "$url" "$S3_QUERY" "$model" --concurrency 16 --streams "$S3_STREAMS" ;;
    s3l) sse_json "$url" "$S3L_QUERY" "$model" --concurrency 16 --streams "$S3_STREAMS" ;;
    s4) sse_json "$url" "$S4_QUERY" "$model" --concurrency 64 --duration "$S4_SECS" ;;
    s5) sse_json "$url" "$S5_QUERY" "$model" --concurrency "$S5_STREAMS" --streams "$S5_STREAMS" ;;
  esac
}

RAW=$TMP/raw.jsonl

# trace_flush: POST /admin/traces/flush to edge-traced; returns once every trace record of the
# calls so far is written, prints llm-edge's counters ({"flushed":true,"written":N,"dropped":N,…})
# or nothing.
trace_flush() {
  taskset -c "$LOAD_CPU" curl -sS --max-time 40 -X POST \
    "http://127.0.0.1:${PORT_OF[edge-traced-admin]}/admin/traces/flush" 2>>"$TMP/client.log" || true
}

# dropped_of FLUSH_JSON: its "dropped" counter, or nothing.
dropped_of() {
  sed -n 's/.*"dropped":\([0-9]*\).*/\1/p' <<<"$1"
}

# reset_traces: empties the trace file and removes rotated ones (only while llm-edge is idle and
# its writer flushed: it appends, so the next record lands at the start of the empty file).
reset_traces() {
  : >"$TRACES"
  rm -f "$TRACES".[0-9]*
}

# trace_lines: records written since reset_traces (rotated files included).
trace_lines() {
  local f n total=0
  for f in "$TRACES" "$TRACES".[0-9]*; do
    [[ -f $f ]] || continue
    n=$(wc -l <"$f")
    total=$((total + n))
  done
  echo "$total"
}

# measure ROUND SCENARIO TARGET: warm-up, then one measured run; appends a line to $RAW.
# edge-traced: its trace writer is flushed and the trace file emptied after the warm-up; after
# the run, the writer is flushed again before the CPU reading (the writing of this run's records
# is part of its cost), and the line count and the records dropped are added to the line as
# "traces" and "traces_dropped".
measure() {
  local round=$1 sc=$2 target=$3 pids result t0 t1 n0 n1 m0 m1 proxy alive start
  local traced=0 traces="" flushed d0="" d1=""
  ensure_running
  warm_up "$sc" "$target"
  if [[ $target == edge-traced ]]; then
    traced=1
    d0=$(dropped_of "$(trace_flush)")
    reset_traces
  fi
  mapfile -t pids < <(pids_of "$target")
  reset_hwm "${pids[@]}"
  start=$SECONDS
  t0=$(cpu_ticks "${pids[@]}")
  n0=$(cpu_ns "${pids[@]}")
  m0=$(cpu_ns "${PID_OF[mock]}")
  result=$(load "$sc" "$target")
  ((traced == 0)) || flushed=$(trace_flush)
  n1=$(cpu_ns "${pids[@]}")
  t1=$(cpu_ticks "${pids[@]}")
  m1=$(cpu_ns "${PID_OF[mock]}")
  if ((${#pids[@]})); then
    alive=true
    all_alive "${pids[@]}" || alive=false
    proxy=$(printf '{"pids":"%s","cpu_ns":%d,"cpu_ticks":%d,"rss_kb":%d,"alive":%s}' \
      "${pids[*]}" "$((n1 - n0))" "$((t1 - t0))" "$(rss_kb "${pids[@]}")" "$alive")
  else
    proxy=null
  fi
  if ((traced)); then
    d1=$(dropped_of "$flushed")
    if [[ -n $d0 && -n $d1 ]]; then
      traces=",\"traces_dropped\":$((d1 - d0))"
    else
      log "round $round $sc $target: POST /admin/traces/flush failed (see $TMP/client.log)"
      traces=",\"traces_dropped\":null"
    fi
    traces=",\"traces\":$(trace_lines)$traces"
    reset_traces
  fi
  printf '{"round":%d,"scenario":"%s","target":"%s","load":%s,"proxy":%s,"mock":{"cpu_ns":%d}%s}\n' \
    "$round" "$sc" "$target" "$result" "$proxy" "$((m1 - m0))" "$traces" >>"$RAW"
  if [[ $result == null ]]; then
    log "round $round $sc $target: NO RESULT from the load tool (see $TMP/client.log)"
  else
    log "round $round $sc $target: $((SECONDS - start)) s"
  fi
}

# ---------------------------------------------------------------------------------------------
# Run

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT_DIR"
make_bodies
write_configs
for name in mock "${PROXIES[@]}"; do
  start "$name"
done
log "ports: mock ${PORT_OF[mock]}, nginx ${PORT_OF[nginx]}, pingora-min ${PORT_OF[pingora-min]}," \
  "edge-api ${PORT_OF[edge-api]}, edge-traced ${PORT_OF[edge-traced]}," \
  "edge-pass ${PORT_OF[edge-pass]}; proxy CPU $PROXY_CPU, load CPU $LOAD_CPU"
log "$ROUNDS round(s), quick=$QUICK; raw results in $RAW"

ORDERS=()
for ((r = 0; r < ROUNDS; r++)); do
  order=()
  for ((i = 0; i < ${#TARGETS[@]}; i++)); do
    order+=("${TARGETS[(i + r) % ${#TARGETS[@]}]}")
  done
  ORDERS+=("${order[*]}")
  for sc in "${SCENARIOS[@]}"; do
    if [[ $sc == s5 ]]; then
      for name in "${PROXIES[@]}"; do
        if runs_in "$name" s5; then restart "$name"; fi
      done
    fi
    for target in "${order[@]}"; do
      runs_in "$target" "$sc" || continue
      measure "$((r + 1))" "$sc" "$target"
    done
  done
done

git_rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || git_rev+="-dirty"
orders_json=$(printf '"%s",' "${ORDERS[@]}")
cat >"$TMP/meta.json" <<EOF
{"timestamp":"$STAMP","git":"$git_rev","quick":$([[ $QUICK == 1 ]] && echo true || echo false),
 "rounds":$ROUNDS,"round_orders":[${orders_json%,}],"clk_tck":$CLK_TCK,
 "cpus":$(nproc),"proxy_cpu":"$PROXY_CPU","load_cpu":"$LOAD_CPU","kernel":"$(uname -r)",
 "nginx":"$(nginx -v 2>&1 | sed 's/.*nginx\///')","wrk":"$(wrk -v 2>&1 | sed -n '1s/^wrk \([^ ]*\).*/\1/p')",
 "scenarios":{
  "s1":{"body_bytes":$(wc -c <"$TMP/body-300.json"),"concurrency":32,"seconds":$WRK_SECS},
  "s2":{"body_bytes":$(wc -c <"$TMP/body-100k.json"),"concurrency":8,"seconds":$WRK_SECS},
  "s3":{"query":"$S3_QUERY","concurrency":16,"streams":$S3_STREAMS},
  "s3l":{"query":"$S3L_QUERY","concurrency":16,"streams":$S3_STREAMS},
  "s4":{"query":"$S4_QUERY","concurrency":64,"seconds":$S4_SECS},
  "s5":{"query":"$S5_QUERY","concurrency":$S5_STREAMS,"streams":$S5_STREAMS}}}
EOF

RESULTS=$OUT_DIR/results-$STAMP.json
report_rc=0
"$TOOLS/bench-report" --raw "$RAW" --clk-tck "$CLK_TCK" --meta "$TMP/meta.json" \
  --out "$RESULTS" || report_rc=$?
mkdir -p "$OUT_DIR/logs-$STAMP"
cp "$TMP"/*.log "$TMP"/*.yaml "$TMP/nginx.conf" "$OUT_DIR/logs-$STAMP/" 2>/dev/null || true
log "results: $RESULTS (logs: $OUT_DIR/logs-$STAMP)"
exit "$report_rc"
