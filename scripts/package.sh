#!/usr/bin/env bash
# Builds pier's .deb and .rpm (one package, `pier`: both binaries, the systemd unit, the
# default configuration; metadata in packaging/Cargo.toml, maintainer scripts in packaging/deb
# and packaging/rpm).
#
#   scripts/package.sh                      release build, both packages, into target/packages
#   scripts/package.sh --profile dev        package the debug binaries (CI: no second build)
#   scripts/package.sh --revision 2         a later package revision (1-2 / release 2), to test upgrades
#   scripts/package.sh --no-build           package what is already built
#   scripts/package.sh --out DIR            where the packages go
#   scripts/package.sh --fast               lighter compression (gzip; for tests: minutes faster)
#
# It installs the packaging tools it needs, pinned, into .tools/ (cargo install --locked; about
# two minutes the first time). The binaries are stripped copies, staged apart so that the
# build's own binaries are left as they are. Prints the two package paths at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1

profile=release
revision=1
build=1
out=""
fast=0
while [ $# -gt 0 ]; do
  case "$1" in
  --profile) profile=$2; shift 2 ;;
  --revision) revision=$2; shift 2 ;;
  --no-build) build=0; shift ;;
  --out) out=$2; shift 2 ;;
  --fast) fast=1; shift ;;
  -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "package.sh: unknown argument: $1 (see --help)" >&2; exit 64 ;;
  esac
done
case "$revision" in
'' | *[!0-9]*) echo "package.sh: --revision takes a number, not '$revision'" >&2; exit 64 ;;
esac

target=${CARGO_TARGET_DIR:-$repo/target}
case "$profile" in
dev | debug) profile=dev; profile_dir=debug ;;
*) profile_dir=$profile ;;
esac
out=${out:-$target/packages}

# The tools, pinned. A wrong or missing version is (re)installed.
tools=$repo/.tools
tool_version() { "$tools/bin/$1" --version 2>/dev/null | awk '{print $NF}'; }
if [ "$(tool_version cargo-deb)" != "$CARGO_DEB_VERSION" ]; then
  echo "package.sh: installing cargo-deb $CARGO_DEB_VERSION into .tools" >&2
  cargo install -q --locked --root "$tools" cargo-deb --version "=$CARGO_DEB_VERSION"
fi
if [ "$(tool_version cargo-generate-rpm)" != "$CARGO_GENERATE_RPM_VERSION" ]; then
  echo "package.sh: installing cargo-generate-rpm $CARGO_GENERATE_RPM_VERSION into .tools" >&2
  cargo install -q --locked --root "$tools" cargo-generate-rpm --version "=$CARGO_GENERATE_RPM_VERSION"
fi
command -v strip >/dev/null || { echo "package.sh: strip (binutils) is needed" >&2; exit 69; }

if [ "$build" -eq 1 ]; then
  cargo build --profile "$profile" -p pier-agent -p pier-controller --bins
fi

# Stage stripped copies where both tools look for `target/release/...` (CARGO_TARGET_DIR).
stage=$target/package-stage
rm -rf "$stage"
mkdir -p "$stage/release" "$out"
for bin in pier-agent pier; do
  src=$target/$profile_dir/$bin
  [ -x "$src" ] || { echo "package.sh: $src is not built (drop --no-build, or build --profile $profile)" >&2; exit 66; }
  strip --strip-all -o "$stage/release/$bin" "$src"
done

version=$(cargo metadata --no-deps --format-version 1 |
  python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "pier-packaging"))')

deb_fast=()
rpm_compress=zstd
if [ "$fast" -eq 1 ]; then
  deb_fast=(--fast)
  rpm_compress=gzip
fi
CARGO_TARGET_DIR=$stage "$tools/bin/cargo-deb" -p pier-packaging --no-build --no-strip \
  "${deb_fast[@]}" --deb-revision "$revision" --output "$out" -q >/dev/null
CARGO_TARGET_DIR=$stage "$tools/bin/cargo-generate-rpm" -p packaging --payload-compress "$rpm_compress" \
  --set-metadata "release = \"$revision\"" --output "$out" >/dev/null

arch_deb=$(dpkg --print-architecture 2>/dev/null || echo amd64)
deb=$out/pier_${version}-${revision}_${arch_deb}.deb
rpm=$(ls -t "$out"/pier-"$version"-"$revision".*.rpm | head -n 1)
[ -f "$deb" ] || { echo "package.sh: cargo-deb did not write $deb" >&2; exit 70; }
[ -f "$rpm" ] || { echo "package.sh: cargo-generate-rpm did not write a pier-$version-$revision rpm in $out" >&2; exit 70; }
echo "$deb"
echo "$rpm"
