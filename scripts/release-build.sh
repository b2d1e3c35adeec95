#!/usr/bin/env bash
# Builds the release programs so that they run on glibc 2.28 and newer
# (RHEL/Rocky/Alma 8 and 9, Debian 10 and later, Ubuntu 20.04 and later),
# whatever glibc this machine has: cargo-zigbuild links them with Zig, which
# carries the symbol tables of every glibc release and links against the
# one named in the target (`x86_64-unknown-linux-gnu.2.28`). The bundled
# SQLite (rusqlite's `bundled`) is compiled by Zig's clang for the same
# glibc. A plain `cargo build --release` on Debian 12 would need GLIBC_2.34.
#
# Installs what it needs when missing, pinned, and reuses it afterwards:
#   Zig from PyPI's `ziglang` wheel, unpacked with pip into
#     ~/.local/share/satellite/ziglang-<version> (not into any Python);
#   cargo-zigbuild from crates.io, into ~/.cargo/bin.
# The programs land in target/<host triple>/release/ (the .2.28 suffix is
# not part of the directory). Prints that directory on its last line.
# Used by scripts/package.sh; run it by hand to build installable programs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

zig_version=0.17.1
zigbuild_version=0.24.1
glibc=2.28
started=$SECONDS

triple=$(rustc -vV | sed -n 's/^host: //p')
case "$triple" in
  *-linux-gnu) ;;
  *) echo "release-build: the host is $triple; the glibc-$glibc build is for *-linux-gnu hosts" >&2; exit 1 ;;
esac

zig_home=$HOME/.local/share/satellite/ziglang-$zig_version
zig=$zig_home/ziglang/zig
if [ "$("$zig" version 2>/dev/null || true)" != "$zig_version" ]; then
  t=$SECONDS
  rm -rf "$zig_home"
  python3 -m pip install --disable-pip-version-check --root-user-action=ignore --quiet --no-deps \
    --target "$zig_home" "ziglang==$zig_version"
  [ "$("$zig" version)" = "$zig_version" ] || { echo "release-build: $zig is not Zig $zig_version" >&2; exit 1; }
  echo "release-build: installed Zig $zig_version (PyPI ziglang) in $((SECONDS - t))s" >&2
fi

if [ "$(cargo zigbuild --version 2>/dev/null || true)" != "cargo-zigbuild $zigbuild_version" ]; then
  t=$SECONDS
  cargo install --locked --version "$zigbuild_version" cargo-zigbuild
  echo "release-build: installed cargo-zigbuild $zigbuild_version in $((SECONDS - t))s" >&2
fi

# cargo-zigbuild asks `python3 -m ziglang` first and `zig` second: both
# find the pinned Zig, whatever else this machine has installed.
export PYTHONPATH="$zig_home${PYTHONPATH:+:$PYTHONPATH}"
export CARGO_ZIGBUILD_ZIG_PATH=$zig

t=$SECONDS
cargo zigbuild --release --locked -p satellite --target "$triple.$glibc" >&2
echo "release-build: cargo zigbuild (Zig $zig_version, glibc $glibc) took $((SECONDS - t))s; $((SECONDS - started))s in all" >&2
target_dir=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
echo "$target_dir/$triple/release"
