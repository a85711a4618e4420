"""host_update: a live update of the Debian host under systemd 262 with luod
from the .deb.

luod.service is active (Type=notify, STATUS= "state normal"); `luoctl check`
and `status --json` name the systemd reboot path; a client service running
as vmm (a non-root member of the group luod) creates two sessions and
preserves three memfds of random bytes; `luoctl prepare/freeze/reboot`:
reboot answers "orderly shutdown under way" (systemctl kexec), the old
kernel shuts down in order (@@HOST down, luod stopped with SIGTERM in the
journal, systemd-shutdown "Preserved fd stores in LUO session 'systemd'");
in the new kernel luod took its sessions from systemd (IncomingFromSystemd)
and is `updated`, the client service takes the three memfds back
byte-identical (SHA-256) and finishes its sessions; `luoctl finish`.
"""

import luodhost

TIMEOUT = 1200


def run(t):
    deb = luodhost.build_deb(t)
    h = luodhost.boot_with_luod(t, deb)
    detail = luodhost.expect_systemd_path(t, h)
    t.info(f"luoctl check: reboot path {detail[:90]}...")
    digests = luodhost.preserve(t, h)
    t.info(f"client service (user vmm, group luod) preserved {len(digests)} memfds in 2 sessions")
    k, reply = luodhost.cycle(t, h)
    t.info(f"luoctl reboot: {reply['from']} -> {reply['to']}, note: {reply['notes'][-1][:70]}...; "
           f"orderly shutdown seen; new boot id {k['boot_id']}")
    t.measure("luoctl reboot -> ssh in the new kernel", k["ssh"])
    luodhost.restore(t, h, digests)
    t.info("new kernel: luod updated from systemd's fd store; the client got its 3 memfds back byte-identical")
    h.check("luoctl finish", timeout=300)
    st = luodhost.status(h)
    t.expect(st["state"] == "normal" and st["live_updates"] == 1, f"after finish: {st['state']}, {st['live_updates']}")
    n = luodhost.unit(h, "luod.service", "NFileDescriptorStore")["NFileDescriptorStore"]
    # luod keeps the record memfd the kernel handed back (parked as
    # luod-record-in) and preserves it in a new LUO session only at the next
    # prepare (Kernel::before_cycle, outside the blackout): until then the fd
    # store holds the record alone (host_two_updates goes through that prepare).
    t.expect(n == "1", f"luod's fd store holds {n} fds after finish, want 1 (its record, kept in place)")
    t.info("finish: normal, live_updates 1, luod's fd store holds its record (its new session comes at prepare)")
    h.shutdown()
