#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for a bounded time each.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 60 s each, every target
#
# Needs cargo-fuzz (`cargo install --locked cargo-fuzz`); cargo fuzz needs
# nightly features, which the stable toolchain allows under RUSTC_BOOTSTRAP=1
# (libFuzzer with AddressSanitizer). Each target starts from its committed
# seeds (fuzz/seeds/TARGET) and a scratch corpus that is thrown away, so the
# tree never changes. A crash fails the run and leaves its input in
# fuzz/artifacts/TARGET/: turn it into a regression test, then fix it.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-60}
shift || true
case "$seconds" in
  '' | *[!0-9]*) echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2 ;;
esac
if ! command -v cargo-fuzz >/dev/null; then
  echo "error: cargo-fuzz is not installed: cargo install --locked cargo-fuzz" >&2
  exit 1
fi
export RUSTC_BOOTSTRAP=1
if (($# == 0)); then
  mapfile -t targets < <(cargo fuzz list)
else
  targets=("$@")
fi
scratch=$(mktemp -d "${TMPDIR:-/tmp}/credd-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

cargo fuzz build -O
for target in "${targets[@]}"; do
  corpus=$scratch/$target
  mkdir -p "$corpus"
  started=$SECONDS
  if ! cargo fuzz run -O "$target" "$corpus" "seeds/$target" -- \
    -max_total_time="$seconds" -print_final_stats=1 >"$scratch/$target.log" 2>&1; then
    tail -n 40 "$scratch/$target.log" >&2
    echo "FAIL: $target crashed; its input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$scratch/$target.log" | tail -n1)
  echo "ok: $target: ${runs:-?} inputs in $((SECONDS - started)) s, no crash"
done
