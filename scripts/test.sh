#!/usr/bin/env bash
# The README's test command: installs what the tests need, builds every
# binary they exec, and runs every test.
#
#   scripts/test.sh [ARGS…]      # ARGS go to `cargo test --workspace`
#
# Why a script and not `cargo test`: the tests run the real tools — Debian's
# git 2.39 beside the machine's current one, gh, promtool, systemd-analyze
# and the shell linter, processes under other uids — and a test that cannot find its
# tool fails (none skips: a skipped check is a check nobody ran). So this
# installs the missing Debian packages first when it can (root with
# apt-get), and otherwise stops at once naming them and the one command that
# installs them. CI (`.ci/run`) runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the tests need: a program (a path, or a name looked up on PATH) and
# the Debian package that brings it. One line each; the test that needs a
# program names this script when it is missing (testkit::bin::require_tool).
needs=(
  /usr/bin/git:git                                 # Debian's git 2.39, the oldest supported
  /usr/bin/gh:gh                                   # real gh through credd exec and the wrapper
  openssl:openssl                                  # throwaway RSA keys for the GitHub App
  promtool:prometheus                              # both metrics outputs are checked by promtool
  systemd-analyze:systemd                          # the units are verified
  systemd-socket-activate:systemd                  # socket activation, for real
  shellcheck:shellcheck                            # the workspace scripts
  setpriv:util-linux                               # the entrypoint's drop to the agent
  useradd:passwd                                   # the test agent user
  strace:strace                                    # the helper's system-call budget
  redis-server:redis-server                        # the replicas' shared token cache
  haproxy:haproxy                                  # the load balancer in front of the replicas
)

missing=()
for need in "${needs[@]}"; do
  program=${need%%:*} package=${need#*:}
  case "$program" in
    /*) [ -x "$program" ] && continue ;;
    *) command -v "$program" >/dev/null && continue ;;
  esac
  case " ${missing[*]} " in *" $package "*) ;; *) missing+=("$package") ;; esac
done

if [ "$(id -u)" -ne 0 ]; then
  echo "error: the tests run processes under other uids and install Debian packages: run as root (sudo scripts/test.sh)" >&2
  exit 1
fi
if ((${#missing[@]})); then
  if ! command -v apt-get >/dev/null; then
    echo "error: missing Debian packages: ${missing[*]}; install them (apt-get install -y ${missing[*]}) and run again" >&2
    exit 1
  fi
  echo "installing ${missing[*]} (apt-get)…" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# `cargo test --workspace` builds every package's binaries too (the tests
# exec them from target/debug), with the features the tests unify — a
# separate `cargo build --workspace` first would build the dependencies a
# second time with the smaller feature set, then rebuild the binaries.
cargo test --workspace "$@"
