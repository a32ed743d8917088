#!/usr/bin/env bash
# The release build users install: molecule-credd and molecule-platform as
# usual, and credd — exec'd by every git operation — statically linked.
#
#   scripts/build-release.sh [CARGO FLAGS...]    e.g. --quiet, --locked
#
# A static helper skips the dynamic loader (no ld.so, no libc relocations),
# the largest part of a small program's start-up: measured 1.07x /bin/true
# static against 1.67x dynamic (scripts/bench-helper.sh, docs/benchmarks.md).
# The flags are given for this one binary and not in .cargo/config.toml:
# there they would also apply to proc-macro crates built for the host, which
# cannot link with +crt-static. credd resolves no names, so static glibc's NSS caveat
# does not apply to it.
#
# The flags live in helper/release-rustflags, read by this script, by
# scripts/bench-helper.sh and by the image's Dockerfile. Besides
# +crt-static, relocation-model=static links a plain static executable
# instead of a static PIE: the PIE relocates itself at every start (3,178
# relocations, 7 more page faults), measured 10% of `credd get`'s time under
# `perf stat -r 300` (666 -> 601 us). The price is that credd's own code and
# data sit at fixed addresses (its stack, heap and mappings stay
# randomized): a short-lived, std-only process that reads git's bounded
# request and one answer from a socket whose owner it has checked.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace "$@"
# After the workspace build, so target/release/credd is the static one.
# Read on a line of its own, so a missing file stops the script (set -e).
flags=$(<helper/release-rustflags)
# shellcheck disable=SC2086  # the flags are words, split on purpose
cargo rustc --release -p credd --bin credd "$@" -- $flags
if ldd target/release/credd 2>&1 | grep -q '=>'; then
  echo "error: target/release/credd is not statically linked" >&2
  exit 1
fi
