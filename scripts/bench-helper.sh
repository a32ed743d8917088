#!/usr/bin/env bash
# Benchmarks `credd get` answered by a running molecule-credd, as a whole
# process (exec + one socket round trip), side by side:
#   /bin/true                    the floor: one exec that does nothing
#   credd get (static)           the helper users install (scripts/build-release.sh)
#   credd get (dynamic)          the same helper, dynamically linked (`cargo build --release`)
#   git credential-cache get     git's own in-memory helper, daemon running
#   seed helper                  the bash + curl helper credd replaces
#   static C int main(){}        with a C compiler (cc): the exec floor
#   C client + C server          with cc: the floor of any helper a daemon
#                                answers (scripts/bench-floor/: connect,
#                                one line each way, no checks, no parsing)
# and then the daemon's answer alone (one client, connect to answer), and
# the C server's beside it.
# Targets: credd get (static) at most 1.10x /bin/true (median), faster than
# credential-cache, at least 10x faster than the seed helper.
#
#   scripts/bench-helper.sh     # needs git and curl; BENCH_RUNS (default 1000) runs each
#
# How: `exec-bench` (tests/src/bin/exec-bench.rs) spawns each contender in
# turn, round after round — run i of every contender back to back — so a
# machine that gets busier during the run slows all of them alike; each run
# is spawn to reap with git's request on stdin from a file, and the medians
# are compared. Timing belongs here, never in a test: the guard CI enforces
# is scripts/helper-budget.sh, which counts system calls.
#
# Environment: SEED_DIR (default ../shared/seed) holds the seed helper as a
# scraped text page; its bash script is extracted to a temp file at run time.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
seed_dir=${SEED_DIR:-$root/../shared/seed}
runs=${BENCH_RUNS:-1000}

for tool in git curl; do
  if ! command -v "$tool" >/dev/null; then
    echo "error: $tool not found; install it (apt-get install $tool)" >&2
    exit 1
  fi
done
shopt -s nullglob
seed_pages=("$seed_dir"/*.txt)
shopt -u nullglob
if [ "${#seed_pages[@]}" -eq 0 ]; then
  echo "error: no seed helper page (*.txt) in $seed_dir; set SEED_DIR" >&2
  exit 1
fi

# shellcheck source=scripts/lib/dev-stack.sh
. "$root/scripts/lib/dev-stack.sh"
make_work bench
cache_sock="$work/cache/socket"
before_cleanup() {
  if [ -S "$cache_sock" ]; then
    git credential-cache --socket "$cache_sock" exit 2>/dev/null || true
  fi
}

echo "building (release)…" >&2
# The static helper users install, with scripts/build-release.sh's flags
# (helper/release-rustflags; the script says why each).
flags=$(<helper/release-rustflags)
# shellcheck disable=SC2086  # the flags are words, split on purpose
cargo rustc --release --quiet -p credd --bin credd -- $flags
cp target/release/credd "$work/credd"
cargo build --release --quiet -p credd
cp target/release/credd "$work/credd-dynamic"
cargo build --release --quiet -p molecule-credd -p molecule-platform
cargo build --release --quiet -p credd-tests --bin exec-bench
bin="$root/target/release"
if ldd "$work/credd" 2>&1 | grep -q '=>'; then
  echo "error: $work/credd is not statically linked" >&2
  exit 1
fi

export CREDD_HOSTS=github.com
export HOME="$work/home" GIT_CONFIG_NOSYSTEM=1 GIT_TERMINAL_PROMPT=0
mkdir -p "$HOME"
start_dev_stack "$bin" "$work/credd" 1h

input="$work/get.in"
printf 'protocol=https\nhost=github.com\n\n' >"$input"

# git's credential cache, holding a (dummy) credential for the same host.
mkdir -m 700 "$work/cache"
# Started as the dashed binary itself: `git credential-cache--daemon` would
# put a git wrapper process between us and the daemon.
"$(git --exec-path)/git-credential-cache--daemon" "$cache_sock" >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  [ -S "$cache_sock" ] && break
  sleep 0.05
done
printf 'protocol=https\nhost=github.com\nusername=x-access-token\npassword=cache-bench-dummy\n\n' |
  git credential-cache --socket "$cache_sock" --timeout 3600 store

# The seed helper: the bash script inside the scraped page (the page puts a
# lone `|` line between the script's lines).
seed="$work/seed-helper.sh"
sed -n '/^#!\/bin\/bash$/,/^esac$/p' "${seed_pages[0]}" | grep -v '^|$' >"$seed"
bash -n "$seed"

# Every contender must actually produce a password before it is timed.
check() {
  local name=$1
  shift
  if ! "$@" <"$input" 2>"$work/check.err" | grep -q '^password='; then
    echo "error: $name printed no password; its stderr:" >&2
    cat "$work/check.err" >&2
    exit 1
  fi
}
check "credd get (static)" "$work/credd" get
check "credd get (dynamic)" "$work/credd-dynamic" get
check "git credential-cache get" git credential-cache --socket "$cache_sock" get
check "seed helper" bash "$seed" get

contenders=(
  "/bin/true=/bin/true"
  "credd get (static)=$work/credd get"
  "credd get (dynamic)=$work/credd-dynamic get"
  "git credential-cache get=git credential-cache --socket $cache_sock get"
  "seed helper (bash + curl)=bash $seed get"
)
# The floor, measured rather than assumed: what this machine charges any
# static program, and any static helper answered over a Unix socket.
floor_sock="$work/floor.sock"
printf 'int main(void) { return 0; }\n' >"$work/empty.c"
# Optional: no C compiler, or no static libc for it, skips the floor only.
if command -v cc >/dev/null &&
  cc -O2 -static -o "$work/empty" "$work/empty.c" 2>/dev/null &&
  cc -O2 -static -o "$work/floor-client" scripts/bench-floor/client.c 2>/dev/null &&
  cc -O2 -o "$work/floor-server" scripts/bench-floor/server.c 2>/dev/null; then
  "$work/floor-server" "$floor_sock" &
  pids+=($!)
  for _ in $(seq 1 100); do
    [ -S "$floor_sock" ] && break
    sleep 0.05
  done
  export FLOOR_SOCK="$floor_sock"
  check "C client + C server" "$work/floor-client"
  contenders+=(
    "static C int main(){}=$work/empty"
    "C client + C server (floor)=$work/floor-client"
  )
else
  echo "no C compiler (cc) with a static libc: the C floor is not measured" >&2
fi

echo "$(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), $runs runs each, interleaved in a shuffled order" >&2
"$bin/exec-bench" "$runs" "$input" "${contenders[@]}"
echo "the daemon's answer alone:" >&2
"$bin/exec-bench" --round-trip "$CREDD_SOCKET" "$runs"
if [ -S "$floor_sock" ]; then
  echo "the C server's answer alone:" >&2
  "$bin/exec-bench" --round-trip "$floor_sock" "$runs"
fi
