#!/usr/bin/env bash
# The protos as a product: `buf lint` (proto/proto/buf.yaml), and `buf
# breaking` of the protos as they are against every version of them ever
# committed, so no change breaks a client generated from any earlier one.
# buf comes from npm (@bufbuild/buf), installed into target/npm.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF_VERSION=1.75.0
BUF=target/npm/node_modules/.bin/buf
if ! [ -x "$BUF" ] || [ "$("$BUF" --version)" != "$BUF_VERSION" ]; then
  npm install --prefix target/npm --no-save --silent "@bufbuild/buf@$BUF_VERSION"
fi
BUF="$PWD/$BUF"
(cd proto/proto && "$BUF" lint)
echo "buf lint: ok"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
n=0
for rev in $(git log --format=%H -- proto/proto); do
  mkdir "$work/$rev"
  git archive "$rev" proto/proto | tar -x -C "$work/$rev"
  (cd proto/proto && "$BUF" breaking --against "$work/$rev/proto/proto") \
    || { echo "buf breaking: the protos break the version of commit $rev" >&2; exit 1; }
  n=$((n + 1))
done
echo "buf breaking: compatible with all $n committed versions"
