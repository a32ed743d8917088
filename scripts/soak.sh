#!/usr/bin/env bash
# Soak and chaos: 100 clients run the real `credd get` (git's credential
# protocol on stdin), each about every 500 ms, for DURATION seconds, while the
# test platform flaps (up, down, up, HTTP 500, up, slow answers; one phase
# each period) and hands out 2-minute tokens, and the daemon — started by
# workspace-template/entrypoint.sh's supervisor, run outside a container — is
# SIGKILLed at random moments and restarted by it. Prints a report and one
# `SOAK_RESULT {json}` line; exits non-zero when a target is missed (the
# targets and how each failure is judged: tests/src/bin/soak/verdict.rs).
#
#   scripts/soak.sh [DURATION]     # seconds, default 600; CI runs 120
#
# The schedule scales with DURATION: phases of DURATION/20 s (10-30 s), kills
# 2/3 of a phase to 3 phases apart. Override with SOAK_PHASE_SECS,
# SOAK_KILL_MIN_SECS, SOAK_KILL_MAX_SECS, SOAK_CLIENTS, SOAK_PACE_MS,
# SOAK_SEED (a failing run prints its seed). SOAK_NO_BUILD=1 uses the
# binaries already in target/release. Run as root: the daemon is
# non-dumpable, so only root can count its open descriptors.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=${1:-600}
case "$duration" in
  '' | *[!0-9]*) echo "usage: scripts/soak.sh [DURATION_SECONDS]" >&2; exit 2 ;;
esac
phase=$((duration / 20))
((phase < 10)) && phase=10
((phase > 30)) && phase=30
phase=${SOAK_PHASE_SECS:-$phase}
kill_min=${SOAK_KILL_MIN_SECS:-$((phase * 2 / 3))}
kill_max=${SOAK_KILL_MAX_SECS:-$((phase * 3))}
slow_hold_ms=$((phase * 100))

if [ "${SOAK_NO_BUILD:-}" != 1 ]; then
  scripts/build-release.sh --quiet
  cargo build --release --quiet -p credd-tests --bin soak
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/credd-soak-run.XXXXXX")
trap 'rm -rf "$work"' EXIT
args=(--bin-dir target/release --seconds "$duration" --phase-secs "$phase"
  --slow-hold-ms "$slow_hold_ms" --kill-min-secs "$kill_min" --kill-max-secs "$kill_max"
  --clients "${SOAK_CLIENTS:-100}" --pace-ms "${SOAK_PACE_MS:-500}")
if [ -n "${SOAK_SEED:-}" ]; then
  args+=(--seed "$SOAK_SEED")
fi
TMPDIR=$work target/release/soak "${args[@]}"
