#!/usr/bin/env bash
# Builds the workspace image (workspace-template/Dockerfile) with a dockerd of
# its own and runs it, checking what workspace-template/README.md claims: the
# entrypoint drops to `agent`, `credd status` shows a valid token, git and the
# gh wrapper get the daemon's token, no process keeps GH_TOKEN/GITHUB_TOKEN,
# the runtime's exit code is the container's, a killed daemon is respawned,
# and `docker stop` lets the daemon finish its shutdown. Then the same image
# sealed (CREDD_SEALED=1): the daemon runs as the image's `credd` account
# (no shell, no home, no password, no sudo); as the agent, git clone and push
# and `gh api` work through the daemon's credential gateway against a TLS
# stand-in of github.com and api.github.com, which sees the daemon's token;
# `credd token` is refused in one line; the bearer is unreadable; no process
# of the agent's uid holds the token.
#
#   scripts/test-image.sh      # as root; CI runs it (.ci/run)
#
# Needs root, docker.io (dockerd, docker, containerd, runc), debootstrap,
# python3, openssl, git, util-linux; Debian's package mirror (debootstrap and the image's
# apt-get) and the crate registry (scripts/build-release.sh). No container
# registry is used:
#   - the base image is Debian 13 (trixie) minbase made by debootstrap from
#     $DEBIAN_MIRROR, slimmed like debian:trixie-slim, kept as a tarball in
#     $IMAGE_TEST_CACHE (default /var/cache/molecule-credd-test) and given to
#     `docker import`; it is RUNTIME_BASE;
#   - the binaries come from scripts/build-release.sh on this machine
#     (BINARIES=prebuilt: the Dockerfile's rust build stage is not run, it
#     needs the rust image from a registry);
#   - the build's apt-get runs with `--network host`.
# dockerd runs with --storage-driver vfs, its own data root, exec root,
# pidfile and socket in a per-run folder beside the cache, with
# --iptables=false and --bridge=none: it makes no bridge and no iptables
# rules, and the containers use the host's network (--network host), where
# molecule-platform --dev and a GitHub API stand-in listen on 127.0.0.1. At
# exit it is stopped and the folder removed; a run killed before that is
# swept by the next. One `ok: …` line per check, durations per step; the
# first check that does not hold prints `FAIL: …` with the logs and exits 1.
# RELEASE_BIN=DIR takes molecule-credd, credd and molecule-platform from DIR
# instead of running scripts/build-release.sh (for iterating); KEEP_LOGS=DIR
# copies the logs to DIR at exit.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache_dir=${IMAGE_TEST_CACHE:-/var/cache/molecule-credd-test}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
docker=${DOCKER:-/usr/bin/docker}
suite=trixie
base_tar=$cache_dir/image-base-$suite.tar
# Written next to the tarball when it is complete; a tarball from another
# recipe is rebuilt.
recipe="$suite minbase slim 2"
base_image=molecule-credd-test/debian:$suite-slim
image=molecule-workspace:test
container=credd-test-ws
agent_uid=1000
agent_socket=/tmp/molecule-credd-$agent_uid/credd.sock
# docker stop's grace period before SIGKILL.
stop_timeout=10
# Bounds on waits, in seconds.
dockerd_start_limit=60
daemon_answer_limit=20
respawn_limit=20
# A provision-time token as an orchestrator passes it (`-e GITHUB_TOKEN=`);
# fake, but nothing must keep it in its environment.
bootstrap_token=ghs_provisionTimeTokenForImageTest0123456

# shellcheck source=scripts/lib/systemd-test.sh
. "$root/scripts/lib/systemd-test.sh"

# ---- steps and their durations ---------------------------------------------

script_started=$SECONDS
step_name=
step_started=$SECONDS
end_step() {
  if [ -n "$step_name" ]; then printf -- '<-- %s: %ss\n' "$step_name" "$((SECONDS - step_started))"; fi
  step_name=
}
step() {
  end_step
  step_name=$*
  step_started=$SECONDS
  printf -- '--> %s\n' "$*"
}

# ---- preflight ---------------------------------------------------------------

step "preflight"
[ "$(id -u)" = 0 ] || fail "run as root (it starts a dockerd)"
for tool in dockerd:docker.io "$docker":docker.io containerd:containerd runc:runc \
  debootstrap:debootstrap python3:python3 flock:util-linux findmnt:util-linux \
  tar:tar ip:iproute2 sha256sum:coreutils openssl:openssl git:git; do
  command -v "${tool%%:*}" >/dev/null ||
    fail "${tool%%:*} is missing (Debian: apt-get install ${tool#*:})"
done
[ -n "$(cgroup_roots)" ] || fail "no cgroup hierarchy under /sys/fs/cgroup for dockerd"
mkdir -p "$cache_dir"

# ---- cleanup, and leftovers of killed runs ---------------------------------

# stop_dockerd RUN_DIR: stops the dockerd whose pidfile is in RUN_DIR
# (bounded; SIGKILL after 30 s), then its containerd if it outlived it.
stop_dockerd() {
  local pid deadline file
  for file in "$1/dockerd.pid" "$1/docker/exec/containerd/containerd.pid"; do
    pid=$(cat "$file" 2>/dev/null) || continue
    alive "$pid" || continue
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 30))
    while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    if alive "$pid"; then
      echo "warning: $file: pid $pid did not stop within 30 s; SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}
# remove_run RUN_DIR: unmounts what is mounted under RUN_DIR, deepest first,
# and removes it.
remove_run() {
  local target
  findmnt -rn -o TARGET | grep -F "$1/" | sort -r | while IFS= read -r target; do
    umount -l "$target" 2>/dev/null || echo "warning: cannot unmount $target" >&2
  done
  rm -rf "$1"
}
for stale in "$cache_dir"/image-run.*; do
  [ -d "$stale" ] || continue
  if [ -f "$stale/pid" ] && alive "$(cat "$stale/pid")"; then continue; fi
  stop_dockerd "$stale"
  remove_run "$stale"
done

run=$(mktemp -d "$cache_dir/image-run.XXXXXX")
echo "$$" >"$run/pid"
links_before=$(ip -o link show | awk -F': ' '{ print $2 }' | sort)
dockerd_pid=
pids=()

diagnostics() {
  echo "---- dockerd (last lines) ----"
  tail -n 15 "$run/dockerd.log" 2>/dev/null
  if [ -n "$dockerd_pid" ] && alive "$dockerd_pid"; then
    echo "---- $container: docker logs (last lines) ----"
    timeout 20 "$docker" logs --tail 40 "$container" 2>&1
  fi
  echo "---- molecule-platform (last lines) ----"
  tail -n 10 "$run/platform.log" 2>/dev/null
  echo "---- GitHub API stand-in (last lines) ----"
  tail -n 10 "$run/standin.log" 2>/dev/null
  echo "---- TLS stand-in of github.com and api.github.com (last lines) ----"
  tail -n 10 "$run/tls-standin.log" 2>/dev/null
}

cleanup() {
  local status=$? pid leftover
  trap - EXIT
  set +e
  end_step
  if [ "$status" != 0 ]; then diagnostics >&2; fi
  if [ -n "${KEEP_LOGS-}" ]; then cp "$run"/*.log "$KEEP_LOGS/" 2>/dev/null; fi
  if [ -n "$dockerd_pid" ] && alive "$dockerd_pid"; then
    timeout 60 "$docker" ps -aq | xargs -r timeout 60 "$docker" rm -f >/dev/null
  fi
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  stop_dockerd "$run"
  remove_run "$run"
  # What dockerd made on the machine: no bridge, veth or iptables chain may
  # be left (--bridge=none --iptables=false make none).
  leftover=$(comm -13 <(echo "$links_before") <(ip -o link show | awk -F': ' '{ print $2 }' | sort))
  if [ -n "$leftover" ]; then
    echo "FAIL: network interfaces left after dockerd stopped: $leftover" >&2
    status=1
  fi
  if command -v iptables-save >/dev/null && iptables-save 2>/dev/null | grep -q DOCKER; then
    echo "FAIL: DOCKER iptables chains exist after dockerd stopped" >&2
    status=1
  fi
  printf -- '==> scripts/test-image.sh: %ss (exit %s)\n' "$((SECONDS - script_started))" "$status"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Fails a wait once the dockerd under test is gone.
check_alive() {
  if [ -n "$dockerd_pid" ] && ! alive "$dockerd_pid"; then fail "$1: dockerd exited"; fi
}

# ---- the binaries ------------------------------------------------------------

if [ -n "${RELEASE_BIN-}" ]; then
  step "release binaries: taken from RELEASE_BIN=$RELEASE_BIN"
  bin=$RELEASE_BIN
else
  step "release binaries (scripts/build-release.sh)"
  "$root/scripts/build-release.sh" --quiet --locked
  bin=$root/target/release
fi
for exe in molecule-credd credd molecule-platform; do
  [ -x "$bin/$exe" ] || fail "$bin/$exe is missing after scripts/build-release.sh"
done

# ---- the base image tarball ------------------------------------------------

step "base image: Debian $suite minbase tarball"
exec 4>"$base_tar.lock"
flock -w 300 4 || fail "another run has held $base_tar.lock for 5 minutes"
if [ "$(cat "$base_tar.recipe" 2>/dev/null)" != "$recipe" ] || [ ! -s "$base_tar" ]; then
  started=$SECONDS
  rm -rf "$base_tar".tmp.*
  rootfs=$(mktemp -d "$base_tar.tmp.XXXXXX")
  if ! timeout 900 debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
    tail -n 20 "$rootfs.log" >&2
    rm -rf "$rootfs" "$rootfs.log"
    fail "debootstrap of $suite from $mirror failed"
  fi
  rm -f "$rootfs.log"
  # As debian:*-slim: no documentation, manuals or translations (also for
  # the packages the Dockerfile installs), no package lists (the Dockerfile
  # runs apt-get update), no leftover downloads.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
DPKG
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
  # mktemp made it 0700: the image's / would be root's only.
  chmod 0755 "$rootfs"
  tar --numeric-owner -C "$rootfs" -cf "$base_tar.tmp" .
  rm -rf "$rootfs"
  mv "$base_tar.tmp" "$base_tar"
  printf '%s\n' "$recipe" >"$base_tar.recipe"
  ok "debootstrap $suite minbase from $mirror, slimmed, into $base_tar ($(du -m "$base_tar" | cut -f1) MB) in $((SECONDS - started)) s"
fi
# Shared while in use: no rebuild under this run's feet.
flock -s 4

# ---- dockerd -----------------------------------------------------------------

step "dockerd (vfs, own data root, no bridge, no iptables)"
mkdir -p "$run/docker/data" "$run/docker/exec"
echo '{}' >"$run/daemon.json"
export DOCKER_HOST=unix://$run/docker.sock
# Its own config file: nothing from /etc/docker applies.
dockerd --config-file "$run/daemon.json" --storage-driver vfs \
  --data-root "$run/docker/data" --exec-root "$run/docker/exec" \
  --pidfile "$run/dockerd.pid" -H "$DOCKER_HOST" \
  --iptables=false --ip-masq=false --bridge=none \
  >"$run/dockerd.log" 2>&1 &
dockerd_pid=$!
docker_answers() { timeout 10 "$docker" info >/dev/null 2>&1; }
started=$(now_ms)
wait_for "$dockerd_start_limit" "dockerd answering docker info" docker_answers
storage=$("$docker" info --format '{{.Driver}}')
[ "$storage" = vfs ] || fail "dockerd uses storage driver $storage, not vfs"
ok "dockerd $("$docker" version --format '{{.Server.Version}}') (pid $dockerd_pid) answers on $DOCKER_HOST after $(($(now_ms) - started)) ms; storage driver $storage"

# ---- the image -----------------------------------------------------------------

step "docker import the base image"
"$docker" import "$base_tar" "$base_image" >/dev/null
ok "imported $base_tar as $base_image"

step "docker build (BINARIES=prebuilt, GH_SOURCE=debian)"
# The context: the Dockerfile's folder and the prebuilt binaries (the rust
# build stage, which needs the sources, is not run).
context=$run/context
mkdir -p "$context/prebuilt"
cp -a "$root/workspace-template" "$context/"
cp "$bin/molecule-credd" "$bin/credd" "$context/prebuilt/"
started=$SECONDS
if ! DOCKER_BUILDKIT=1 "$docker" build --network host --progress plain \
  -f "$context/workspace-template/Dockerfile" \
  --build-arg RUNTIME_BASE="$base_image" --build-arg BUILD_BASE="$base_image" \
  --build-arg BINARIES=prebuilt --build-arg GH_SOURCE=debian \
  -t "$image" "$context" >"$run/build.log" 2>&1; then
  tail -n 30 "$run/build.log" >&2
  fail "docker build failed"
fi
# shellcheck disable=SC2016  # expanded by the container's sh
versions=$("$docker" run --rm --entrypoint sh "$image" -c \
  '. /etc/os-release; echo "$PRETTY_NAME, $(git --version), $(gh --version | head -n 1)"')
ok "built $image in $((SECONDS - started)) s ($(("$("$docker" image inspect -f '{{.Size}}' "$image")" / 1000000)) MB): $versions"

# ---- the platform and GitHub's API, on the host's loopback -----------------

step "molecule-platform --dev and the GitHub API stand-in on 127.0.0.1"
mkdir -m 0700 "$run/configs"
# first_line NAME CMD...: starts CMD with stdout on a fifo, reads its first
# line into $first_line (bounded) and keeps draining the rest.
first_line() {
  local name=$1
  shift
  mkfifo "$run/$name.out"
  "$@" >"$run/$name.out" 2>"$run/$name.log" &
  pids+=($!)
  exec 5<"$run/$name.out"
  read -r -t 15 first_line <&5 || fail "$name did not print its address"
  cat <&5 >/dev/null &
  pids+=($!)
  exec 5<&-
}
first_line platform "$bin/molecule-platform" --dev --listen 127.0.0.1:0 \
  --dev-auth-token-file "$run/configs/.auth_token"
platform_url=${first_line##* }
case $platform_url in http://127.0.0.1:*) ;; *) fail "molecule-platform said: $first_line" ;; esac
wait_for 5 "the platform's bearer file" test -s "$run/configs/.auth_token"
first_line standin python3 "$root/scripts/lib/github-api-standin.py" "$run/api-requests"
api_url=${first_line##* }
case $api_url in http://127.0.0.1:*) ;; *) fail "the GitHub API stand-in said: $first_line" ;; esac
ok "molecule-platform --dev at $platform_url, GitHub API stand-in at $api_url"

# ---- the workspace container ---------------------------------------------------

# In the container as root, with the environment `docker exec` gives (the
# container's, GITHUB_TOKEN included).
in_ws() { timeout 60 "$docker" exec "$container" "$@"; }
# As the workspace's user, entered the way the README says: through the
# entrypoint (it drops to agent, clears the provision-time token, puts the
# gh wrapper first on PATH).
in_workspace() { timeout 60 "$docker" exec "$@"; }
# The same without the container's GITHUB_TOKEN in this process's own
# environment.
as_root_clean() { in_ws env -u GITHUB_TOKEN -u GH_TOKEN "$@"; }
# container_processes: "HOST-PID CONTAINER-PID" for every process in the
# container's PID namespace, seen from the host: only the host's root reads
# the environment of the agent's and non-dumpable processes (root in the
# container lacks CAP_SYS_PTRACE).
container_processes() {
  local init ns d nspid
  init=$("$docker" inspect -f '{{.State.Pid}}' "$container") || fail "docker inspect $container failed"
  [ "$init" -gt 0 ] || fail "$container has no host pid (not running)"
  ns=$(readlink "/proc/$init/ns/pid") || fail "cannot read the pid namespace of $container"
  for d in /proc/[0-9]*; do
    [ "$(readlink "$d/ns/pid" 2>/dev/null)" = "$ns" ] || continue
    nspid=$(sed -n 's/^NSpid:.*[[:space:]]\([0-9]*\)$/\1/p' "$d/status" 2>/dev/null) || continue
    [ -n "$nspid" ] && echo "${d#/proc/} $nspid"
  done
}
# pid_of CMDLINE: the pid of the container process whose NUL-separated
# command line, with NULs as spaces, is CMDLINE (as root, in the container).
# shellcheck disable=SC2016  # expanded by the container's sh
pid_of() {
  as_root_clean sh -c 'for d in /proc/[0-9]*; do
    [ "$(tr "\0" " " <"$d/cmdline" 2>/dev/null)" = "$1 " ] && echo "${d#/proc/}"; done; true' sh "$1"
}
uid_of() { as_root_clean sed -n 's/^Uid:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$1/status"; }

step "docker run: the workspace (default CMD, sleep infinity)"
started=$(now_ms)
"$docker" run -d --name "$container" --network host --stop-timeout "$stop_timeout" \
  -e PLATFORM_URL="$platform_url" -e GITHUB_TOKEN="$bootstrap_token" \
  -v "$run/configs:/configs" "$image" >/dev/null || fail "docker run failed"
socket_answers() { in_ws setpriv --reuid "$agent_uid" --regid "$agent_uid" --clear-groups \
  env -u GITHUB_TOKEN CREDD_SOCKET="$agent_socket" credd status >/dev/null 2>&1; }
wait_for "$daemon_answer_limit" "the daemon answering on $agent_socket" socket_answers
ok "docker run -d: the daemon answers on $agent_socket after $(($(now_ms) - started)) ms"

# -- the drop to agent
runtime_pid=$(pid_of "sleep infinity") || fail "cannot list the container's processes"
[ -n "$runtime_pid" ] || fail "no 'sleep infinity' process in the container"
runtime_uid=$(uid_of "$runtime_pid") || fail "cannot read /proc/$runtime_pid/status"
[ "$runtime_uid" = "$agent_uid" ] || fail "the runtime (pid $runtime_pid) runs as uid $runtime_uid, not agent ($agent_uid)"
[ "$(in_ws id -un "$agent_uid")" = agent ] || fail "uid $agent_uid is not agent"
daemon_pid=$(in_ws cat "/tmp/molecule-credd-$agent_uid/molecule-credd.pid") || fail "no molecule-credd.pid"
supervisor_pid=$(in_ws cat "/tmp/molecule-credd-$agent_uid/supervisor.pid") || fail "no supervisor.pid"
for pid in "$daemon_pid" "$supervisor_pid"; do
  [ "$(uid_of "$pid")" = "$agent_uid" ] || fail "pid $pid (daemon/supervisor) runs as uid $(uid_of "$pid"), not $agent_uid"
done
ok "the entrypoint dropped to agent: runtime (pid $runtime_pid), supervisor (pid $supervisor_pid) and daemon (pid $daemon_pid) run as uid $agent_uid"

# -- credd status
status_text=$(in_workspace "$container" workspace-entrypoint credd status 2>&1) ||
  fail "credd status (through the entrypoint) failed: $status_text"
valid_token() {
  status_text=$(in_workspace "$container" workspace-entrypoint credd status 2>/dev/null) &&
    grep -qE '^state: +valid$' <<<"$status_text"
}
wait_for 10 "a valid token in credd status" valid_token
grep -qE '^source: +platform$' <<<"$status_text" || fail "the token is not from the platform: $status_text"
grep -qF "(pid $daemon_pid)" <<<"$status_text" || fail "credd status was not answered by pid $daemon_pid: $status_text"
ok "credd status as agent: state valid, source platform, answered by pid $daemon_pid"

# -- git credential fill
token=$(in_workspace "$container" workspace-entrypoint credd token 2>>"$run/exec.log") || fail "credd token failed"
case $token in ghs_*) ;; *) fail "credd token is not a ghs_ token (${#token} characters)" ;; esac
fill=$(printf 'protocol=https\nhost=github.com\n\n' |
  in_workspace -i "$container" workspace-entrypoint git credential fill 2>&1) || fail "git credential fill failed"
[ "$(sed -n 's/^password=//p' <<<"$fill")" = "$token" ] ||
  fail "git credential fill did not return the daemon's token (it said $(grep -vc '^password=' <<<"$fill") other lines)"
grep -qx 'username=x-access-token' <<<"$fill" || fail "git credential fill: no username=x-access-token"
ok "git credential fill for github.com as agent returns the daemon's token (${#token} characters, username x-access-token)"

# -- gh, through the wrapper, against the stand-in
sha_of() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }
expected=$(sha_of "token $token")
gh_env=(-e GH_HOST=github.localhost -e HTTP_PROXY="$api_url" -e NO_PROXY=)
said=$(in_workspace "${gh_env[@]}" "$container" workspace-entrypoint gh api /user 2>&1) ||
  fail "gh api /user through the wrapper failed: $said"
grep -q '"login": *"agent"' <<<"$said" || fail "gh api /user did not print the stand-in's user: $said"
last_request=$(tail -n 1 "$run/api-requests")
[ "${last_request##* }" = "$expected" ] ||
  fail "gh api /user did not send 'Authorization: token <the daemon's token>' (last request: ${last_request% *})"
said=$(in_workspace "${gh_env[@]}" "$container" workspace-entrypoint gh auth status --hostname github.localhost 2>&1) ||
  fail "gh auth status through the wrapper failed: $said"
if ! grep -q 'github.localhost' <<<"$said" || ! grep -q 'GH_TOKEN' <<<"$said"; then
  fail "gh auth status does not report the token from GH_TOKEN: $said"
fi
ok "gh wrapper: gh api /user sent 'Authorization: token <the daemon's token>' to the stand-in; gh auth status reports it from GH_TOKEN ($(grep -m1 -o 'Logged in[^(]*([^)]*)' <<<"$said" || echo "said: $(head -n 2 <<<"$said" | tr '\n' ' ')"))"

# -- nobody keeps the provision-time token
# shellcheck disable=SC2016  # expanded by the container's sh
scanned=0
holders=
runtime_env=
while read -r host_pid ns_pid; do
  environ=$(tr '\0' '\n' <"/proc/$host_pid/environ") || fail "cannot read /proc/$host_pid/environ (pid $ns_pid in the container)"
  scanned=$((scanned + 1))
  if grep -qE "^(GH_TOKEN|GITHUB_TOKEN)=|ghs_provisionTime" <<<"$environ"; then
    holders+=" pid $ns_pid ($(tr '\0' ' ' <"/proc/$host_pid/cmdline"))"
  fi
  if [ "$ns_pid" = "$runtime_pid" ]; then runtime_env=$environ; fi
done < <(container_processes)
[ -z "$holders" ] || fail "processes keep GH_TOKEN/GITHUB_TOKEN in their environment:$holders"
[ "$scanned" -ge 4 ] || fail "only $scanned processes found in the container (expected tini, the runtime, supervisor, daemon)"
grep -q '^CREDD_SOCKET=' <<<"$runtime_env" || fail "the runtime's environment has no CREDD_SOCKET (is this the runtime?)"
grep -q '^PATH=/usr/local/lib/molecule-credd/bin:' <<<"$runtime_env" || fail "the gh wrapper is not first on the runtime's PATH"
ok "none of the $scanned processes in the container (tini, the entrypoint, the runtime, supervisor, daemon) has GH_TOKEN/GITHUB_TOKEN or the provision-time token in /proc/PID/environ; the runtime has CREDD_SOCKET and the wrapper first on PATH"

# -- the daemon is respawned after kill -9
started=$(now_ms)
# (sh's kill builtin: the image has no procps.)
# shellcheck disable=SC2016  # expanded by the container's sh
in_ws sh -c 'kill -KILL "$1"' sh "$daemon_pid" || fail "cannot SIGKILL the daemon (pid $daemon_pid)"
respawned() {
  new_pid=$(in_ws cat "/tmp/molecule-credd-$agent_uid/molecule-credd.pid" 2>/dev/null) &&
    [ -n "$new_pid" ] && [ "$new_pid" != "$daemon_pid" ] && socket_answers
}
wait_for "$respawn_limit" "the supervisor respawning the daemon after kill -9" respawned
wait_for 10 "a valid token from the respawned daemon" valid_token
grep -qF "(pid $new_pid)" <<<"$status_text" || fail "the respawned daemon (pid $new_pid) does not answer: $status_text"
ok "kill -9 of the daemon (pid $daemon_pid): the supervisor respawned it as pid $new_pid, answering with a valid token after $(($(now_ms) - started)) ms"
daemon_pid=$new_pid

# -- docker stop: the daemon finishes its shutdown
started=$(now_ms)
"$docker" stop -t "$stop_timeout" "$container" >/dev/null || fail "docker stop failed"
stop_ms=$(($(now_ms) - started))
exit_code=$("$docker" inspect -f '{{.State.ExitCode}}' "$container")
daemon_log=$(timeout 20 "$docker" logs "$container" 2>&1 | grep -F molecule_credd || true)
grep -q 'shutting down' <<<"$daemon_log" || fail "docker stop: the daemon never logged that it is shutting down"
grep -qE '(^| )stopped$' <<<"$(tail -n 1 <<<"$daemon_log")" ||
  fail "docker stop: the daemon's last line is not 'stopped' (its shutdown was cut short; exit $exit_code after $stop_ms ms): $(tail -n 2 <<<"$daemon_log")"
if [ "$stop_ms" -ge $((stop_timeout * 1000)) ] || [ "$exit_code" = 137 ]; then
  fail "docker stop took $stop_ms ms and ended with exit $exit_code: SIGKILLed after the $stop_timeout s timeout"
fi
left=$(timeout 60 "$docker" diff "$container" | sed -n "s|^[AC] \(/tmp/molecule-credd-$agent_uid/.*\)|\1|p" | sort | tr '\n' ' ')
case " $left " in *" $agent_socket "*) fail "docker stop: the socket $agent_socket is still there (left: $left)" ;; esac
# The supervisor removes its pid files once the daemon has exited: left
# behind, they show the supervisor was killed before it finished.
case " $left " in *"/supervisor.pid "* | *"/molecule-credd.pid "*)
  fail "docker stop: the supervisor did not finish (its pid files are left: $left)" ;;
esac
case " $left " in *"/supervisor.lock "*) ;; *) fail "docker diff shows no /tmp/molecule-credd-$agent_uid/supervisor.lock: the check cannot see the folder (left: $left)" ;; esac
ok "docker stop -t $stop_timeout: container exit $exit_code after $stop_ms ms; the daemon logged 'shutting down' then 'stopped'; $agent_socket and the supervisor's pid files removed (left in the folder: $left)"

# -- the runtime's exit code is the container's
step "docker run … sh -c 'exit 7': the exit code passes through"
started=$(now_ms)
set +e
"$docker" run --name "$container-exit" --network host -e PLATFORM_URL="$platform_url" \
  -v "$run/configs:/configs" "$image" sh -c 'exit 7' >"$run/exit.log" 2>&1
exit_code=$?
set -e
[ "$exit_code" = 7 ] || fail "docker run … sh -c 'exit 7' exited $exit_code: $(tail -n 5 "$run/exit.log")"
grep -qF 'molecule-credd answers' "$run/exit.log" || fail "the daemon did not come up in the exit-code run: $(tail -n 5 "$run/exit.log")"
daemon_log=$(grep -F molecule_credd "$run/exit.log" || true)
grep -qE '(^| )stopped$' <<<"$(tail -n 1 <<<"$daemon_log")" ||
  fail "after the runtime exited, the daemon's last line is not 'stopped': $(tail -n 2 <<<"$daemon_log")"
ok "docker run … sh -c 'exit 7' exited 7 in $(($(now_ms) - started)) ms, after the daemon came up and logged 'stopped'"

# ---- sealed: the same image with CREDD_SEALED=1 -----------------------------

# The agent (uid 1000) uses git and gh through the daemon's credential
# gateway and can never read the token. "github.com" and "api.github.com"
# behind the gateway are the stand-in over TLS on loopback (a CA made here),
# reached with the daemon's --gateway-upstream and --gateway-extra-ca: the
# image's daemon is started through a two-line wrapper (CREDD_BIN_DIR) that
# adds those test flags when the entrypoint starts it with --gateway.
step "sealed: github.com and api.github.com stand-in over TLS (test CA), a bare repository"
tls=$run/tls
mount=$run/sealed-mount
mkdir -m 0700 "$tls"
mkdir -m 0755 "$mount" "$mount/bin"
openssl_quiet() { openssl "$@" 2>>"$run/openssl.log" || fail "openssl $1 failed: $(tail -n 3 "$run/openssl.log")"; }
openssl_quiet req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
  -keyout "$tls/ca.key" -out "$mount/ca.pem" -days 2 -subj "/CN=molecule-credd image test CA" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
openssl_quiet req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
  -keyout "$tls/server.key" -out "$tls/server.csr" -subj /CN=github.com
printf '%s\n' subjectAltName=DNS:github.com,DNS:api.github.com basicConstraints=critical,CA:FALSE \
  keyUsage=critical,digitalSignature extendedKeyUsage=serverAuth >"$tls/server.ext"
openssl_quiet x509 -req -in "$tls/server.csr" -CA "$mount/ca.pem" -CAkey "$tls/ca.key" \
  -set_serial "0x$(openssl rand -hex 8)" -days 2 -extfile "$tls/server.ext" -out "$tls/server.pem"
chmod 0644 "$mount/ca.pem"
git_root=$run/git
seed=$run/seed
git init -q -b main "$seed"
git -C "$seed" -c user.name=test -c user.email=test@example.invalid commit -q --allow-empty -m seed
mkdir -p "$git_root/acme"
git clone -q --bare "$seed" "$git_root/acme/api.git"
first_line tls-standin python3 "$root/scripts/lib/github-api-standin.py" "$run/tls-requests" \
  --tls "$tls/server.pem" "$tls/server.key" --git-root "$git_root"
upstream=${first_line##*//}
case $first_line in *https://127.0.0.1:*) ;; *) fail "the TLS stand-in said: $first_line" ;; esac
cat >"$mount/bin/molecule-credd" <<WRAPPER
#!/bin/sh
# scripts/test-image.sh: the image's daemon; its gateway goes to the stand-in.
case " \$* " in *" --gateway "*)
  set -- "\$@" --gateway-extra-ca /sealed-test/ca.pem \\
    --gateway-upstream github.com=$upstream --gateway-upstream api.github.com=$upstream ;;
esac
exec /usr/local/bin/molecule-credd "\$@"
WRAPPER
chmod 0755 "$mount/bin/molecule-credd"
ln -s /usr/local/bin/credd "$mount/bin/credd"
# A loopback port for the gateway (host network): free when asked.
gateway_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The bearer, in a folder of its own: the sealed entrypoint gives it to credd.
mkdir -m 0700 "$run/sealed-configs"
cp "$run/configs/.auth_token" "$run/sealed-configs/.auth_token"
ok "stand-in of github.com (git http-backend over $git_root) and api.github.com over TLS at $upstream; the gateway will listen on 127.0.0.1:$gateway_port"

step "sealed: docker run -e CREDD_SEALED=1"
container=credd-test-ws-sealed
# The daemon's own folder (pid files, lock), closed to the agent; the
# agent's socket, bound by root in the agent's folder and handed over.
sealed_run=/run/molecule-credd-sealed/run
agent_socket=/run/molecule-credd-agent/credd.sock
started=$(now_ms)
"$docker" run -d --name "$container" --network host --stop-timeout "$stop_timeout" \
  -e PLATFORM_URL="$platform_url" -e GITHUB_TOKEN="$bootstrap_token" -e CREDD_SEALED=1 \
  -e CREDD_GATEWAY="127.0.0.1:$gateway_port" -e CREDD_BIN_DIR=/sealed-test/bin \
  -v "$run/sealed-configs:/configs" -v "$mount:/sealed-test:ro" "$image" >/dev/null ||
  fail "docker run (sealed) failed"
daemon_uid=$(in_ws id -u credd) || fail "the image has no credd account"
daemon_gid=$(in_ws id -g credd)
# credd status as the agent, entered as the README says.
as_agent_status() {
  status_text=$(in_workspace "$container" workspace-entrypoint credd status 2>&1) &&
    grep -qE '^state: +valid$' <<<"$status_text" && grep -qE '^source: +platform$' <<<"$status_text"
}
wait_for "$daemon_answer_limit" "the sealed daemon answering the agent with a platform token on $agent_socket" as_agent_status
ok "sealed: the daemon answers the agent's credd status on $agent_socket with a valid platform token after $(($(now_ms) - started)) ms"
metrics_text=$(in_workspace -u "$agent_uid" "$container" workspace-entrypoint credd metrics 2>&1) ||
  fail "credd metrics as the agent (docker exec -u agent) failed: $metrics_text"
grep -q '^credd_token_valid' <<<"$metrics_text" || fail "credd metrics printed no credd_token_valid: $metrics_text"
ok "sealed: credd metrics as the agent (docker exec -u $agent_uid): $(grep -c '^credd_' <<<"$metrics_text") samples"

# -- the credd account
passwd_line=$(in_ws getent passwd credd)
IFS=: read -r _ _ _ _ _ daemon_home daemon_shell <<<"$passwd_line"
if [ "$daemon_uid" -eq 0 ] || [ "$daemon_uid" -eq "$agent_uid" ] || [ "$daemon_uid" -ge 1000 ]; then
  fail "credd's uid $daemon_uid is not a system uid of its own"
fi
[ "$daemon_shell" = /usr/sbin/nologin ] || fail "credd's shell is $daemon_shell, not /usr/sbin/nologin"
if in_ws test -e "$daemon_home"; then fail "credd's home $daemon_home exists"; fi
password_field=$(in_ws getent shadow credd | cut -d: -f2)
case $password_field in '!'* | '*'*) ;; *) fail "credd's password is not locked" ;; esac
agent_groups=$(in_ws id -G agent)
case " $agent_groups " in *" $daemon_gid "* | *" 0 "*) fail "agent is in credd's or root's group: $agent_groups" ;; esac
if in_ws sh -c 'command -v sudo || test -e /etc/sudoers'; then fail "the image has sudo"; fi
setuid=$(in_ws find / -xdev -perm /6000 -type f 2>/dev/null | sort | tr '\n' ' ')
case $setuid in *"/usr/local/"*) fail "a setuid/setgid program of ours: $setuid" ;; esac
su_said=
for target in root credd; do
  if said=$(in_workspace -u "$agent_uid" "$container" su -s /bin/sh -c id "$target" </dev/null 2>&1); then
    fail "the agent became $target with su: $said"
  fi
  su_said+=" su $target: '$(head -n 1 <<<"$said")';"
done
ok "credd account: uid $daemon_uid, gid $daemon_gid, shell $daemon_shell, home $daemon_home (absent), password locked; agent's groups: $agent_groups; no sudo;$su_said setuid/setgid files (Debian's): ${setuid:-none}"

# -- who runs what
daemon_pid=$(in_ws cat "$sealed_run/molecule-credd.pid") || fail "no $sealed_run/molecule-credd.pid"
supervisor_pid=$(in_ws cat "$sealed_run/supervisor.pid") || fail "no $sealed_run/supervisor.pid"
for pid in "$daemon_pid" "$supervisor_pid"; do
  [ "$(uid_of "$pid")" = "$daemon_uid" ] || fail "pid $pid (daemon/supervisor) runs as uid $(uid_of "$pid"), not credd ($daemon_uid)"
done
# shellcheck disable=SC2016  # expanded by the container's sh
daemon_cmdline=$(as_root_clean sh -c 'tr "\0" " " <"/proc/$1/cmdline"' sh "$daemon_pid")
for word in "--sealed" "--gateway 127.0.0.1:$gateway_port" "--allow-uid $agent_uid"; do
  case " $daemon_cmdline " in *" $word "*) ;;
    *) fail "the daemon's command line lacks $word: $daemon_cmdline" ;;
  esac
done
runtime_pid=$(pid_of "sleep infinity")
if [ -z "$runtime_pid" ] || [ "$(uid_of "$runtime_pid")" != "$agent_uid" ]; then
  fail "no 'sleep infinity' runtime as uid $agent_uid"
fi
ok "sealed: daemon (pid $daemon_pid) and supervisor (pid $supervisor_pid) run as credd ($daemon_uid), the daemon with --sealed --gateway … --allow-uid $agent_uid; the runtime (pid $runtime_pid) as agent"

# -- git clone and push as the agent, through the gateway
: >"$run/tls-requests"
# shellcheck disable=SC2016  # expanded by the container's sh
pushed=$(in_workspace "$container" workspace-entrypoint sh -c 'set -e; cd "$HOME"; rm -rf api
  git clone -q https://github.com/acme/api.git; cd api
  git -c user.name=agent -c user.email=agent@example.invalid commit -q --allow-empty -m "sealed push"
  git push -q origin HEAD:main; git rev-parse HEAD' 2>"$run/sealed-git.log") ||
  fail "git clone/push as the agent failed: $(tail -n 5 "$run/sealed-git.log")"
[ "$(git --git-dir "$git_root/acme/api.git" rev-parse main)" = "$pushed" ] ||
  fail "the stand-in's acme/api main is not the agent's pushed commit $pushed"
git_lines=$(grep -c ' github.com /acme/api.git/' "$run/tls-requests" || true)
grep -q ' github.com /acme/api.git/git-receive-pack 200 ' "$run/tls-requests" || fail "no receive-pack reached the stand-in: $(cat "$run/tls-requests")"
if grep -v ' 200 [0-9a-f]\{64\} [0-9a-f]\{64\}$' "$run/tls-requests" | grep -q .; then
  fail "a git request reached the stand-in without the stamped credential: $(grep -v ' 200 ' "$run/tls-requests")"
fi
stamped=$(awk '{ print $5 }' "$run/tls-requests" | sort -u)
[ "$(wc -l <<<"$stamped")" = 1 ] || fail "git requests carried different tokens: $stamped"
ok "git clone and push of https://github.com/acme/api.git as the agent through the gateway: $git_lines requests reached the stand-in, each 200 with Basic x-access-token:TOKEN (token sha256 ${stamped:0:12}…); the stand-in's main is the agent's commit ${pushed:0:12}"

# -- gh api as the agent
: >"$run/tls-requests"
said=$(in_workspace "$container" workspace-entrypoint gh api /user 2>&1) || fail "gh api /user (sealed) failed: $said"
grep -q '"login": *"agent"' <<<"$said" || fail "gh api /user did not print the stand-in's user: $said"
grep -q "^GET api.github.com /user 200 $stamped " "$run/tls-requests" ||
  fail "gh api /user did not reach the stand-in with 'Authorization: token <the token git got>': $(cat "$run/tls-requests")"
said=$(in_workspace "$container" workspace-entrypoint gh auth status 2>&1) || fail "gh auth status (sealed) failed: $said"
ok "gh api /user as the agent through the gateway: the stand-in saw 'Authorization: token <the same token>' (never the placeholder); gh auth status: $(grep -m1 -o 'Logged in[^(]*([^)]*)' <<<"$said" || head -n 2 <<<"$said" | tr '\n' ' ')"

# -- the token is the daemon's
as_agent_status || fail "the sealed daemon stopped answering: $status_text"
fingerprint=$(sed -n 's/^fingerprint: *//p' <<<"$status_text")
if [ -z "$fingerprint" ] || [ "${stamped:0:${#fingerprint}}" != "$fingerprint" ]; then
  fail "the stamped token (sha256 ${stamped:0:12}) is not the daemon's (fingerprint $fingerprint)"
fi
ok "the stamped token is the daemon's: credd status fingerprint $fingerprint = SHA-256 prefix of what the stand-in received"

# -- credd token is refused, the bearer unreadable
set +e
token_out=$(in_workspace "$container" workspace-entrypoint credd token 2>"$run/sealed-token.err")
token_status=$?
set -e
token_err=$(grep -v '^entrypoint: ' "$run/sealed-token.err" || true)
if [ "$token_status" = 0 ] || [ -n "$token_out" ]; then
  fail "credd token as the agent printed ${#token_out} characters (exit $token_status)"
fi
[ "$(wc -l <<<"$token_err")" = 1 ] || fail "credd token's refusal is not one line: $token_err"
for reader in "workspace-entrypoint cat /configs/.auth_token" "cat /configs/.auth_token" "ls /configs"; do
  # shellcheck disable=SC2086  # the words of $reader
  if said=$(in_workspace -u "$agent_uid" "$container" $reader 2>&1); then
    fail "the agent ran '$reader': ${#said} characters"
  fi
done
if in_workspace -u "$agent_uid" "$container" ls "$(dirname "$sealed_run")" >/dev/null 2>&1; then
  fail "the agent can list the sealed folder"
fi
ok "credd token as the agent: exit $token_status, nothing on stdout, one line: $token_err; /configs/.auth_token, /configs and the sealed folder are closed to the agent"

# -- no process of the agent's uid holds the token
# shellcheck disable=SC2016  # expanded by the container's sh
in_workspace -d "$container" workspace-entrypoint sh -c 'gh api /user >/dev/null 2>&1; git -C "$HOME/api" fetch -q; exec sleep 600'
sleeping() { [ -n "$(pid_of "sleep 600")" ]; }
wait_for 30 "the agent's gh and git, then sleep 600" sleeping
agent_pids=()
scanned=0
runtime_env=
while read -r host_pid ns_pid; do
  scanned=$((scanned + 1))
  if grep -qF "$bootstrap_token" "/proc/$host_pid/environ" "/proc/$host_pid/cmdline"; then
    fail "pid $ns_pid keeps the provision-time token"
  fi
  [ "$(sed -n 's/^Uid:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$host_pid/status")" = "$agent_uid" ] || continue
  agent_pids+=("$host_pid")
  case $(tr '\0' ' ' <"/proc/$host_pid/cmdline") in *molecule-credd*)
    fail "a daemon runs as the agent (pid $ns_pid): $(tr '\0' ' ' <"/proc/$host_pid/cmdline")" ;;
  esac
  if [ "$ns_pid" = "$runtime_pid" ]; then runtime_env=$(tr '\0' '\n' <"/proc/$host_pid/environ"); fi
done < <(container_processes)
[ "${#agent_pids[@]}" -ge 2 ] || fail "only ${#agent_pids[@]} processes of uid $agent_uid found"
grep -q '^CREDD_GH_SEALED=1$' <<<"$runtime_env" || fail "the runtime's environment has no CREDD_GH_SEALED=1 (is this the runtime?)"
# Every run of token characters, and every base64 word decoded (Basic
# credentials), hashed and compared with what the stand-in received.
holders=$(python3 - "$stamped" "${agent_pids[@]}" <<'PY'
import base64, binascii, hashlib, re, sys
want, found = sys.argv[1], []
for pid in sys.argv[2:]:
    for name in ("environ", "cmdline"):
        try:
            data = open(f"/proc/{pid}/{name}", "rb").read()
        except OSError as error:
            sys.exit(f"cannot read /proc/{pid}/{name}: {error}")
        words = re.findall(rb"[A-Za-z0-9_]{8,}", data)
        for b64 in re.findall(rb"[A-Za-z0-9+/]{12,}={0,2}", data):
            try:
                words += re.findall(rb"[A-Za-z0-9_]{8,}", base64.b64decode(b64 + b"=" * (-len(b64) % 4)))
            except (binascii.Error, ValueError):
                pass
        if any(hashlib.sha256(w).hexdigest() == want for w in words) or b"ghs_" in data:
            found.append(f"{pid}/{name}")
print(" ".join(found))
PY
) || fail "scanning the agent's processes failed"
[ -z "$holders" ] || fail "processes of uid $agent_uid hold the token or a ghs_ string: $holders"
ok "none of the ${#agent_pids[@]} processes of uid $agent_uid (of $scanned in the container: the runtime, and a docker exec'd shell that ran gh and git, then exec'd sleep 600) has the stamped token (or any ghs_ string) in /proc/PID/environ or cmdline; none of the $scanned has the provision-time token"

# -- docker stop: the sealed daemon finishes its shutdown
started=$(now_ms)
"$docker" stop -t "$stop_timeout" "$container" >/dev/null || fail "docker stop (sealed) failed"
stop_ms=$(($(now_ms) - started))
exit_code=$("$docker" inspect -f '{{.State.ExitCode}}' "$container")
daemon_log=$(timeout 20 "$docker" logs "$container" 2>&1 | grep -F molecule_credd || true)
grep -qE '(^| )stopped$' <<<"$(tail -n 1 <<<"$daemon_log")" ||
  fail "docker stop (sealed): the daemon's last line is not 'stopped' (exit $exit_code after $stop_ms ms): $(tail -n 2 <<<"$daemon_log")"
ok "docker stop -t $stop_timeout (sealed): container exit $exit_code after $stop_ms ms; the daemon logged 'stopped'"
