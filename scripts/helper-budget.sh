#!/usr/bin/env bash
# The helper's start-up guard: the system calls of one `credd get` answered
# by the daemon, counted with strace, against a budget per call.
#
#   scripts/helper-budget.sh       # builds the release binaries first (scripts/build-release.sh)
#
# Why system calls and not time: time on a shared 2-core machine is noise
# (scripts/bench-helper.sh measures it, and says how), while the calls a
# process makes are the same on every run. Each one that creeps into the hot
# path (a stat, a /proc read, a second geteuid) is exactly the drift that
# took `credd get` from 1.16x to 1.42x /bin/true unseen; here it fails CI
# and names itself.
#
# The budget is the static release `credd` (the build users install) as
# measured after the start-up work of issue 16, per system call; `brk` has a
# margin of 2 because malloc's growth depends on the environment's size.
# Everything else is exact, so one added call of any kind fails. Change a
# line only with the reason in the commit. On failure the whole trace is
# printed.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# name  max   what makes it
budget='
execve           1  the exec itself
arch_prctl       1  static glibc: thread pointer
set_tid_address  1  static glibc: thread start
set_robust_list  1  static glibc: thread start
rseq             1  static glibc: restartable sequences
prlimit64        1  static glibc: stack limit
readlink         1  static glibc: /proc/self/exe, for the origin path
getrandom        1  glibc malloc: tcache key
brk              7  static glibc TLS and malloc (5 measured, margin 2)
mprotect         1  RELRO after relocation
rt_sigaction     1  SIGPIPE ignored (helper/src/main.rs)
read             1  git request on stdin
geteuid          1  our uid, for the trust checks
statx            1  the socket folder rule
socket           1  the connection
setsockopt       3  send deadline before connect; send and read deadlines
connect          1  the connection
getsockopt       1  SO_PEERCRED: the listener uid
sendto           1  the request line
recvfrom         1  the answer line
close            1  the connection
write            1  the answer for git, in one write
exit_group       1  exit
'

command -v strace >/dev/null || {
  echo "error: strace is not installed (apt-get install -y strace; scripts/test.sh installs it)" >&2
  exit 1
}
if [ "${HELPER_BUDGET_SKIP_BUILD:-}" != 1 ]; then
  scripts/build-release.sh --quiet
fi
bin="$root/target/release"

# shellcheck source=scripts/lib/dev-stack.sh
. "$root/scripts/lib/dev-stack.sh"
make_work budget

export CREDD_HOSTS=github.com HOME="$work/home"
mkdir -p "$HOME" "$work/configs"
start_dev_stack "$bin" "$bin/credd" 1h

printf 'protocol=https\nhost=github.com\n\n' >"$work/get.in"
# The daemon must answer (not the platform fallback): its token first.
"$bin/credd" get <"$work/get.in" | grep -q '^password=' || {
  echo "error: credd get printed no password" >&2
  exit 1
}
strace -f -qq -o "$work/trace" "$bin/credd" get <"$work/get.in" >"$work/answer"
grep -q '^password=' "$work/answer" || {
  echo "error: credd get under strace printed no password" >&2
  exit 1
}

# Count each call (strace -f -qq: "PID name(args) = result" per line).
counts=$(sed -nE 's/^[0-9]+ +([a-z_0-9]+)\(.*/\1/p' "$work/trace" | sort | uniq -c)
failed=0
total=0
while read -r count name; do
  [ -n "$name" ] || continue
  total=$((total + count))
  max=$(awk -v n="$name" '$1 == n {print $2}' <<<"$budget")
  if [ -z "$max" ]; then
    echo "OVER BUDGET: $name x$count is not in the budget" >&2
    failed=1
  elif [ "$count" -gt "$max" ]; then
    echo "OVER BUDGET: $name x$count, budget $max" >&2
    failed=1
  fi
done <<<"$counts"
allowed=$(awk 'NF >= 2 {s += $2} END {print s}' <<<"$budget")
echo "credd get (static release, answered by the daemon): $total system calls (budget $allowed)"
if [ "$failed" -ne 0 ]; then
  echo "the trace:" >&2
  # The answer line is the token: strace shows only its first 32 bytes, but
  # they are the token's prefix; keep them out of the log.
  sed -E 's/(recvfrom\([0-9]+, )"[^"]*"/\1"…"/; s/(write\(1, )"[^"]*"/\1"…"/' "$work/trace" >&2
  exit 1
fi
