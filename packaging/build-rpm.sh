#!/usr/bin/env bash
# Builds the apptainer-supervisor RPM from the working tree, committed or not, and lists
# what it contains.
#
#   packaging/build-rpm.sh [OUT_DIR]        (default OUT_DIR: target/rpm)
#
# CARGO_TARGET_DIR, when set, is passed to the spec's %build, so an existing release
# build is reused instead of starting from nothing (CI: CARGO_TARGET_DIR=$PWD/target).
# Works on EL8/EL9 (rpm-build) and on Debian (apt-get install rpm), where rpmbuild cannot
# see the build requirements and runs with --nodeps.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
spec="$here/apptainer-supervisor.spec"
out=${1:-$root/target/rpm}

for tool in rpmbuild rpm rpmspec tar cargo; do
    if ! command -v "$tool" >/dev/null; then
        echo "error: $tool not found (EL: dnf install rpm-build; Debian: apt-get install rpm; cargo: rustup)" >&2
        exit 1
    fi
done

name=$(rpmspec -q --srpm --qf '%{name}' "$spec")
version=$(rpmspec -q --srpm --qf '%{version}' "$spec")
cargo_version=$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml")
if [[ "$version" != "$cargo_version" ]]; then
    echo "error: $spec has Version: $version but Cargo.toml has version $cargo_version" >&2
    exit 1
fi

topdir=$(mktemp -d "${TMPDIR:-/tmp}/$name-rpm.XXXXXX")
trap 'rm -rf "$topdir"' EXIT
mkdir -p "$topdir"/{BUILD,BUILDROOT,RPMS,SOURCES,SPECS,SRPMS}

# The source tarball: every file git would commit (tracked, or untracked and not ignored),
# as it is in the working tree now; outside a git checkout, the tree without target/.
tarball="$topdir/SOURCES/$name-$version.tar.gz"
tar_opts=(--transform "s,^\./,,;s,^,$name-$version/," --sort=name --owner=0 --group=0 --numeric-owner)
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (
        cd "$root"
        git ls-files -z --cached --others --exclude-standard |
            while IFS= read -r -d '' f; do
                # A tracked file deleted in the working tree is not part of it.
                if [[ -e "$f" || -L "$f" ]]; then printf '%s\0' "$f"; fi
            done |
            # --ignore-failed-read: an editor's temporary file may vanish between the
            # listing and tar; it is no part of the tree.
            tar "${tar_opts[@]}" --null --no-recursion --ignore-failed-read -T - -czf "$tarball"
    )
else
    tar "${tar_opts[@]}" -C "$root" --exclude=./target --exclude=./.git -czf "$tarball" .
fi

rpmbuild_opts=(-bb --define "_topdir $topdir")
if ! rpm -q --whatprovides cargo >/dev/null 2>&1; then
    echo "note: cargo is not installed as an RPM (Debian, or a rustup toolchain): rpmbuild --nodeps" >&2
    rpmbuild_opts+=(--nodeps)
fi
if [[ -n "${CARGO_TARGET_DIR:-}" ]]; then
    # %build runs in rpmbuild's own directory: a relative path would point elsewhere.
    CARGO_TARGET_DIR=$(realpath -m "$CARGO_TARGET_DIR")
    export CARGO_TARGET_DIR
    echo "note: reusing CARGO_TARGET_DIR=$CARGO_TARGET_DIR" >&2
fi

rpmbuild "${rpmbuild_opts[@]}" "$spec"

mkdir -p "$out"
shopt -s nullglob
rpms=("$topdir"/RPMS/*/*.rpm)
if (( ${#rpms[@]} == 0 )); then
    echo "error: rpmbuild produced no package" >&2
    exit 1
fi
for rpm_file in "${rpms[@]}"; do
    cp "$rpm_file" "$out/"
    echo
    echo "== $out/$(basename "$rpm_file")"
    rpm -qlp "$rpm_file"
done
