#!/usr/bin/env bash
# The release build users install: molecule-credd and molecule-platform as
# usual, and credd — exec'd by every git operation — statically linked.
#
#   scripts/build-release.sh [CARGO FLAGS...]    e.g. --quiet, --locked
#
# A static helper skips the dynamic loader (no ld.so, no libc relocations),
# the largest part of a small program's start-up: measured ~1.2x /bin/true
# static against ~1.5-1.8x dynamic (scripts/bench-helper.sh). The flag is
# given here, for this one binary, and not in .cargo/config.toml: there it
# would also apply to proc-macro crates built for the host, which cannot link
# with +crt-static. credd resolves no names, so static glibc's NSS caveat
# does not apply to it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace "$@"
# After the workspace build, so target/release/credd is the static one.
cargo rustc --release -p credd --bin credd "$@" -- -C target-feature=+crt-static
if ldd target/release/credd 2>&1 | grep -q '=>'; then
  echo "error: target/release/credd is not statically linked" >&2
  exit 1
fi
