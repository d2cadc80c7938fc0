#!/usr/bin/env bash
# An idle partition's leader killed while nobody publishes: how long until
# the others elect a new leader on the gossip's suspicion alone. Three agents
# (release build), topic idle: 1 partition, replicas 3. Each kill (KILLS, 3
# by default): wait until every agent reports the group asleep, SIGKILL its
# leader, poll the two others' /v1/cluster (a pause of 50 ms between polls,
# each poll a curl and a python3 per agent, so the resolution is about
# 100 ms) until one names another leader, restart the killed agent. (With publishes through an agent
# that holds a replica, `shoal-bench --only replication --idle-kills N`
# measures the same failover as a publish sees it.) Uses loopback ports
# 22001-22003, 22101-22103 and 22201-22203 (UDP), and a directory under /tmp
# that it deletes (kept, with the agents' logs, when it fails). Needs curl,
# python3 and GNU date. About a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/shoal-agent}
[ -x "$BIN" ] || { echo "build it first: cargo build --release -p shoal-agent"; exit 2; }
KILLS=${KILLS:-3}
D=$(mktemp -d /tmp/idlefo.XXXX)
PIDS=()
cleanup() {
  local rc=$?
  for p in ${PIDS[@]+"${PIDS[@]}"}; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$rc" = 0 ]; then rm -rf "$D"; else echo "failed; the agents' logs are in $D"; fi
}
trap cleanup EXIT
for port in 22001 22002 22003 22101 22102 22103; do
  if curl -s -m 1 -o /dev/null "127.0.0.1:$port/"; then
    echo "port $port is in use (an agent of an earlier run?); stop it first"; exit 2
  fi
done
start() { # n
  local n=$1
  local args=(--dev --node-name "agent-$n" --ca-dir "$D/ca" --data-dir "$D/agent-$n"
    --app-addr "127.0.0.1:$((22000+n))" --admin-addr "127.0.0.1:$((22100+n))"
    --mesh-addr "127.0.0.1:$((22200+n))")
  [ "$n" != 1 ] && args+=(--join 127.0.0.1:22201)
  SHOAL_LOG=warn "$BIN" "${args[@]}" >> "$D/agent-$n.log" 2>&1 &
  PIDS[$n]=$!
  for _ in $(seq 1 100); do curl -fs "127.0.0.1:$((22100+n))/readyz" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "agent-$n not ready"; cat "$D/agent-$n.log"; exit 1
}
# "<asleep 0|1> <leader or -> <term>" of partition 0 of topic idle, as agent n sees it.
seen() {
  curl -s -m 2 "127.0.0.1:$((22000+$1))/v1/cluster" | python3 -c '
import json, sys
try:
    g = [x for x in json.load(sys.stdin).get("replicated", []) if x["topic"] == "idle"][0]
    print(int(g["hibernating"]), g["leader"] or "-", g["term"])
except Exception:
    print(0, "-", 0)'
}
start 1; start 2; start 3
for try in $(seq 1 50); do
  curl -fsS -m 5 -X PUT 127.0.0.1:22001/v1/topics/idle -H 'content-type: application/json' \
    -d '{"partitions":1,"replicas":3}' >/dev/null && break
  [ "$try" = 50 ] && { echo "cannot create the topic"; exit 1; }
  sleep 0.2
done
for k in $(seq 1 "$KILLS"); do
  leader=-
  for try in $(seq 1 200); do
    asleep=0
    for n in 1 2 3; do
      read -r a l _ < <(seen "$n")
      asleep=$((asleep + a)); [ "$l" != - ] && leader=$l
    done
    [ "$asleep" = 3 ] && [ "$leader" != - ] && break
    [ "$try" = 200 ] && { echo "the group never fell asleep on every agent"; exit 1; }
    sleep 0.2
  done
  victim=${leader#agent-}
  t0=$(date +%s%N)
  kill -9 "${PIDS[$victim]}"; wait "${PIDS[$victim]}" 2>/dev/null || true
  new=-
  for try in $(seq 1 600); do
    for n in 1 2 3; do
      [ "$n" = "$victim" ] && continue
      read -r _ l t < <(seen "$n")
      if [ "$l" != - ] && [ "$l" != "$leader" ]; then new="$l (term $t)"; break; fi
    done
    [ "$new" != - ] && break
    sleep 0.05
  done
  t1=$(date +%s%N)
  [ "$new" = - ] && { echo "kill $k: no new leader after 600 polls since killing $leader"; exit 1; }
  echo "kill $k: $leader killed while asleep; new leader $new after $(( (t1 - t0) / 1000000 )) ms, no publish"
  start "$victim"
  sleep 3
done
