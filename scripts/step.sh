#!/usr/bin/env bash
# Runs one step of `make test` and prints how long it took: `step.sh NAME COMMAND...`.
set -uo pipefail
name=$1; shift
start=$SECONDS
echo "==> $name"
"$@"
rc=$?
echo "==> $name: $((SECONDS - start)) s$([ $rc -ne 0 ] && echo " (FAILED, exit $rc)")"
exit $rc
