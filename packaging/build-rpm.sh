#!/usr/bin/env bash
# Builds the apptainer-supervisor RPM and source RPM from the working tree, committed or
# not, then checks them.
#
#   packaging/build-rpm.sh [--prebuilt DIR] [OUT_DIR]      (default OUT_DIR: target/rpm)
#
# 1. packaging/rpm/make-source.sh: Source0 = the tree + `cargo vendor` + .cargo/config.toml.
# 2. rpmbuild -ba packaging/rpm/apptainer-supervisor.spec. With --prebuilt DIR (CI:
#    target/release, made by `cargo build --release --locked --bins`), the spec runs no
#    cargo and packages DIR's binaries; without it, %build is the offline cargo build an EL
#    host does.
# 3. The payload (`rpm -qlp`) must be exactly packaging/rpm/files.txt.
# 4. rpmlint, with packaging/rpm/rpmlintrc (each filter says why): any error or warning
#    left fails the build. Skipped with a note when rpmlint is not installed, except in CI.
# 5. packaging/rpm/msrv.sh (the Rust the EL build needs, consistent in Cargo.toml and the
#    spec) and packaging/rpm/glibc-versions.sh (what the packaged binaries need of glibc).
#
# Works on EL8/EL9 (dnf install rpm-build rust-toolset systemd-rpm-macros) and on Debian
# (apt-get install rpm rpmlint), where rpmbuild cannot see the build requirements and runs
# with --nodeps.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
spec="$here/rpm/apptainer-supervisor.spec"

prebuilt=
args=()
while (($#)); do
    case "$1" in
        --prebuilt) prebuilt=${2:?--prebuilt needs a directory}; shift 2 ;;
        --prebuilt=*) prebuilt=${1#--prebuilt=}; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "error: unknown option $1" >&2; exit 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
out=${args[0]:-$root/target/rpm}

for tool in rpmbuild rpm rpmspec tar gzip cargo python3 objdump; do
    if ! command -v "$tool" >/dev/null; then
        echo "error: $tool not found (EL: dnf install rpm-build binutils python3; Debian: apt-get install rpm binutils python3; cargo: rust-toolset or rustup)" >&2
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

echo "== Rust needed by the EL build"
"$here/rpm/msrv.sh"

topdir=$(mktemp -d "${TMPDIR:-/tmp}/$name-rpm.XXXXXX")
trap 'rm -rf "$topdir"' EXIT
mkdir -p "$topdir"/{BUILD,BUILDROOT,RPMS,SOURCES,SPECS,SRPMS}

echo "== source tarball (tree + cargo vendor)"
tarball=$("$here/rpm/make-source.sh" "$topdir/SOURCES")
echo "$(basename "$tarball"): $(du -h "$tarball" | cut -f1)"

rpmbuild_opts=(-ba --define "_topdir $topdir")
if ! rpm -q --whatprovides cargo >/dev/null 2>&1; then
    echo "note: cargo is not installed as an RPM (Debian, or a rustup toolchain): rpmbuild --nodeps" >&2
    rpmbuild_opts+=(--nodeps)
fi
binaries=()
if [[ -n "$prebuilt" ]]; then
    # %build runs in rpmbuild's own directory: a relative path would point elsewhere.
    prebuilt=$(realpath -e "$prebuilt")
    echo "note: packaging the prebuilt binaries of $prebuilt" >&2
    rpmbuild_opts+=(--define "_prebuilt_dir $prebuilt")
fi

echo "== rpmbuild"
rpmbuild "${rpmbuild_opts[@]}" "$spec" >"$topdir/rpmbuild.log" 2>&1 || {
    cat "$topdir/rpmbuild.log" >&2
    echo "error: rpmbuild failed" >&2
    exit 1
}
grep -E '^(Wrote|warning):' "$topdir/rpmbuild.log" || true

shopt -s nullglob
rpms=("$topdir"/RPMS/*/"$name"-*.rpm)
srpms=("$topdir"/SRPMS/"$name"-*.src.rpm)
if ((${#rpms[@]} != 1 || ${#srpms[@]} != 1)); then
    echo "error: expected one binary and one source package, got: ${rpms[*]} ${srpms[*]}" >&2
    exit 1
fi
rpm_file=${rpms[0]}

echo "== payload of $(basename "$rpm_file") against packaging/rpm/files.txt"
if ! diff -u --label expected --label "rpm -qlp" \
        <(grep -v '^#' "$here/rpm/files.txt" | sed '/^$/d' | sort) \
        <(rpm -qlp "$rpm_file" | sort); then
    echo "error: the payload differs from packaging/rpm/files.txt (+ packaged, - expected)" >&2
    exit 1
fi
echo "payload as expected ($(rpm -qlp "$rpm_file" | wc -l) paths)"
rpm -qp --scripts "$rpm_file"

echo "== rpmlint"
if command -v rpmlint >/dev/null; then
    lint_log="$topdir/rpmlint.log"
    # -c: rpmlint 2 reads a TOML config; -r: the filters, each with its reason.
    rpmlint -c "$here/rpm/rpmlint.toml" -r "$here/rpm/rpmlintrc" \
        "$rpm_file" "${srpms[0]}" "$spec" >"$lint_log" 2>&1 || true
    cat "$lint_log"
    summary=$(grep -E '[0-9]+ errors?, [0-9]+ warnings?' "$lint_log" | tail -n1 || true)
    if [[ -z "$summary" ]]; then
        echo "error: rpmlint printed no summary" >&2
        exit 1
    fi
    if ! grep -qE '(^| )0 errors, 0 warnings' <<<"$summary"; then
        echo "error: rpmlint: $summary; fix them or filter them in packaging/rpm/rpmlintrc with a reason" >&2
        exit 1
    fi
elif [[ -n "${CI:-}" ]]; then
    echo "error: rpmlint is not installed and CI is set (.ci/run installs it)" >&2
    exit 1
else
    echo "note: rpmlint not installed (Debian: apt-get install rpmlint; EL: dnf install rpmlint); not linted" >&2
fi

echo "== glibc symbol versions the packaged binaries need"
extract="$topdir/extract"
mkdir -p "$extract"
rpm2cpio "$rpm_file" | (cd "$extract" && cpio -idm --quiet)
for f in "$extract"/usr/bin/"$name" "$extract"/usr/lib/systemd/system-generators/*; do
    [[ -f "$f" ]] && binaries+=("$f")
done
(cd "$extract" && "$here/rpm/glibc-versions.sh" "${binaries[@]#"$extract"/}")

mkdir -p "$out"
cp "$rpm_file" "${srpms[0]}" "$out/"
echo
echo "== $out/$(basename "$rpm_file")"
echo "== $out/$(basename "${srpms[0]}")"
