#!/usr/bin/env bash
# Tests the Debian package (as root; installs lintian, zsh, fish and
# mmdebstrap with apt when missing):
#  1. builds it twice with packaging/build-deb.sh (the workspace's version and
#     a newer build, VERSION+test1) and checks the contents: files, modes,
#     control fields, the maintainer scripts (sh -n);
#  2. every man page renders with `man -l` without a warning, luod(8) names
#     every option `luod --help` shows and each luoctl command has its page;
#  3. the completions load and complete (bash, fish), zsh parses them;
#  4. lintian: no error, no warning (the override is justified in
#     packaging/debian/lintian-overrides);
#  5. in a Debian 12 chroot (no systemd): install (the group `luod` made by
#     addgroup, luod.service enabled), then with a real luod in `prepared`
#     an upgrade and a removal are refused with the reason and change
#     nothing; `cancel`, then the upgrade to the newer build, removal and
#     purge (config and state directory gone, the group kept) work.
# Exit status 0 when everything passed.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LUO_CACHE:=/var/cache/liveupdate-qemu}"

fail() { echo "test-deb: FAIL: $*" >&2; exit 1; }
ok() { echo "test-deb: ok: $*"; }

# ---- phase 5, run by phase 1-4 below inside a private mount namespace ----
if [ "${1:-}" = --chroot-phase ]; then
    root="$2" deb="$3" newer="$4" version="$5" newer_version="$6" outer_ns="$7"
    # The mounts below must vanish with this process, never reach the
    # caller's namespace (its cleanup removes the chroot with rm -rf).
    [ "$(readlink /proc/self/ns/mnt)" != "$outer_ns" ] || fail "the chroot phase must run in its own mount namespace"
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    mount -t tmpfs -o mode=0755 tmpfs "$root/run"
    cp "$deb" "$newer" "$root/tmp/"
    in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 "$@"; }
    installed() { in_root dpkg-query -W -f='${db:Status-Abbrev}${Version}' liveupdate 2>/dev/null || true; }
    state() { in_root luoctl --json status | tr -d ' \n' | sed -n 's/^{"ok":true,"state":"\([a-z-]*\)".*/\1/p'; }
    generation() { in_root luoctl --json status | sed -n 's/^  "generation": \([0-9]*\),$/\1/p'; }

    repo=$(pwd)
    in_root dpkg -i "/tmp/$(basename "$deb")" >/dev/null
    [ "$(installed)" = "ii $version" ] || fail "after dpkg -i: $(installed)"
    if [ -f luod/luod.toml ]; then
        cmp -s "$root/etc/luod/luod.toml" luod/luod.toml || fail "install did not put luod/luod.toml in /etc/luod"
        in_root luod --check-config >/dev/null || fail "luod --check-config refuses the installed /etc/luod/luod.toml"
    fi
    in_root getent group luod >/dev/null || fail "install did not create the group luod"
    [ -L "$root/etc/systemd/system/multi-user.target.wants/luod.service" ] ||
        fail "install did not enable luod.service (deb-systemd-helper)"
    in_root luoctl --version | grep -qx "luoctl .*" || fail "luoctl does not run in the chroot"
    ok "install: $version, group luod, luod.service enabled"

    # A real luod (file backend, fd holder: no systemd here), in `prepared`.
    mkdir -p "$root/var/lib/luo-test"
    chroot "$root" /usr/sbin/luod --backend file --region /var/lib/luo-test/region --region-size 64M \
        --socket /run/luod/luod.sock --state-dir /run/luod --fd-store holder 2>"$root/tmp/luod.log" &
    luod_pid=$!
    stop_luod() {
        kill "$luod_pid" 2>/dev/null || true
        wait "$luod_pid" 2>/dev/null || true
        if [ -f "$root/run/luod/holder.pid" ]; then kill "$(cat "$root/run/luod/holder.pid")" 2>/dev/null || true; fi
    }
    trap stop_luod EXIT
    for _ in $(seq 100); do [ -S "$root/run/luod/luod.sock" ] && break; sleep 0.1; done
    [ -S "$root/run/luod/luod.sock" ] || fail "luod did not start: $(cat "$root/tmp/luod.log")"
    in_root luoctl session create pkg-test >/dev/null
    in_root luoctl prepare >/dev/null
    [ "$(state)" = prepared ] || fail "luod is '$(state)' after prepare"
    gen=$(generation)

    # Refusals while `prepared`: nothing changes.
    changelog_before=$(zcat "$root/usr/share/doc/liveupdate/changelog.gz" | head -n1)
    if in_root dpkg -i "/tmp/$(basename "$newer")" >"$root/tmp/out" 2>&1; then
        fail "an upgrade while prepared was not refused"
    fi
    want="liveupdate: refusing to upgrade the package: luod is 'prepared': a live-update cycle is in progress. Finish it (luoctl finish, in the new kernel) or abandon it (luoctl cancel, before the reboot); then run dpkg again. Nothing was changed."
    grep -qxF "$want" "$root/tmp/out" || fail "upgrade refusal: $(cat "$root/tmp/out")"
    [ "$(installed)" = "ii $version" ] || fail "after the refused upgrade: $(installed)"
    [ "$(zcat "$root/usr/share/doc/liveupdate/changelog.gz" | head -n1)" = "$changelog_before" ] ||
        fail "the refused upgrade changed the installed files"
    [ "$(state)" = prepared ] && [ "$(generation)" = "$gen" ] || fail "the refused upgrade changed luod's state"
    ok "upgrade while prepared: refused, nothing changed"

    if in_root dpkg -r liveupdate >"$root/tmp/out" 2>&1; then
        fail "a removal while prepared was not refused"
    fi
    grep -qxF "${want/refusing to upgrade/refusing to remove}" "$root/tmp/out" || fail "removal refusal: $(cat "$root/tmp/out")"
    [ "$(installed)" = "ii $version" ] || [ "$(installed)" = "ri $version" ] ||
        fail "after the refused removal: $(installed)"
    [ -x "$root/usr/sbin/luod" ] || fail "the refused removal removed luod"
    [ "$(state)" = prepared ] && [ "$(generation)" = "$gen" ] || fail "the refused removal changed luod's state"
    ok "removal while prepared: refused, nothing changed"

    # `normal` again: the upgrade goes through.
    in_root luoctl cancel >/dev/null
    [ "$(state)" = normal ] || fail "luod is '$(state)' after cancel"
    in_root dpkg -i "/tmp/$(basename "$newer")" >/dev/null
    [ "$(installed)" = "ii $newer_version" ] || fail "after the upgrade: $(installed)"
    zcat "$root/usr/share/doc/liveupdate/changelog.gz" | head -n1 | grep -qF "($newer_version)" ||
        fail "the upgrade did not install the newer changelog"
    ok "upgrade while normal: $version -> $newer_version"

    # Removal while `normal`, then purge.
    mkdir -p "$root/etc/luod" && echo "# operator's notes" >"$root/etc/luod/notes"
    in_root dpkg -r liveupdate >/dev/null
    [ "$(installed)" = "rc $newer_version" ] || [ -z "$(installed)" ] || fail "after dpkg -r: $(installed)"
    [ ! -e "$root/usr/sbin/luod" ] && [ ! -e "$root/usr/bin/luoctl" ] || fail "dpkg -r left the binaries"
    if [ -f "$repo/luod/luod.toml" ]; then
        cmp -s "$root/etc/luod/luod.toml" "$repo/luod/luod.toml" || fail "dpkg -r did not keep the conffile /etc/luod/luod.toml"
    fi
    stop_luod
    in_root dpkg -P liveupdate >/dev/null
    [ -z "$(installed)" ] || fail "after dpkg -P: $(installed)"
    [ ! -e "$root/etc/luod" ] || fail "purge left /etc/luod"
    [ ! -e "$root/run/luod" ] || fail "purge left the state directory /run/luod"
    [ ! -e "$root/etc/systemd/system/multi-user.target.wants/luod.service" ] || fail "purge left the enable link"
    in_root getent group luod >/dev/null || fail "purge removed the group luod (it stays, as documented)"
    if in_root dpkg -l liveupdate >/dev/null 2>&1; then fail "dpkg -l still lists liveupdate after the purge"; fi
    ok "remove (conffile kept) and purge: binaries, /etc/luod, /run/luod and the enable link gone, group luod kept"
    exit 0
fi

# ---- setup ----
missing=()
command -v lintian >/dev/null || missing+=(lintian)
command -v zsh >/dev/null || missing+=(zsh)
command -v fish >/dev/null || missing+=(fish)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
command -v man >/dev/null || missing+=(man-db)
command -v dpkg-shlibdeps >/dev/null || missing+=(dpkg-dev)
if [ ${#missing[@]} -gt 0 ]; then
    echo "test-deb: apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ---- 1. build, contents ----
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
newer_version="$version+test1"
deb=$(packaging/build-deb.sh | tail -n1)
newer=$(LIVEUPDATE_DEB_VERSION="$newer_version" packaging/build-deb.sh | tail -n1)
[ "$deb" = "target/debian/liveupdate_${version}_amd64.deb" ] || fail "build-deb.sh made $deb"
[ "$newer" = "target/debian/liveupdate_${newer_version}_amd64.deb" ] || fail "build-deb.sh made $newer"
if out=$(packaging/build-deb.sh --version 1-2 2>&1); then fail "a version with a hyphen was taken"; fi
grep -qxF "build-deb.sh: '1-2' is not a Debian native version (a digit, then letters, digits, '.', '+', '~')" <<<"$out" ||
    fail "bad version: $out"

x="$work/x"
dpkg-deb -R "$deb" "$x"
field() { sed -n "s/^$1: //p" "$x/DEBIAN/control"; }
[ "$(field Package)" = liveupdate ] && [ "$(field Version)" = "$version" ] && [ "$(field Architecture)" = amd64 ] ||
    fail "control: $(cat "$x/DEBIAN/control")"
field Depends | grep -q '^libc6 (>= [0-9.]*), .*adduser$' || fail "Depends: $(field Depends)"
listing=$(dpkg-deb -c "$deb")
for f in usr/sbin/luod usr/bin/luoctl; do
    grep -qE "^-rwxr-xr-x root/root .* \./$f$" <<<"$listing" || fail "$f is not root:root 0755 in the package"
done
for f in usr/lib/systemd/system/luod.service usr/lib/sysusers.d/luod.conf \
    usr/share/man/man8/luod.8.gz usr/share/man/man8/luoctl.8.gz \
    usr/share/bash-completion/completions/luod usr/share/bash-completion/completions/luoctl \
    usr/share/zsh/vendor-completions/_luod usr/share/zsh/vendor-completions/_luoctl \
    usr/share/fish/vendor_completions.d/luod.fish usr/share/fish/vendor_completions.d/luoctl.fish \
    usr/share/doc/liveupdate/copyright usr/share/doc/liveupdate/changelog.gz \
    usr/share/lintian/overrides/liveupdate; do
    grep -qE "^-rw-r--r-- root/root .* \./$f$" <<<"$listing" || fail "$f is not root:root 0644 in the package"
done
cmp -s "$x/usr/lib/systemd/system/luod.service" luod/luod.service || fail "the packaged unit differs from luod/luod.service"
cmp -s "$x/usr/lib/sysusers.d/luod.conf" luod/luod.sysusers.conf || fail "the sysusers.d entry differs"
if [ -f luod/luod.toml ]; then
    [ "$(cat "$x/DEBIAN/conffiles")" = /etc/luod/luod.toml ] || fail "conffiles: $(cat "$x/DEBIAN/conffiles" 2>&1)"
    cmp -s "$x/etc/luod/luod.toml" luod/luod.toml || fail "the packaged luod.toml differs from luod/luod.toml"
else
    [ ! -e "$x/DEBIAN/conffiles" ] && [ ! -e "$x/etc" ] || fail "a conffile without luod/luod.toml"
fi
"$x/usr/sbin/luod" --version | grep -qx "luod $version" || fail "the packaged luod does not run"
"$x/usr/bin/luoctl" --version | grep -qx "luoctl $version" || fail "the packaged luoctl does not run"
for b in usr/sbin/luod usr/bin/luoctl; do
    if readelf -S "$x/$b" | grep -qE '\.symtab|\.debug_info'; then fail "$b is not stripped"; fi
done
for s in preinst postinst prerm postrm; do
    [ -x "$x/DEBIAN/$s" ] || fail "DEBIAN/$s is not executable"
    sh -n "$x/DEBIAN/$s" || fail "DEBIAN/$s: sh -n failed"
    if grep -q '#LUOD_GATE#' "$x/DEBIAN/$s"; then fail "DEBIAN/$s still has the #LUOD_GATE# token"; fi
done
grep -q '^luod_gate()' "$x/DEBIAN/preinst" && grep -q '^luod_gate()' "$x/DEBIAN/prerm" || fail "the state gate is not in preinst and prerm"
(cd "$x" && md5sum --quiet -c DEBIAN/md5sums) || fail "md5sums do not match"
zcat "$x/usr/share/doc/liveupdate/changelog.gz" | head -n1 | grep -qxF "liveupdate ($version) unstable; urgency=medium" ||
    fail "changelog: $(zcat "$x/usr/share/doc/liveupdate/changelog.gz" | head -n1)"
ok "build and contents ($deb, $(stat -c %s "$deb") bytes)"

# ---- 2. man pages ----
for page in "$x"/usr/share/man/man8/*.8.gz; do
    name=$(basename "$page" .8.gz)
    warnings=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -E UTF-8 -l "$page" 2>&1 >"$work/page.txt") ||
        fail "man -l $name: $warnings"
    [ -z "$warnings" ] || fail "man -l $name warns: $warnings"
    grep -q "^NAME" "$work/page.txt" && grep -qF "${name}" "$work/page.txt" || fail "$name(8) has no NAME section"
done
LC_ALL=C.UTF-8 MANWIDTH=200 man -l "$x/usr/share/man/man8/luod.8.gz" 2>/dev/null >"$work/luod.txt"
for opt in $("$x/usr/sbin/luod" --help | grep -oE -- '--[a-z][a-z-]+' | sort -u); do
    grep -qF -- "$opt" "$work/luod.txt" || fail "luod(8) does not document $opt"
done
for cmd in $("$x/usr/bin/luoctl" --help | sed -n '/^Commands:/,/^$/p' | awk 'NR > 1 && $1 != "help" { print $1 }'); do
    [ -f "$x/usr/share/man/man8/luoctl-$cmd.8.gz" ] || fail "no man page luoctl-$cmd(8)"
done
ok "man pages: $(ls "$x"/usr/share/man/man8 | wc -l) render without warnings, options and commands all documented"

# ---- 3. completions ----
bc="$x/usr/share/bash-completion/completions"
for name in luod luoctl; do bash -n "$bc/$name" || fail "bash -n $name"; done
bash_complete() { # FILE WORD...: the candidates bash completes for the last word
    bash -c 'source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
        func=$(complete -p "$1" | sed -n "s/.*-F \([^ ]*\) .*/\1/p"); "$func" "$1" "${!#}" "${COMP_WORDS[COMP_CWORD-1]}"
        printf "%s\n" "${COMPREPLY[@]}"' _ "$@"
}
bash_complete "$bc/luoctl" luoctl sess | grep -qx session || fail "bash: 'luoctl sess' does not complete to session"
bash_complete "$bc/luod" luod --back | grep -qx -- --backend || fail "bash: 'luod --back' does not complete to --backend"
zc="$x/usr/share/zsh/vendor-completions"
for name in _luod _luoctl; do zsh -n "$zc/$name" || fail "zsh -n $name"; done
fc="$x/usr/share/fish/vendor_completions.d"
for name in luod luoctl; do fish --no-execute "$fc/$name.fish" || fail "fish -n $name"; done
fish -c "source $fc/luoctl.fish; complete -C 'luoctl sess'" | grep -q '^session' || fail "fish: 'luoctl sess' does not complete"
ok "completions: bash and fish load and complete, zsh parses"

# ---- 4. lintian ----
lintian_rc=0
lintian --fail-on error,warning "$deb" "$newer" >"$work/lintian" 2>&1 || lintian_rc=$?
if [ "$lintian_rc" -ne 0 ] || grep -q '^[EW]:' "$work/lintian"; then fail "lintian (exit $lintian_rc): $(cat "$work/lintian")"; fi
ok "lintian: no error, no warning ($(lintian --version))"

# ---- 5. install, refused upgrade/removal, upgrade, remove, purge in a chroot ----
tarball="$LUO_CACHE/deb-chroot/bookworm-minbase-adduser-init-system-helpers.tar"
mkdir -p "$(dirname "$tarball")"
if [ ! -s "$tarball" ] || [ -n "$(find "$tarball" -mtime +7)" ]; then
    echo "test-deb: mmdebstrap bookworm (minbase, adduser, init-system-helpers) into $tarball"
    (
        flock 9
        mmdebstrap --quiet --variant=minbase --include=adduser,init-system-helpers bookworm "$tarball.tmp.$$" \
            http://deb.debian.org/debian && mv "$tarball.tmp.$$" "$tarball"
    ) 9>"$tarball.lock"
fi
chroot_dir="$work/root"
mkdir "$chroot_dir"
tar -C "$chroot_dir" -xf "$tarball"
unshare --mount --propagation private -- "$0" --chroot-phase "$chroot_dir" "$(realpath "$deb")" "$(realpath "$newer")" \
    "$version" "$newer_version" "$(readlink /proc/self/ns/mnt)"
echo "test-deb: all passed"
