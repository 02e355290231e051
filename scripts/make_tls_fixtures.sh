#!/usr/bin/env bash
# Writes the TLS test fixtures in tests/fixtures/tls/ (run once; the files are committed):
# a CA, a coordinator certificate for localhost / 127.0.0.1 and a worker client certificate
# signed by it, and an unrelated CA. Test-only keys: never use them for a real job.
set -euo pipefail
d="$(dirname "$0")/../tests/fixtures/tls"
mkdir -p "$d"
cd "$d"
days=36500
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days $days \
  -subj "/CN=Tandem test CA" -keyout ca.key -out ca.pem
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days $days \
  -subj "/CN=Another CA" -keyout other-ca.key -out other-ca.pem
for who in coordinator worker; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=tandem-$who" \
    -keyout "$who.key" -out "$who.csr"
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > "$who.ext"
  openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days $days \
    -extfile "$who.ext" -out "$who.pem"
  rm "$who.csr" "$who.ext"
done
rm -f ca.srl ca.key other-ca.key
