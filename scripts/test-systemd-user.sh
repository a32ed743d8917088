#!/usr/bin/env bash
# Runs the shipped user units (systemd/user/) under a real `systemd --user`
# manager and checks what systemd/README.md claims for them: socket
# activation, READY and STATUS, the sandbox as the kernel sees it, the
# watchdog, reload, stop, and that no other uid gets a token.
#
#   scripts/test-systemd-user.sh       # as root; CI runs it (.ci/run)
#
# Needs root, systemd (the user manager, journald, systemctl, journalctl),
# util-linux (unshare, setpriv, nsenter, findmnt), mount and passwd (useradd),
# and target/debug/{molecule-credd,credd,molecule-platform} from
# `cargo build --workspace`. Creates the system user credd-sdtest once if it
# is missing.
#
# Only a user manager is started, never systemd as PID 1: everything runs in
# private mount and PID namespaces (this script is their PID 1) with tmpfs on
# /run, /home, /tmp, /var/tmp and /var/log/journal, so the machine's own are
# never written; the manager runs in a cgroup delegated to the test user. One `ok: …` line per check; the
# first check that does not hold prints `FAIL: …` with the logs and exits 1.
# KEEP_LOGS=DIR copies the logs and the journal to DIR at exit (not under
# /run, /home, /tmp or /var/tmp: those are the private tmpfs).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/debug
test_user='credd-sdtest'
cgroup_top='credd-sdtest.slice'

# shellcheck source=scripts/lib/systemd-test.sh
. "$root/scripts/lib/systemd-test.sh"

# Fails a wait once the systemd under test is gone.
check_alive() {
  if [ -n "$manager_pid" ] && ! alive "$manager_pid"; then fail "$1: systemd --user exited"; fi
}

# Kills every process left in our cgroups and removes them, deepest first.
sweep_cgroups() {
  local h pid _
  for h in $(cgroup_roots); do
    [ -d "$h/$cgroup_top" ] || continue
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      while IFS= read -r pid; do
        kill -KILL "$pid" 2>/dev/null || true
      done < <(find "$h/$cgroup_top" -name cgroup.procs -exec cat {} + 2>/dev/null)
      find "$h/$cgroup_top" -depth -type d -exec rmdir {} + 2>/dev/null || true
      [ -d "$h/$cgroup_top" ] || break
      sleep 0.1
    done
    if [ -d "$h/$cgroup_top" ]; then echo "warning: could not remove $h/$cgroup_top" >&2; fi
  done
  return 0
}

if [ "${1-}" != --in-namespace ]; then
  # Outside: check the prerequisites, run the rest in private namespaces,
  # and sweep the cgroups whatever happened in there.
  [ "$(id -u)" = 0 ] || fail "run as root (it mounts, delegates a cgroup and may create a user)"
  for tool in unshare:util-linux setpriv:util-linux nsenter:util-linux findmnt:util-linux \
    mount:mount umount:mount useradd:passwd systemctl:systemd journalctl:systemd; do
    command -v "${tool%%:*}" >/dev/null ||
      fail "${tool%%:*} is missing (Debian: apt-get install ${tool#*:})"
  done
  for exe in /lib/systemd/systemd /lib/systemd/systemd-journald; do
    [ -x "$exe" ] || fail "$exe is missing (Debian: apt-get install systemd)"
  done
  for exe in molecule-credd credd molecule-platform; do
    [ -x "$bin/$exe" ] || fail "$bin/$exe is missing: run cargo build --workspace first"
  done
  [ -n "$(cgroup_roots)" ] || fail "no cgroup hierarchy to delegate under /sys/fs/cgroup"
  case $root in /run | /run/*) fail "the checkout must not be under /run (a tmpfs hides it)" ;; esac
  if ! getent passwd "$test_user" >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin "$test_user" || fail "could not create the test user $test_user"
  fi
  sweep_cgroups
  # A PID namespace too, with this script (not systemd) as its PID 1: it
  # reaps orphans, and when it goes the kernel kills whatever is left in the
  # namespace.
  unshare --mount --propagation private --pid --fork --kill-child --mount-proc \
    -- "$BASH" "$0" --in-namespace &
  child=$!
  # On a signal or after 100 s: SIGTERM to the script inside (it cleans up),
  # then, if it is still there after 10 s, SIGKILL to unshare (which ignores
  # SIGTERM), which kills the namespace.
  stop_inside() {
    local inner pid _
    inner=$(cat "/proc/$child/task/$child/children" 2>/dev/null || true)
    for pid in $inner; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 100); do
      alive "$child" || return 0
      sleep 0.1
    done
    kill -KILL "$child" 2>/dev/null || true
  }
  trap 'stop_inside; trap - INT TERM' INT TERM
  deadline=$((SECONDS + 100))
  while alive "$child" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
  timed_out=0
  if alive "$child"; then
    timed_out=1
    stop_inside
  fi
  status=0
  wait "$child" || status=$?
  sweep_cgroups
  [ "$timed_out" = 0 ] || fail "the test did not finish within 100 s"
  exit "$status"
fi

# ---- inside the private namespaces -----------------------------------------

uid=$(id -u "$test_user")
gid=$(id -g "$test_user")
work=/run/credd-sdtest
home=/home/$test_user
runtime=/run/user/$uid
socket=$runtime/molecule-credd/credd.sock
credd=$home/.local/bin/credd
service=molecule-credd.service
cgroups=
kill_exe=
declare -A origin=()
manager_pid=
journald_pid=
platform_pid=

diagnostics() {
  echo "---- systemd --user stderr ----"
  tail -n 20 "$work/manager.log" 2>/dev/null
  echo "---- journal (priority info and above, last lines) ----"
  journalctl --no-pager -q -o short-monotonic -p info | grep -v ' kernel: ' | tail -n 60
  echo "---- molecule-platform ----"
  tail -n 20 "$work/platform.log" 2>/dev/null
}

# stop PID SECONDS: SIGTERM, wait at most SECONDS, then SIGKILL; reaps it.
stop() {
  local pid=$1 i
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < $2 * 20; i++)); do
    alive "$pid" || break
    sleep 0.05
  done
  kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return 0
}

cleanup() {
  local status=$? h
  trap - EXIT
  set +e
  if [ "$status" != 0 ]; then diagnostics >&2; fi
  if [ -n "${KEEP_LOGS-}" ]; then
    cp "$work"/*.log "$KEEP_LOGS"/
    journalctl --no-pager -q -o short-monotonic >"$KEEP_LOGS/journal.txt"
  fi
  stop "$manager_pid" 10
  stop "$platform_pid" 5
  stop "$journald_pid" 5
  # Out of our cgroups, then kill whatever is left in them.
  for h in $cgroups; do
    echo "$$" >"$h${origin[$h]}/cgroup.procs"
  done
  sweep_cgroups
  exec 3<&-
  umount -l "${kill_exe:-/nonexistent}" /home /tmp /var/tmp /var/log/journal /run 2>/dev/null
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs a command as the test user, with the environment a login would give.
as_user() {
  setpriv --reuid "$uid" --regid "$gid" --init-groups \
    env -i HOME="$home" USER="$test_user" LOGNAME="$test_user" LANG=C.UTF-8 \
    PATH=/usr/local/bin:/usr/bin:/bin XDG_RUNTIME_DIR="$runtime" "$@"
}
uctl() { as_user systemctl --user "$@"; }
prop() { uctl show --value -p "$1" "$service"; }

# wait_for SECONDS WHAT CMD...: polls CMD every 50 ms until it succeeds.

# tmpfs of our own on /run, /home, /tmp, /var/tmp and the journal: the test
# user's home and runtime folder, this script's files, journald's sockets and
# files and the units' PrivateTmp folders never touch the machine's, and go
# when the namespace does. /run must be a mount point, or systemd gives each
# sandboxed unit a fresh one and the service never sees NOTIFY_SOCKET.
mount -t tmpfs -o mode=0755 credd-sdtest /run || fail "cannot mount a tmpfs on /run"
# The checkout, read-only, where the tmpfs below cannot hide it (it may be
# under /home or /tmp).
mkdir -p "$work/checkout"
if ! { mount --bind "$root" "$work/checkout" && mount -o remount,bind,ro "$work/checkout"; }; then
  fail "cannot bind-mount the checkout read-only"
fi
root=$work/checkout
bin=$root/target/debug
for dir in /home /tmp /var/tmp /var/log/journal; do
  [ -d "$dir" ] || continue
  mount -t tmpfs -o mode="$(stat -c %a "$dir")" credd-sdtest "$dir" || fail "cannot mount a tmpfs on $dir"
done
mkdir -p /run/systemd/system /run/systemd/unit-root /run/user
install -d -m 0700 -o "$uid" -g "$gid" "$runtime"
# procps's /bin/kill is not installed everywhere: hide it, so the reload
# check shows ExecReload= does without it.
kill_exe=$(type -P kill || true)
if [ -n "$kill_exe" ]; then
  kill_exe=$(readlink -f "$kill_exe")
  mount --bind /dev/null "$kill_exe" || fail "cannot hide $kill_exe"
fi

# This shell and what it starts (journald, the platform) go into
# $cgroup_top/aux; the user manager into $cgroup_top/user@UID.service, owned
# by the test user. origin remembers where this shell was, for cleanup.
cgroups=$(cgroup_roots)
for h in $cgroups; do
  case $h in
    */systemd) origin[$h]=$(sed -n 's/^[0-9]*:name=systemd://p' /proc/self/cgroup) ;;
    *) origin[$h]=$(sed -n 's/^0:://p' /proc/self/cgroup) ;;
  esac
  if ! { mkdir -p "$h/$cgroup_top/aux" "$h/$cgroup_top/user@$uid.service" &&
    chown -R "$uid:$gid" "$h/$cgroup_top/user@$uid.service" &&
    echo "$$" >"$h/$cgroup_top/aux/cgroup.procs"; }; then
    fail "cannot create and delegate cgroups under $h"
  fi
done

/lib/systemd/systemd-journald >"$work/journald.log" 2>&1 &
journald_pid=$!
wait_for 10 "systemd-journald's stdout socket" test -S /run/systemd/journal/stdout

# The platform in dev mode on a random port; its bearer becomes the test
# user's .auth_token.
mkfifo "$work/platform.out"
"$bin/molecule-platform" --dev --listen 127.0.0.1:0 --dev-auth-token-file "$work/platform/bearer" \
  >"$work/platform.out" 2>"$work/platform.log" &
platform_pid=$!
exec 3<"$work/platform.out"
read -r -t 15 first_line <&3 || fail "molecule-platform did not start"
cat <&3 >/dev/null &
platform_url=${first_line##* }
case $platform_url in http://127.0.0.1:*) ;; *) fail "molecule-platform said: $first_line" ;; esac

# The user's side, installed as systemd/README.md says: the binaries in
# ~/.local/bin, the units as shipped in ~/.config/systemd/user, the env
# file. Only the watchdog period is shortened (a drop-in), to be quick.
install -d -o "$uid" -g "$gid" -m 0755 "$home" "$home/.local" "$home/.local/bin" \
  "$home/.config" "$home/.config/systemd" "$home/.config/systemd/user" \
  "$home/.config/systemd/user/$service.d"
install -d -o "$uid" -g "$gid" -m 0700 "$home/.config/molecule-credd"
install -o "$uid" -g "$gid" -m 0755 "$bin/molecule-credd" "$bin/credd" "$home/.local/bin/"
install -o "$uid" -g "$gid" -m 0644 "$root"/systemd/user/*.service "$root"/systemd/user/*.socket \
  "$home/.config/systemd/user/"
install -o "$uid" -g "$gid" -m 0600 "$work/platform/bearer" "$home/.config/molecule-credd/.auth_token"
install -o "$uid" -g "$gid" -m 0600 /dev/stdin "$home/.config/molecule-credd/env" <<ENV
PLATFORM_URL=$platform_url
CONFIGS_DIR=$home/.config/molecule-credd
ENV
install -o "$uid" -g "$gid" -m 0644 /dev/stdin "$home/.config/systemd/user/$service.d/test.conf" <<'UNIT'
[Service]
WatchdogSec=4s
UNIT

# ---- the user manager ------------------------------------------------------

started=$(now_ms)
(
  for h in $cgroups; do
    echo "$BASHPID" >"$h/$cgroup_top/user@$uid.service/cgroup.procs"
  done
  exec setpriv --reuid "$uid" --regid "$gid" --init-groups \
    env -i HOME="$home" USER="$test_user" LOGNAME="$test_user" LANG=C.UTF-8 \
    PATH=/usr/local/bin:/usr/bin:/bin XDG_RUNTIME_DIR="$runtime" \
    SYSTEMD_LOG_LEVEL=debug SYSTEMD_LOG_TARGET=journal \
    /lib/systemd/systemd --user
) >"$work/manager.log" 2>&1 &
manager_pid=$!
manager_up() {
  alive "$manager_pid" || fail "systemd --user exited"
  case $(uctl show --value -p SystemState 2>/dev/null) in running | degraded) ;; *) return 1 ;; esac
}
wait_for 20 "the user manager reaching running" manager_up
ok "systemd --user (pid $manager_pid, uid $uid) up in $(($(now_ms) - started)) ms, SystemState=$(uctl show --value -p SystemState)"

# ---- socket activation -----------------------------------------------------

uctl start molecule-credd.socket || fail "systemctl --user start molecule-credd.socket failed"
[ -S "$socket" ] || fail "no socket at $socket after starting molecule-credd.socket"
[ "$(prop ActiveState)" = inactive ] || fail "the service runs before the first connection"
ok "molecule-credd.socket listening at $socket, $service not started"

started=$(now_ms)
status_text=$(as_user "$credd" status 2>&1) ||
  fail "credd status (first connection) failed: $status_text; $service: Result=$(prop Result), ExecMainStatus=$(prop ExecMainStatus)"
activation_ms=$(($(now_ms) - started))
first_state=$(sed -n 's/^state: *//p' <<<"$status_text")
main_pid=$(prop MainPID)
[ "$main_pid" -gt 0 ] || fail "no MainPID after the first credd status"
grep -qF "(pid $main_pid)" <<<"$status_text" ||
  fail "credd status was not answered by MainPID $main_pid: $status_text"
# status answers at once, so the first one may come before the first fetch.
token_valid() {
  status_text=$(as_user "$credd" status) || fail "credd status failed: $status_text"
  grep -qE '^state: +valid$' <<<"$status_text"
}
wait_for 10 "a valid token in credd status" token_valid
valid_ms=$(($(now_ms) - started))
grep -qE '^source: +platform$' <<<"$status_text" || fail "the token is not from the platform: $status_text"
ok "socket activation: the first credd status started pid $main_pid and exited 0 in $activation_ms ms (state then: $first_state); valid token from the platform after $valid_ms ms"

# ---- READY and STATUS ------------------------------------------------------

[ "$(prop ActiveState)/$(prop SubState)" = active/running ] || fail "$service is not active/running"
# manager_logged TEXT: the user manager's journal has a line with TEXT.
# (grep reads all of it: with -q, journalctl's SIGPIPE would fail the pipe.)
manager_logged() { journalctl --no-pager -q -o cat _PID="$manager_pid" | grep -F "$1" >/dev/null; }
wait_for 5 "the user manager logging READY=1 from pid $main_pid" \
  manager_logged "Got notification message from PID $main_pid (READY=1)"
ready_ms=$((($(prop ActiveEnterTimestampMonotonic) - $(prop ExecMainStartTimestampMonotonic)) / 1000))
status_line=$(prop StatusText)
grep -q "token" <<<"$status_line" || fail "StatusText does not mention the token: '$status_line'"
ok "READY=1 from pid $main_pid, active/running $ready_ms ms after exec; StatusText='$status_line'"

# ---- the sandbox, as the kernel sees the daemon ----------------------------

proc_status=$(cat "/proc/$main_pid/status")
grep -qE '^NoNewPrivs:[[:space:]]+1$' <<<"$proc_status" || fail "NoNewPrivs is not 1"
grep -qE '^Seccomp:[[:space:]]+2$' <<<"$proc_status" || fail "no seccomp filter (Seccomp is not 2)"
cap_bnd=$(sed -n 's/^CapBnd:[[:space:]]*//p' <<<"$proc_status")
[ "$cap_bnd" = 0000000000000000 ] || fail "the capability bounding set is not empty: CapBnd=$cap_bnd"
uid_map=$(tr -s ' \n' '  ' <"/proc/$main_pid/uid_map" | sed 's/^ //; s/ $//')
case $uid_map in
  "0 0 4294967295") fail "the daemon is in the initial user namespace (PrivateUsers=yes not applied)" ;;
esac
for ns in mnt uts; do
  [ "$(readlink "/proc/$main_pid/ns/$ns")" != "$(readlink "/proc/$manager_pid/ns/$ns")" ] ||
    fail "the daemon shares the manager's $ns namespace (mnt: no mount sandbox; uts: ProtectHostname=)"
done
skipped=$(journalctl --no-pager -q -o cat | grep -cF 'assuming containerized execution' || true)
[ "$skipped" = 0 ] ||
  fail "the user manager skipped the mount sandbox ('assuming containerized execution')"
root_opts=$(awk '$5 == "/" { print $6 }' "/proc/$main_pid/mountinfo" | tail -n 1)
case ,$root_opts, in *,ro,*) ;; *) fail "/ is not read-only in the daemon's mountinfo ($root_opts)" ;; esac
in_ns() { nsenter -t "$main_pid" -m -- "$@"; }
in_ns test -d /usr || fail "cannot look into the daemon's mount namespace"
for path in /usr /etc /var "$home" "$runtime" /proc/sys /sys/fs/cgroup; do
  ! in_ns test -w "$path" || fail "$path is writable inside the service"
done
in_ns test -w "$runtime/molecule-credd" || fail "the RuntimeDirectory is not writable inside the service"
[ "$(in_ns stat -c %d:%i /tmp)" != "$(stat -c %d:%i /tmp)" ] || fail "/tmp is not private (PrivateTmp=)"
[ "$(in_ns stat -c %a /proc/kmsg)" = 0 ] || fail "/proc/kmsg is accessible inside the service (ProtectKernelLogs=)"
# (stat, not find -type: the nodes are bind mounts over plain files.)
# shellcheck disable=SC2016  # expanded by that sh
devices=$(in_ns find /dev -exec sh -c 'for f; do
  if [ ! -L "$f" ] && { [ -b "$f" ] || [ -c "$f" ]; }; then printf "%s " "${f#/dev/}"; fi
  done' sh {} + | sed 's/ $//')
[ -n "$devices" ] || fail "no device nodes found inside the service (the /dev check is broken)"
for dev in $devices; do
  case $dev in null | zero | full | random | urandom | tty | ptmx | pts/ptmx) ;;
    *) fail "/dev/$dev is visible inside the service (PrivateDevices=): $devices" ;;
  esac
done
ok "sandbox on pid $main_pid: NoNewPrivs 1, Seccomp 2, CapBnd 0, uid_map '$uid_map', own mount and UTS namespaces, / $root_opts; /usr /etc /var ~ \$XDG_RUNTIME_DIR /proc/sys /sys/fs/cgroup read-only, RuntimeDirectory writable, private /tmp, /proc/kmsg mode 0, /dev only: $devices"

# ---- another uid -----------------------------------------------------------

token=$(as_user "$credd" token) || fail "credd token failed for the test user"
[ -n "$token" ] || fail "credd token printed nothing"
# nobody_token SOCKET [EXTRA SETPRIV ARGS...]: credd token as uid 65534 on
# SOCKET, with no platform to fall back on; sets other and other_status.
nobody_token() {
  local path=$1
  shift
  set +e
  other=$(setpriv --reuid 65534 --regid 65534 --clear-groups "$@" env -i PATH=/usr/bin:/bin \
    CREDD_SOCKET="$path" CREDD_DAEMON_UID="$uid" PLATFORM_URL=http://127.0.0.1:9 \
    CONFIGS_DIR=/nonexistent "$credd" token 2>&1)
  other_status=$?
  set -e
  [ "$other_status" != 0 ] || fail "uid 65534 ($*) got a token from $path"
  ! grep -qF "$token" <<<"$other" || fail "uid 65534 ($*) saw the token"
}
nobody_token "$socket"
ok "uid 65534: credd token exits $other_status, no token ($(head -n 1 <<<"$other"))"
# The daemon's own check: the same socket bind-mounted into a folder credd
# accepts (root's, 0700), and uid 65534 past the file permissions
# (CAP_DAC_OVERRIDE) trusting the listener's uid. It reaches the daemon,
# whose peer-uid check refuses it.
install -d -m 0700 "$work/other"
touch "$work/other/credd.sock"
mount --bind "$socket" "$work/other/credd.sock" || fail "cannot bind-mount the socket"
nobody_token "$work/other/credd.sock" --inh-caps +dac_override --ambient-caps +dac_override
umount "$work/other/credd.sock"
grep -qF forbidden <<<"$other" || fail "the daemon did not refuse uid 65534: $other"
ok "uid 65534 past the file permissions: the daemon refuses it, credd token exits $other_status, no token ($(head -n 1 <<<"$other"))"

# ---- the watchdog ----------------------------------------------------------

restarts=$(prop NRestarts)
started=$(now_ms)
kill -STOP "$main_pid"
restarted() { [ "$(prop NRestarts)" -gt "$restarts" ] && [ "$(prop ActiveState)" = active ]; }
wait_for 20 "a watchdog restart after SIGSTOP" restarted
new_pid=$(prop MainPID)
if [ "$new_pid" -le 0 ] || [ "$new_pid" = "$main_pid" ]; then
  fail "no new MainPID after the restart ($new_pid)"
fi
restart_ms=$(($(now_ms) - started))
wait_for 10 "a valid token from the restarted daemon" token_valid
grep -qF "(pid $new_pid)" <<<"$status_text" || fail "the restarted daemon does not answer: $status_text"
wait_for 5 "the user manager logging the watchdog timeout" manager_logged "$service: Watchdog timeout"
ok "watchdog (WatchdogSec=4s drop-in): SIGSTOPped pid $main_pid replaced by pid $new_pid after $restart_ms ms, NRestarts $restarts -> $(prop NRestarts), valid token again"
main_pid=$new_pid

# ---- reload ----------------------------------------------------------------

calls() { as_user "$credd" status --json | status_platform_calls; }
before=$(calls)
[ -n "$before" ] || fail "credd status --json has no platform_calls"
uctl reload "$service" || fail "systemctl --user reload $service failed"
more_calls() { [ "$(calls)" -gt "$before" ]; }
wait_for 10 "a platform call after reload" more_calls
[ "$(prop MainPID)" = "$main_pid" ] || fail "reload restarted the daemon"
ok "systemctl --user reload: platform calls $before -> $(calls), same pid $main_pid${kill_exe:+ ($kill_exe hidden)}"

# ---- stop ------------------------------------------------------------------

started=$(now_ms)
uctl stop "$service" molecule-credd.socket || fail "systemctl --user stop exited non-zero"
stop_ms=$(($(now_ms) - started))
[ ! -e "$socket" ] || fail "$socket is still there after stop"
[ "$(prop ActiveState)" = inactive ] || fail "$service is $(prop ActiveState) after stop"
[ "$(prop Result)" = success ] || fail "$service stopped with Result=$(prop Result)"
! alive "$main_pid" || fail "pid $main_pid still runs after stop"
ok "stop: both units inactive in $stop_ms ms, Result=success, pid $main_pid gone, $socket removed"
