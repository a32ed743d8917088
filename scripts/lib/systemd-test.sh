# shellcheck shell=bash
# What the two real-systemd test scripts share (test-systemd-user.sh,
# test-systemd-system.sh), and test-image.sh uses too: reporting, clocks,
# process and cgroup helpers, and bounded waits. Sourced, not run.
#
# A script that sources this defines `check_alive WHAT`: it fails the run
# (with WHAT in the message) when the systemd it drives has exited, so a wait
# never outlives the manager it waits on.

fail() {
  printf 'FAIL: %s\n' "$*" >&2
  exit 1
}
ok() { printf 'ok: %s\n' "$*"; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

# Is PID alive (a zombie child is not)?
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat:0:1}" != Z ]
}

# The cgroup hierarchies systemd needs: hybrid (name=systemd v1 plus
# unified v2) or pure cgroup v2.
cgroup_roots() {
  if [ -d /sys/fs/cgroup/systemd ] || [ -d /sys/fs/cgroup/unified ]; then
    local h
    for h in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified; do
      if [ -d "$h" ]; then echo "$h"; fi
    done
  elif [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ]; then
    echo /sys/fs/cgroup
  fi
}

# wait_for SECONDS WHAT CMD...: polls CMD until it succeeds, failing after
# SECONDS or as soon as the systemd under test exits (`check_alive`).
wait_for() {
  local seconds=$1 what=$2 deadline
  shift 2
  deadline=$(($(now_ms) + seconds * 1000))
  until "$@"; do
    check_alive "$what"
    [ "$(now_ms)" -lt "$deadline" ] || fail "$what: not within ${seconds}s"
    sleep 0.05
  done
}

# The default token's platform calls from `credd status --json` on stdin: the
# top-level key (`counters` holds another of that name, indented deeper).
status_platform_calls() { sed -n 's/^  "platform_calls": *\([0-9]*\).*/\1/p'; }
