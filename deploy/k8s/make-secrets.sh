#!/usr/bin/env bash
# Writes what the manifests' Secrets are made of, into deploy/k8s/base/ (git ignores it): the
# job token (job-token.txt) and TLS for the coordinator's gRPC port (tls/: a CA of its own, the
# coordinator's certificate for the Service's names, and its key; the CA's key is deleted). Run
# it once per cluster namespace, before `kubectl apply -k`:
#
#   deploy/k8s/make-secrets.sh [NAMESPACE]      # default: default
#
# Workers trust tls/ca.pem and reach https://tandem-coordinator:29400; the token and the data
# never cross the cluster network in clear text. Needs openssl.
set -euo pipefail
ns=${1:-default}
base="$(dirname "$0")/base"
mkdir -p "$base/tls"
umask 077
[ -s "$base/job-token.txt" ] || openssl rand -hex 32 > "$base/job-token.txt"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
  -subj "/CN=Tandem CA ($ns)" -keyout "$tmp/ca.key" -out "$base/tls/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=tandem-coordinator" \
  -keyout "$base/tls/tls.key" -out "$tmp/tls.csr" 2>/dev/null
svc=tandem-coordinator
printf 'subjectAltName=DNS:%s,DNS:%s.%s,DNS:%s.%s.svc,DNS:%s.%s.svc.cluster.local\nbasicConstraints=CA:FALSE\n' \
  "$svc" "$svc" "$ns" "$svc" "$ns" "$svc" "$ns" > "$tmp/ext"
openssl x509 -req -in "$tmp/tls.csr" -CA "$base/tls/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial \
  -CAserial "$tmp/ca.srl" -days 3650 -extfile "$tmp/ext" -out "$base/tls/tls.crt" 2>/dev/null
echo "make-secrets: $base/job-token.txt and $base/tls/ (ca.pem, tls.crt, tls.key) for namespace $ns"
