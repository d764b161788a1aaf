#!/bin/sh
# Installs the static hostbind guest agent from this tarball (see ./install.sh --help).
# All or nothing: everything is checked before anything is installed, and a failure while
# installing undoes what this run did.
set -eu

usage() {
    cat <<'EOF'
Usage: ./install.sh [--root DIR] [--prefix DIR] [--no-start] [--no-user]

Installs the static hostbind guest agent from this unpacked tarball: no package manager and
no shared library needed. Run it as root.

  ./install.sh                  install into this system, enable and start the agent
  ./install.sh --no-start       install and enable it; it starts at the next boot
  ./install.sh --root DIR       install into a guest image mounted at DIR (nothing is started;
                                DIR must hold the image's etc/passwd and etc/group)

Options:
  --prefix DIR   where the binary, man pages and completions go (default /usr/local)
  --no-user      do not create the user and group hostbind (they exist, or you make them)
  -h, --help     this text

Installs PREFIX/bin/hostbind-agent, /etc/systemd/system/hostbind-agent.service (enabled), man
pages and shell completions under PREFIX/share, and creates the system user and group
hostbind. Apps reach the agent at /run/hostbind/agent.sock (group hostbind, mode 0660).

Everything is checked first; if installing fails midway, what this run installed is removed
again and files it replaced are restored. Exit status: 0 installed, 1 failed (nothing
changed), 2 bad command line.
EOF
}

ROOT=""
PREFIX="/usr/local"
START=1
USERS=1

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

say() { echo "install.sh: $*"; }

# --- check everything first -------------------------------------------------------------------
problems=""
problem() { problems="$problems
  - $*"; }

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

# The tarball's own files.
[ -x "$HERE/bin/hostbind-agent" ] || problem "$HERE/bin/hostbind-agent is missing: run install.sh from the unpacked tarball"
[ -f "$HERE/hostbind-agent.service" ] || problem "$HERE/hostbind-agent.service is missing: unpack the whole tarball"
for f in completions/hostbind-agent.bash completions/_hostbind-agent completions/hostbind-agent.fish; do
    [ -f "$HERE/$f" ] || problem "$HERE/$f is missing: unpack the whole tarball"
done
set -- "$HERE"/man/*.1.gz
[ -f "$1" ] || problem "no man pages in $HERE/man: unpack the whole tarball"

# Where it goes: every target directory must be creatable, every target file replaceable.
writable_dir() { # writable_dir DIR: DIR, or its nearest existing ancestor, is a writable directory
    d=$1
    while [ ! -e "$d" ]; do d=$(dirname "$d"); done
    if [ ! -d "$d" ]; then
        problem "$d is not a directory (it is in the way of $1)"
    elif [ ! -w "$d" ]; then
        problem "$d is not writable by $(id -un) (read-only file system, or run as root)"
    fi
}
unitdir="$ROOT/etc/systemd/system"
for d in "$ROOT$PREFIX/bin" "$ROOT$PREFIX/share/man/man1" \
    "$ROOT$PREFIX/share/bash-completion/completions" "$ROOT$PREFIX/share/zsh/site-functions" \
    "$ROOT$PREFIX/share/fish/vendor_completions.d"; do
    writable_dir "$d"
done
for f in "$ROOT$PREFIX/bin/hostbind-agent" "$unitdir/hostbind-agent.service"; do
    [ ! -d "$f" ] || problem "$f is a directory"
done

# The system user and group the agent runs as.
has_user() {
    if [ -n "$ROOT" ]; then grep -q "^$1:" "$ROOT/etc/passwd" 2>/dev/null; else getent passwd "$1" >/dev/null; fi
}
has_group() {
    if [ -n "$ROOT" ]; then grep -q "^$1:" "$ROOT/etc/group" 2>/dev/null; else getent group "$1" >/dev/null; fi
}
user_tool=""
if [ "$USERS" = 1 ] && ! { has_user hostbind && has_group hostbind; }; then
    if [ -n "$ROOT" ] && { [ ! -f "$ROOT/etc/passwd" ] || [ ! -f "$ROOT/etc/group" ]; }; then
        problem "$ROOT has no etc/passwd and etc/group: it is not a guest image's root (mount the image there), or pass --no-user to install only the files"
    fi
    if command -v useradd >/dev/null 2>&1 && command -v groupadd >/dev/null 2>&1; then
        user_tool=shadow
    elif [ -z "$ROOT" ] && command -v adduser >/dev/null 2>&1 && command -v addgroup >/dev/null 2>&1; then
        user_tool=busybox
    else
        problem "cannot create the user and group hostbind: no useradd/groupadd here (with --root they are needed on this machine); create them, then rerun with --no-user"
    fi
    [ "$(id -u)" = 0 ] || problem "creating the user and group hostbind needs root: run as root, or create them and pass --no-user"
fi

# systemd, in the image or here.
has_systemd() {
    if [ -n "$ROOT" ]; then
        [ -d "$unitdir" ] || [ -x "$ROOT/usr/lib/systemd/systemd" ] || [ -x "$ROOT/lib/systemd/systemd" ]
    else
        [ -d /run/systemd/system ] || command -v systemctl >/dev/null 2>&1
    fi
}
if has_systemd; then
    writable_dir "$unitdir/multi-user.target.wants"
fi

if [ -n "$problems" ]; then
    echo "install.sh: nothing was installed:$problems" >&2
    exit 1
fi

# --- install, undoing this run's changes if a step fails ---------------------------------------
UNDO=$(mktemp -d "${TMPDIR:-/tmp}/hostbind-install.XXXXXX")
: >"$UNDO/log"
n=0
finished=0
log() { echo "$*" >>"$UNDO/log"; } # log OP ARG PATH (ARG is - when unused)
undo() {
    if [ "$finished" = 0 ]; then
        echo "install.sh: installing failed; undoing what this run did" >&2
        # Newest first.
        sed '1!G;h;$!d' "$UNDO/log" | while read -r op arg path; do
            case "$op" in
                rm) rm -f "$path" ;;
                rmdir) rmdir "$path" 2>/dev/null || true ;;
                restore) cp -p "$UNDO/$arg" "$path" ;;
                userdel) if [ -n "$ROOT" ]; then userdel --root "$ROOT" "$path"; else userdel "$path"; fi ;;
                groupdel) if [ -n "$ROOT" ]; then groupdel --root "$ROOT" "$path"; else groupdel "$path"; fi ;;
                deluser) deluser "$path" ;;
                delgroup) delgroup "$path" ;;
            esac || echo "install.sh: could not undo: $op $path" >&2
        done
        rm -rf "$UNDO"
        echo "install.sh: nothing was installed" >&2
        exit 1
    fi
    rm -rf "$UNDO"
}
trap undo EXIT
trap 'exit 1' HUP INT TERM

mkdirs() { # mkdirs DIR: DIR and its missing parents (mode 0755)
    [ -d "$1" ] && return 0
    mkdirs "$(dirname "$1")"
    mkdir -m 0755 "$1"
    log rmdir - "$1"
}
put() { # put SRC DEST MODE: install one file, keeping what it replaces
    if [ -e "$2" ] || [ -L "$2" ]; then
        n=$((n + 1))
        cp -p "$2" "$UNDO/$n"
        log restore "$n" "$2"
    else
        log rm - "$2"
    fi
    install -m "$3" "$1" "$2"
}

# Binary, man pages, completions.
mkdirs "$ROOT$PREFIX/bin"
put "$HERE/bin/hostbind-agent" "$ROOT$PREFIX/bin/hostbind-agent" 0755
mkdirs "$ROOT$PREFIX/share/man/man1"
for page in "$HERE"/man/*.1.gz; do
    put "$page" "$ROOT$PREFIX/share/man/man1/$(basename "$page")" 0644
done
mkdirs "$ROOT$PREFIX/share/bash-completion/completions"
put "$HERE/completions/hostbind-agent.bash" "$ROOT$PREFIX/share/bash-completion/completions/hostbind-agent" 0644
mkdirs "$ROOT$PREFIX/share/zsh/site-functions"
put "$HERE/completions/_hostbind-agent" "$ROOT$PREFIX/share/zsh/site-functions/_hostbind-agent" 0644
mkdirs "$ROOT$PREFIX/share/fish/vendor_completions.d"
put "$HERE/completions/hostbind-agent.fish" "$ROOT$PREFIX/share/fish/vendor_completions.d/hostbind-agent.fish" 0644
say "installed $ROOT$PREFIX/bin/hostbind-agent"

# The systemd unit, pointing at PREFIX, enabled the way `systemctl enable` does it.
enable_offline() {
    mkdirs "$unitdir/multi-user.target.wants"
    link="$unitdir/multi-user.target.wants/hostbind-agent.service"
    if [ ! -L "$link" ]; then
        ln -s /etc/systemd/system/hostbind-agent.service "$link"
        log rm - "$link"
    fi
}
systemd_here=0
if has_systemd; then
    systemd_here=1
    mkdirs "$unitdir"
    sed "s|/usr/bin/hostbind-agent|$PREFIX/bin/hostbind-agent|" "$HERE/hostbind-agent.service" \
        >"$UNDO/unit"
    put "$UNDO/unit" "$unitdir/hostbind-agent.service" 0644
    if [ -n "$ROOT" ] || [ ! -d /run/systemd/system ]; then
        enable_offline
    fi
fi

# The system user and group (last among the changes that can fail: undone with the rest).
if [ "$USERS" = 1 ]; then
    nologin=/usr/sbin/nologin
    [ -x "$ROOT$nologin" ] || nologin=/sbin/nologin
    case "$user_tool" in
        shadow)
            set --
            [ -n "$ROOT" ] && set -- --root "$ROOT"
            if ! has_group hostbind; then
                groupadd "$@" --system hostbind
                log groupdel - hostbind
            fi
            if ! has_user hostbind; then
                useradd "$@" --system --gid hostbind --no-create-home \
                    --home-dir /nonexistent --shell "$nologin" --comment "hostbind daemons" hostbind
                log userdel - hostbind
            fi
            ;;
        busybox)
            if ! has_group hostbind; then
                addgroup -S hostbind
                log delgroup - hostbind
            fi
            if ! has_user hostbind; then
                adduser -S -D -H -h /nonexistent -s "$nologin" -G hostbind hostbind
                log deluser - hostbind
            fi
            ;;
    esac
    say "user and group hostbind are there; add the users of licensed apps to group hostbind"
fi

# Done: what follows changes nothing on disk that could need undoing.
finished=1
if [ "$systemd_here" = 1 ]; then
    if [ -n "$ROOT" ]; then
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
        say "installed and enabled hostbind-agent.service (systemd is not running now)"
    fi
else
    say "no systemd here: start the agent from your init system as user hostbind:"
    say "  $PREFIX/bin/hostbind-agent --socket /run/hostbind/agent.sock run --host vsock:2:9999 --state-dir /var/lib/hostbind-agent"
    say "  (create /run/hostbind and /var/lib/hostbind-agent owned by hostbind first)"
fi
