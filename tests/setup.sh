#!/usr/bin/env bash
# What `cargo test --locked` needs on a fresh Debian 12 machine, and nothing else:
#   tests/setup.sh && cargo test --locked        (the README's line; .ci/run runs it too)
# 1. the Debian packages the tests run (apt-get update only when one is missing);
# 2. the test rootfs a real systemd boots in (tests/support/build-rootfs.sh: debootstrap,
#    ~4 min the first time, then cached under /var/cache/apptainer-supervisor-tests).
# Idempotent: once both are there it only checks (about a second). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "tests/setup.sh: run as root (apt-get; the tests need root too)" >&2
  exit 1
fi

# e2fsprogs: mkfs.ext3 -d and debugfs for overlay images; util-linux: losetup, nsenter,
# unshare, setpriv; mandoc: man page lint; man-db: `systemd-analyze verify` checks the
# unit's Documentation= pages; systemd: systemd-analyze and the host-systemd tests;
# systemd-container: systemd-nspawn, the peer the readiness benchmark compares with;
# python3: the Apptainer CLI double (tests/support/apptainer); debootstrap: the test
# rootfs; containernetworking-plugins, iproute2, iputils-ping: the real CNI plugins in
# test network namespaces; zsh: `zsh -n` on the zsh completion script; dbus-daemon: a
# private bus for the inner-bus unit tests (a signal flood while calls wait); dbus: the
# hostile container's bus (tests/hostile.rs) and the dbus.service its image is checked
# for (until its init has chrooted, the container's root is this machine's);
# docker-registry: the CNCF distribution registry (/usr/bin/docker-registry), which
# tests/registry.rs starts on 127.0.0.1 with its own config to push and pull ORAS SIF images
# (the package's own service, on :5000, is not used); squashfs-tools: mksquashfs makes the
# system partition of the real SIF images tests/support/sif.rs builds from the rootfs;
# curl: `update` asks the registry for the manifest digest with it.
pkgs=(e2fsprogs util-linux mandoc man-db systemd systemd-container python3 debootstrap
      containernetworking-plugins iproute2 iputils-ping zsh dbus-daemon dbus docker-registry
      squashfs-tools curl)
missing=()
for p in "${pkgs[@]}"; do
  # `dpkg -s` also lists removed-but-not-purged packages: ask for the installed state.
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "tests/setup.sh: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
    "${missing[@]}" >&2
  # The registry package starts a registry of its own on :5000 of every address where
  # services may start: the tests never use it, and nothing of theirs listens beyond
  # loopback. Stop and disable it, only when this script installed it.
  if [[ " ${missing[*]} " == *" docker-registry "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now docker-registry.service >&2 2>/dev/null || true
  fi
fi

# The rootfs path goes to stderr: stdout stays empty, so `setup.sh && cargo test` reads
# as one command.
rootfs=$(tests/support/build-rootfs.sh)
echo "tests/setup.sh: packages present; test rootfs $rootfs" >&2
