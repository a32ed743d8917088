#!/bin/sh
# Stand-in for a workspace's runtime in the entrypoint tests. Reports, one
# `key=value` per line, what a real workspace process would see — tokens only
# as SHA-256 hashes, never the characters — then exits with $RUNTIME_EXIT.
set -u

sha() { printf %s "$1" | sha256sum | cut -d' ' -f1; }

if [ -n "${GH_TOKEN+set}" ]; then echo "runtime-gh-token=set"; else echo "runtime-gh-token=unset"; fi
if [ -n "${GITHUB_TOKEN+set}" ]; then echo "runtime-github-token=set"; else echo "runtime-github-token=unset"; fi
echo "runtime-uid=$(id -u)"
echo "runtime-home=$HOME"
echo "runtime-credd-socket=${CREDD_SOCKET:-unset}"

password=$(printf 'protocol=https\nhost=github.com\n\n' | git credential fill 2>/dev/null |
    sed -n 's/^password=//p')
if [ -n "$password" ]; then
    echo "git-token-sha=$(sha "$password")"
else
    echo "git-token-sha=none"
fi

# The gh wrapper is first on PATH; the fake gh behind it reports its token.
gh pr list
echo "gh-exit=$?"

if "${CREDD_BIN_DIR:-/usr/local/bin}/credd" status >/dev/null 2>&1; then
    echo "credd-status=ok"
else
    echo "credd-status=failed"
fi

exit "${RUNTIME_EXIT:-0}"
