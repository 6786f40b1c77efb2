#!/usr/bin/env bash
# Seed 001's walkthrough, for real: two Deployments become pods (network
# namespaces) wired by our CNI plugin and agent; the seed's
# CiliumNetworkPolicy is compiled into policy map entries that our eBPF
# programs enforce on real TCP connections.
#
#   scripts/demo.sh          run it and clean up
#   KEEP=1 scripts/demo.sh   leave the lab up to explore (cilium lab down --name demo)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

echo "== building (first build takes a few minutes)"
cargo build --workspace --locked -q
export PATH="$PWD/target/debug:$PATH"
export CILIUM_LAB=demo
export CILIUM_SOCK=/var/run/cilium-lab/demo/node1/cilium.sock
SEED=examples/seed-001

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
cleanup() { [ "${KEEP:-0}" = 1 ] || { cilium lab down >/dev/null 2>&1; cilium lab down --name demo-vxlan >/dev/null 2>&1; } || true; }
trap cleanup EXIT
cilium lab down >/dev/null 2>&1 || true
cilium lab down --name demo-vxlan >/dev/null 2>&1 || true

step "A lab: node1 is a network namespace running cilium-agent; 'world' stands for the outside"
run cilium lab up -f $SEED/frontend-deployment.yaml -f $SEED/backend-deployment.yaml
run cilium lab get pods
run cilium status

step "By default every pod may talk to every pod: curl the backend from the frontend"
BACKEND_POD_IP=$(cilium lab get pods -l app=backend -o ip)
FRONTEND_POD_NAME=$(cilium lab get pods -l app=frontend -o name)
echo "BACKEND_POD_IP=$BACKEND_POD_IP FRONTEND_POD_NAME=$FRONTEND_POD_NAME"
run cilium lab exec "$FRONTEND_POD_NAME" -- curl -s -m 2 "http://$BACKEND_POD_IP:8080"

step "Apply the seed's CiliumNetworkPolicy (selects frontend; ingress from backend on TCP 8080)"
cat $SEED/frontend-to-backend-policy.yaml
run cilium lab apply -f $SEED/frontend-to-backend-policy.yaml
run cilium endpoint list
run cilium bpf policy get --all

step "The frontend's own curl to the backend still succeeds"
echo "(The seed says it fails. In Cilium an ingress policy on frontend restricts traffic INTO"
echo " frontend; it does not touch frontend's egress, and the backend has no policy at all.)"
run cilium lab exec "$FRONTEND_POD_NAME" -- curl -s -m 2 "http://$BACKEND_POD_IP:8080"

step "What the policy does block: connections INTO the frontend"
mon=$(mktemp)
cilium monitor --type drop --type policy-verdict > "$mon" &
monpid=$!
sleep 0.3
echo "backend -> frontend:80 (only TCP 8080 from backend is allowed, and frontend serves 80):"
run cilium lab probe --from "$(cilium lab get pods -l app=backend -o name)" --to "$FRONTEND_POD_NAME" --port 80
echo "world -> frontend:80 (the world is not the backend):"
run cilium lab probe --from world --to "$FRONTEND_POD_NAME" --port 80
echo "node -> frontend:80 (the local host may always reach its pods, as upstream's allow-localhost):"
run cilium lab probe --from node1 --to "$FRONTEND_POD_NAME" --port 80
sleep 0.5
kill $monpid 2>/dev/null || true
wait $monpid 2>/dev/null || true

step "What the datapath reported (cilium monitor): verdicts and drops with upstream's reason codes"
grep -v '^Listening' "$mon" | head -8
rm -f "$mon"

step "The same story as Hubble flows (hubble observe, through the lab's hubble-relay)"
eval "$(cilium lab env | grep HUBBLE_SERVER)"
run hubble observe --namespace default --verdict DROPPED --last 5
echo "the allowed side: backend -> frontend:8080 passes the policy (nothing listens there, so it is refused)"
cilium lab probe --from "$(cilium lab get pods -l app=backend -o name)" --to "$FRONTEND_POD_NAME" --port 8080 >/dev/null || true
sleep 0.5   # the agent reads the datapath's events every 20 ms or when its ring fills up
run hubble observe --type policy-verdict --verdict FORWARDED --to-pod "$FRONTEND_POD_NAME" --last 1
echo "and the flow names the policy that allowed it (-o json):"
hubble observe --type policy-verdict --verdict FORWARDED --to-pod "$FRONTEND_POD_NAME" --last 1 -o json | grep -o '"ingress_allowed_by":[^]]*]' || true
run hubble status

step "Why: cilium policy trace explains both directions (the source's egress, the destination's ingress)"
BACKEND_POD_NAME=$(cilium lab get pods -l app=backend -o name)
run cilium policy trace --src-k8s-pod "${BACKEND_POD_NAME/\//:}" --dst-k8s-pod "${FRONTEND_POD_NAME/\//:}" --dport 80/TCP || true

step "L7: the backend accepts only GET /api/... from the frontend (the agent's HTTP proxy)"
cat $SEED/backend-l7-policy.yaml
run cilium lab apply -f $SEED/backend-l7-policy.yaml
echo "allowed:"
run cilium lab exec "$FRONTEND_POD_NAME" -- curl -s -m 2 "http://$BACKEND_POD_IP:8080/api/items"
echo "denied by the HTTP rule (the proxy answers 403):"
run cilium lab exec "$FRONTEND_POD_NAME" -- curl -s -m 2 -w "%{http_code}\n" -X POST "http://$BACKEND_POD_IP:8080/api/items"
sleep 0.5
run hubble observe --protocol http --last 4
run cilium lab delete -f $SEED/backend-l7-policy.yaml

step "A Service for the backend (kube-proxy replacement, no iptables)"
cat examples/services/backend-service.yaml
run cilium lab apply -f examples/services/backend-service.yaml
run cilium service list
CLUSTER_IP=$(cilium service list | awk '$3 == "ClusterIP" { split($2, a, ":"); print a[1]; exit }')
echo "the frontend pod curls the ClusterIP; its socket is connected straight to the backend pod:"
run cilium lab exec "$FRONTEND_POD_NAME" -- curl -s -m 2 "http://$CLUSTER_IP:80"
echo "the world reaches the node port; the node's devices translate each packet:"
run cilium lab probe --from world --to node1 --port 30080
run cilium bpf lb list

step "As the seed installs it: two nodes, pods joined by VXLAN, the source identity in the VNI"
echo "(routingMode tunnel: every node has cilium_vxlan; the nodes share identities through etcd)"
run cilium lab up --name demo-vxlan --nodes 2 --routing-mode tunnel -f $SEED/frontend-deployment.yaml -f $SEED/backend-deployment.yaml -f $SEED/frontend-to-backend-policy.yaml
export CILIUM_SOCK=/var/run/cilium-lab/demo-vxlan/node1/cilium.sock
run cilium lab get pods --name demo-vxlan
echo '$ cilium status | grep -E "KVStore|Routing|Cluster health"'
cilium status | grep -E "KVStore|Routing|Cluster health"
V_FRONTEND=$(cilium lab get pods --name demo-vxlan -l app=frontend -o name)
V_BACKEND=$(cilium lab get pods --name demo-vxlan -l app=backend -o name)
V_BACKEND_IP=$(cilium lab get pods --name demo-vxlan -l app=backend -o ip)
echo "the frontend curls the backend on the other node, through the tunnel:"
run cilium lab exec --name demo-vxlan "$V_FRONTEND" -- curl -s -m 2 "http://$V_BACKEND_IP:8080"
echo "node1's ipcache: the other node's pods and pod CIDR behind its address (the tunnel endpoint):"
run cilium bpf ipcache list
echo "backend -> frontend:80 is judged on the frontend's node with the identity the VNI carries:"
run cilium lab probe --name demo-vxlan --from "$V_BACKEND" --to "$V_FRONTEND" --port 80
run cilium-health status --probe || true

step "Done"
if [ "${KEEP:-0}" = 1 ]; then
  echo "The labs are still up. Try: cilium lab get pods; cilium monitor; cilium lab down; cilium lab down --name demo-vxlan"
else
  echo "Removing the labs (KEEP=1 keeps them)."
fi
