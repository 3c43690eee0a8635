#!/usr/bin/env bash
# Install edgeagent as a systemd service on Debian, Ubuntu or Raspberry Pi OS.
#
#   sudo scripts/install.sh               install or upgrade (idempotent: safe to run again)
#   sudo scripts/install.sh --worker      the cloud worker instead: the same software and
#                                         edgeagent-cloud-worker.service; no edge service, no model
#   sudo scripts/install.sh --uninstall   remove the services and the software; keep config,
#                                         models and state
#   sudo scripts/install.sh --uninstall --purge   ... and remove those too, and the build cache
#
# Layout: software in /opt/edgeagent/venv, config in /etc/edgeagent/edgeagent.toml (written
# only if absent), MQTT password in /etc/edgeagent/credentials/mqtt-password (passed to the
# service with LoadCredential=), models in /var/lib/edgeagent/models, units in
# /etc/systemd/system, the llama-cpp-python wheel built for this CPU in
# /var/cache/edgeagent-build/edgeagent/wheels/<key>/. See docs/deploy.md.
set -euo pipefail

PREFIX=/opt/edgeagent
ETC=/etc/edgeagent
STATE=/var/lib/edgeagent
UNIT_DIR=/etc/systemd/system
BUILD_CACHE=/var/cache/edgeagent-build  # XDG_CACHE_HOME of scripts/build-llama.sh
SERVICE_USER=edgeagent
CLIENT_GROUP=edgeagent-clients  # terminals' users: may connect to the socket, nothing else
SRC="$(cd "$(dirname "$0")/.." && pwd)"

say() { printf 'edgeagent install: %s\n' "$*"; }
have_systemd() { [ -d /run/systemd/system ]; }

UNITS="edgeagent.service edgeagent.socket edgeagent-http.socket edgeagent-cloud-worker.service"

uninstall() {
  local purge=$1 unit
  for unit in $UNITS; do  # one at a time: systemctl refuses the lot if one is not installed
    if have_systemd; then
      systemctl disable --now "$unit" 2>/dev/null || true
    fi
    rm -f "$UNIT_DIR/$unit"
  done
  have_systemd && systemctl daemon-reload
  rm -rf "$PREFIX"
  if [ "$purge" = yes ]; then
    rm -rf "$ETC" "$STATE" /var/cache/edgeagent "$BUILD_CACHE"
    if id "$SERVICE_USER" >/dev/null 2>&1; then
      userdel "$SERVICE_USER"
    fi
    if getent group "$CLIENT_GROUP" >/dev/null; then
      groupdel "$CLIENT_GROUP"
    fi
    say "removed edgeagent, its config, models, build cache and user"
  else
    say "removed edgeagent; kept $ETC, $STATE and $BUILD_CACHE (use --purge to remove them)"
  fi
}

# The cloud worker's machine: the unit runs as a dynamic user (no system user to make) and
# needs its two credential files; it is started once /etc/edgeagent/worker.toml exists.
install_worker() {
  local cred
  install -d -m 0755 "$ETC"
  install -d -m 0700 "$ETC/credentials"
  for cred in cloud-password cloud-api-key; do  # LoadCredential= needs them; empty: none
    [ -f "$ETC/credentials/$cred" ] || install -m 0600 /dev/null "$ETC/credentials/$cred"
  done
  install -m 0644 "$SRC/systemd/edgeagent-cloud-worker.service" "$UNIT_DIR/"
  have_systemd && systemctl daemon-reload
  if [ ! -f "$ETC/worker.toml" ]; then
    say "write $ETC/worker.toml (mode 0644; [cloud] broker, [worker] model server: see"
    say "docs/escalation.md), then: systemctl enable --now edgeagent-cloud-worker"
    return 0
  fi
  "$PREFIX/venv/bin/edgeagent" config check "$ETC/worker.toml"
  if have_systemd; then
    systemctl enable edgeagent-cloud-worker.service
    systemctl restart edgeagent-cloud-worker.service
    say "running: systemctl status edgeagent-cloud-worker"
  else
    say "systemd is not running here: unit installed in $UNIT_DIR, not started"
  fi
}

if [ "$(id -u)" != 0 ]; then
  echo "run as root (sudo $0 $*)" >&2
  exit 1
fi

mode=edge
case "${1:-}" in
  --uninstall)
    uninstall "$([ "${2:-}" = --purge ] && echo yes || echo no)"
    exit 0
    ;;
  --worker) mode=worker ;;
  "") ;;
  *)
    echo "usage: $0 [--worker | --uninstall [--purge]]" >&2
    exit 2
    ;;
esac

# 1. Build tools and Python (llama.cpp is compiled once per CPU feature set), and procps for
# the unit's `ExecReload=/bin/kill` (a minimal Debian has no /bin/kill: reload would fail).
need=""
for pkg in python3-venv python3-dev gcc g++ procps; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
done
if [ -n "$need" ]; then
  say "installing$need"
  DEBIAN_FRONTEND=noninteractive apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $need
fi

# 2. A system user without a shell or a home of its own (the worker's unit has a dynamic one).
if [ "$mode" = edge ] && ! id "$SERVICE_USER" >/dev/null 2>&1; then
  say "creating system user $SERVICE_USER"
  useradd --system --user-group --home-dir "$STATE" --no-create-home \
    --shell /usr/sbin/nologin "$SERVICE_USER"
fi
# Terminals' users join this group (usermod -aG edgeagent-clients USER): it opens the socket
# and nothing else; the daemon's state, cache and spool stay its own.
if [ "$mode" = edge ] && ! getent group "$CLIENT_GROUP" >/dev/null; then
  say "creating group $CLIENT_GROUP (add terminal users: usermod -aG $CLIENT_GROUP USER)"
  groupadd --system "$CLIENT_GROUP"
fi

# 3. The software: a venv with llama-cpp-python built for this CPU, then edgeagent itself.
# The distribution's Python, not whichever python3 is first on root's PATH: a pyenv or conda
# interpreter under /root is not executable by the service user.
PY=/usr/bin/python3
if [ -x "$PREFIX/venv/bin/python" ] && \
   [ "$(readlink -f "$PREFIX/venv/bin/python")" != "$(readlink -f "$PY")" ]; then
  say "recreating $PREFIX/venv on $PY"
  rm -rf "$PREFIX/venv"
fi
if [ ! -x "$PREFIX/venv/bin/python" ]; then
  say "creating $PREFIX/venv"
  mkdir -p "$PREFIX"
  "$PY" -m venv "$PREFIX/venv"
fi
"$PREFIX/venv/bin/python" -m pip install --quiet --upgrade pip
llama_version=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$SRC/pyproject.toml")
wheel=$(XDG_CACHE_HOME="$BUILD_CACHE" "$SRC/scripts/build-llama.sh" \
  "$llama_version" "$PREFIX/venv/bin/python")
"$PREFIX/venv/bin/python" -m pip install --quiet "$wheel"
"$PREFIX/venv/bin/python" -m pip install --quiet --upgrade "$SRC"
mkdir -p "$PREFIX/share/doc"
cp "$SRC/README.md" "$SRC/edgeagent.example.toml" "$PREFIX/share/doc/"
cp -r "$SRC/docs" "$PREFIX/share/doc/"
if [ "$mode" = worker ]; then
  install_worker
  say "done"
  exit 0
fi

# 4. Config and credentials: never overwritten.
install -d -m 0755 "$ETC"
install -d -m 0700 "$ETC/credentials"
if [ ! -f "$ETC/edgeagent.toml" ]; then
  say "writing $ETC/edgeagent.toml (edit it, then: systemctl reload edgeagent)"
  install -m 0644 "$SRC/edgeagent.example.toml" "$ETC/edgeagent.toml"
fi
# LoadCredential= refuses to start the service when its file is missing: an empty password
# means "none". Put the broker password in this file (mode 0600, root only).
if [ ! -f "$ETC/credentials/mqtt-password" ]; then
  install -m 0600 /dev/null "$ETC/credentials/mqtt-password"
fi
"$PREFIX/venv/bin/edgeagent" config check "$ETC/edgeagent.toml"

# 5. The model, fetched and verified into the service's state directory.
install -d -m 0700 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE"
install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE/models"
EDGEAGENT_MODEL_DIR="$STATE/models" "$PREFIX/venv/bin/edgeagent" model fetch
chown -R "$SERVICE_USER:$SERVICE_USER" "$STATE/models"

# 6. The units. An upgrade restarts the service only: the socket keeps listening, so the
# terminals that connect meanwhile wait for the new version instead of being refused. The
# socket itself is restarted only when its unit changed (which restarts the service too).
# edgeagent-http.socket is installed, not enabled (docs/deploy.md says how to enable it).
socket_changed=yes
cmp -s "$SRC/systemd/edgeagent.socket" "$UNIT_DIR/edgeagent.socket" && socket_changed=no
http_socket_changed=yes
cmp -s "$SRC/systemd/edgeagent-http.socket" "$UNIT_DIR/edgeagent-http.socket" &&
  http_socket_changed=no
install -m 0644 "$SRC/systemd/edgeagent.service" "$SRC/systemd/edgeagent.socket" \
  "$SRC/systemd/edgeagent-http.socket" "$UNIT_DIR/"
if have_systemd; then
  systemctl daemon-reload
  # Earlier units made /run/edgeagent the service's (RuntimeDirectory=); it is the socket's now.
  if [ -d /run/edgeagent ]; then chown root:root /run/edgeagent; chmod 0755 /run/edgeagent; fi
  systemctl enable edgeagent.socket edgeagent.service
  # A socket unit refuses to start while its service runs, so the service comes first in
  # one call: its restart job is queued first, and systemd stops the daemon (which also holds
  # a copy of the HTTP port) before a socket binds again, then starts it after them, with no
  # gap for a terminal's connection to start the daemon on the old sockets.
  restart=edgeagent.service
  if [ "$socket_changed" = yes ] || ! systemctl is-active --quiet edgeagent.socket; then
    restart="$restart edgeagent.socket"
  fi
  if [ "$http_socket_changed" = yes ] && systemctl is-enabled --quiet edgeagent-http.socket; then
    restart="$restart edgeagent-http.socket"
  fi
  systemctl restart $restart
  say "running: systemctl status edgeagent; journalctl -u edgeagent -f"
else
  say "systemd is not running here: units installed in $UNIT_DIR, not started"
fi
say "done"
