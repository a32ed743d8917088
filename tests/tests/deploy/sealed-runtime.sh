#!/bin/sh
# Stand-in for a sealed workspace's runtime (the agent): reports, one
# `key=value` per line, what the agent can reach. It also prints the
# environment and arguments of every process of its uid: the test scans
# this output for the token and the bearer, so a leak into any agent
# process fails it.
set -u

echo "runtime-uid=$(id -u)"
if cat "$CONFIGS_DIR/.auth_token" >/dev/null 2>&1; then
    echo "bearer-readable=yes"
else
    echo "bearer-readable=no"
fi
if ls "$CREDD_SEALED_DIR" >/dev/null 2>&1; then
    echo "sealed-dir-listable=yes"
else
    echo "sealed-dir-listable=no"
fi
said=$("${CREDD_BIN_DIR:-/usr/local/bin}/credd" token 2>&1)
echo "credd-token-exit=$?"
echo "credd-token-lines=$(printf '%s\n' "$said" | wc -l)"
case $said in
    *sealed*) echo "credd-token-sealed=yes" ;;
    *) echo "credd-token-sealed=no" ;;
esac
# What the agent may have: the daemon's status and metrics, on its socket.
echo "credd-socket=${CREDD_SOCKET:-unset}"
"${CREDD_BIN_DIR:-/usr/local/bin}/credd" status >/dev/null 2>&1
echo "credd-status-exit=$?"
"${CREDD_BIN_DIR:-/usr/local/bin}/credd" metrics >/dev/null 2>&1
echo "credd-metrics-exit=$?"
if su -c true root </dev/null >/dev/null 2>&1; then echo "su-root=ok"; else echo "su-root=failed"; fi
if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    echo "sudo=ok"
else
    echo "sudo=failed"
fi
echo "git-helper=[$(git config --get-all credential.https://github.com/.helper)]"
echo "git-proxy=$(git config --get http.https://github.com/.proxy)"
echo "git-cainfo=$(git config --get http.https://github.com/.sslCAInfo)"
echo "https-proxy=${HTTPS_PROXY:-unset}"
password=$(printf 'protocol=https\nhost=github.com\n\n' | git credential fill 2>/dev/null |
    sed -n 's/^password=//p')
echo "git-password=${password:+set}"
gh pr list
echo "gh-exit=$?"
for p in /proc/[0-9]*; do
    if [ -O "$p" ]; then
        tr '\0' '\n' <"$p/environ" 2>/dev/null
        tr '\0' ' ' <"$p/cmdline" 2>/dev/null
        echo
    fi
done | sed 's/^/agent-process: /'
exit 0
