#!/usr/bin/env bash
# Makes the RPM's two sources for an offline build on an EL host, as EL's Rust packages
# (sevctl, stratisd) ship them:
#
#   packaging/rpm/make-source.sh OUT_DIR        (prints the two tarballs' paths)
#
#   Source0, NAME-VERSION.tar.gz, under NAME-VERSION/: every file git would commit
#     (tracked, or untracked and not ignored), as it is in the working tree now; outside a
#     git checkout, the tree without target/ and .git/;
#   Source1, NAME-VERSION-vendor.tar.gz: vendor/, `cargo vendor --locked` of Cargo.lock
#     (every package of the lock file, for every platform: cargo has no platform filter,
#     so windows-sys comes along, unused). The spec's %prep unpacks it into the source
#     tree and points cargo at it: EL's `%cargo_prep -V 1`, or its own .cargo/config.toml.
# Before packing, the tree plus vendor/ must resolve every crate of Cargo.lock with no
# network and an empty CARGO_HOME. The archives are reproducible for a given tree: sorted
# names, owner 0, mtime of the last commit (SOURCE_DATE_EPOCH when set), gzip -n.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:?usage: make-source.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)

spec="$here/apptainer-supervisor.spec"
name=$(rpmspec -q --srpm --qf '%{name}' "$spec")
version=$(rpmspec -q --srpm --qf '%{version}' "$spec")

if [[ -e "$root/.cargo/config.toml" || -e "$root/.cargo/config" ]]; then
    # %prep writes its own (EL's %cargo_prep writes .cargo/config); one in the tree would
    # take precedence or have to be merged. Nothing needs one today.
    echo "error: $root/.cargo/config.toml exists; the spec's %prep writes its own" >&2
    exit 1
fi

stage=$(mktemp -d "${TMPDIR:-/tmp}/$name-source.XXXXXX")
trap 'rm -rf "$stage"' EXIT
tree="$stage/$name-$version"
mkdir -p "$tree"

in_git=false
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then in_git=true; fi

if $in_git; then
    (
        cd "$root"
        git ls-files -z --cached --others --exclude-standard |
            while IFS= read -r -d '' f; do
                # A tracked file deleted in the working tree is not part of it.
                if [[ -e "$f" || -L "$f" ]]; then printf '%s\0' "$f"; fi
            done |
            # --ignore-failed-read: an editor's temporary file may vanish between the
            # listing and tar; it is no part of the tree.
            tar --null --no-recursion --ignore-failed-read -T - -cf - |
            tar -xf - -C "$tree"
    )
else
    tar -C "$root" --exclude=./target --exclude=./.git -cf - . | tar -xf - -C "$tree"
fi

# Offline first (CI has run `cargo fetch --locked`, so every crate is in cargo's cache);
# a developer's machine without them fetches.
vendor_log="$stage/vendor.log"
if ! cargo vendor --manifest-path "$tree/Cargo.toml" --locked --offline "$tree/vendor" \
        >"$vendor_log" 2>&1; then
    echo "note: cargo vendor --offline failed (crates not in cargo's cache?); fetching" >&2
    cargo vendor --manifest-path "$tree/Cargo.toml" --locked "$tree/vendor" >"$vendor_log" 2>&1 || {
        cat "$vendor_log" >&2
        exit 1
    }
fi

# The tree must resolve every crate of Cargo.lock from vendor/ alone: an empty CARGO_HOME,
# --frozen (no network, no lock file change), and the configuration the spec's plain
# %prep writes. Cargo finds .cargo/config.toml from the current directory, hence the cd.
# About a second. The configuration is removed again: it is not part of Source0.
mkdir -p "$tree/.cargo"
cat >"$tree/.cargo/config.toml" <<'EOF'
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "vendor"

[net]
offline = true
EOF
(cd "$tree" && CARGO_HOME="$stage/empty-cargo-home" cargo fetch --frozen >"$vendor_log" 2>&1) || {
    cat "$vendor_log" >&2
    echo "error: the vendored tree does not resolve offline" >&2
    exit 1
}
rm -r "$tree/.cargo"

if [[ -z "${SOURCE_DATE_EPOCH:-}" ]] && $in_git; then
    SOURCE_DATE_EPOCH=$(git -C "$root" log -1 --format=%ct)
fi
mtime=${SOURCE_DATE_EPOCH:-0}

pack() { # pack ARCHIVE DIR ENTRY: DIR/ENTRY into ARCHIVE, reproducibly
    tar -C "$2" --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$mtime" \
        -cf - "$3" | gzip -n >"$1"
}
mv "$tree/vendor" "$stage/vendor"
pack "$out/$name-$version.tar.gz" "$stage" "$name-$version"
pack "$out/$name-$version-vendor.tar.gz" "$stage" vendor
echo "$out/$name-$version.tar.gz"
echo "$out/$name-$version-vendor.tar.gz"
