#!/usr/bin/env bash
# A partition past the old 256 MiB snapshot cap, replicated to a replacement.
# Three agents (static release build), topic big: 1 partition, replicas 3;
# MB megabytes published in 900 KiB messages; agent-3 killed (-9) and its
# data deleted; agent-4 joins under a new name. Prints how long until
# agent-4 holds the partition, and peak RSS (VmHWM) of every agent. Uses
# loopback ports 21001-21004, 21101-21104 and 21201-21204, and a directory
# under /tmp that it deletes. About a minute; MB=1024 tests a gibibyte.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/x86_64-unknown-linux-gnu/release/shoal-agent}
[ -x "$BIN" ] || { echo "build it first: RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target x86_64-unknown-linux-gnu -p shoal-agent"; exit 2; }
MB=${MB:-300}
D=$(mktemp -d /tmp/bigcu.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$D"; }
trap cleanup EXIT
for port in 21001 21002 21003 21004 21101 21102 21103 21104; do
  if curl -s -m 1 -o /dev/null "127.0.0.1:$port/"; then
    echo "port $port is in use (an agent of an earlier run?); stop it first"; exit 2
  fi
done
start() { # n join?
  local n=$1
  local args=(--dev --node-name "agent-$n" --ca-dir "$D/ca" --data-dir "$D/agent-$n"
    --app-addr "127.0.0.1:$((21000+n))" --admin-addr "127.0.0.1:$((21100+n))"
    --mesh-addr "127.0.0.1:$((21200+n))" --replace-after 2s)
  [ "$n" != 1 ] && args+=(--join 127.0.0.1:21201)
  SHOAL_LOG=warn "$BIN" "${args[@]}" > "$D/agent-$n.log" 2>&1 &
  PIDS[$n]=$!
  for _ in $(seq 1 100); do curl -fs "127.0.0.1:$((21100+n))/readyz" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "agent-$n not ready"; cat "$D/agent-$n.log"; exit 1
}
start 1; start 2; start 3
for try in $(seq 1 50); do
  curl -fsS -m 5 -X PUT 127.0.0.1:21001/v1/topics/big -H 'content-type: application/json' \
    -d '{"partitions":1,"replicas":3}' >/dev/null && break
  [ "$try" = 50 ] && { echo "cannot create the topic"; exit 1; }
  sleep 0.2
done
head -c $((900*1024)) /dev/zero | tr '\0' x > "$D/body"
n=$(( MB * 1024 / 900 ))
t0=$(date +%s.%N)
for i in $(seq 1 "$n"); do
  for try in $(seq 1 100); do
    code=$(curl -s -m 30 -o /dev/null -w '%{http_code}' -X POST 127.0.0.1:21001/v1/topics/big/messages \
      -H 'content-type: text/plain' -H "shoal-id: m-$i" --data-binary @"$D/body" || echo 000)
    [ "$code" = 201 ] || [ "$code" = 200 ] && break
    sleep 0.1
  done
  [ "$code" = 201 ] || [ "$code" = 200 ] || { echo "publish $i: $code"; exit 1; }
done
t1=$(date +%s.%N)
echo "published $n messages of 900 KiB ($MB MiB) in $(python3 -c "print(round($t1-$t0,1))") s"
du -sm "$D"/agent-*/replicas | sed 's/^/  /'
for n in 1 2 3; do
  echo "before the kill: agent-$n peak RSS $(grep VmHWM /proc/${PIDS[$n]}/status | awk '{print $2/1024 " MiB"}'), now $(grep VmRSS /proc/${PIDS[$n]}/status | awk '{print $2/1024 " MiB"}')"
done
kill -9 "${PIDS[3]}"; wait "${PIDS[3]}" 2>/dev/null || true; unset 'PIDS[3]'
rm -rf "$D/agent-3"
t2=$(date +%s.%N)
start 4
echo "agent-4 started; waiting for it to hold the partition"
want=$(du -sm "$D/agent-1/replicas" 2>/dev/null | cut -f1 || true)
held=0
for _ in $(seq 1 600); do
  have=$(du -sm "$D/agent-4/replicas" 2>/dev/null | cut -f1 || echo 0)
  if [ "${have:-0}" -ge $((want - 2)) ]; then held=1; break; fi
  sleep 0.5
done
t3=$(date +%s.%N)
[ "$held" = 1 ] || { echo "agent-4 holds only ${have:-0} of ${want} MiB after 5 minutes"; exit 1; }
echo "agent-4 holds ${have} MiB of replicas (agent-1 ${want} MiB) $(python3 -c "print(round($t3-$t2,1))") s after agent-3 was killed (replace-after 2 s)"
for n in 1 2 4; do
  echo "agent-$n peak RSS $(grep VmHWM /proc/${PIDS[$n]}/status | awk '{print $2/1024 " MiB"}'), now $(grep VmRSS /proc/${PIDS[$n]}/status | awk '{print $2/1024 " MiB"}')"
done
grep -h -i 'too_large\|panick\|error' "$D"/agent-*.log | head -5 || true
