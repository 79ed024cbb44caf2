#!/usr/bin/env bash
# Builds the Debian package: release binary, then the man pages egressguard(8) (generated from
# the binary's own clap definitions, so it can never disagree with it) and egressguard-policy(5)
# and the shell completions, then `cargo deb --no-build`. Prints the path of the .deb as the
# last line on stdout.
#
# Needs: cargo-deb (`cargo install cargo-deb --locked`), dpkg-dev (dpkg-shlibdeps, for the
# $auto dependencies), binutils (objcopy, for the separate debug symbols).
# Output: target/debian/egressguard_<version>-1_amd64.deb and egressguard-dbgsym_<version>-1_amd64.ddeb.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Check the tools first: a missing one should not cost a full release build to find out.
missing=()
cargo deb --version >/dev/null 2>&1 || missing+=("cargo-deb: cargo install cargo-deb --locked")
command -v dpkg-shlibdeps >/dev/null || missing+=("dpkg-shlibdeps: apt-get install dpkg-dev")
command -v objcopy >/dev/null || missing+=("objcopy: apt-get install binutils")
if [ "${#missing[@]}" -gt 0 ]; then
    echo "build.sh: missing tools; install them first:" >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 1
fi

target_dir="${CARGO_TARGET_DIR:-target}"
assets=target/deb-assets   # named in [package.metadata.deb] assets, relative to the crate

# Reproducible timestamps inside the package: the last commit, if this is a git checkout.
if [ -z "${SOURCE_DATE_EPOCH:-}" ] && git rev-parse --git-dir >/dev/null 2>&1; then
    SOURCE_DATE_EPOCH="$(git log -1 --format=%ct)"
    export SOURCE_DATE_EPOCH
fi

cargo build --release --locked >&2

rm -rf "$assets"
mkdir -p "$assets"
"$target_dir/release/egressguard" generate-man "$assets" >&2
"$target_dir/release/egressguard" generate-completions "$assets" >&2
for f in egressguard.8 egressguard-policy.5 egressguard.bash _egressguard; do
    [ -s "$assets/$f" ] || { echo "build.sh: generator did not write $assets/$f" >&2; exit 1; }
done

# cargo-deb gzips the man pages and the changelog itself (zopfli, no timestamp: reproducible).
# Debug symbols go to a separate egressguard-dbgsym_*.ddeb (zlib: readable by Rust backtraces).
deb="$(cargo deb --no-build --locked --dbgsym --compress-debug-symbols=zlib "$@" | tail -n 1)"

# cargo-deb writes no DEBIAN/md5sums; add it so that `dpkg --verify egressguard` and debsums
# can check the installed files (lintian: no-md5sums-control-file).
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
dpkg-deb -R "$deb" "$work/pkg"
(cd "$work/pkg" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
    | xargs -0 md5sum >DEBIAN/md5sums)
chmod 0644 "$work/pkg/DEBIAN/md5sums"
dpkg-deb --root-owner-group -Zxz -b "$work/pkg" "$deb" >&2
echo "$deb"
