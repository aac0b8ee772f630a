#!/usr/bin/env bash
# Builds the small Debian rootfs the tests boot a real systemd in, and caches it outside
# the work tree, keyed by this script's hash (a changed script builds a new one).
#   usage: tests/support/build-rootfs.sh        → prints the rootfs path
# Cache: $ASV_ROOTFS_CACHE (default /var/cache/apptainer-supervisor-tests).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${ASV_ROOTFS_CACHE:-/var/cache/apptainer-supervisor-tests}
key=$(sha256sum "$0" | cut -c1-16)
out="$cache/rootfs-$key"
if [ -f "$out/.complete" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$cache"
tmp="$cache/.build-$key-$$"
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
# The machine's own apt mirror (the only one reachable here).
mirror=$(grep -hoE '^URIs: *http[^ ]+' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | awk '{print $2}')
mirror=${mirror:-http://deb.debian.org/debian}
command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install debootstrap" >&2; exit 1; }
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus bookworm "$tmp" "$mirror" >&2
rm -f "$tmp"/var/cache/apt/archives/*.deb
# Per-instance identity comes at boot: empty machine-id → systemd makes a transient one.
: > "$tmp/etc/machine-id"
rm -f "$tmp/var/lib/dbus/machine-id"
ln -sf /dev/null "$tmp/etc/systemd/system/console-getty.service"
# Test units (issue: readiness from the inner systemd).
install -d "$tmp/etc/systemd/system/multi-user.target.wants"
cat > "$tmp/etc/systemd/system/asv-simple.service" <<'UNIT'
[Unit]
Description=test: long-running service that leaves a mark when stopped
[Service]
ExecStart=/bin/sleep infinity
ExecStop=/bin/sh -c 'echo stopped >> /var/lib/asv-simple.mark'
[Install]
WantedBy=multi-user.target
UNIT
cat > "$tmp/etc/systemd/system/asv-flaky.service" <<'UNIT'
[Unit]
Description=test: fails when /run/asv-fail exists
[Service]
ExecStart=/bin/sh -c 'test ! -e /run/asv-fail && exec /bin/sleep infinity'
[Install]
WantedBy=multi-user.target
UNIT
cat > "$tmp/etc/systemd/system/asv-slow.service" <<'UNIT'
[Unit]
Description=test: slow to start
[Service]
Type=notify
NotifyAccess=all
ExecStart=/bin/sh -c 'sleep 1; systemd-notify --ready; exec /bin/sleep infinity'
[Install]
WantedBy=multi-user.target
UNIT
for u in asv-simple asv-flaky asv-slow; do
  ln -sf "/etc/systemd/system/$u.service" "$tmp/etc/systemd/system/multi-user.target.wants/$u.service"
done
touch "$tmp/.complete"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "$out"
