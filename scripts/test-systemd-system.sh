#!/usr/bin/env bash
# Runs the shipped system units (systemd/molecule-credd.{socket,service},
# sysusers.d, tmpfiles.d) under a real system manager — systemd as PID 1 of
# a booted container on a rootfs of its own — and checks what
# systemd/README.md claims for them: socket activation, READY and STATUS, the
# daemon's own user, who gets a token, the sandbox as the kernel sees it, the
# watchdog, reload and stop.
#
#   scripts/test-systemd-system.sh     # as root; CI runs it (.ci/run)
#
# Needs root, debootstrap, systemd-container (systemd-nspawn), util-linux
# (nsenter, setpriv, flock), overlayfs, and
# target/debug/{molecule-credd,credd,molecule-platform} from
# `cargo build --workspace` (Debian 12's glibc: they run inside the
# container).
#
# The rootfs is Debian 12 (bookworm, minbase plus systemd) from
# $DEBIAN_MIRROR (default http://deb.debian.org/debian), built once by
# debootstrap (about a minute) into a temporary folder and renamed to
# $ROOTFS_CACHE (default /var/cache/molecule-credd-test/rootfs-bookworm) only
# when complete. Each run boots an overlay of it (the changes go to a
# per-run folder beside the cache, removed at exit), with
# `systemd-nspawn --boot --private-network`: the container has its own PID 1,
# /run, /tmp and loopback, and the machine's own systemd is never involved.
# Inside, everything is installed the way systemd/README.md says (the
# checkout is bind-mounted read-only at /src), with the `agent` account
# (uid 1000) as the client and `molecule-platform --dev` on the container's
# 127.0.0.1 as a transient unit. Only WatchdogSec= is shortened, to 4 s, by a
# drop-in. One `ok: …` line per check; the first check that does not hold
# prints `FAIL: …` with the logs and exits 1. KEEP_LOGS=DIR copies the
# container's journal and the logs to DIR at exit.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/debug
cache=${ROOTFS_CACHE:-/var/cache/molecule-credd-test/rootfs-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=systemd,systemd-sysv,dbus,git,ca-certificates,util-linux
# Written into the rootfs when debootstrap has finished; a cache without it,
# or from another recipe, is rebuilt.
recipe="bookworm minbase $packages"
stamp=.molecule-credd-test-rootfs
service=molecule-credd.service
socket=/run/molecule-credd/credd.sock
client_uid=1000

# shellcheck source=scripts/lib/systemd-test.sh
. "$root/scripts/lib/systemd-test.sh"

# Fails a wait once the systemd under test is gone.
check_alive() {
  if [ -n "$nspawn_pid" ] && ! alive "$nspawn_pid"; then fail "$1: the container exited"; fi
}
# This shell's cgroup in hierarchy H.
cgroup_of_self() {
  case $1 in
    */systemd) sed -n 's/^[0-9]*:name=systemd://p' /proc/self/cgroup ;;
    *) sed -n 's/^0:://p' /proc/self/cgroup ;;
  esac
}
# cgroup_dir H NAME: the folder of cgroup NAME under this shell's in H.
cgroup_dir() {
  local base
  base=$1$(cgroup_of_self "$1")
  echo "${base%/}/$2"
}
# sweep_cgroup NAME: kills whatever is left in NAME (a child of this shell's
# cgroup, in every hierarchy) and removes it, deepest first.
sweep_cgroup() {
  local h dir pid _
  for h in $(cgroup_roots); do
    dir=$(cgroup_dir "$h" "$1")
    [ -d "$dir" ] || continue
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      while IFS= read -r pid; do
        kill -KILL "$pid" 2>/dev/null || true
      done < <(find "$dir" -name cgroup.procs -exec cat {} + 2>/dev/null)
      find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true
      [ -d "$dir" ] || break
      sleep 0.1
    done
    if [ -d "$dir" ]; then echo "warning: could not remove $dir" >&2; fi
  done
  return 0
}

[ "$(id -u)" = 0 ] || fail "run as root (it builds a rootfs, mounts an overlay and boots a container)"
for tool in debootstrap:debootstrap systemd-nspawn:systemd-container nsenter:util-linux \
  setpriv:util-linux flock:util-linux mount:mount umount:mount; do
  command -v "${tool%%:*}" >/dev/null ||
    fail "${tool%%:*} is missing (Debian: apt-get install ${tool#*:})"
done
for exe in molecule-credd credd molecule-platform; do
  [ -x "$bin/$exe" ] || fail "$bin/$exe is missing: run cargo build --workspace first"
done
[ -n "$(cgroup_roots)" ] || fail "no cgroup hierarchy under /sys/fs/cgroup for systemd-nspawn"
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null ||
  fail "the kernel has no overlayfs"

# ---- the cached rootfs -----------------------------------------------------

cache_dir=$(dirname "$cache")
mkdir -p "$cache_dir"

# Leftovers of runs that were killed before their cleanup (named after the
# run's shell): first their containers (cgroups), then their folders.
for h in $(cgroup_roots); do
  for stale in "$(cgroup_dir "$h" '')"molecule-credd-systest.*; do
    if [ -d "$stale" ] && ! alive "${stale##*.}"; then sweep_cgroup "${stale##*/}"; fi
  done
done
for stale in "$cache_dir"/run.*; do
  [ -d "$stale" ] || continue
  if [ -f "$stale/pid" ] && alive "$(cat "$stale/pid")"; then continue; fi
  umount -l "$stale/merged" 2>/dev/null || true
  rm -rf "$stale"
done

# fd 4 holds the lock (the container does not inherit it: a container left
# by a killed run must not hold it).
exec 4>"$cache.lock"
flock -w 300 4 || fail "another run has held $cache.lock for 5 minutes"
if [ "$(cat "$cache/$stamp" 2>/dev/null)" != "$recipe" ]; then
  started=$SECONDS
  # Holding the lock: any half-built folder is from an interrupted run.
  rm -rf "$cache".tmp.* "$cache".old.*
  tmp_rootfs=$(mktemp -d "$cache.tmp.XXXXXX")
  if ! timeout 900 debootstrap --variant=minbase --include="$packages" bookworm "$tmp_rootfs" "$mirror" \
    >"$tmp_rootfs.log" 2>&1; then
    tail -n 20 "$tmp_rootfs.log" >&2
    rm -rf "$tmp_rootfs" "$tmp_rootfs.log"
    fail "debootstrap of bookworm from $mirror failed"
  fi
  rm -f "$tmp_rootfs.log"
  printf '%s\n' "$recipe" >"$tmp_rootfs/$stamp"
  if [ -e "$cache" ]; then
    old=$(mktemp -u "$cache.old.XXXXXX")
    mv "$cache" "$old"
    rm -rf "$old"
  fi
  mv "$tmp_rootfs" "$cache"
  ok "rootfs: debootstrap bookworm ($packages) into $cache in $((SECONDS - started)) s"
fi
# A shared lock while a run uses the cache: no rebuild under its feet.
flock -s 4

# ---- the container ---------------------------------------------------------

run=$(mktemp -d "$cache_dir/run.XXXXXX")
echo "$$" >"$run/pid"
mkdir "$run/upper" "$run/work" "$run/merged"
nspawn_pid=
pid1=
merged_mounted=0
# systemd-nspawn --keep-unit runs in a cgroup of this run's, where it makes
# its payload/ and supervisor/ cgroups; cleanup removes it.
cgroup=molecule-credd-systest.$$

# Runs a command in the container (all its namespaces; a process of this
# script's cgroup, which the container's manager does not track), bounded.
inside() { timeout 30 nsenter -t "$pid1" -a -- "$@"; }
ctl() { inside systemctl "$@"; }
prop() { ctl show --value -p "$1" "$service"; }
# As agent, with the environment a login shell there would have.
as_agent() {
  inside setpriv --reuid "$client_uid" --regid "$client_uid" --init-groups \
    env -i HOME=/home/agent USER=agent LOGNAME=agent LANG=C.UTF-8 \
    PATH=/usr/local/bin:/usr/bin:/bin CREDD_SOCKET="$socket" "$@"
}

diagnostics() {
  echo "---- systemd-nspawn (last lines) ----"
  tail -n 15 "$run/nspawn.log" 2>/dev/null
  if [ -z "$pid1" ] || ! alive "$pid1"; then return 0; fi
  echo "---- $service and molecule-credd.socket ----"
  ctl status --no-pager -n 0 molecule-credd.socket "$service" 2>&1
  echo "---- the container's journal (priority info and above, last lines) ----"
  inside journalctl --no-pager -q -o short-monotonic -p info | grep -v ' kernel: ' | tail -n 60
  echo "---- molecule-platform ----"
  inside journalctl --no-pager -q -o cat -u credd-test-platform.service | tail -n 20
}

cleanup() {
  local status=$? i
  trap - EXIT
  set +e
  if [ "$status" != 0 ]; then diagnostics >&2; fi
  if [ -n "${KEEP_LOGS-}" ]; then
    cp "$run/nspawn.log" "$KEEP_LOGS/" 2>/dev/null
    if [ -n "$pid1" ] && alive "$pid1"; then
      inside journalctl --no-pager -q -o short-monotonic >"$KEEP_LOGS/journal.txt"
    fi
  fi
  # SIGTERM makes systemd-nspawn power the container off; bounded, then
  # SIGKILL to its PID 1 (which ends the whole PID namespace) and to nspawn.
  if [ -n "$nspawn_pid" ]; then
    kill -TERM "$nspawn_pid" 2>/dev/null
    for ((i = 0; i < 300; i++)); do
      alive "$nspawn_pid" || break
      sleep 0.05
    done
    if alive "$nspawn_pid"; then
      echo "warning: the container did not power off within 15 s; killing it" >&2
      [ -z "$pid1" ] || kill -KILL "$pid1" 2>/dev/null
      kill -KILL "$nspawn_pid" 2>/dev/null
    fi
    wait "$nspawn_pid" 2>/dev/null
  fi
  sweep_cgroup "$cgroup"
  if [ "$merged_mounted" = 1 ]; then
    for ((i = 0; i < 50; i++)); do
      umount "$run/merged" 2>/dev/null && break
      sleep 0.1
    done
    if mountpoint -q "$run/merged"; then umount -l "$run/merged"; fi
  fi
  rm -rf "$run"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for SECONDS WHAT CMD...: polls CMD every 50 ms until it succeeds.

mount -t overlay credd-systest \
  -o "lowerdir=$cache,upperdir=$run/upper,workdir=$run/work" "$run/merged" ||
  fail "cannot mount an overlay of $cache"
merged_mounted=1

for h in $(cgroup_roots); do
  dir=$(cgroup_dir "$h" "$cgroup")
  mkdir -p "$dir" || fail "cannot create the cgroup $dir"
done
started=$(now_ms)
(
  for h in $(cgroup_roots); do
    echo "$BASHPID" >"$(cgroup_dir "$h" "$cgroup")/cgroup.procs"
  done
  exec 4>&-
  exec systemd-nspawn -q -D "$run/merged" --boot --register=no --keep-unit --private-network \
    --console=pipe --bind-ro="$root:/src"
) </dev/null >"$run/nspawn.log" 2>&1 &
nspawn_pid=$!
# The container's PID 1: systemd, a child of nspawn (after an intermediate
# child that exits).
find_pid1() {
  local child children=()
  # (no newline at the end of that file: read's status would be 1)
  read -r -a children <<<"$(cat "/proc/$nspawn_pid/task/$nspawn_pid/children" 2>/dev/null)"
  for child in "${children[@]}"; do
    if [ "$(cat "/proc/$child/comm" 2>/dev/null)" = systemd ]; then
      pid1=$child
      return 0
    fi
  done
  return 1
}
wait_for 20 "systemd as the container's PID 1" find_pid1
system_up() {
  case $(ctl show --value -p SystemState 2>/dev/null) in running | degraded) ;; *) return 1 ;; esac
}
wait_for 60 "the container's system manager reaching running" system_up
failed_units=$(ctl list-units --failed --plain --no-legend | awk '{ print $1 }' | tr '\n' ' ')
ok "container booted: systemd $(inside systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p') as PID 1 (pid $pid1 here), SystemState=$(ctl show --value -p SystemState) in $(($(now_ms) - started)) ms${failed_units:+, failed units: $failed_units}"
inside test -d /sys/class/net/lo || fail "no loopback in the container"
[ "$(inside ls /sys/class/net)" = lo ] ||
  fail "the container has network interfaces besides lo (--private-network): $(inside ls /sys/class/net | tr '\n' ' ')"

# ---- installed as systemd/README.md says -----------------------------------

# The client account first: the tmpfiles line and SocketUser= name it.
inside useradd --uid "$client_uid" --user-group --create-home --shell /bin/bash agent ||
  fail "useradd agent failed"
# shellcheck disable=SC2016  # expanded by the container's bash
inside bash -euo pipefail -c '
  cd /src
  install -m 0755 target/debug/molecule-credd target/debug/credd target/debug/molecule-platform /usr/local/bin/
  install -m 0644 systemd/molecule-credd.socket systemd/molecule-credd.service /etc/systemd/system/
  install -D -m 0644 -t /etc/sysusers.d/ systemd/sysusers.d/molecule-credd.conf
  install -D -m 0644 -t /etc/tmpfiles.d/ systemd/tmpfiles.d/molecule-credd.conf
  systemd-sysusers
  systemd-tmpfiles --create molecule-credd.conf
  install -D -m 0644 /dev/stdin /etc/systemd/system/molecule-credd.service.d/test.conf <<UNIT
[Service]
WatchdogSec=4s
UNIT
' || fail "installing the units and binaries as systemd/README.md says failed"
daemon_user=$(inside getent passwd molecule-credd) || fail "systemd-sysusers did not create molecule-credd"
daemon_uid=$(cut -d: -f3 <<<"$daemon_user")
[ "$daemon_uid" -lt 1000 ] || fail "molecule-credd is not a system account (uid $daemon_uid)"
run_dir=$(inside stat -c '%a %U:%G' /run/molecule-credd) || fail "systemd-tmpfiles did not create /run/molecule-credd"
[ "$run_dir" = "700 agent:agent" ] || fail "/run/molecule-credd is $run_dir, not 700 agent:agent"
ok "installed: systemd-sysusers made molecule-credd (uid $daemon_uid, shell $(cut -d: -f7 <<<"$daemon_user")), systemd-tmpfiles made /run/molecule-credd ($run_dir)"

# The platform on the container's own loopback, a transient unit of the
# container's manager; its bearer becomes CONFIGS_DIR/.auth_token, readable
# by molecule-credd (root:molecule-credd 0640) as the README says.
ctl reset-failed credd-test-platform.service 2>/dev/null || true
inside systemd-run -q --unit=credd-test-platform --property=StandardOutput=file:/run/platform.out \
  --property=StandardError=journal \
  /usr/local/bin/molecule-platform --dev --listen 127.0.0.1:0 --dev-auth-token-file /var/lib/credd-test/bearer ||
  fail "systemd-run molecule-platform failed"
platform_line() {
  first_line=$(inside head -n 1 /run/platform.out 2>/dev/null) && [ -n "$first_line" ]
}
wait_for 15 "molecule-platform's first line" platform_line
platform_url=${first_line##* }
case $platform_url in http://127.0.0.1:*) ;; *) fail "molecule-platform said: $first_line" ;; esac
wait_for 5 "the platform's bearer file" inside test -s /var/lib/credd-test/bearer
inside bash -euo pipefail -c "
  install -d -m 0750 -g molecule-credd /configs
  install -m 0640 -g molecule-credd /var/lib/credd-test/bearer /configs/.auth_token
  install -D -m 0600 /dev/stdin /etc/molecule-credd/env <<ENV
PLATFORM_URL=$platform_url
CONFIGS_DIR=/configs
ENV
  systemctl daemon-reload
  systemctl enable --now molecule-credd.socket
" || fail "writing /etc/molecule-credd/env and enabling molecule-credd.socket failed"
ok "molecule-platform --dev at $platform_url inside the container; /configs/.auth_token $(inside stat -c '%a %U:%G' /configs/.auth_token); /etc/molecule-credd/env written"

# ---- socket activation -----------------------------------------------------

inside test -S "$socket" || fail "no socket at $socket after enabling molecule-credd.socket"
socket_file=$(inside stat -c '%a %U:%G' "$socket")
[ "$socket_file" = "600 agent:agent" ] || fail "$socket is $socket_file, not 600 agent:agent"
[ "$(prop ActiveState)" = inactive ] || fail "the service runs before the first connection"
ok "molecule-credd.socket $(ctl show --value -p ActiveState molecule-credd.socket) at $socket ($socket_file), $service not started"

started=$(now_ms)
status_text=$(as_agent credd status 2>&1) ||
  fail "credd status (first connection) as agent failed: $status_text; $service: Result=$(prop Result), ExecMainStatus=$(prop ExecMainStatus)"
activation_ms=$(($(now_ms) - started))
first_state=$(sed -n 's/^state: *//p' <<<"$status_text")
main_pid=$(prop MainPID)
[ "$main_pid" -gt 0 ] || fail "no MainPID after the first credd status"
grep -qF "(pid $main_pid)" <<<"$status_text" ||
  fail "credd status was not answered by MainPID $main_pid: $status_text"
token_valid() {
  status_text=$(as_agent credd status) || fail "credd status failed: $status_text"
  grep -qE '^state: +valid$' <<<"$status_text"
}
wait_for 10 "a valid token in credd status" token_valid
valid_ms=$(($(now_ms) - started))
grep -qE '^source: +platform$' <<<"$status_text" || fail "the token is not from the platform: $status_text"
ok "socket activation: the first credd status as agent started pid $main_pid and exited 0 in $activation_ms ms (state then: $first_state); valid token from the platform after $valid_ms ms"

# ---- READY and STATUS ------------------------------------------------------

[ "$(prop ActiveState)/$(prop SubState)" = active/running ] || fail "$service is not active/running"
manager_logged() { inside journalctl --no-pager -q -o cat _PID=1 | grep -F "$1" >/dev/null; }
ready_ms=$((($(prop ActiveEnterTimestampMonotonic) - $(prop ExecMainStartTimestampMonotonic)) / 1000))
# The daemon's STATUS= follows its token: with a valid platform token it
# says where it came from and when it expires.
status_reflects_token() {
  status_line=$(prop StatusText)
  case $status_line in "token from platform, expires in "*"; platform ok") ;; *) return 1 ;; esac
}
wait_for 5 "StatusText showing the valid platform token (last: '$(prop StatusText)')" status_reflects_token
ok "READY: Type=notify unit active/running $ready_ms ms after exec (pid $main_pid); StatusText='$status_line'"

# ---- whose daemon, whose token ---------------------------------------------

proc_status=$(inside cat "/proc/$main_pid/status")
read -r _ ruid euid _ < <(grep '^Uid:' <<<"$proc_status")
[ "$ruid:$euid" = "$daemon_uid:$daemon_uid" ] ||
  fail "the daemon runs as uid $ruid/$euid, not molecule-credd ($daemon_uid)"
token=$(as_agent credd token) || fail "credd token failed for agent"
[ -n "$token" ] || fail "credd token printed nothing for agent"
# nobody_token SOCKET [EXTRA SETPRIV ARGS...]: credd token as uid 65534 on
# SOCKET, with no platform to fall back on; sets other and other_status.
nobody_token() {
  local path=$1
  shift
  set +e
  other=$(inside setpriv --reuid 65534 --regid 65534 --clear-groups "$@" env -i PATH=/usr/bin:/bin \
    CREDD_SOCKET="$path" PLATFORM_URL=http://127.0.0.1:9 CONFIGS_DIR=/nonexistent \
    /usr/local/bin/credd token 2>&1)
  other_status=$?
  set -e
  [ "$other_status" != 0 ] || fail "uid 65534 ($*) got a token from $path"
  ! grep -qF "$token" <<<"$other" || fail "uid 65534 ($*) saw the token"
}
nobody_token "$socket"
ok "the daemon runs as molecule-credd (uid $ruid); agent: credd token exits 0 with a ${#token}-character token; uid 65534: credd token exits $other_status, no token ($(head -n 1 <<<"$other" | cut -c 1-160))"
# The daemon's own check (--allow-uid \${CREDD_CLIENT_UID}): the same socket
# bind-mounted into a folder credd accepts (root's, 0700), and uid 65534
# past the file permissions (CAP_DAC_OVERRIDE). It reaches the daemon, whose
# peer-uid check refuses it.
inside install -d -m 0700 /run/credd-test-other
inside touch /run/credd-test-other/credd.sock
inside mount --bind "$socket" /run/credd-test-other/credd.sock || fail "cannot bind-mount the socket"
nobody_token /run/credd-test-other/credd.sock --inh-caps +dac_override --ambient-caps +dac_override
inside umount /run/credd-test-other/credd.sock
grep -qF forbidden <<<"$other" || fail "the daemon did not refuse uid 65534: $other"
ok "uid 65534 past the file permissions: the daemon refuses it, credd token exits $other_status, no token ($(head -n 1 <<<"$other" | cut -c 1-160))"

# ---- the sandbox, as the kernel sees the daemon ----------------------------

grep -qE '^NoNewPrivs:[[:space:]]+1$' <<<"$proc_status" || fail "NoNewPrivs is not 1"
grep -qE '^Seccomp:[[:space:]]+2$' <<<"$proc_status" || fail "no seccomp filter (Seccomp is not 2)"
cap_bnd=$(sed -n 's/^CapBnd:[[:space:]]*//p' <<<"$proc_status")
[ "$cap_bnd" = 0000000000000000 ] || fail "the capability bounding set is not empty: CapBnd=$cap_bnd"
cap_eff=$(sed -n 's/^CapEff:[[:space:]]*//p' <<<"$proc_status")
[ "$cap_eff" = 0000000000000000 ] || fail "the daemon has effective capabilities: CapEff=$cap_eff"
[ "$(inside readlink "/proc/$main_pid/ns/mnt")" != "$(inside readlink /proc/1/ns/mnt)" ] ||
  fail "the daemon shares PID 1's mount namespace (no mount sandbox)"
mountinfo=$(inside cat "/proc/$main_pid/mountinfo")
root_opts=$(awk '$5 == "/" { print $6 }' <<<"$mountinfo" | tail -n 1)
case ,$root_opts, in *,ro,*) ;; *) fail "/ is not read-only in the daemon's mountinfo ($root_opts)" ;; esac
in_ns() { inside nsenter -t "$main_pid" -m -- "$@"; }
in_ns test -d /usr || fail "cannot look into the daemon's mount namespace"
# As root there (test -w then sees only read-only mounts), then as the
# daemon's uid (mounts and permissions: ProtectSystem=strict leaves /run a
# writable mount, its modes keep the daemon out).
for path in /usr /etc /var /home/agent /configs /proc/sys /sys/fs/cgroup; do
  ! in_ns test -w "$path" || fail "$path is writable inside the service (a read-write mount)"
done
for path in /run /run/molecule-credd /var/lib /configs; do
  ! in_ns setpriv --reuid "$daemon_uid" --regid "$daemon_uid" --clear-groups test -w "$path" ||
    fail "$path is writable for molecule-credd inside the service"
done
in_ns test -r /configs/.auth_token || fail "/configs/.auth_token is not readable inside the service"
[ "$(in_ns stat -c %d:%i /tmp)" != "$(inside stat -c %d:%i /tmp)" ] || fail "/tmp is not private (PrivateTmp=)"
proc_opts=$(awk '$5 == "/proc"' <<<"$mountinfo" | tail -n 1)
grep -qF hidepid=invisible <<<"$proc_opts" || fail "/proc is not mounted hidepid=invisible (ProtectProc=): $proc_opts"
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
ok "sandbox on pid $main_pid: NoNewPrivs 1, Seccomp 2, CapBnd 0, CapEff 0, own mount namespace, / $root_opts; /usr /etc /var /home/agent /configs /proc/sys /sys/fs/cgroup on read-only mounts (test -w /usr fails even as root), /run /run/molecule-credd /var/lib /configs not writable for uid $daemon_uid, .auth_token readable, private /tmp, /proc hidepid=invisible, /dev only: $devices"

# ---- the watchdog ----------------------------------------------------------

restarts=$(prop NRestarts)
started=$(now_ms)
# (sh's kill builtin: the container has no procps.)
# shellcheck disable=SC2016  # expanded by that sh
inside sh -c 'kill -STOP "$1"' sh "$main_pid" || fail "cannot SIGSTOP pid $main_pid"
restarted() { [ "$(prop NRestarts)" -gt "$restarts" ] && [ "$(prop ActiveState)" = active ]; }
wait_for 20 "a watchdog restart after SIGSTOP" restarted
new_pid=$(prop MainPID)
if [ "$new_pid" -le 0 ] || [ "$new_pid" = "$main_pid" ]; then
  fail "no new MainPID after the restart ($new_pid)"
fi
restart_ms=$(($(now_ms) - started))
wait_for 10 "a valid token from the restarted daemon" token_valid
grep -qF "(pid $new_pid)" <<<"$status_text" || fail "the restarted daemon does not answer: $status_text"
wait_for 5 "the system manager logging the watchdog timeout" manager_logged "$service: Watchdog timeout"
ok "watchdog (WatchdogSec=4s drop-in): SIGSTOPped pid $main_pid replaced by pid $new_pid after $restart_ms ms, NRestarts $restarts -> $(prop NRestarts), valid token again"
main_pid=$new_pid

# ---- reload ----------------------------------------------------------------

calls() { as_agent credd status --json | status_platform_calls; }
before=$(calls)
[ -n "$before" ] || fail "credd status --json has no platform_calls"
ctl reload "$service" || fail "systemctl reload $service failed"
more_calls() { [ "$(calls)" -gt "$before" ]; }
wait_for 10 "a platform call after reload" more_calls
[ "$(prop MainPID)" = "$main_pid" ] || fail "reload restarted the daemon"
ok "systemctl reload: platform calls $before -> $(calls), same pid $main_pid"

# ---- stop ------------------------------------------------------------------

started=$(now_ms)
ctl stop "$service" molecule-credd.socket || fail "systemctl stop exited non-zero"
stop_ms=$(($(now_ms) - started))
! inside test -e "$socket" || fail "$socket is still there after stop"
[ "$(prop ActiveState)" = inactive ] || fail "$service is $(prop ActiveState) after stop"
[ "$(prop Result)" = success ] || fail "$service stopped with Result=$(prop Result)"
! inside test -e "/proc/$main_pid" || fail "pid $main_pid still runs after stop"
ok "stop: systemctl stop exited 0, both units inactive in $stop_ms ms, Result=success, pid $main_pid gone, $socket removed"
