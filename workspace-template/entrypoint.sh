#!/bin/sh
# Workspace container entrypoint: make git and gh use a live GitHub token,
# then run the workspace's runtime command ("$@").
#
#   root phase  fix $CONFIGS_DIR ownership, write the agent's git helper
#               config (`credd configure-git`), drop to the agent user and
#               re-exec this script.
#   user phase  start molecule-credd under a supervisor (one per socket,
#               guarded by a lock; respawn with back-off), hand it the
#               provision-time GITHUB_TOKEN/GH_TOKEN as bootstrap, wait up to
#               ~5 s for its socket to answer, remove GITHUB_TOKEN/GH_TOKEN
#               from the runtime's environment, put the gh wrapper first on
#               PATH, exec the runtime.
#
# Anything missing is one ERROR line on stderr and the runtime still starts
# (git then falls through to the fallback helper). Idempotent: a second run
# rewrites the same git config and starts no second daemon.
#
# Environment (all optional):
#   CREDD_BIN_DIR          where credd and molecule-credd are  [/usr/local/bin]
#   CREDD_GH_WRAPPER_DIR   folder holding the gh wrapper       [/usr/local/lib/molecule-credd/bin]
#   CREDD_AGENT_USER       account the runtime runs as (root phase) [agent]
#   CREDD_FALLBACK_HELPER  git credential helper asked after credd
#   CREDD_ENTRYPOINT_STAGE `user` skips the root phase (set by this script
#                          itself when it re-executes after the privilege drop)
#   CREDD_SOCKET, CREDD_HOSTS, CONFIGS_DIR, PLATFORM_URL, WORKSPACE_ID: see credd
set -u

log() { printf 'entrypoint: %s\n' "$*" >&2; }
error() { printf 'entrypoint: ERROR: %s\n' "$*" >&2; }

BIN_DIR=${CREDD_BIN_DIR:-/usr/local/bin}
CREDD=$BIN_DIR/credd
DAEMON=$BIN_DIR/molecule-credd
GH_WRAPPER_DIR=${CREDD_GH_WRAPPER_DIR:-/usr/local/lib/molecule-credd/bin}
AGENT_USER=${CREDD_AGENT_USER:-agent}
CONFIGS=${CONFIGS_DIR:-/configs}
# First respawn delay and cap, in seconds; a daemon that ran this long is
# considered healthy again and the delay starts over.
BACKOFF_INITIAL=1
BACKOFF_MAX=30
HEALTHY_RUN=60
# The daemon serves the bootstrap token at most this long after the *first*
# start (its --bootstrap-max-age default); respawns get what is left of it.
BOOTSTRAP_MAX_AGE=3000

if [ "$#" -eq 0 ]; then
    error "no runtime command given: usage: entrypoint.sh COMMAND [ARGS...]"
    exit 2
fi

script=$(cd "$(dirname "$0")" && pwd -P)/$(basename "$0")

have_credd() {
    if [ -x "$CREDD" ]; then
        return 0
    fi
    error "credd not found at $CREDD (set CREDD_BIN_DIR): git will not use the token daemon"
    return 1
}

# configure_git [PREFIX...]: writes the git helper list for every
# CREDD_HOSTS host into $HOME's git config, running credd under PREFIX (the
# privilege drop) when given.
configure_git() {
    have_credd || return 1
    set -- "$@" "$CREDD" configure-git
    if [ -n "${CREDD_FALLBACK_HELPER:-}" ]; then
        set -- "$@" --fallback-helper "$CREDD_FALLBACK_HELPER"
    fi
    if ! "$@" >/dev/null; then
        error "credd configure-git failed for $HOME: git may not ask the token daemon"
        return 1
    fi
}

# ---------------------------------------------------------------------------
# Root phase
# ---------------------------------------------------------------------------
if [ "$(id -u)" -eq 0 ] && [ "${CREDD_ENTRYPOINT_STAGE:-}" != user ]; then
    if agent_uid=$(id -u "$AGENT_USER" 2>/dev/null); then
        agent_gid=$(id -g "$AGENT_USER")
        agent_home=$(getent passwd "$AGENT_USER" | cut -d: -f6)
        if [ -d "$CONFIGS" ]; then
            chown -R "$agent_uid:$agent_gid" "$CONFIGS" ||
                error "could not give $CONFIGS to $AGENT_USER: the daemon may not read .auth_token"
        fi
        if command -v setpriv >/dev/null 2>&1; then
            export HOME="${agent_home:-/home/$AGENT_USER}" USER="$AGENT_USER" LOGNAME="$AGENT_USER"
            # Root's runtime folder is not the agent's.
            unset XDG_RUNTIME_DIR
            # Written as the agent, into the agent's home: the file is theirs.
            if configure_git setpriv --reuid="$agent_uid" --regid="$agent_gid" --init-groups --; then
                export CREDD_GIT_CONFIGURED=1
            fi
            export CREDD_ENTRYPOINT_STAGE=user
            exec setpriv --reuid="$agent_uid" --regid="$agent_gid" --init-groups -- \
                /bin/sh "$script" "$@"
        fi
        error "setpriv is not installed: cannot drop to $AGENT_USER; running the workspace as root"
    else
        error "user $AGENT_USER does not exist: running the workspace as root"
    fi
fi

# ---------------------------------------------------------------------------
# User phase (the agent, or whoever started us when not root)
# ---------------------------------------------------------------------------
umask 077
if [ "${CREDD_GIT_CONFIGURED:-}" != 1 ]; then
    configure_git
fi
unset CREDD_ENTRYPOINT_STAGE CREDD_GIT_CONFIGURED

# The socket: the same default credd and molecule-credd compute, made
# explicit so every process of the workspace agrees.
if [ -z "${CREDD_SOCKET:-}" ]; then
    case "${XDG_RUNTIME_DIR:-}" in
    /*) CREDD_SOCKET=$XDG_RUNTIME_DIR/molecule-credd/credd.sock ;;
    *) CREDD_SOCKET=/tmp/molecule-credd-$(id -u)/credd.sock ;;
    esac
fi
export CREDD_SOCKET CREDD_BIN_DIR="$BIN_DIR"
RUN_DIR=$(dirname "$CREDD_SOCKET")

daemon_answers() {
    "$CREDD" status >/dev/null 2>&1
}

# sleep_backoff SECONDS: sleeps between SECONDS/2 and SECONDS (full jitter on
# the upper half), so respawning workspaces do not move in step.
sleep_backoff() {
    rnd=$(od -An -N2 -tu2 /dev/urandom 2>/dev/null | tr -d ' ') || rnd=0
    ms=$(($1 * 500 + ${rnd:-0} % ($1 * 500 + 1)))
    sleep "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"
}

# The supervisor: runs in the background with the lock on fd 9 for its whole
# life; the daemon gets the bootstrap token through its environment only.
supervise() {
    first_start=$(date +%s)
    delay=$BACKOFF_INITIAL
    daemon_pid=
    trap 'if [ -n "$daemon_pid" ]; then kill -TERM "$daemon_pid" 2>/dev/null; wait "$daemon_pid"; fi; rm -f "$RUN_DIR/molecule-credd.pid" "$RUN_DIR/supervisor.pid"; exit 0' TERM INT HUP
    sh -c 'echo "$PPID"' >"$RUN_DIR/supervisor.pid"
    while :; do
        started=$(date +%s)
        left=$((BOOTSTRAP_MAX_AGE - (started - first_start)))
        if [ "$left" -le 0 ]; then
            # The provision-time token is dead by now: never hand it out again.
            unset GITHUB_TOKEN GH_TOKEN
            left=1
        fi
        "$DAEMON" --bootstrap-max-age "${left}s" </dev/null 9>&- &
        daemon_pid=$!
        echo "$daemon_pid" >"$RUN_DIR/molecule-credd.pid"
        wait "$daemon_pid"
        status=$?
        daemon_pid=
        if [ $(($(date +%s) - started)) -ge "$HEALTHY_RUN" ]; then
            delay=$BACKOFF_INITIAL
        fi
        log "molecule-credd exited (status $status); restarting in about ${delay}s"
        sleep_backoff "$delay"
        delay=$((delay * 2))
        if [ "$delay" -gt "$BACKOFF_MAX" ]; then
            delay=$BACKOFF_MAX
        fi
    done
}

start_daemon() {
    if [ ! -x "$DAEMON" ]; then
        error "molecule-credd not found at $DAEMON (set CREDD_BIN_DIR): git falls back to the next helper"
        return 1
    fi
    # Created 0700 (umask 077); the daemon itself refuses a folder that is
    # someone else's or open to others, so it is not chmod'ed here.
    if ! mkdir -p "$RUN_DIR" 2>/dev/null || [ ! -O "$RUN_DIR" ]; then
        error "cannot use $RUN_DIR for the daemon's socket (not creatable, or owned by someone else): set CREDD_SOCKET"
        return 1
    fi
    if ! command -v flock >/dev/null 2>&1; then
        error "flock is not installed: cannot guard the daemon against a second instance; not starting it"
        return 1
    fi
    (
        # Lock held until the supervisor exits; busy = another one runs.
        exec 9>>"$RUN_DIR/supervisor.lock"
        if ! flock -n 9; then
            log "molecule-credd is already supervised for $CREDD_SOCKET"
            exit 0
        fi
        supervise
    ) </dev/null &
}

wait_for_daemon() {
    have_credd || return 1
    tries=50
    while [ "$tries" -gt 0 ]; do
        if daemon_answers; then
            return 0
        fi
        tries=$((tries - 1))
        sleep 0.1
    done
    error "molecule-credd did not answer on $CREDD_SOCKET within 5s: git falls back to the next helper"
    return 1
}

if start_daemon; then
    wait_for_daemon && log "molecule-credd answers on $CREDD_SOCKET"
fi

# The runtime never sees the provision-time token: it dies within the hour,
# and gh prefers GH_TOKEN over anything else.
unset GITHUB_TOKEN GH_TOKEN

if [ -x "$GH_WRAPPER_DIR/gh" ]; then
    PATH=$GH_WRAPPER_DIR:$PATH
    export PATH
else
    error "gh wrapper not found at $GH_WRAPPER_DIR/gh (set CREDD_GH_WRAPPER_DIR): gh will not get a live token"
fi

exec "$@"
