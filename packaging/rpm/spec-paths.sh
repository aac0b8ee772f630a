#!/usr/bin/env bash
# Checks what each of the spec's three ways to build expands to (rpmspec -P, the spec as
# rpmbuild would run it; nothing is built):
#   prebuilt      --define "_prebuilt_dir DIR": no cargo; the binaries come from DIR;
#   plain         no %cargo_* macros (Debian, rustup): Source1 unpacked, our own
#                 .cargo/config.toml, `cargo build --release --frozen --offline`;
#   cargo_macros  EL8/EL9 rust-toolset's macros, stood in for by el-cargo-macros.stub
#                 (rpmspec --load): %cargo_prep -V 1 unpacks Source1, %cargo_build
#                 --locked, %cargo_install, then the generator moved to systemd's directory.
# It fails when a way misses a step or takes another way's. Run by packaging/build-rpm.sh.
#
#   packaging/rpm/spec-paths.sh
#
# What it does not show: that EL's own macros build the package (only a build on EL does),
# nor the plain way's build (packaging/build-rpm.sh without --prebuilt runs that for real).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
spec="$here/apptainer-supervisor.spec"
stub="$here/el-cargo-macros.stub"
work=$(mktemp -d "${TMPDIR:-/tmp}/apptainer-supervisor-spec-paths.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Fixed directories, so that the expected text does not depend on the host's rpm setup.
common=(--define "_sourcedir /SOURCES" --define "_builddir /BUILD"
        --define "buildroot /BUILDROOT" --define "_smp_mflags -j2")
# The plain and prebuilt ways must not see a host's real %cargo_* macros (an EL host).
no_macros=(--undefine cargo_prep --undefine cargo_build --undefine cargo_install)

rpmspec -P "${common[@]}" "${no_macros[@]}" --define "_prebuilt_dir /PREBUILT" "$spec" \
    >"$work/prebuilt"
rpmspec -P "${common[@]}" "${no_macros[@]}" "$spec" >"$work/plain"
rpmspec -P "${common[@]}" --load "$stub" --define "rhel 9" "$spec" >"$work/cargo_macros"

python3 - "$work" <<'PY'
import re, sys

work = sys.argv[1]
SECTIONS = ("prep", "build", "install", "check", "files", "post", "preun", "postun",
            "changelog", "description", "package")

def sections(path):
    out, cur = {}, "preamble"
    for line in open(path).read().splitlines():
        m = re.match(r"^%(\w+)\b", line)
        if m and m.group(1) in SECTIONS:
            cur = m.group(1)
            out.setdefault(cur, [])
            continue
        out.setdefault(cur, []).append(line)
    out = {k: "\n".join(v) for k, v in out.items()}
    # rpmspec -P (rpm 4.18) leaves out the "%build" line when the section opens with a
    # conditional: %build's lines then follow %prep's. Check the two as one.
    out["prep"] = out["build"] = out.get("prep", "") + "\n" + out.get("build", "")
    return out

# (way, section, regular expression, must it be there?)
VENDOR = re.escape("tar -xoaf /SOURCES/apptainer-supervisor-") + r"[^ ]*-vendor\.tar\.gz"
checks = [
    ("prebuilt", "prep", VENDOR, False),
    ("prebuilt", "build", r'test "\$\(/PREBUILT/apptainer-supervisor --version\)"', True),
    ("prebuilt", "install", r"install -D -m 0755 /PREBUILT/apptainer-supervisor-generator", True),
    ("plain", "prep", VENDOR, True),
    ("plain", "prep", r'cat > \.cargo/config\.toml', True),
    ("plain", "build", r"^cargo build --release --frozen --offline --bins$", True),
    ("plain", "install", r"install -D -m 0755 target/release/apptainer-supervisor ", True),
    ("cargo_macros", "prep", VENDOR, True),
    ("cargo_macros", "prep", r"echo 'directory = \"\./vendor\"' >> \.cargo/config", True),
    ("cargo_macros", "prep", r"config\.toml", False),
    ("cargo_macros", "build", r"^/usr/bin/env CARGO_HOME=\.cargo cargo build --release -j2 --locked$", True),
    ("cargo_macros", "install", r"^/usr/bin/env CARGO_HOME=\.cargo cargo install --no-track --path \.$", True),
    ("cargo_macros", "install", r"^mv /BUILDROOT/usr/bin/apptainer-supervisor-generator /BUILDROOT/usr/lib/systemd/system-generators/$", True),
    ("cargo_macros", "install", r"target/release", False),
]
# No way may run another's cargo: the prebuilt way runs none at all.
for way in ("prebuilt", "plain", "cargo_macros"):
    for sec in ("prep", "build", "install"):
        if way == "prebuilt":
            checks.append((way, sec, r"\bcargo\b", False))
        if way != "cargo_macros":
            checks.append((way, sec, r"CARGO_HOME|%cargo_|cargo install", False))
    checks.append((way, "install", r"completions bash > apptainer-supervisor\.bash", True))

texts = {w: sections(f"{work}/{w}") for w in ("prebuilt", "plain", "cargo_macros")}
failed = 0
for way, sec, pattern, wanted in checks:
    found = re.search(pattern, texts[way].get(sec, ""), re.M) is not None
    if found != wanted:
        failed += 1
        print(f"error: {way}: %{sec} {'lacks' if wanted else 'has'} /{pattern}/:\n"
              + texts[way].get(sec, "(no such section)"), file=sys.stderr)
if failed:
    sys.exit(f"error: {failed} of {len(checks)} spec-path checks failed")
print(f"spec paths: prebuilt, plain and EL cargo macros expand as expected ({len(checks)} checks)")
PY
