#!/usr/bin/env bash
# The part of GitHub's OpenAPI description the platform speaks, generated
# from the `@octokit/openapi` npm package (GitHub's published description):
#
#   stand-ins/github/openapi/github-app-api.json   schemas, operations, examples
#   platform/src/github_permissions.rs              the permission table
#
# Usage:
#   scripts/github-openapi.sh              regenerate from the version recorded
#   scripts/github-openapi.sh --check      regenerate into a temporary folder
#                                          and fail if the committed files differ
#   scripts/github-openapi.sh --version V  regenerate from version V (latest:
#                                          the newest), then review the diff
#
# Needs npm (it fetches the package tarball with `npm pack`) and python3.
# Never edit the generated files by hand: CI runs --check.
set -euo pipefail
cd "$(dirname "$0")/.."

json=stand-ins/github/openapi/github-app-api.json
rust=platform/src/github_permissions.rs
package=@octokit/openapi

check=false
version=
while (($#)); do
  case "$1" in
    --check) check=true ;;
    --version)
      version=${2:?--version needs a version}
      shift
      ;;
    *)
      echo "usage: $0 [--check] [--version V]" >&2
      exit 2
      ;;
  esac
  shift
done
if [ -z "$version" ]; then
  version=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["source"]["version"])' "$json")
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$package@$version" >tarball-name)
tarball="$work/$(tail -n1 "$work/tarball-name")"
sha256=$(sha256sum "$tarball" | cut -d' ' -f1)
tar -xzf "$tarball" -C "$work" package/package.json package/generated/api.github.com.json

if $check; then
  python3 scripts/lib/github-openapi.py "$work/package" "$sha256" "$work/out.json" "$work/out.rs"
  status=0
  for pair in "$json:$work/out.json" "$rust:$work/out.rs"; do
    committed=${pair%%:*}
    fresh=${pair#*:}
    if ! cmp -s "$committed" "$fresh"; then
      echo "$committed differs from what $package@$version generates:" >&2
      diff -u "$committed" "$fresh" | head -n 40 >&2 || true
      status=1
    fi
  done
  if ((status)); then
    echo "regenerate with scripts/github-openapi.sh and commit the result" >&2
    exit 1
  fi
  echo "$json and $rust match $package@$version (sha256 $sha256)"
else
  mkdir -p "$(dirname "$json")"
  python3 scripts/lib/github-openapi.py "$work/package" "$sha256" "$json" "$rust"
  echo "wrote $json and $rust from $package@$version (sha256 $sha256)"
fi
