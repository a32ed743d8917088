#!/bin/sh
# Workspace container entrypoint: make git and gh use a live GitHub token,
# then run the workspace's runtime command ("$@").
#
#   init phase  only as the container's PID 1 (the image's ENTRYPOINT): moves
#               the provision-time GITHUB_TOKEN/GH_TOKEN out of the
#               environment onto a pipe (fd 8) and execs tini without it
#               (PID 1 lives as long as the container, and its initial
#               environment stays readable in /proc/1/environ); tini runs
#               this script again. That run waits for the runtime instead of
#               exec'ing it, then stops the supervisor and its daemon and
#               exits with the runtime's status, so the daemon's shutdown is
#               finished before the container's PID 1 exits (when PID 1
#               exits, the kernel SIGKILLs every other process in the
#               container).
#   root phase  fix $CONFIGS_DIR ownership, write the agent's git helper
#               config (`credd configure-git`), drop to the agent user and
#               re-exec this script.
#   user phase  let molecule-credd check (and create) its socket folder
#               (`--prepare-socket`: the binary's own rules, never a
#               followed symlink; a refused folder is replaced by a private
#               mktemp folder), start the daemon under a supervisor (one per
#               socket, guarded by a lock; respawn with back-off, but not
#               after a configuration error), hand the first daemon the
#               provision-time GITHUB_TOKEN/GH_TOKEN on a pipe, wait up to
#               ~5 s for its socket to answer, remove GITHUB_TOKEN/GH_TOKEN
#               from the runtime's environment, put the gh wrapper first on
#               PATH, exec the runtime.
#   supervisor  exec'd with GITHUB_TOKEN/GH_TOKEN removed from its
#               environment (a process's initial environment stays readable
#               in /proc/PID/environ for its whole life, and this one lives
#               as long as the container): it passes the token pipe to the
#               first daemon only and never reads it.
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
#   CREDD_TINI             tini, exec'd by the init phase  [/usr/bin/tini]
#   CREDD_ENTRYPOINT_STAGE `user` skips the root phase, `supervise` runs the
#                          supervisor, `root` skips the init phase (all set
#                          by this script itself when it re-executes)
#   CREDD_SOCKET, CREDD_HOSTS, CONFIGS_DIR, PLATFORM_URL, WORKSPACE_ID: see credd
#
# Sealed mode (CREDD_SEALED=1, root phase only; see workspace-template/README.md):
#   the daemon runs under CREDD_DAEMON_USER [credd] with --sealed and its
#   credential gateway on CREDD_GATEWAY [127.0.0.1:8119]; CONFIGS_DIR (the
#   bearer, and every copy rotated in later) and the socket folder under
#   CREDD_SEALED_DIR [/run/molecule-credd-sealed] belong to that user, mode
#   0700: the agent cannot traverse them. The agent reaches the daemon's
#   status and metrics on CREDD_AGENT_SOCKET_DIR [/run/molecule-credd-agent]
#   /credd.sock, a folder of its own that root binds the socket in and hands
#   to the daemon (molecule-credd --bind-socket-for, socket activation); the
#   daemon refuses it every token. The gateway's CA certificate is
#   written to CREDD_GATEWAY_CA [/run/molecule-credd-ca/gateway-ca.pem].
#   git gets per-URL proxy and CA settings for each CREDD_HOSTS host and no
#   credential helper for them; the gh wrapper runs gh through the gateway
#   with a placeholder token. Nothing else is proxied. If sealing cannot be
#   arranged, the runtime starts without any token (never unsealed); so it
#   does when the entrypoint runs sealed but not as root (no daemon of the
#   caller's uid is started).
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
# molecule-credd's exit code for a configuration it refuses (bad variable,
# unsafe socket folder): restarting cannot help.
CONFIG_ERROR=2
# molecule-credd --prepare-socket's exit code for a socket folder it refuses.
FOLDER_REFUSED=3

# sleep_backoff SECONDS: sleeps between SECONDS/2 and SECONDS (full jitter on
# the upper half), so respawning workspaces do not move in step.
sleep_backoff() {
    rnd=$(od -An -N2 -tu2 /dev/urandom 2>/dev/null | tr -d ' ') || rnd=0
    ms=$(($1 * 500 + ${rnd:-0} % ($1 * 500 + 1)))
    sleep "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"
}

# stop_supervisor: the supervisor's SIGTERM/SIGINT: stops the daemon and
# returns only once it has exited (a second signal interrupts `wait`, not the
# loop), so whoever waits for the supervisor waits for the daemon's shutdown.
# shellcheck disable=SC2317  # run by the trap
stop_supervisor() {
    if [ -n "$daemon_pid" ]; then
        kill -TERM "$daemon_pid" 2>/dev/null
        while kill -0 "$daemon_pid" 2>/dev/null; do
            wait "$daemon_pid"
        done
    fi
    rm -f "$RUN_DIR/molecule-credd.pid" "$RUN_DIR/supervisor.pid"
    exit 0
}

# run_runtime CMD…: the workspace's runtime as the container's main process.
# Without a supervisor to stop with it (CREDD_STOP_WITH_RUNTIME unset, or no
# supervisor), CMD replaces this shell. Under tini (the init phase) CMD runs
# in the foreground (tini -g signals it directly; the traps only keep this
# shell alive meanwhile), then the supervisor is stopped and waited for: it
# returns once the daemon has logged "stopped". Then CMD's status is the
# container's.
run_runtime() {
    if [ "$stop_with_runtime" != 1 ] || [ -z "$supervisor_pid" ]; then
        exec "$@"
    fi
    trap ':' TERM INT HUP
    "$@"
    status=$?
    kill -TERM "$supervisor_pid" 2>/dev/null
    while kill -0 "$supervisor_pid" 2>/dev/null; do
        wait "$supervisor_pid"
    done
    exit "$status"
}

# The supervisor (stage `supervise`): runs in the background with the lock on
# fd 9 for its whole life. Its stdin is the bootstrap token pipe, handed to
# the first daemon only; later daemons get an empty stdin (the provision-time
# token is never handed out twice, and respawns do not need it).
supervise() {
    handed_socket=
    if [ "${LISTEN_FDS:-}" = 1 ]; then
        # The socket `molecule-credd --bind-socket-for` bound (on fd 3): held
        # on fd 4 for the supervisor's life, given to each daemon as fd 3.
        exec 4<&3 3<&-
        unset LISTEN_FDS LISTEN_PID LISTEN_FDNAMES
        handed_socket=1
    fi
    exec 3<&0 </dev/null
    delay=$BACKOFF_INITIAL
    daemon_pid=
    trap stop_supervisor TERM INT
    # SIGHUP is the daemon's "refresh now": passed on, never an exit.
    trap 'if [ -n "$daemon_pid" ]; then kill -HUP "$daemon_pid" 2>/dev/null; fi' HUP
    set --
    if [ "${CREDD_SEALED:-}" = 1 ]; then
        # (Unsealed, launch_supervisor took the lock before exec'ing us.)
        exec 9>>"$RUN_DIR/supervisor.lock"
        if ! flock -n 9; then
            log "molecule-credd is already supervised for $CREDD_SOCKET"
            exit 0
        fi
        set -- --sealed --gateway "$CREDD_GATEWAY" --gateway-ca-file "$CREDD_GATEWAY_CA" \
            --allow-uid "$CREDD_AGENT_UID"
    fi
    # Only once the lock is ours: a second entrypoint run (docker exec) must
    # not overwrite the running supervisor's pid.
    echo "$$" >"$RUN_DIR/supervisor.pid"
    while :; do
        started=$(date +%s)
        if [ -n "$handed_socket" ]; then
            # Socket activation: LISTEN_PID must be the daemon's own pid, so
            # a shell sets it to its $$ and execs the daemon (same pid).
            # shellcheck disable=SC2016
            LISTEN_FDS=1 LISTEN_FDNAMES=credd sh -c 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"' \
                molecule-credd "$DAEMON" --bootstrap-from-stdin "$@" <&3 3<&4 4<&- 9>&- &
        else
            "$DAEMON" --bootstrap-from-stdin "$@" <&3 3<&- 9>&- &
        fi
        daemon_pid=$!
        exec 3</dev/null
        echo "$daemon_pid" >"$RUN_DIR/molecule-credd.pid"
        # A trapped SIGHUP interrupts `wait` while the daemon lives on.
        while :; do
            wait "$daemon_pid"
            status=$?
            kill -0 "$daemon_pid" 2>/dev/null || break
        done
        daemon_pid=
        if [ "$status" -eq "$CONFIG_ERROR" ]; then
            error "molecule-credd refused its configuration (exit $status, reason above); not restarting it"
            rm -f "$RUN_DIR/molecule-credd.pid" "$RUN_DIR/supervisor.pid"
            exit 0
        fi
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

if [ "${CREDD_ENTRYPOINT_STAGE:-}" = supervise ]; then
    unset CREDD_ENTRYPOINT_STAGE
    supervise
    exit 0
fi

if [ "$#" -eq 0 ]; then
    error "no runtime command given: usage: entrypoint.sh COMMAND [ARGS...]"
    exit 2
fi

script=$(cd "$(dirname "$0")" && pwd -P)/$(basename "$0")

# ---------------------------------------------------------------------------
# Init phase (the container's PID 1)
# ---------------------------------------------------------------------------
if [ "$$" -eq 1 ] && [ -z "${CREDD_ENTRYPOINT_STAGE:-}" ]; then
    TINI=${CREDD_TINI:-/usr/bin/tini}
    if [ -x "$TINI" ]; then
        # Left on fd 8 for the first daemon. A here-document is a pipe in
        # dash (no file), and the value reaches no argv.
        exec 8<<EOF
${GITHUB_TOKEN:-${GH_TOKEN:-}}
EOF
        # -g: tini sends its signals to the whole process group (the
        # runtime, the supervisor and the daemon each get docker stop's
        # SIGTERM).
        exec env -u GITHUB_TOKEN -u GH_TOKEN CREDD_ENTRYPOINT_STAGE=root \
            CREDD_TOKEN_FD=8 CREDD_STOP_WITH_RUNTIME=1 \
            "$TINI" -g -- /bin/sh "$script" "$@"
    fi
    error "tini not found at $TINI (set CREDD_TINI): running without an init; the provision-time token stays in /proc/1/environ"
fi

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
# Sealed root phase (CREDD_SEALED=1): the daemon under a uid of its own, the
# bearer and the socket out of the agent's reach, the tools pointed at the
# gateway; then the runtime as the agent.
# ---------------------------------------------------------------------------
DAEMON_USER=${CREDD_DAEMON_USER:-credd}
SEALED_DIR=${CREDD_SEALED_DIR:-/run/molecule-credd-sealed}
AGENT_SOCKET_DIR=${CREDD_AGENT_SOCKET_DIR:-/run/molecule-credd-agent}
GATEWAY=${CREDD_GATEWAY:-127.0.0.1:8119}
GATEWAY_CA=${CREDD_GATEWAY_CA:-/run/molecule-credd-ca/gateway-ca.pem}
# What gh is given instead of a token: the gateway replaces it.
GH_PLACEHOLDER=sealed-by-molecule-credd

# as_user UID GID HOME CMD...: CMD as that user, with that HOME.
as_user() {
    as_uid=$1 as_gid=$2 as_home=$3
    shift 3
    HOME=$as_home setpriv --reuid="$as_uid" --regid="$as_gid" --init-groups -- "$@"
}

# private_dir PATH UID GID MODE: PATH as a real folder (never a followed
# symlink) owned by UID:GID with MODE.
private_dir() {
    if [ -L "$1" ]; then
        error "$1 is a symbolic link: refusing it"
        return 1
    fi
    mkdir -p "$1" && chown "$2:$3" "$1" && chmod "$4" "$1" && [ ! -L "$1" ]
}

sealed_root_phase() {
    if ! command -v setpriv >/dev/null 2>&1 || ! command -v flock >/dev/null 2>&1; then
        error "sealed mode needs setpriv and flock (util-linux)"
        return 1
    fi
    if ! agent_uid=$(id -u "$AGENT_USER" 2>/dev/null); then
        error "user $AGENT_USER does not exist"
        return 1
    fi
    agent_gid=$(id -g "$AGENT_USER")
    agent_home=$(getent passwd "$AGENT_USER" | cut -d: -f6)
    agent_home=${agent_home:-/home/$AGENT_USER}
    if ! daemon_uid=$(id -u "$DAEMON_USER" 2>/dev/null); then
        error "sealed mode: the daemon's user $DAEMON_USER does not exist (set CREDD_DAEMON_USER)"
        return 1
    fi
    daemon_gid=$(id -g "$DAEMON_USER")
    if [ "$daemon_uid" -eq 0 ] || [ "$daemon_uid" -eq "$agent_uid" ]; then
        error "sealed mode: $DAEMON_USER must be neither root nor $AGENT_USER"
        return 1
    fi
    # The bearer (and every copy the platform rotates in later): only the
    # daemon's uid may traverse the folder.
    if [ -d "$CONFIGS" ]; then
        if ! chown -R "$daemon_uid:$daemon_gid" "$CONFIGS" || ! chmod 0700 "$CONFIGS"; then
            error "could not give $CONFIGS to $DAEMON_USER"
            return 1
        fi
    fi
    private_dir "$SEALED_DIR" "$daemon_uid" "$daemon_gid" 0700 || return 1
    ca_dir=$(dirname "$GATEWAY_CA")
    private_dir "$ca_dir" "$daemon_uid" "$daemon_gid" 0755 || return 1
    RUN_DIR=$SEALED_DIR/run
    CREDD_SOCKET=$RUN_DIR/credd.sock
    export CREDD_SOCKET
    # The agent's socket: in a folder of the agent's own, bound by root (see
    # launch_sealed_supervisor).
    private_dir "$AGENT_SOCKET_DIR" "$agent_uid" "$agent_gid" 0700 || return 1
    agent_socket=$AGENT_SOCKET_DIR/credd.sock
    if ! as_user "$daemon_uid" "$daemon_gid" "$SEALED_DIR" "$DAEMON" --prepare-socket >/dev/null; then
        error "sealed mode: molecule-credd --prepare-socket refused $CREDD_SOCKET"
        return 1
    fi
    # The token pipe goes to the first daemon only (see launch_supervisor).
    # A second run (docker exec … workspace-entrypoint) finds the supervisor
    # holding its lock and starts nothing: the socket is bound already.
    if [ -e "$RUN_DIR/supervisor.lock" ] && ! flock -n "$RUN_DIR/supervisor.lock" true; then
        :
    elif [ "${CREDD_TOKEN_FD:-}" = 8 ]; then
        launch_sealed_supervisor <&8 &
        supervisor_pid=$!
    else
        printf '%s\n' "${GITHUB_TOKEN:-${GH_TOKEN:-}}" | launch_sealed_supervisor &
        supervisor_pid=$!
    fi
    tries=50
    until as_user "$agent_uid" "$agent_gid" "$agent_home" \
        env CREDD_SOCKET="$agent_socket" "$CREDD" status >/dev/null 2>&1 &&
        [ -s "$GATEWAY_CA" ]; do
        tries=$((tries - 1))
        if [ "$tries" -le 0 ]; then
            error "sealed mode: molecule-credd did not answer within 5s"
            break
        fi
        sleep 0.1
    done
    # From here on (the runtime, as the agent): the agent's socket.
    CREDD_SOCKET=$agent_socket
    # git: the gateway for each GitHub host, and no credential helper there
    # (an empty helper value resets the list: git never prompts or asks
    # another helper for these hosts).
    hosts=$(printf '%s' "${CREDD_HOSTS:-github.com}" | tr ',' ' ')
    for host in $hosts; do
        url="https://$host/"
        for setting in "http.$url.proxy=http://$GATEWAY" "http.$url.sslCAInfo=$GATEWAY_CA" \
            "credential.$url.helper="; do
            if ! as_user "$agent_uid" "$agent_gid" "$agent_home" \
                git config --global "${setting%%=*}" "${setting#*=}"; then
                error "could not configure git for $host"
            fi
        done
    done
    return 0
}

# launch_sealed_supervisor: with the token pipe on stdin, execs the
# supervisor as the daemon's user (meant to run in the background).
launch_sealed_supervisor() {
    exec 8<&-
    exec "$DAEMON" --socket "$agent_socket" --bind-socket-for "$agent_uid" -- \
        setpriv --reuid="$daemon_uid" --regid="$daemon_gid" --init-groups -- \
        env -u GITHUB_TOKEN -u GH_TOKEN -u CREDD_TOKEN_FD -u CREDD_STOP_WITH_RUNTIME \
        HOME="$SEALED_DIR" CREDD_ENTRYPOINT_STAGE=supervise RUN_DIR="$RUN_DIR" \
        CREDD_SEALED=1 CREDD_GATEWAY="$GATEWAY" CREDD_GATEWAY_CA="$GATEWAY_CA" \
        CREDD_AGENT_UID="$agent_uid" /bin/sh "$script" supervise 3<&-
}

if [ "${CREDD_SEALED:-}" = 1 ] && [ "$(id -u)" -eq 0 ] && [ "${CREDD_ENTRYPOINT_STAGE:-}" != user ]; then
    unset CREDD_ENTRYPOINT_STAGE
    umask 077
    supervisor_pid=
    agent_uid=
    if ! sealed_root_phase; then
        error "sealed mode could not be arranged: the workspace runs without any GitHub token"
    fi
    if [ "${CREDD_TOKEN_FD:-}" = 8 ]; then
        exec 8<&-
    fi
    stop_with_runtime=${CREDD_STOP_WITH_RUNTIME:-}
    unset CREDD_TOKEN_FD CREDD_STOP_WITH_RUNTIME GITHUB_TOKEN GH_TOKEN CREDD_SEALED
    if [ -z "$agent_uid" ]; then
        error "no agent user: not running the workspace as root in sealed mode"
        exit 1
    fi
    export HOME="$agent_home" USER="$AGENT_USER" LOGNAME="$AGENT_USER"
    unset XDG_RUNTIME_DIR
    # The gh wrapper reads these (gh alone goes through the gateway).
    export CREDD_GH_SEALED=1 CREDD_GATEWAY="$GATEWAY" CREDD_GATEWAY_CA="$GATEWAY_CA" \
        CREDD_GH_PLACEHOLDER="$GH_PLACEHOLDER"
    if [ -x "$GH_WRAPPER_DIR/gh" ]; then
        PATH=$GH_WRAPPER_DIR:$PATH
        export PATH
    fi
    umask 022
    run_runtime setpriv --reuid="$agent_uid" --regid="$agent_gid" --init-groups -- "$@"
fi

# Sealed but not root (`docker exec -u agent …`, `docker run --user …`):
# sealing can only be arranged as root, and the user phase would start a
# daemon of this uid, handing it the provision-time token, where this uid
# can read it. So no daemon: the tokens are dropped and the runtime runs
# with the tools pointed at the gateway (if the root entrypoint started one).
if [ "${CREDD_SEALED:-}" = 1 ] && [ "$(id -u)" -ne 0 ]; then
    error "sealed mode: not started as root, so no daemon is started by uid $(id -u) (the runtime gets no token)"
    if [ "${CREDD_TOKEN_FD:-}" = 8 ]; then
        exec 8<&-
    fi
    unset CREDD_TOKEN_FD CREDD_STOP_WITH_RUNTIME GITHUB_TOKEN GH_TOKEN CREDD_SEALED CREDD_ENTRYPOINT_STAGE
    export CREDD_GH_SEALED=1 CREDD_GATEWAY="$GATEWAY" CREDD_GATEWAY_CA="$GATEWAY_CA" \
        CREDD_GH_PLACEHOLDER="$GH_PLACEHOLDER"
    # The agent's socket (status and metrics), when the root phase made it.
    if [ -S "$AGENT_SOCKET_DIR/credd.sock" ]; then
        CREDD_SOCKET=$AGENT_SOCKET_DIR/credd.sock
        export CREDD_SOCKET
    fi
    if [ -x "$GH_WRAPPER_DIR/gh" ]; then
        PATH=$GH_WRAPPER_DIR:$PATH
        export PATH
    fi
    exec "$@"
fi

# ---------------------------------------------------------------------------
# Root phase
# ---------------------------------------------------------------------------
if [ "$(id -u)" -eq 0 ] && [ "${CREDD_ENTRYPOINT_STAGE:-}" != user ]; then
    unset CREDD_ENTRYPOINT_STAGE
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

# The socket: asked of molecule-credd itself (`--prepare-socket` applies the
# daemon's path and folder rules and creates the folder), made explicit so
# every process of the workspace agrees. A folder it refuses (another user
# created it first, a planted symlink) is never used or exported: a fresh
# private folder from mktemp takes its place.
prepare_socket() {
    "$DAEMON" --prepare-socket 2>"${1:-/dev/null}"
}

resolve_socket() {
    if [ ! -x "$DAEMON" ]; then
        return 1
    fi
    reason_file=$(mktemp) || return 1
    path=$(prepare_socket "$reason_file")
    prepared=$?
    reason=$(head -c 600 "$reason_file" | tr '\n' ' ')
    rm -f "$reason_file"
    if [ "$prepared" -eq 0 ]; then
        CREDD_SOCKET=$path
        return 0
    fi
    error "molecule-credd --prepare-socket: $reason"
    # 3: the folder is refused; anything else is a configuration error that
    # another folder cannot fix.
    if [ "$prepared" -ne "$FOLDER_REFUSED" ] || [ -n "${CREDD_SOCKET:-}" ]; then
        # An operator's explicit choice is theirs to fix.
        unset CREDD_SOCKET
        return 1
    fi
    if private=$(mktemp -d "${TMPDIR:-/tmp}/molecule-credd-$(id -u).XXXXXXXX") &&
        path=$(CREDD_SOCKET=$private/credd.sock prepare_socket); then
        log "using the private socket folder $private instead"
        CREDD_SOCKET=$path
        return 0
    fi
    unset CREDD_SOCKET
    return 1
}

if resolve_socket; then
    export CREDD_SOCKET
    RUN_DIR=$(dirname "$CREDD_SOCKET")
else
    RUN_DIR=
fi
export CREDD_BIN_DIR="$BIN_DIR"

daemon_answers() {
    "$CREDD" status >/dev/null 2>&1
}

start_daemon() {
    if [ ! -x "$DAEMON" ]; then
        error "molecule-credd not found at $DAEMON (set CREDD_BIN_DIR): git falls back to the next helper"
        return 1
    fi
    if [ -z "$RUN_DIR" ]; then
        error "no usable folder for the daemon's socket (see above): git falls back to the platform, then the next helper"
        return 1
    fi
    if ! command -v flock >/dev/null 2>&1; then
        error "flock is not installed: cannot guard the daemon against a second instance; not starting it"
        return 1
    fi
    # The token goes down a pipe: the init phase's (fd 8), or one fed here
    # (printf is a shell builtin: no argv); the supervisor is exec'd without
    # it in its environment.
    if [ "${CREDD_TOKEN_FD:-}" = 8 ]; then
        launch_supervisor <&8 &
    else
        printf '%s\n' "${GITHUB_TOKEN:-${GH_TOKEN:-}}" | launch_supervisor &
    fi
    supervisor_pid=$!
}

# launch_supervisor: with the token pipe on stdin, execs the supervisor
# (meant to run in the background: it becomes the supervisor's process).
launch_supervisor() {
    exec 8<&-
    # Lock held until the supervisor exits; busy = another one runs.
    # The folder was checked by --prepare-socket: ours, 0700, no symlink.
    exec 9>>"$RUN_DIR/supervisor.lock"
    if ! flock -n 9; then
        log "molecule-credd is already supervised for $CREDD_SOCKET"
        exit 0
    fi
    exec env -u GITHUB_TOKEN -u GH_TOKEN -u CREDD_TOKEN_FD -u CREDD_STOP_WITH_RUNTIME \
        CREDD_ENTRYPOINT_STAGE=supervise RUN_DIR="$RUN_DIR" /bin/sh "$script" supervise
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

supervisor_pid=
if start_daemon; then
    wait_for_daemon && log "molecule-credd answers on $CREDD_SOCKET"
fi
# The token pipe is the first daemon's; nobody else keeps it open.
if [ "${CREDD_TOKEN_FD:-}" = 8 ]; then
    exec 8<&-
fi
stop_with_runtime=${CREDD_STOP_WITH_RUNTIME:-}
unset CREDD_TOKEN_FD CREDD_STOP_WITH_RUNTIME

# The runtime never sees the provision-time token: it dies within the hour,
# and gh prefers GH_TOKEN over anything else.
unset GITHUB_TOKEN GH_TOKEN

if [ -x "$GH_WRAPPER_DIR/gh" ]; then
    PATH=$GH_WRAPPER_DIR:$PATH
    export PATH
else
    error "gh wrapper not found at $GH_WRAPPER_DIR/gh (set CREDD_GH_WRAPPER_DIR): gh will not get a live token"
fi

run_runtime "$@"
