#!/usr/bin/env bash
# Writes the spec's License: tag and its `Provides: bundled(crate(NAME)) = VERSION` lines
# (Fedora's packaging guidelines for bundled Rust crates) between the "BEGIN bundled-crates"
# and "END bundled-crates" lines of packaging/rpm/apptainer-supervisor.spec.
#
#   packaging/rpm/bundled-crates.sh            rewrite the spec's block
#   packaging/rpm/bundled-crates.sh --check    fail, showing the diff, when the committed
#                                              block is not what Cargo.lock gives
#                                              (packaging/build-rpm.sh, hence CI, runs it)
#
# Which crates: those linked into the Linux binaries, from
#   cargo tree -e normal,no-proc-macro --target <each EL architecture's Linux triple>
# - normal edges only: build-dependencies (build.rs helpers such as cc or autocfg) run on
#   the build host and dev-dependencies only in tests; neither is in the binary;
# - no proc-macros: a proc-macro crate (serde_derive, thiserror-impl, tokio-macros,
#   zbus_macros, clap_derive) and what only it uses (syn, quote, proc-macro2) is a compiler
#   plugin rustc loads while compiling; its code is not linked into the binary. Fedora's
#   %cargo_license macro chooses the same edges (no-build, no-dev, no-proc-macro);
# - the Linux triples of EL's four architectures, so that a cfg(target_arch) dependency of
#   any of them is counted; Windows- and macOS-only crates (windows-sys), which
#   `cargo vendor` puts in the tarball all the same, are not linked and not listed.
# Licenses: the `license` field of each crate's Cargo.toml, from `cargo metadata`. The
# vendored copies in the source tarball are these same crate files (Cargo.lock pins their
# checksums), so it reads the same manifests make-source.sh vendors. A crate that declares
# only a license-file has no SPDX expression to take: the script stops and names it.
# Expression (Fedora's rules): SPDX, one term per distinct crate expression, joined with
# AND; a crate's own choice (MIT OR Apache-2.0) kept in parentheses, an AND within a
# crate's expression joined to the list; the old "MIT/Apache-2.0" spelling read as OR.
# The package's own license comes first.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
spec="$here/apptainer-supervisor.spec"

check=false
case "${1:-}" in
    --check) check=true ;;
    "") ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (usage: bundled-crates.sh [--check])" >&2; exit 2 ;;
esac

work=$(mktemp -d "${TMPDIR:-/tmp}/apptainer-supervisor-bundled.XXXXXX")
trap 'rm -rf "$work"' EXIT

# EL8/EL9 build for x86_64, aarch64, ppc64le and s390x.
targets=(x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu
         powerpc64le-unknown-linux-gnu s390x-unknown-linux-gnu)
target_args=()
for t in "${targets[@]}"; do target_args+=(--target "$t"); done

# --locked --offline: the lock file as committed, crates from cargo's cache (CI has run
# `cargo fetch --locked`); nothing is compiled.
cargo tree --manifest-path "$root/Cargo.toml" --locked --offline \
    -e normal,no-proc-macro "${target_args[@]}" \
    --prefix none --no-dedupe --format '{p}' >"$work/tree"
cargo metadata --manifest-path "$root/Cargo.toml" --format-version 1 --locked --offline \
    >"$work/metadata"

python3 - "$work/tree" "$work/metadata" "$spec" "$work/spec.new" "$here/rpmlint.toml" <<'PY'
import json, re, sys

tree_path, meta_path, spec_path, out_path, lint_path = sys.argv[1:6]
meta = json.load(open(meta_path))
root_id = meta["resolve"]["root"]
by_key = {(p["name"], p["version"]): p for p in meta["packages"]}
root = next(p for p in meta["packages"] if p["id"] == root_id)

# `cargo tree --format {p}` prints "NAME vVERSION", then " (PATH)" for path packages,
# " (proc-macro)" and " (*)" markers; the first two words are all that is needed.
linked = set()
for line in open(tree_path):
    words = line.split()
    if len(words) < 2 or not words[1].startswith("v"):
        continue
    linked.add((words[0], words[1][1:]))
linked.discard((root["name"], root["version"]))

def split_top(expr, op):
    """Splits at " op " outside parentheses."""
    parts, depth, cur, i = [], 0, "", 0
    while i < len(expr):
        c = expr[i]
        depth += (c == "(") - (c == ")")
        if depth == 0 and expr.startswith(f" {op} ", i):
            parts.append(cur)
            cur, i = "", i + len(op) + 2
            continue
        cur += c
        i += 1
    return parts + [cur]

def strip_outer(expr):
    """"(A OR B)" -> "A OR B", but "(A) AND (B)" stays."""
    while expr.startswith("(") and expr.endswith(")"):
        depth = 0
        for i, c in enumerate(expr):
            depth += (c == "(") - (c == ")")
            if depth == 0 and i < len(expr) - 1:
                return expr
        expr = expr[1:-1].strip()
    return expr

def terms(lic):
    """The AND terms of an SPDX expression: "(MIT OR Apache-2.0) AND Unicode-3.0" gives
    "(Apache-2.0 OR MIT)" and "Unicode-3.0" (AND is associative, so they join the
    package's AND list as they are). The alternatives of an OR are ordered, so that
    "MIT OR Apache-2.0" and "Apache-2.0 OR MIT" (the same choice) make one term."""
    lic = strip_outer(" ".join(lic.replace("/", " OR ").split()))
    ands = split_top(lic, "AND")
    if len(ands) > 1:
        return [t for a in ands for t in terms(a)]
    ors = split_top(lic, "OR")
    if len(ors) > 1:
        return ["(" + " OR ".join(sorted(strip_outer(o) if " AND " not in o else o
                                         for o in ors)) + ")"]
    return [lic]

errors = []
def expression(p):
    lic = p.get("license")
    if not lic:
        errors.append(f'{p["name"]} {p["version"]}: no SPDX `license` in its Cargo.toml'
                      f' (license-file: {p.get("license_file")}); write its expression'
                      ' into the spec by hand and teach this script the exception')
        return []
    return terms(lic)

own = expression(root)
found = sorted({t for k in linked for t in expression(by_key[k])} - set(own))
if errors:
    sys.exit("error: " + "\n".join(errors))
license = " AND ".join(own + found)

# rpmlint checks the tag against rpmlint.toml's lists, but only partly (see there): check
# every identifier here.
lint = open(lint_path).read()
def toml_list(key):
    m = re.search(rf"^{key}\s*=\s*\[([^\]]*)\]", lint, re.M)
    return set(re.findall(r'"([^"]+)"', m.group(1))) if m else set()
words = re.findall(r"[^\s()]+", license)
exceptions = {w for prev, w in zip(words, words[1:]) if prev == "WITH"}
ids = {w for w in words if w not in ("AND", "OR", "WITH")} - exceptions
unknown = sorted(ids - toml_list("ValidLicenses")) + sorted(exceptions - toml_list("ValidLicenseExceptions"))
if unknown:
    sys.exit(f"error: License: names {', '.join(unknown)}, not in {lint_path}'s ValidLicenses/"
             "ValidLicenseExceptions: add them there once the license is acceptable (deny.toml)")

def rpm_version(v):
    # SemVer pre-release "1.0.0-rc.1" sorts before 1.0.0; RPM's "~" says the same, and "-"
    # is not allowed in an RPM version. "+build" metadata is allowed as it is.
    core, plus, build = v.partition("+")
    return core.replace("-", "~", 1) + plus + build

block = [
    "# BEGIN bundled-crates: written by packaging/rpm/bundled-crates.sh from Cargo.lock, not",
    f"# by hand (CI fails when it differs): the {len(linked)} crates linked into the binaries.",
    "License:        " + license,
]
block += [f"Provides:       bundled(crate({n})) = {rpm_version(v)}" for n, v in sorted(linked)]
block.append("# END bundled-crates")

text = open(spec_path).read().splitlines()
try:
    start = next(i for i, l in enumerate(text) if l.startswith("# BEGIN bundled-crates"))
    end = next(i for i, l in enumerate(text) if i > start and l == "# END bundled-crates")
except StopIteration:
    sys.exit(f"error: {spec_path}: no '# BEGIN bundled-crates' ... '# END bundled-crates' block")
open(out_path, "w").write("\n".join(text[:start] + block + text[end + 1:]) + "\n")
print(f"{len(linked)} crates linked, License: {license}")
PY

if $check; then
    if ! diff -u --label "$spec (committed)" --label "from Cargo.lock" "$spec" "$work/spec.new"; then
        echo "error: the spec's License:/bundled() block is not what Cargo.lock gives;" \
            "run packaging/rpm/bundled-crates.sh and commit the spec" >&2
        exit 1
    fi
    echo "bundled-crates: the spec's License: and bundled() provides match Cargo.lock"
else
    cat "$work/spec.new" >"$spec"
fi
