#!/bin/bash
# How much one operator build asks of the API server's watch and of JetStream: ten JobQueues
# (no Workers) on the Kubernetes test double and a real nats-server; after 30 s to settle,
# counts over 60 s the operator's reconciles (conveyor_operator_reconciles_total) and the
# JetStream API requests the server answered (/jsz api.total). With TRICKLE=1, one job per
# second is submitted to each queue during the 60 s, so every queue's status changes at each
# reconcile (a status write that, without the JobQueue controller's predicate, triggers the
# next reconcile at once).
#
# usage: scripts/reconcile-load.sh CRD_DIR OPERATOR_BIN [LABEL]
#   BIN_DIR (default target/release) holds conveyor-devcluster and conveyor.
# Compare two builds by running it once with each (e.g. a checkout before a change, in its own
# worktree and target dir, and this one).
set -u
CRDS=$1; OP=$2; LABEL=${3:-$2}
BIN=${BIN_DIR:-target/release}
W=$(mktemp -d)
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
NP=$(free); MP=$(free); HP=$(free)
nats-server -a 127.0.0.1 -p "$NP" -m "$MP" -js -sd "$W/js" >"$W/nats.log" 2>&1 &
NPID=$!
"$BIN/conveyor-devcluster" --api-only --state-dir "$W/dc" >"$W/dc.log" 2>&1 &
DPID=$!
stop() { kill "${OPID:-}" "$DPID" "$NPID" 2>/dev/null; wait "${OPID:-}" "$DPID" "$NPID" 2>/dev/null; rm -rf "$W"; }
trap stop EXIT
for _ in $(seq 100); do [ -f "$W/dc/kubeconfig" ] && break; sleep 0.2; done
K="kubectl --kubeconfig $W/dc/kubeconfig"
for _ in $(seq 50); do $K get ns >/dev/null 2>&1 && break; sleep 0.2; done
$K apply -f "$CRDS" >/dev/null
$K create namespace team >/dev/null
KUBECONFIG="$W/dc/kubeconfig" "$OP" --nats-url "nats://127.0.0.1:$NP" --http-addr "127.0.0.1:$HP" \
  --worker-image unused >"$W/op.log" 2>&1 &
OPID=$!
for n in $(seq 10); do
  printf 'apiVersion: conveyor.dev/v1alpha1\nkind: JobQueue\nmetadata: {name: q%s, namespace: team}\nspec: {}\n---\n' "$n"
done | $K apply -f - >/dev/null
sleep 30
reconciles() { curl -s "127.0.0.1:$HP/metrics" | awk '/^conveyor_operator_reconciles_total/ {s+=$2} END {print s+0}'; }
requests() { curl -s "127.0.0.1:$MP/jsz" | python3 -c 'import json,sys; print(json.load(sys.stdin)["api"]["total"])'; }
r0=$(reconciles); a0=$(requests)
if [ "${TRICKLE:-}" = 1 ]; then
  subs=""
  end=$((SECONDS + 60))
  while [ $SECONDS -lt $end ]; do
    for n in $(seq 10); do
      "$BIN/conveyor" submit "q$n" x -n team --nats-url "nats://127.0.0.1:$NP" >/dev/null 2>&1 &
      subs="$subs $!"
    done
    sleep 1
  done
  # shellcheck disable=SC2086
  wait $subs
else
  sleep 60
fi
r1=$(reconciles); a1=$(requests)
echo "$LABEL: 10 JobQueues$([ "${TRICKLE:-}" = 1 ] && echo ', 1 job/s each'), 60 s: $((r1 - r0)) reconciles, $((a1 - a0)) JetStream API requests"
