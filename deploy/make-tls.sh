#!/usr/bin/env bash
# Writes TLS for the coordinator's gRPC port into DIR: a CA of its own (ca.pem; its key is
# deleted), the coordinator's certificate for the given host names (tls.crt) and its key
# (tls.key). Workers trust DIR/ca.pem (--tls-ca) and connect to https://NAME:PORT. Needs openssl.
#
#   deploy/make-tls.sh DIR NAME [NAME...]
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 DIR NAME [NAME...]" >&2; exit 2; }
dir=$1
shift
mkdir -p "$dir"
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
  -subj "/CN=Tandem CA ($1)" -keyout "$tmp/ca.key" -out "$dir/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$1" \
  -keyout "$dir/tls.key" -out "$tmp/tls.csr" 2>/dev/null
san=$(printf 'DNS:%s,' "$@")
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\n' "${san%,}" > "$tmp/ext"
openssl x509 -req -in "$tmp/tls.csr" -CA "$dir/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial \
  -CAserial "$tmp/ca.srl" -days 3650 -extfile "$tmp/ext" -out "$dir/tls.crt" 2>/dev/null
