#!/bin/sh
# Regenerates the test-only RSA key pairs used by PicoD's tests. Never use them for anything else.
set -eu
cd "$(dirname "$0")"
for name in router other; do
  openssl genrsa -traditional -out "$name.key.pem" 2048 2>/dev/null
  openssl rsa -in "$name.key.pem" -pubout -out "$name.pub.pem" 2>/dev/null
done
# A public key below ring's 2048-bit floor, which PicoD refuses at start.
openssl genrsa -traditional 1024 2>/dev/null | openssl rsa -pubout -out short.pub.pem 2>/dev/null
