# shellcheck shell=bash
# Sourced by the scripts that run the release binaries on loopback
# (run-dev.sh, bench-helper.sh, helper-budget.sh, idle-daemon.sh): a private
# work folder cleaned up at exit, and the platform in dev mode with one
# molecule-credd in front of it.
#
# make_work NAME
#   Sets work (a new private folder, credd-NAME.XXXXXX under TMPDIR) and
#   pids (empty); at exit every process in pids gets SIGTERM and is reaped,
#   after the caller's before_cleanup function if it defined one, and the
#   folder is removed. INT and TERM exit with 130 through the same path.
#
# start_dev_stack BIN_DIR CREDD TOKEN_TTL
#   BIN_DIR    folder holding molecule-platform and molecule-credd
#   CREDD      the credd binary used to ask whether the daemon answers
#   TOKEN_TTL  lifetime of the dev tokens (humantime: 60m, 2m, …)
# Uses the caller's $work (a private temporary folder) and appends every
# process it starts to the caller's pids array, for the caller's cleanup.
# Exports PLATFORM_URL, CONFIGS_DIR and CREDD_SOCKET and sets daemon_pid.
# shellcheck disable=SC2154  # work and pids belong to the caller

make_work() {
  work=$(mktemp -d "${TMPDIR:-/tmp}/credd-$1.XXXXXX")
  chmod 700 "$work"
  pids=()
  trap cleanup_work EXIT
  trap 'exit 130' INT TERM
}

cleanup_work() {
  if declare -F before_cleanup >/dev/null; then before_cleanup; fi
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}

start_dev_stack() {
  local bin=$1 credd=$2 ttl=$3 first_line
  # The platform prints its bound address as the first line of stdout.
  mkfifo "$work/platform.out"
  "$bin/molecule-platform" --dev --listen 127.0.0.1:0 --dev-token-ttl "$ttl" \
    --dev-auth-token-file "$work/configs/.auth_token" \
    >"$work/platform.out" 2>"$work/platform.log" &
  pids+=($!)
  exec 3<"$work/platform.out"
  if ! read -r -t 15 first_line <&3; then
    echo "error: molecule-platform did not start; its log:" >&2
    cat "$work/platform.log" >&2
    return 1
  fi
  # Keep draining the platform's stdout so it never blocks on a full pipe.
  cat <&3 >/dev/null &
  pids+=($!)

  export PLATFORM_URL=${first_line##* }
  export CONFIGS_DIR="$work/configs"
  export CREDD_SOCKET="$work/run/credd.sock"
  "$bin/molecule-credd" 2>"$work/daemon.log" &
  daemon_pid=$!
  pids+=("$daemon_pid")

  # Wait (bounded) until the daemon answers on its socket.
  local _
  for _ in $(seq 1 200); do
    "$credd" status >/dev/null 2>&1 && return 0
    if ! kill -0 "$daemon_pid" 2>/dev/null; then
      echo "error: molecule-credd exited; its log:" >&2
      cat "$work/daemon.log" >&2
      return 1
    fi
    sleep 0.05
  done
  echo "error: molecule-credd did not answer on $CREDD_SOCKET within 10 s; its log:" >&2
  cat "$work/daemon.log" >&2
  return 1
}
