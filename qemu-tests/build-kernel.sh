#!/usr/bin/env bash
# Build (or reuse from cache) a LUO-enabled kernel bzImage from Debian's
# newest linux-source-X.Y (X.Y >= 6.19) found in sid/experimental, using
# `make tinyconfig` + qemu-tests/kernel/luo.config + qemu-tests/kernel/systemd-host.config.
# One kernel serves both the busybox scenarios and the Debian host (qemu-tests/host/).
#
# stdout: the path of the bzImage (only that line); progress goes to stderr.
#
# Environment:
#   LUO_CACHE              cache root (default /var/cache/liveupdate-qemu)
#   LUO_KERNEL_SERIES      pin a series >= 6.19, e.g. 7.2 (default: the newest)
#   LUO_KERNEL_FRAGMENT    Kconfig fragment(s), space-separated, merged in order
#                          (default: qemu-tests/kernel/luo.config qemu-tests/kernel/systemd-host.config)
#   LUO_JOBS               make -j (default: nproc)
#   LUO_APT_MAX_AGE        seconds before the private apt lists are refreshed (21600)
#
# Cache key: $LUO_CACHE/kernel-<debian version>-<sha256(fragments concatenated)[:16]>/bzImage
# (next to it: config, build.log, fragment.config (the concatenation),
# source-version). A hit skips apt entirely unless LUO_KERNEL_REFRESH=1 (the version is remembered in kernel-latest).
set -euo pipefail
LOG_TAG=build-kernel
. "$(dirname "$0")/lib/common.sh"
. "$QEMU_TESTS_DIR/lib/apt-private.sh"

read -r -a FRAGMENTS <<< "${LUO_KERNEL_FRAGMENT:-$QEMU_TESTS_DIR/kernel/luo.config $QEMU_TESTS_DIR/kernel/systemd-host.config}"
[ "${#FRAGMENTS[@]}" -gt 0 ] || die "LUO_KERNEL_FRAGMENT names no fragment"
for f in "${FRAGMENTS[@]}"; do [ -r "$f" ] || die "Kconfig fragment not found: $f"; done
JOBS="${LUO_JOBS:-$(nproc)}"
MIN_SERIES=6.19
REQUIRED=(CONFIG_LIVEUPDATE CONFIG_KEXEC_HANDOVER CONFIG_LIVEUPDATE_MEMFD CONFIG_KEXEC_FILE CONFIG_KVM_AMD)

for t in apt-get apt-cache dpkg dpkg-deb tar xz make gcc bc bison flex sha256sum flock; do need "$t"; done
[ -w "$(dirname "$LUO_CACHE")" ] || [ -w "$LUO_CACHE" ] || die "cache $LUO_CACHE is not writable (run as root or set LUO_CACHE)"
mkdir -p "$LUO_CACHE"

frag_hash="$(cat "${FRAGMENTS[@]}" | sha256sum | cut -c1-16)"

# version_ge A B: Debian version comparison (handles ~rc).
version_ge() { dpkg --compare-versions "$1" ge "$2"; }

# Verify the required symbols in a .config; print what is missing.
check_config() {
  local cfg="$1" sym missing=()
  for sym in "${REQUIRED[@]}"; do
    grep -qx "$sym=y" "$cfg" || missing+=("$sym")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "the built .config ($cfg) lacks: ${missing[*]}"
    for sym in "${missing[@]}"; do
      log "  $(grep -E "^(# )?${sym}[= ]" "$cfg" || echo "$sym: absent from .config (dependency not met?)")"
    done
    return 1
  fi
  log "config OK: ${REQUIRED[*]} are =y"
}

# Fast path: the last resolved version, if its build is cached.
latest_file="$LUO_CACHE/kernel-latest-${LUO_KERNEL_SERIES:-any}"
if [ "${LUO_KERNEL_REFRESH:-0}" != 1 ] && [ -f "$latest_file" ]; then
  ver="$(cat "$latest_file")"
  out="$LUO_CACHE/kernel-$ver-$frag_hash"
  if [ -f "$out/bzImage" ]; then
    log "cached: $out/bzImage (linux-source $ver, fragment $frag_hash; LUO_KERNEL_REFRESH=1 to re-resolve)"
    echo "$out/bzImage"
    exit 0
  fi
fi

t0=$(now_ms)
apt_private_update "${LUO_APT_MAX_AGE:-21600}"

# Find linux-source-X.Y packages with X.Y >= 6.19 (or the pinned series).
mapfile -t pkgs < <(apt-cache "${APT_PRIV[@]}" pkgnames linux-source- | grep -E '^linux-source-[0-9]+\.[0-9]+$' | sort -V)
log "linux-source packages served: ${pkgs[*]:-none}"
best_pkg="" best_ver=""
for p in "${pkgs[@]}"; do
  series="${p#linux-source-}"
  version_ge "$series" "$MIN_SERIES" || continue
  if [ -n "${LUO_KERNEL_SERIES:-}" ]; then
    [ "$series" = "$LUO_KERNEL_SERIES" ] || continue
  fi
  v="$(apt-cache "${APT_PRIV[@]}" policy "$p" | awk '/Candidate:/ {print $2}')"
  [ -n "$v" ] && [ "$v" != "(none)" ] || continue
  if [ -z "$best_ver" ] || version_ge "$v" "$best_ver"; then best_pkg="$p" best_ver="$v"; fi
done
if [ -z "$best_pkg" ]; then
  die "no suitable linux-source package: need linux-source-X.Y with X.Y >= $MIN_SERIES${LUO_KERNEL_SERIES:+ (pinned: $LUO_KERNEL_SERIES)} in Debian stable/sid/experimental; found: ${pkgs[*]:-none}"
fi
series="${best_pkg#linux-source-}"
log "using $best_pkg $best_ver"

out="$LUO_CACHE/kernel-$best_ver-$frag_hash"
if [ -f "$out/bzImage" ]; then
  echo "$best_ver" > "$latest_file"
  log "cached: $out/bzImage"
  echo "$out/bzImage"
  exit 0
fi

exec 9>"$LUO_CACHE/build-kernel.lock"
flock 9

# Download and unpack the source (shared by every fragment of this version).
src_root="$LUO_CACHE/src/$best_ver"
src="$src_root/linux-source-$series"
if [ ! -f "$src_root/.extracted" ]; then
  rm -rf "$src_root"; mkdir -p "$src_root" "$LUO_CACHE/debs"
  deb_glob="$LUO_CACHE/debs/${best_pkg}_${best_ver/\~/%7e}_all.deb"
  deb="$(ls "$LUO_CACHE"/debs/"${best_pkg}"_*"_all.deb" 2>/dev/null | while read -r f; do
           [ "$(dpkg-deb -f "$f" Version)" = "$best_ver" ] && echo "$f"; done | head -n1 || true)"
  if [ -z "$deb" ]; then
    ts=$(now_ms)
    log "running: (cd $LUO_CACHE/debs && apt-get <private config> download $best_pkg=$best_ver)"
    (cd "$LUO_CACHE/debs" && apt-get "${APT_PRIV[@]}" -q download "$best_pkg=$best_ver" </dev/null) >&2
    deb="$(ls "$LUO_CACHE"/debs/"${best_pkg}"_*"_all.deb" | while read -r f; do
             [ "$(dpkg-deb -f "$f" Version)" = "$best_ver" ] && echo "$f"; done | head -n1)"
    [ -n "$deb" ] || die "download of $best_pkg=$best_ver produced no .deb (looked for $deb_glob)"
    log "downloaded $deb in $(secs_since "$ts") s"
  fi
  ts=$(now_ms)
  tarball="./usr/src/linux-source-$series.tar.xz"
  log "extracting $tarball from $(basename "$deb")"
  dpkg-deb --fsys-tarfile "$deb" | tar -x -O -f - "$tarball" | xz -dc -T0 | tar -x -C "$src_root" -f -
  [ -f "$src/Makefile" ] || die "unexpected tarball layout: $src/Makefile missing (see $src_root)"
  touch "$src_root/.extracted"
  log "extracted in $(secs_since "$ts") s"
fi
kver="$(make -s -C "$src" kernelversion 2>/dev/null || echo '?')"
log "kernel source $src (make kernelversion: $kver)"

# Build out of tree, so one extracted source serves every fragment.
obj="$LUO_CACHE/build/$best_ver-$frag_hash"
rm -rf "$obj"; mkdir -p "$obj"
blog="$obj/build.log"
ts=$(now_ms)
{
  echo "== make tinyconfig"
  nice -n 10 make -C "$src" O="$obj" tinyconfig
  echo "== merge_config.sh -m ${FRAGMENTS[*]}"
  (cd "$obj" && "$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "${FRAGMENTS[@]}")
  echo "== make olddefconfig"
  nice -n 10 make -C "$src" O="$obj" olddefconfig
} > "$blog" 2>&1 || { tail -n 40 "$blog" >&2; die "configuration failed (log: $blog)"; }

# Report fragment symbols that did not survive olddefconfig (Kconfig surprises).
dropped=0
while IFS= read -r line; do
  case "$line" in CONFIG_*=*) ;; *) continue ;; esac
  sym="${line%%=*}"
  case "$line" in
    *=n) grep -qx "$sym=[ym]" "$obj/.config" || continue ;;  # "=n" is written "# CONFIG_X is not set"
    *) grep -qx "$line" "$obj/.config" && continue ;;
  esac
  got="$(grep -E "^(# )?${sym}[= ]" "$obj/.config" || echo 'absent')"
  log "note: fragment asks $line, .config has: $got"
  dropped=$((dropped + 1))
done < <(cat "${FRAGMENTS[@]}")
log "$dropped fragment line(s) not honoured as written"
check_config "$obj/.config" || die "required options missing after olddefconfig; fix ${FRAGMENTS[*]}"

log "running: nice -n 10 make -j$JOBS bzImage (log: $blog)"
nice -n 10 make -C "$src" O="$obj" -j"$JOBS" bzImage >> "$blog" 2>&1 \
  || { tail -n 60 "$blog" >&2; die "kernel build failed (log: $blog)"; }
build_s="$(secs_since "$ts")"
check_config "$obj/.config" || die "required options missing in the built .config"

tmp="$out.tmp.$$"
rm -rf "$tmp"; mkdir -p "$tmp"
cp "$obj/arch/x86/boot/bzImage" "$tmp/bzImage"
cp "$obj/.config" "$tmp/config"
cp "$blog" "$tmp/build.log"
cat "${FRAGMENTS[@]}" > "$tmp/fragment.config"
printf '%s\n' "package=$best_pkg" "version=$best_ver" "kernelversion=$kver" \
  "fragment_sha256_16=$frag_hash" "build_seconds=$build_s" > "$tmp/source-version"
rm -rf "$out"; mv "$tmp" "$out"
echo "$best_ver" > "$latest_file"
# The object tree is large; keep only the source tarball extraction.
rm -rf "$obj"
log "built $out/bzImage ($kver, $(stat -c %s "$out/bzImage") bytes) in $build_s s (configure+build); total $(secs_since "$t0") s"
echo "$out/bzImage"
