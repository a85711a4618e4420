"""host_systemd_coexist: luod and a second service that keeps its own memfd
in systemd's fd store (FileDescriptorStorePreserve=yes) share the exclusive
/dev/liveupdate across the same kexec: the service's memfd comes back
through LISTEN_FDS byte-identical, and luod's client data too.
"""

import luodhost

TIMEOUT = 1200

KEEPER = r'''
import array, hashlib, os, socket, time
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\0" + addr[1:]
names = []
if os.environ.get("LISTEN_PID") == str(os.getpid()):
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")[: int(os.environ.get("LISTEN_FDS", "0"))]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
if "data" in names:
    fd = 3 + names.index("data")
    data = os.pread(fd, 1 << 21, 0)
    with open("/var/lib/memkeeper/after", "w") as f:
        f.write(hashlib.sha256(data).hexdigest())
    status = "restored"
else:
    fd = os.memfd_create("memkeeper-data")
    data = os.urandom(1 << 20)
    os.write(fd, data)
    with open("/var/lib/memkeeper/before", "w") as f:
        f.write(hashlib.sha256(data).hexdigest())
    sock.sendmsg([b"FDSTORE=1\nFDNAME=data"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0, addr)
    status = "stored"
sock.sendto(f"READY=1\nSTATUS={status}".encode(), addr)
while True:
    time.sleep(3600)
'''

KEEPER_UNIT = """[Unit]
Description=keeps a memfd in systemd's fd store

[Service]
Type=notify
FileDescriptorStoreMax=4
FileDescriptorStorePreserve=yes
StateDirectory=memkeeper
ExecStart=/usr/bin/python3 /usr/local/bin/memkeeper

[Install]
WantedBy=multi-user.target
"""


def run(t):
    deb = luodhost.build_deb(t)
    h = luodhost.boot_with_luod(t, deb)
    h.ssh("cat > /usr/local/bin/memkeeper", input=KEEPER)
    h.ssh("cat > /etc/systemd/system/memkeeper.service", input=KEEPER_UNIT)
    h.check("systemctl daemon-reload && systemctl enable --now memkeeper.service", timeout=120)
    u = luodhost.unit(h, "memkeeper.service", "StatusText", "NFileDescriptorStore")
    t.expect(u == {"StatusText": "stored", "NFileDescriptorStore": "1"}, f"memkeeper after start: {u}")
    before = h.check("cat /var/lib/memkeeper/before").strip()
    luodhost.expect_systemd_path(t, h)
    digests = luodhost.preserve(t, h)
    t.info("memkeeper.service keeps a 1 MiB memfd in its fd store; luod's client preserved 3 memfds")
    k, _ = luodhost.cycle(t, h)
    h.check("systemctl is-active --wait memkeeper.service || sleep 5", timeout=60)
    u = luodhost.unit(h, "memkeeper.service", "StatusText", "NFileDescriptorStore")
    t.expect(u["StatusText"] == "restored", f"memkeeper in the new kernel: {u}\n"
             f"{h.ssh('journalctl -b -u memkeeper -o cat').stdout}")
    after = h.check("cat /var/lib/memkeeper/after").strip()
    t.expect(after == before, f"memkeeper's memfd came back with SHA-256 {after}, stored {before}")
    luodhost.restore(t, h, digests)
    t.info(f"after the kexec: memkeeper got its memfd back through LISTEN_FDS (SHA-256 {after[:16]}...), "
           f"luod's client its 3 memfds; both through the one LUO handover")
    h.check("luoctl finish", timeout=300)
    h.shutdown()
