#!/usr/bin/env bash
# Runs the whole system on its embedded default: the platform in dev mode
# (minting short-lived ghs_-shaped tokens on loopback) and one molecule-credd
# daemon in front of it, then asks real git for a GitHub credential through
# credd. Everything lives in a temporary folder and is removed on exit.
#
#   scripts/run-dev.sh          # build, show `git credential fill`, keep running until Ctrl-C
#   scripts/run-dev.sh --once   # the same, then stop (used by CI as a smoke test)
#
# Environment: DEV_TOKEN_TTL (default 60m, like GitHub's) is the dev tokens' lifetime; make it
# short (say 2m) to watch the daemon refresh ahead of expiry in `credd status`.
set -euo pipefail

once=false
case "${1:-}" in
  --once) once=true ;;
  "") ;;
  *) echo "usage: $0 [--once]" >&2; exit 2 ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/build-release.sh --quiet
bin="$root/target/release"

# shellcheck source=scripts/lib/dev-stack.sh
. "$root/scripts/lib/dev-stack.sh"
make_work dev

start_dev_stack "$bin" "$bin/credd" "${DEV_TOKEN_TTL:-60m}"

echo "platform (dev mode): $PLATFORM_URL"
echo "daemon socket:       $CREDD_SOCKET"
echo
printf '%s\n' "\$ printf 'protocol=https\nhost=github.com\n\n' | git credential fill"
# A throwaway HOME so no personal git config or other helper takes part.
fill=$(printf 'protocol=https\nhost=github.com\n\n' |
  HOME="$work" XDG_CONFIG_HOME="$work" GIT_CONFIG_NOSYSTEM=1 GIT_TERMINAL_PROMPT=0 \
    git -c credential.helper= -c "credential.helper=$bin/credd" credential fill)
# Dev tokens are harmless, but a habit is a habit: show only the shape.
while IFS= read -r line; do
  case "$line" in
    password=*) pw=${line#password=}; echo "password=${pw:0:4}… (${#pw} characters, redacted)" ;;
    *) echo "$line" ;;
  esac
done <<<"$fill"
echo
echo "\$ credd status"
"$bin/credd" status

if "$once"; then
  grep -q '^password=ghs_' <<<"$fill" || { echo "error: git got no ghs_ token" >&2; exit 1; }
  exit 0
fi
echo
echo "Running. In another shell:  CREDD_SOCKET=$CREDD_SOCKET $bin/credd status"
echo "Press Ctrl-C to stop."
wait "$daemon_pid"
