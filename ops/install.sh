#!/bin/sh
# Installs syncd on this machine (run as root), or into a staging tree with
# --root DIR (for packaging; no user is created and systemd is not touched).
#
#   cargo build --release && sudo ops/install.sh
#
# Installs: syncd and syncctl in /usr/local/bin, the unit in
# /etc/systemd/system (plus a drop-in making every synced root writable),
# the syncctl man page and bash completion, the operator's guide, the
# system user and group `syncd`, /etc/syncd with example configuration
# (only if none exists), /var/lib/syncd.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
root=""
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root=$2; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
target=${CARGO_TARGET_DIR:-$repo/target}
for b in syncd syncctl; do
    if [ ! -x "$target/release/$b" ]; then
        echo "install.sh: $target/release/$b not found; run cargo build --release first" >&2
        exit 1
    fi
done
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (or use --root DIR to stage)" >&2
    exit 1
fi

bin=$root/usr/local/bin
install -d "$bin" "$root/etc/syncd/dirs.d" "$root/etc/systemd/system/syncd.service.d" \
    "$root/usr/local/share/man/man1" "$root/usr/local/share/doc/syncd" \
    "$root/usr/share/bash-completion/completions"
# Stripped: the release build keeps line tables for profiling (~500 MB).
install -s -m 0755 "$target/release/syncd" "$target/release/syncctl" "$bin/" 2>/dev/null ||
    install -m 0755 "$target/release/syncd" "$target/release/syncctl" "$bin/"
install -m 0644 "$here/syncd.service" "$root/etc/systemd/system/syncd.service"
install -m 0644 "$here/README.md" "$root/usr/local/share/doc/syncd/README.md"
"$bin/syncctl" man > "$root/usr/local/share/man/man1/syncctl.1"
"$bin/syncctl" completions bash > "$root/usr/share/bash-completion/completions/syncctl"

if [ ! -e "$root/etc/syncd/syncd.toml" ]; then
    sed "s/^id = \"web-01\"/id = \"$(hostname -s 2>/dev/null || hostname)\"/" \
        "$here/examples/syncd.toml" > "$root/etc/syncd/syncd.toml"
    echo "installed an example /etc/syncd/syncd.toml: edit peers, labels, listen"
fi

# ProtectSystem=strict makes the file system read-only for syncd except
# where allowed: every synced root of dirs.d.
paths=$(sed -n 's/^path *= *"\(.*\)".*/\1/p' "$root"/etc/syncd/dirs.d/*.toml 2>/dev/null | sort -u)
{
    echo "# Written by ops/install.sh from /etc/syncd/dirs.d; re-run it after adding a directory."
    echo "[Service]"
    for p in $paths; do echo "ReadWritePaths=$p"; done
} > "$root/etc/systemd/system/syncd.service.d/paths.conf"

if [ -n "$root" ]; then
    echo "staged into $root"
    exit 0
fi

getent group syncd >/dev/null || groupadd --system syncd
getent passwd syncd >/dev/null ||
    useradd --system --gid syncd --home-dir /var/lib/syncd --shell /usr/sbin/nologin syncd
install -d -o syncd -g syncd -m 0750 /var/lib/syncd
for p in $paths; do
    [ -d "$p" ] || install -d -o syncd -g syncd -m 0755 "$p"
done
"$bin/syncd" check-config --config /etc/syncd/syncd.toml || \
    echo "install.sh: fix the configuration above before starting syncd" >&2
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify /etc/systemd/system/syncd.service
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "next: systemctl enable --now syncd && syncctl status"
fi
