#!/usr/bin/env bash
# The Rust an EL build host needs: the largest `rust-version` over every package in
# Cargo.lock, from `cargo metadata` (no other toolchain can be installed here to try, so
# the declared minimums of the dependency tree are the evidence). Prints the figure and the
# packages that set it, and fails when Cargo.toml's rust-version or the spec's
# `BuildRequires: cargo/rust >= ...` is not that figure.
#
#   packaging/rpm/msrv.sh
#
# Packages that declare no rust-version (old 2015/2018-edition crates such as hex,
# lazy_static) are listed; they do not raise the minimum.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
spec="$here/apptainer-supervisor.spec"

meta=$(mktemp "${TMPDIR:-/tmp}/apptainer-supervisor-metadata.XXXXXX")
trap 'rm -f "$meta"' EXIT
cargo metadata --manifest-path "$root/Cargo.toml" --format-version 1 --locked --offline >"$meta"

python3 - "$meta" "$root/Cargo.toml" "$spec" <<'PY'
import json, re, sys

meta_path, cargo_toml, spec = sys.argv[1:4]
meta = json.load(open(meta_path))

def key(v):
    # "1.89" and "1.89.0" are the same minimum.
    parts = [int(x) for x in v.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))

def short(v):
    parts = list(key(v))
    while len(parts) > 2 and parts[-1] == 0:
        parts.pop()
    return ".".join(map(str, parts))

ours = {p for p in meta["workspace_members"]}
deps, undeclared = [], []
for p in meta["packages"]:
    if p["id"] in ours:
        continue
    if p.get("rust_version"):
        deps.append((key(p["rust_version"]), p["name"], p["version"], p["rust_version"]))
    else:
        undeclared.append(f'{p["name"]} {p["version"]} (edition {p["edition"]})')

deps.sort()
need = deps[-1][0]
setters = [f"{n} {v}" for k, n, v, _ in deps if k == need]
msrv = short(".".join(map(str, need)))
print(f"msrv: {msrv} (largest rust-version of {len(deps)} dependencies: {', '.join(setters)})")
if undeclared:
    print(f"msrv: no rust-version declared by: {', '.join(undeclared)}")

problems = []
m = re.search(r'^rust-version\s*=\s*"([^"]+)"', open(cargo_toml).read(), re.M)
if not m:
    problems.append(f"{cargo_toml}: no rust-version")
elif short(m.group(1)) != msrv:
    problems.append(f"{cargo_toml}: rust-version = \"{m.group(1)}\", the dependencies need {msrv}")

spec_text = open(spec).read()
for tool in ("cargo", "rust"):
    m = re.search(rf"^BuildRequires:\s*{tool}\s*>=\s*(\S+)", spec_text, re.M)
    if not m:
        problems.append(f"{spec}: no 'BuildRequires: {tool} >= {msrv}'")
    elif short(m.group(1)) != msrv:
        problems.append(f"{spec}: 'BuildRequires: {tool} >= {m.group(1)}', the dependencies need {msrv}")

for p in problems:
    print(f"error: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY
