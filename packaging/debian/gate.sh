# luod_gate ACTION: lets dpkg go on only while luod is `normal`. Between
# `prepare` and `finish` (prepared, frozen, updated) dpkg must neither stop
# nor replace luod: the script fails with the reason, before anything has
# changed, and dpkg keeps the installed package as it was.
luod_gate() {
    [ -z "${DPKG_ROOT:-}" ] || return 0
    command -v luoctl >/dev/null 2>&1 || return 0
    if status=$(luoctl --json --timeout 10 status 2>/dev/null); then
        state=$(printf '%s' "$status" | tr -d ' \t\n' | sed -n 's/^{"ok":true,"state":"\([a-z-]*\)".*/\1/p')
        case "$state" in
            normal) return 0 ;;
            "") luod_refuse "$1" "luod answered 'luoctl --json status' with something other than a state" ;;
            *) luod_refuse "$1" "luod is '$state': a live-update cycle is in progress. Finish it (luoctl finish, in the new kernel) or abandon it (luoctl cancel, before the reboot)" ;;
        esac
        return 1
    fi
    # luod does not answer: nothing to ask unless systemd says it runs or
    # still holds what it parked.
    [ -d /run/systemd/system ] || return 0
    active=$(systemctl is-active luod.service 2>/dev/null) || true
    case "$active" in
        active | activating | reloading | deactivating | refreshing)
            luod_refuse "$1" "luod.service is $active but luod does not answer on /run/luod/luod.sock; wait until 'luoctl status' answers"
            return 1
            ;;
    esac
    parked=$(systemctl show --property=NFileDescriptorStore --value luod.service 2>/dev/null) || true
    case "$parked" in
        "" | *[!0-9]* | 0) return 0 ;;
    esac
    luod_refuse "$1" "luod is stopped, but systemd holds $parked descriptors luod parked in its fd store (preserved sessions, maybe a live-update cycle). Start luod (systemctl start luod) so that its state can be checked"
    return 1
}

luod_refuse() {
    echo "liveupdate: refusing to $1 the package: $2; then run dpkg again. Nothing was changed." >&2
}
