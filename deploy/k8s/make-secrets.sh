#!/usr/bin/env bash
# Writes what the manifests' Secrets are made of, into deploy/k8s/common/ (git ignores it): the
# job token (job-token.txt) and TLS for the coordinator's gRPC port (tls/: a CA of its own, the
# coordinator's certificate for the Service's names, and its key; deploy/make-tls.sh). Run it
# once per cluster namespace, before `kubectl apply -k`:
#
#   deploy/k8s/make-secrets.sh [NAMESPACE]      # default: default
#
# Workers trust tls/ca.pem and reach https://tandem-coordinator:29400; the token and the data
# never cross the cluster network in clear text. Needs openssl.
set -euo pipefail
ns=${1:-default}
here="$(dirname "$0")"
base="$here/common"
umask 077
[ -s "$base/job-token.txt" ] || openssl rand -hex 32 > "$base/job-token.txt"
svc=tandem-coordinator
"$here/../make-tls.sh" "$base/tls" "$svc" "$svc.$ns" "$svc.$ns.svc" "$svc.$ns.svc.cluster.local"
echo "make-secrets: $base/job-token.txt and $base/tls/ (ca.pem, tls.crt, tls.key) for namespace $ns"
