#!/bin/sh
# Installs the static hostbind guest agent from this tarball: no package manager and no shared
# library needed. Run as root, from the unpacked tarball.
#
#   ./install.sh                  install into this system, enable and start the agent
#   ./install.sh --no-start       install and enable, start at next boot
#   ./install.sh --root DIR       install into a guest image mounted at DIR (nothing is started)
#
# Options: --prefix DIR (default /usr/local), --no-user (the user and group `hostbind` exist).
# Installs PREFIX/bin/hostbind-agent, /etc/systemd/system/hostbind-agent.service (enabled), man
# pages and shell completions under PREFIX/share, and creates the system user and group
# `hostbind`. Apps reach the agent at /run/hostbind/agent.sock (group hostbind, mode 0660).
set -eu

ROOT=""
PREFIX="/usr/local"
START=1
USERS=1

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || { echo "install.sh: --root needs a directory" >&2; exit 2; }; ROOT="$2"; shift 2 ;;
        --root=*) ROOT="${1#--root=}"; shift ;;
        --prefix) [ $# -ge 2 ] || { echo "install.sh: --prefix needs a directory" >&2; exit 2; }; PREFIX="$2"; shift 2 ;;
        --prefix=*) PREFIX="${1#--prefix=}"; shift ;;
        --no-start) START=0; shift ;;
        --no-user) USERS=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

case "$PREFIX" in
    /*) ;;
    *) echo "install.sh: --prefix must be an absolute path, not '$PREFIX'" >&2; exit 2 ;;
esac
if [ -n "$ROOT" ]; then
    if [ ! -d "$ROOT" ]; then
        echo "install.sh: --root $ROOT is not a directory (mount the guest image there first)" >&2
        exit 2
    fi
    ROOT=$(cd "$ROOT" && pwd)
    START=0
fi
HERE=$(cd "$(dirname "$0")" && pwd)
if [ ! -x "$HERE/bin/hostbind-agent" ]; then
    echo "install.sh: $HERE/bin/hostbind-agent is missing; run install.sh from the unpacked tarball" >&2
    exit 1
fi

say() { echo "install.sh: $*"; }

# Binary, man pages, completions.
install -d "$ROOT$PREFIX/bin" "$ROOT$PREFIX/share/man/man1" \
    "$ROOT$PREFIX/share/bash-completion/completions" \
    "$ROOT$PREFIX/share/zsh/site-functions" \
    "$ROOT$PREFIX/share/fish/vendor_completions.d"
install -m 0755 "$HERE/bin/hostbind-agent" "$ROOT$PREFIX/bin/hostbind-agent"
for page in "$HERE"/man/*.1.gz; do
    install -m 0644 "$page" "$ROOT$PREFIX/share/man/man1/"
done
install -m 0644 "$HERE/completions/hostbind-agent.bash" \
    "$ROOT$PREFIX/share/bash-completion/completions/hostbind-agent"
install -m 0644 "$HERE/completions/_hostbind-agent" "$ROOT$PREFIX/share/zsh/site-functions/"
install -m 0644 "$HERE/completions/hostbind-agent.fish" "$ROOT$PREFIX/share/fish/vendor_completions.d/"
say "installed $ROOT$PREFIX/bin/hostbind-agent"

# The system user and group the agent runs as.
has_user() {
    if [ -n "$ROOT" ]; then grep -q "^$1:" "$ROOT/etc/passwd" 2>/dev/null; else getent passwd "$1" >/dev/null; fi
}
has_group() {
    if [ -n "$ROOT" ]; then grep -q "^$1:" "$ROOT/etc/group" 2>/dev/null; else getent group "$1" >/dev/null; fi
}
if [ "$USERS" = 1 ]; then
    nologin=/usr/sbin/nologin
    [ -x "$ROOT$nologin" ] || nologin=/sbin/nologin
    if command -v useradd >/dev/null 2>&1; then
        set --
        [ -n "$ROOT" ] && set -- --root "$ROOT"
        has_group hostbind || groupadd "$@" --system hostbind
        has_user hostbind || useradd "$@" --system --gid hostbind --no-create-home \
            --home-dir /nonexistent --shell "$nologin" --comment "hostbind daemons" hostbind
    elif [ -z "$ROOT" ] && command -v adduser >/dev/null 2>&1; then
        # busybox
        has_group hostbind || addgroup -S hostbind
        has_user hostbind || adduser -S -D -H -h /nonexistent -s "$nologin" -G hostbind hostbind
    else
        echo "install.sh: cannot create the user and group hostbind (no useradd; with --root, useradd is needed); create them, then rerun with --no-user" >&2
        exit 1
    fi
    say "user and group hostbind are there; add the users of licensed apps to group hostbind"
fi

# The systemd unit, pointing at PREFIX.
unitdir="$ROOT/etc/systemd/system"
has_systemd() {
    if [ -n "$ROOT" ]; then
        [ -d "$unitdir" ] || [ -x "$ROOT/usr/lib/systemd/systemd" ] || [ -x "$ROOT/lib/systemd/systemd" ]
    else
        [ -d /run/systemd/system ] || command -v systemctl >/dev/null 2>&1
    fi
}
if has_systemd; then
    install -d "$unitdir"
    sed "s|/usr/bin/hostbind-agent|$PREFIX/bin/hostbind-agent|" "$HERE/hostbind-agent.service" \
        > "$unitdir/hostbind-agent.service"
    chmod 0644 "$unitdir/hostbind-agent.service"
    if [ -n "$ROOT" ]; then
        # Offline: the same symlink `systemctl enable` makes.
        install -d "$unitdir/multi-user.target.wants"
        ln -sf /etc/systemd/system/hostbind-agent.service \
            "$unitdir/multi-user.target.wants/hostbind-agent.service"
        say "installed and enabled hostbind-agent.service in $ROOT"
    elif [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable hostbind-agent.service
        if [ "$START" = 1 ]; then
            systemctl restart hostbind-agent.service
            say "hostbind-agent is running: hostbind-agent status"
        else
            say "hostbind-agent starts at next boot (or: systemctl start hostbind-agent)"
        fi
    else
        install -d "$unitdir/multi-user.target.wants"
        ln -sf /etc/systemd/system/hostbind-agent.service \
            "$unitdir/multi-user.target.wants/hostbind-agent.service"
        say "installed and enabled hostbind-agent.service (systemd is not running now)"
    fi
else
    say "no systemd here: start the agent from your init system as user hostbind:"
    say "  $PREFIX/bin/hostbind-agent --socket /run/hostbind/agent.sock run --host vsock:2:9999 --state-dir /var/lib/hostbind-agent"
    say "  (create /run/hostbind and /var/lib/hostbind-agent owned by hostbind first)"
fi
