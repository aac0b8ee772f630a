#!/usr/bin/env bash
# Makes the RPM's Source0, NAME-VERSION.tar.gz, for an offline build on an EL host:
#
#   packaging/rpm/make-source.sh OUT_DIR        (prints the tarball's path)
#
# Contents, under NAME-VERSION/:
#   - every file git would commit (tracked, or untracked and not ignored), as it is in the
#     working tree now; outside a git checkout, the tree without target/ and .git/;
#   - vendor/: `cargo vendor --locked` of Cargo.lock (every package of the lock file, for
#     every platform: cargo has no platform filter, so windows-sys comes along, unused);
#   - .cargo/config.toml, which replaces crates.io with vendor/ and sets net.offline, so
#     that `cargo build --frozen --offline` in %build needs nothing but the tarball.
# The archive is reproducible for a given tree: sorted names, owner 0, mtime of the last
# commit (SOURCE_DATE_EPOCH when set), gzip -n.
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
    # The tarball's own config would have to be merged with it; nothing needs one today.
    echo "error: $root/.cargo/config.toml exists; make-source.sh writes its own" >&2
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

mkdir -p "$tree/.cargo"
cat >"$tree/.cargo/config.toml" <<'EOF'
# Written by packaging/rpm/make-source.sh: build from vendor/ only, never the network.
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "vendor"

[net]
offline = true
EOF

# The tree must resolve every crate of Cargo.lock from vendor/ alone: an empty CARGO_HOME,
# --frozen (no network, no lock file change). Cargo finds .cargo/config.toml from the
# current directory, hence the cd. About a second.
(cd "$tree" && CARGO_HOME="$stage/empty-cargo-home" cargo fetch --frozen >"$vendor_log" 2>&1) || {
    cat "$vendor_log" >&2
    echo "error: the vendored tree does not resolve offline" >&2
    exit 1
}

if [[ -z "${SOURCE_DATE_EPOCH:-}" ]] && $in_git; then
    SOURCE_DATE_EPOCH=$(git -C "$root" log -1 --format=%ct)
fi
mtime=${SOURCE_DATE_EPOCH:-0}

tarball="$out/$name-$version.tar.gz"
tar -C "$stage" --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$mtime" \
    -cf - "$name-$version" | gzip -n >"$tarball"
echo "$tarball"
