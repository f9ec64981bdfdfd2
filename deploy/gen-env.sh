#!/bin/sh
# Writes deploy/.env (or the file named) from deploy/.env.example: each key the file lacks is
# added, with the example's value, or a new random one (48 hex characters) where the example
# leaves it empty. Values already in the file are never changed, so running it again after
# the example gained a key adds only that key.
set -eu
example="$(dirname "$0")/.env.example"
out="${1:-$(dirname "$0")/.env}"
umask 077
touch "$out"
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
        [A-Z]*=*) ;;
        *) continue ;;
    esac
    key="${line%%=*}"
    if grep -q "^$key=" "$out"; then
        continue
    fi
    value="${line#*=}"
    if [ -z "$value" ]; then
        value="$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
    fi
    printf '%s=%s\n' "$key" "$value" >>"$out"
done <"$example"
echo "$out: $(grep -c '^[A-Z]' "$out") settings"
