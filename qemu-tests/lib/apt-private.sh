# shellcheck shell=bash
# A private apt configuration that adds Debian sid and experimental (plus the
# stock release $LUO_STOCK_RELEASE, default bookworm, with its -updates and
# -security suites) WITHOUT touching the machine's apt sources. Source this file, then
# call `apt_private_update` and use "${APT_PRIV[@]}" in front of apt-get /
# apt-cache arguments, e.g. `apt-get "${APT_PRIV[@]}" download linux-source-7.2`.
#
# Everything lives under $LUO_CACHE/apt (lists, package caches, sources.list).

: "${LUO_CACHE:=/var/cache/liveupdate-qemu}"
: "${LUO_DEBIAN_MIRROR:=http://deb.debian.org/debian}"
: "${LUO_DEBIAN_SECURITY_MIRROR:=http://deb.debian.org/debian-security}"
: "${LUO_STOCK_RELEASE:=bookworm}"
APT_DIR="$LUO_CACHE/apt"

apt_private_init() {
  mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/archives/partial" \
           "$APT_DIR/sources.list.d" "$APT_DIR/preferences.d"
  local kr=/usr/share/keyrings/debian-archive-keyring.gpg
  if [ -n "${LUO_APT_SOURCES:-}" ]; then
    # A caller with its own APT_DIR may name its own suites (fetch-qemu.sh).
    printf '%s\n' "$LUO_APT_SOURCES" > "$APT_DIR/sources.list.new.$$"
  else
  cat > "$APT_DIR/sources.list.new.$$" <<SRC
deb [signed-by=$kr] $LUO_DEBIAN_MIRROR $LUO_STOCK_RELEASE main
deb [signed-by=$kr] $LUO_DEBIAN_MIRROR $LUO_STOCK_RELEASE-updates main
deb [signed-by=$kr] $LUO_DEBIAN_SECURITY_MIRROR $LUO_STOCK_RELEASE-security main
deb [signed-by=$kr] $LUO_DEBIAN_MIRROR sid main
deb [signed-by=$kr] $LUO_DEBIAN_MIRROR experimental main
SRC
  fi
  # A changed sources.list invalidates the "recently updated" stamp.
  if ! cmp -s "$APT_DIR/sources.list.new.$$" "$APT_DIR/sources.list"; then
    mv "$APT_DIR/sources.list.new.$$" "$APT_DIR/sources.list"
    rm -f "$APT_DIR/last-update"
  else
    rm -f "$APT_DIR/sources.list.new.$$"
  fi
  APT_PRIV=(
    -o "Dir::State=$APT_DIR"
    -o "Dir::State::Lists=$APT_DIR/lists"
    -o "Dir::State::status=/var/lib/dpkg/status"
    -o "Dir::Cache=$APT_DIR"
    -o "Dir::Cache::archives=$APT_DIR/archives"
    -o "Dir::Cache::pkgcache=$APT_DIR/pkgcache.bin"
    -o "Dir::Cache::srcpkgcache=$APT_DIR/srcpkgcache.bin"
    -o "Dir::Etc::SourceList=$APT_DIR/sources.list"
    -o "Dir::Etc::SourceParts=$APT_DIR/sources.list.d"
    -o "Dir::Etc::Preferences=$APT_DIR/preferences"
    -o "Dir::Etc::PreferencesParts=$APT_DIR/preferences.d"
    -o "APT::Default-Release="
    -o "Acquire::Languages=none"
    -o "Debug::NoLocking=true"
    -o "APT::Sandbox::User=root"
  )
}

# Refresh the private lists at most every $1 seconds (default 6 h).
# Serialized with a lock so that concurrent scripts do not race.
apt_private_update() {
  local max_age="${1:-21600}" stamp="$APT_DIR/last-update" rc=0
  mkdir -p "$APT_DIR"
  exec 8>"$APT_DIR/.lock"
  flock 8
  apt_private_init
  if [ -f "$stamp" ] && [ $(( $(date +%s) - $(stat -c %Y "$stamp") )) -lt "$max_age" ]; then
    flock -u 8
    return 0
  fi
  echo "apt-private: apt-get ${APT_PRIV[*]} update" >&2
  apt-get "${APT_PRIV[@]}" -q update >&2 </dev/null || rc=$?
  [ "$rc" -ne 0 ] || touch "$stamp"
  flock -u 8
  return "$rc"
}
