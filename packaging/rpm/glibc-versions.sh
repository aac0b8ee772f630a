#!/usr/bin/env bash
# Prints the GLIBC symbol versions each binary needs (its dynamic symbol table, objdump -T)
# and, for each EL release, whether that release's glibc has them all. A binary built on
# Debian 12 (glibc 2.36) runs on a host only if the host's glibc is at least the largest
# version printed; EL8 has glibc 2.28, EL9 2.34.
#
#   packaging/rpm/glibc-versions.sh BINARY...
#
# Informational: it fails only when a binary cannot be read.
set -euo pipefail

if (( $# == 0 )); then
    echo "usage: glibc-versions.sh BINARY..." >&2
    exit 2
fi
command -v objdump >/dev/null || { echo "error: objdump not found (binutils)" >&2; exit 1; }

for bin in "$@"; do
    versions=$(objdump -T "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/^GLIBC_//' | sort -u -V)
    if [[ -z "$versions" ]]; then
        echo "$bin: no GLIBC symbol versions (static?)"
        continue
    fi
    max=$(tail -n1 <<<"$versions")
    echo "$bin: needs GLIBC $(paste -sd' ' <<<"$versions")"
    # The symbols that need the newest version: what would fail to resolve on an older host.
    newest=$(objdump -T "$bin" | awk -v v="GLIBC_$max" '$0 ~ "\\(?" v "\\)?[ \t]" {print $NF}' | sort -u | paste -sd' ')
    echo "$bin: GLIBC_$max for: $newest"
    for el in "EL8 2.28" "EL9 2.34"; do
        read -r rel have <<<"$el"
        if [[ "$(printf '%s\n%s\n' "$max" "$have" | sort -V | tail -n1)" == "$have" ]]; then
            echo "$bin: $rel's glibc $have has every version it needs"
        else
            echo "$bin: $rel's glibc $have is too old (needs $max): build the RPM on $rel"
        fi
    done
done
