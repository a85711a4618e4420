#!/usr/bin/env bash
# Builds the Debian package of luod and luoctl with dpkg-deb:
#   target/debian/liveupdate_VERSION_amd64.deb
# VERSION is the workspace's version unless LIVEUPDATE_DEB_VERSION (or
# --version V) says otherwise; a newer VERSION makes a "newer build" for an
# upgrade (its changelog gains an entry). Release build, binaries stripped,
# man pages and completions rendered from the clap definitions by
# luo-gen-docs (packaging/gen). Prints the .deb's path on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

version="${LIVEUPDATE_DEB_VERSION:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --version) version="${2:?--version needs a value}"; shift 2 ;;
        --version=*) version="${1#--version=}"; shift ;;
        -h | --help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "build-deb.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
base_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
version="${version:-$base_version}"
# A native package's version: digits first, then letters, digits, . + ~ (no
# hyphen: no Debian revision).
if ! [[ "$version" =~ ^[0-9][A-Za-z0-9.+~]*$ ]]; then
    echo "build-deb.sh: '$version' is not a Debian native version (a digit, then letters, digits, '.', '+', '~')" >&2
    exit 2
fi
arch=$(dpkg --print-architecture)
if [ "$arch" != amd64 ]; then
    echo "build-deb.sh: the package is built for amd64 only, this machine is $arch" >&2
    exit 2
fi
for tool in dpkg-deb dpkg-shlibdeps strip gzip; do
    command -v "$tool" >/dev/null || { echo "build-deb.sh: $tool is missing (apt-get install dpkg-dev binutils)" >&2; exit 1; }
done

# One build at a time: host scenarios that run at once each build the
# package, and two builds in the same staging tree break each other.
mkdir -p target
exec 9>target/build-deb.lock
flock 9

# Reproducible: every date comes from the last commit (or SOURCE_DATE_EPOCH).
: "${SOURCE_DATE_EPOCH:=$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
export SOURCE_DATE_EPOCH
date_day=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%d)
date_rfc=$(date -u -R -d "@$SOURCE_DATE_EPOCH")

echo "== cargo build --release (luod, luoctl, luo-gen-docs)" >&2
cargo build --release --locked -p luod -p luoctl -p liveupdate-packaging >&2
target="${CARGO_TARGET_DIR:-target}"
rel="$target/release"

out="$target/debian"
root="$out/liveupdate_${version}_$arch"
gen="$out/gen-$version"
rm -rf "$root" "$gen"
mkdir -p "$out"
umask 022

"$rel/luo-gen-docs" --out "$gen" --package-version "$version" --date "$date_day"

# install -D MODE SRC DEST (DEST relative to the package root)
put() { install -D -m "$1" "$2" "$root/$3"; }
put 0755 "$rel/luod" usr/sbin/luod
put 0755 "$rel/luoctl" usr/bin/luoctl
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/sbin/luod" "$root/usr/bin/luoctl"
put 0644 luod/luod.service usr/lib/systemd/system/luod.service
put 0644 luod/luod.sysusers.conf usr/lib/sysusers.d/luod.conf
for page in "$gen"/man/*.8; do
    put 0644 "$page" "usr/share/man/man8/$(basename "$page")"
    gzip -9n "$root/usr/share/man/man8/$(basename "$page")"
done
for name in luod luoctl; do
    put 0644 "$gen/completions/bash/$name" "usr/share/bash-completion/completions/$name"
    put 0644 "$gen/completions/zsh/_$name" "usr/share/zsh/vendor-completions/_$name"
    put 0644 "$gen/completions/fish/$name.fish" "usr/share/fish/vendor_completions.d/$name.fish"
done
doc=usr/share/doc/liveupdate
put 0644 packaging/debian/copyright "$doc/copyright"
put 0644 packaging/debian/lintian-overrides usr/share/lintian/overrides/liveupdate
{
    if [ "$version" != "$base_version" ]; then
        printf 'liveupdate (%s) unstable; urgency=medium\n\n  * Local build %s of liveupdate %s.\n\n -- %s  %s\n\n' \
            "$version" "$version" "$base_version" "liveupdate developers <liveupdate@example.invalid>" "$date_rfc"
    fi
    cat packaging/debian/changelog
} | gzip -9n >"$out/changelog.gz"
put 0644 "$out/changelog.gz" "$doc/changelog.gz"
rm "$out/changelog.gz"
for f in README.md luoctl/CLI.md; do
    put 0644 "$f" "$doc/$(basename "$f")"
    gzip -9n "$root/$doc/$(basename "$f")"
done

# The default configuration, a conffile, once luod has one (luod/luod.toml).
conffiles=()
if [ -f luod/luod.toml ]; then
    put 0644 luod/luod.toml etc/luod/luod.toml
    conffiles+=(/etc/luod/luod.toml)
fi

# Control area: maintainer scripts (the state gate pasted where they say
# #LUOD_GATE#), conffiles, md5sums, control with the shared-library
# dependencies dpkg-shlibdeps finds.
mkdir -p "$root/DEBIAN"
for script in preinst postinst prerm postrm; do
    awk -v gate=packaging/debian/gate.sh '
        $0 == "#LUOD_GATE#" { while ((getline line < gate) > 0) print line; next }
        { print }' "packaging/debian/$script" >"$root/DEBIAN/$script"
    chmod 0755 "$root/DEBIAN/$script"
done
if [ ${#conffiles[@]} -gt 0 ]; then
    printf '%s\n' "${conffiles[@]}" >"$root/DEBIAN/conffiles"
    chmod 0644 "$root/DEBIAN/conffiles"
fi
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums"

shlibs_dir=$(mktemp -d)
trap 'rm -rf "$shlibs_dir"' EXIT
mkdir "$shlibs_dir/debian"
printf 'Source: liveupdate\n\nPackage: liveupdate\nArchitecture: any\n' >"$shlibs_dir/debian/control"
abs_root=$(realpath "$root")
shlibs=$(cd "$shlibs_dir" && dpkg-shlibdeps -O -e"$abs_root/usr/sbin/luod" -e"$abs_root/usr/bin/luoctl" 2>/dev/null |
    sed -n 's/^shlibs:Depends=//p')
if [ -z "$shlibs" ]; then
    echo "build-deb.sh: dpkg-shlibdeps found no shared-library dependencies for luod and luoctl" >&2
    exit 1
fi
installed_size=$(du -s -k --apparent-size --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@INSTALLED_SIZE@/$installed_size/" -e "s/@SHLIBS@/$shlibs/" \
    packaging/debian/control.in >"$root/DEBIAN/control"

find "$root" -exec touch --no-dereference -d "@$SOURCE_DATE_EPOCH" {} +
deb="$out/liveupdate_${version}_$arch.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >&2
rm -rf "$gen"
echo "$deb"
