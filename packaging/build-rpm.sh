#!/usr/bin/env bash
# Builds the apptainer-supervisor RPM and source RPM from the working tree, committed or
# not, then checks them.
#
#   packaging/build-rpm.sh [--prebuilt DIR] [--load MACRO_FILE] [OUT_DIR]
#                                                          (default OUT_DIR: target/rpm)
#
# --load MACRO_FILE is passed to rpmbuild: packaging/rpm/el-cargo-macros.stub builds the
# EL %cargo_* way on a host without rust-toolset's macros (a full cargo build).
#
# 1. The spec before anything is built: packaging/rpm/bundled-crates.sh --check (License:
#    and bundled(crate()) provides as Cargo.lock gives them) and packaging/rpm/spec-paths.sh
#    (what the prebuilt, plain-cargo and EL %cargo_* ways expand to).
# 2. packaging/rpm/make-source.sh: Source0 = the tree, Source1 = its `cargo vendor`.
# 3. rpmbuild -ba packaging/rpm/apptainer-supervisor.spec. With --prebuilt DIR (CI:
#    target/release, made by `cargo build --release --locked --bins`), the spec runs no
#    cargo and packages DIR's binaries; without it, %build is the offline cargo build an EL
#    host does (EL's %cargo_* macros where rust-toolset defines them, plain cargo
#    elsewhere). Debuginfo on, as on EL: where rpm does not enable it (Debian), build-rpm.sh
#    defines _enable_debug_packages and _include_minidebuginfo.
# 4. The payload (`rpm -qlp`) of the main package must be exactly packaging/rpm/files.txt.
# 5. The -debuginfo package: each binary's .debug file with its line tables and symbols,
#    whose build-id (readelf -n) is the packaged binary's, and its /usr/lib/debug/.build-id
#    link; the packaged binary itself stripped of them.
# 6. rpmlint over every package, with packaging/rpm/rpmlintrc (each filter says why): any
#    error or warning left fails the build. Skipped with a note when rpmlint is not
#    installed, except in CI.
# 7. packaging/rpm/msrv.sh (the Rust the EL build needs, consistent in Cargo.toml and the
#    spec) and packaging/rpm/glibc-versions.sh (what the packaged binaries need of glibc).
#
# Works on EL8/EL9 (dnf install rpm-build rust-toolset systemd-rpm-macros) and on Debian
# (apt-get install rpm rpmlint elfutils), where rpmbuild cannot see the build requirements
# and runs with --nodeps; find-debuginfo (debugedit, which rpm depends on) needs eu-strip
# from elfutils.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
spec="$here/rpm/apptainer-supervisor.spec"

prebuilt=
load=
args=()
while (($#)); do
    case "$1" in
        --prebuilt) prebuilt=${2:?--prebuilt needs a directory}; shift 2 ;;
        --prebuilt=*) prebuilt=${1#--prebuilt=}; shift ;;
        --load) load=$(realpath -e "${2:?--load needs a macro file}"); shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "error: unknown option $1" >&2; exit 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
out=${args[0]:-$root/target/rpm}

for tool in rpmbuild rpm rpmspec tar gzip cargo python3 objdump readelf eu-strip; do
    if ! command -v "$tool" >/dev/null; then
        echo "error: $tool not found (EL: dnf install rpm-build binutils elfutils python3; Debian: apt-get install rpm binutils elfutils python3; cargo: rust-toolset or rustup)" >&2
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

echo "== the spec: License: and bundled() provides, and its three ways to build"
"$here/rpm/bundled-crates.sh" --check
"$here/rpm/spec-paths.sh"

topdir=$(mktemp -d "${TMPDIR:-/tmp}/$name-rpm.XXXXXX")
trap 'rm -rf "$topdir"' EXIT
mkdir -p "$topdir"/{BUILD,BUILDROOT,RPMS,SOURCES,SPECS,SRPMS}

echo "== sources (tree, cargo vendor)"
"$here/rpm/make-source.sh" "$topdir/SOURCES" | while read -r tarball; do
    echo "$(basename "$tarball"): $(du -h "$tarball" | cut -f1)"
done

rpmbuild_opts=(-ba --define "_topdir $topdir")
if [[ -n "$load" ]]; then
    rpmbuild_opts+=(--load "$load")
fi
if ! rpm -q --whatprovides cargo >/dev/null 2>&1; then
    echo "note: cargo is not installed as an RPM (Debian, or a rustup toolchain): rpmbuild --nodeps" >&2
    rpmbuild_opts+=(--nodeps)
fi
# EL's redhat-rpm-config turns both on; Debian's rpm leaves them undefined.
if [[ -z "$(rpm --eval '%{?_enable_debug_packages}')" ]]; then
    rpmbuild_opts+=(--define "_enable_debug_packages 1")
fi
if [[ -z "$(rpm --eval '%{?_include_minidebuginfo}')" ]]; then
    rpmbuild_opts+=(--define "_include_minidebuginfo 1")
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
# NAME-VERSION-..., NAME-debuginfo-VERSION-... and, where rpm makes one (EL), a
# NAME-debugsource package.
rpms=("$topdir"/RPMS/*/"$name"-[0-9]*.rpm)
debuginfo=("$topdir"/RPMS/*/"$name"-debuginfo-[0-9]*.rpm)
all_rpms=("$topdir"/RPMS/*/*.rpm)
srpms=("$topdir"/SRPMS/"$name"-*.src.rpm)
if ((${#rpms[@]} != 1 || ${#debuginfo[@]} != 1 || ${#srpms[@]} != 1)); then
    echo "error: expected one binary, one -debuginfo and one source package, got:" \
        "${all_rpms[*]} ${srpms[*]}" >&2
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

echo "== debuginfo: $(basename "${debuginfo[0]}")"
extract="$topdir/extract"
debug_extract="$topdir/extract-debuginfo"
mkdir -p "$extract" "$debug_extract"
rpm2cpio "$rpm_file" | (cd "$extract" && cpio -idm --quiet)
rpm2cpio "${debuginfo[0]}" | (cd "$debug_extract" && cpio -idm --quiet)
build_id() { readelf -n "$1" | awk '/Build ID:/ {print $3}'; }
for bin in usr/bin/"$name" usr/lib/systemd/system-generators/"$name"-generator; do
    id=$(build_id "$extract/$bin")
    if [[ -z "$id" ]]; then
        echo "error: $bin in $(basename "$rpm_file") has no build-id note" >&2
        exit 1
    fi
    # The .debug file: /usr/lib/debug/PATH-VERSION-RELEASE.ARCH.debug (unique debug names).
    debug_files=("$debug_extract/usr/lib/debug/$bin"-*.debug)
    if ((${#debug_files[@]} != 1)); then
        echo "error: $(basename "${debuginfo[0]}") has no single /usr/lib/debug/$bin-*.debug" >&2
        exit 1
    fi
    debug_file=${debug_files[0]}
    debug_id=$(build_id "$debug_file")
    if [[ "$debug_id" != "$id" ]]; then
        echo "error: build-id of /$bin is $id but its .debug file's is ${debug_id:-missing}" >&2
        exit 1
    fi
    # How gdb, eu-stack and systemd-coredump find the symbols of a core's binary.
    link="$debug_extract/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug"
    if [[ "$(realpath -m "$link")" != "$(realpath "$debug_file")" ]]; then
        echo "error: $(basename "${debuginfo[0]}") lacks /usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug -> ${debug_file#"$debug_extract"}" >&2
        exit 1
    fi
    sections=$(readelf -W -S "$debug_file")
    for section in .debug_line .symtab; do
        if ! grep -qF " $section " <<<"$sections"; then
            echo "error: ${debug_file#"$debug_extract"} has no $section section" >&2
            exit 1
        fi
    done
    if readelf -W -S "$extract/$bin" | grep -qE ' \.(debug_[a-z]+|symtab) '; then
        echo "error: /$bin in $(basename "$rpm_file") still has debug sections or .symtab" >&2
        exit 1
    fi
    echo "/$bin: build-id $id; ${debug_file#"$debug_extract"} ($(du -h "$debug_file" | cut -f1)) has it, with line tables and symbols"
done

echo "== rpmlint"
if command -v rpmlint >/dev/null; then
    lint_log="$topdir/rpmlint.log"
    # -c: rpmlint 2 reads a TOML config; -r: the filters, each with its reason.
    rpmlint -c "$here/rpm/rpmlint.toml" -r "$here/rpm/rpmlintrc" \
        "${all_rpms[@]}" "${srpms[0]}" "$spec" >"$lint_log" 2>&1 || true
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
for f in "$extract"/usr/bin/"$name" "$extract"/usr/lib/systemd/system-generators/*; do
    [[ -f "$f" ]] && binaries+=("$f")
done
(cd "$extract" && "$here/rpm/glibc-versions.sh" "${binaries[@]#"$extract"/}")

mkdir -p "$out"
cp "${all_rpms[@]}" "${srpms[0]}" "$out/"
echo
for f in "${all_rpms[@]}" "${srpms[0]}"; do
    echo "== $out/$(basename "$f")"
done
