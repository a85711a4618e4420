// SPDX-License-Identifier: MIT
/*
 * luo-smoke: a tiny static helper run inside the QEMU guest by
 * qemu-tests/boot-smoke.sh. It is only a smoke test of the harness and of the
 * kernel facts the Rust code relies on; the project's own code does the real
 * work later.
 *
 *   luo-smoke devices               check /dev/liveupdate and /dev/kvm
 *   luo-smoke errnos                probe LUO ioctl errnos in a fresh boot
 *   luo-smoke cycle [KERNEL INITRD CMDLINE]
 *        retrieve the counter memfd preserved by the previous kernel (if any),
 *        finish that session, increment; with arguments: preserve the counter
 *        in a new session, kexec_file_load(KERNEL, INITRD, CMDLINE) and
 *        reboot(LINUX_REBOOT_CMD_KEXEC) while the session is still open.
 *   luo-smoke kexec KERNEL INITRD CMDLINE
 *        plain kexec_file_load + reboot(LINUX_REBOOT_CMD_KEXEC), no LUO
 *        (for kernels without LUO: the reserved-memory scenario).
 *
 * Output lines start with "SMOKE:" so the host can grep the serial log.
 * The uapi structs are copied from include/uapi/linux/liveupdate.h (Linux
 * 7.3-rc7, Debian linux-source-7.3) so no kernel headers are needed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ---- copied from include/uapi/linux/liveupdate.h ---- */
#define LIVEUPDATE_IOCTL_TYPE 0xBA
#define LIVEUPDATE_SESSION_NAME_LENGTH 64
enum {
	LIVEUPDATE_CMD_BASE = 0x00,
	LIVEUPDATE_CMD_CREATE_SESSION = LIVEUPDATE_CMD_BASE,
	LIVEUPDATE_CMD_RETRIEVE_SESSION = 0x01,
};
enum {
	LIVEUPDATE_CMD_SESSION_BASE = 0x40,
	LIVEUPDATE_CMD_SESSION_PRESERVE_FD = LIVEUPDATE_CMD_SESSION_BASE,
	LIVEUPDATE_CMD_SESSION_RETRIEVE_FD = 0x41,
	LIVEUPDATE_CMD_SESSION_FINISH = 0x42,
	LIVEUPDATE_CMD_SESSION_GET_NAME = 0x43,
};
struct liveupdate_ioctl_create_session {
	uint32_t size;
	int32_t fd;
	uint8_t name[LIVEUPDATE_SESSION_NAME_LENGTH];
};
struct liveupdate_ioctl_retrieve_session {
	uint32_t size;
	int32_t fd;
	uint8_t name[LIVEUPDATE_SESSION_NAME_LENGTH];
};
struct liveupdate_session_preserve_fd {
	uint32_t size;
	int32_t fd;
	uint64_t token __attribute__((aligned(8)));
};
struct liveupdate_session_retrieve_fd {
	uint32_t size;
	int32_t fd;
	uint64_t token __attribute__((aligned(8)));
};
struct liveupdate_session_finish {
	uint32_t size;
	uint32_t reserved;
};
struct liveupdate_session_get_name {
	uint32_t size;
	uint32_t reserved;
	uint8_t name[LIVEUPDATE_SESSION_NAME_LENGTH];
};
#define LIVEUPDATE_IOCTL_CREATE_SESSION _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_CREATE_SESSION)
#define LIVEUPDATE_IOCTL_RETRIEVE_SESSION _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_RETRIEVE_SESSION)
#define LIVEUPDATE_SESSION_PRESERVE_FD _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_PRESERVE_FD)
#define LIVEUPDATE_SESSION_RETRIEVE_FD _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_RETRIEVE_FD)
#define LIVEUPDATE_SESSION_FINISH _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_FINISH)
#define LIVEUPDATE_SESSION_GET_NAME _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_GET_NAME)
/* ---- end of copy ---- */

_Static_assert(sizeof(struct liveupdate_ioctl_create_session) == 72, "create_session");
_Static_assert(sizeof(struct liveupdate_session_preserve_fd) == 16, "preserve_fd");
_Static_assert(sizeof(struct liveupdate_session_retrieve_fd) == 16, "retrieve_fd");
_Static_assert(sizeof(struct liveupdate_session_finish) == 8, "finish");
_Static_assert(sizeof(struct liveupdate_session_get_name) == 72, "get_name");
_Static_assert(LIVEUPDATE_IOCTL_CREATE_SESSION == 0xBA00, "nr");
_Static_assert(LIVEUPDATE_SESSION_PRESERVE_FD == 0xBA40, "nr");

#define KVM_GET_API_VERSION _IO(0xAE, 0x00)
#define KVM_CREATE_VM _IO(0xAE, 0x01)

#define LUO_DEV "/dev/liveupdate"
#define COUNTER_SESSION "smoke-counter"
#define COUNTER_TOKEN 0x5A5AULL

static int failures;

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static double uptime_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_BOOTTIME, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static const char *ename(int e)
{
	switch (e) {
	case 0: return "OK";
	case EPERM: return "EPERM";
	case ENOENT: return "ENOENT";
	case EIO: return "EIO";
	case E2BIG: return "E2BIG";
	case EBADF: return "EBADF";
	case ENOMEM: return "ENOMEM";
	case EBUSY: return "EBUSY";
	case EEXIST: return "EEXIST";
	case EINVAL: return "EINVAL";
	case ENOTTY: return "ENOTTY";
	case ENOSPC: return "ENOSPC";
	case EFAULT: return "EFAULT";
	case EOPNOTSUPP: return "EOPNOTSUPP";
	case EOVERFLOW: return "EOVERFLOW";
	case EFBIG: return "EFBIG";
	default: return strerror(e);
	}
}

/* ioctl returning 0 or the errno */
static int xioctl(int fd, unsigned long req, void *arg)
{
	return ioctl(fd, req, arg) < 0 ? errno : 0;
}

static void expect(const char *what, int got, int want)
{
	printf("SMOKE: errno %-44s want %-10s got %-10s %s\n", what, ename(want),
	       ename(got), got == want ? "ok" : "MISMATCH");
	if (got != want)
		failures++;
}

static int create_session(int luo, const char *name, int *err)
{
	struct liveupdate_ioctl_create_session a = { .size = sizeof(a) };
	memcpy(a.name, name, strnlen(name, sizeof(a.name)));
	*err = xioctl(luo, LIVEUPDATE_IOCTL_CREATE_SESSION, &a);
	return *err ? -1 : a.fd;
}

static int retrieve_session(int luo, const char *name, int *err)
{
	struct liveupdate_ioctl_retrieve_session a = { .size = sizeof(a) };
	memcpy(a.name, name, strnlen(name, sizeof(a.name)));
	*err = xioctl(luo, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, &a);
	return *err ? -1 : a.fd;
}

static int preserve_fd(int s, int fd, uint64_t token)
{
	struct liveupdate_session_preserve_fd a = { .size = sizeof(a), .fd = fd, .token = token };
	return xioctl(s, LIVEUPDATE_SESSION_PRESERVE_FD, &a);
}

static int retrieve_fd(int s, uint64_t token, int *err)
{
	struct liveupdate_session_retrieve_fd a = { .size = sizeof(a), .token = token };
	*err = xioctl(s, LIVEUPDATE_SESSION_RETRIEVE_FD, &a);
	return *err ? -1 : a.fd;
}

static int finish_session(int s)
{
	struct liveupdate_session_finish a = { .size = sizeof(a) };
	return xioctl(s, LIVEUPDATE_SESSION_FINISH, &a);
}

static int new_memfd(const char *name, uint64_t value)
{
	int fd = memfd_create(name, 0);
	if (fd < 0 || ftruncate(fd, 4096) < 0 || pwrite(fd, &value, sizeof(value), 0) != sizeof(value)) {
		printf("SMOKE: memfd setup failed: %s\n", strerror(errno));
		exit(1);
	}
	return fd;
}

static int cmd_devices(void)
{
	int ok = 1;
	int fd = open(LUO_DEV, O_RDWR);
	if (fd < 0) {
		printf("SMOKE: /dev/liveupdate MISSING (%s)\n", strerror(errno));
		ok = 0;
	} else {
		printf("SMOKE: /dev/liveupdate present, opened\n");
		close(fd);
	}
	fd = open("/dev/kvm", O_RDWR);
	if (fd < 0) {
		printf("SMOKE: /dev/kvm MISSING (%s)\n", strerror(errno));
		ok = 0;
	} else {
		int api = ioctl(fd, KVM_GET_API_VERSION, 0);
		int vm = ioctl(fd, KVM_CREATE_VM, 0);
		printf("SMOKE: /dev/kvm present, api=%d, create_vm=%s\n", api,
		       vm >= 0 ? "ok" : strerror(errno));
		if (vm < 0)
			ok = 0;
		else
			close(vm);
		close(fd);
	}
	return ok ? 0 : 1;
}

/* Errno probes that need a fresh boot (no incoming sessions). */
static int cmd_errnos(void)
{
	int err, luo, luo2, s, s2, mfd, mfd2, p[2];

	luo = open(LUO_DEV, O_RDWR);
	if (luo < 0) {
		printf("SMOKE: open %s: %s\n", LUO_DEV, strerror(errno));
		return 1;
	}
	luo2 = open(LUO_DEV, O_RDWR);
	expect("second open of /dev/liveupdate", luo2 < 0 ? errno : 0, EBUSY);

	create_session(luo, "", &err);
	expect("CREATE_SESSION empty name", err, EINVAL);
	{
		struct liveupdate_ioctl_create_session a = { .size = sizeof(a) };
		memset(a.name, 'x', sizeof(a.name)); /* 64 bytes, no NUL */
		expect("CREATE_SESSION unterminated 64-byte name",
		       xioctl(luo, LIVEUPDATE_IOCTL_CREATE_SESSION, &a), EINVAL);
		memset(a.name, 0, sizeof(a.name));
		memset(a.name, 'y', 63); /* longest valid name */
		err = xioctl(luo, LIVEUPDATE_IOCTL_CREATE_SESSION, &a);
		expect("CREATE_SESSION 63-byte name", err, 0);
		if (!err)
			close(a.fd);
	}
	s = create_session(luo, "dup", &err);
	expect("CREATE_SESSION \"dup\"", err, 0);
	create_session(luo, "dup", &err);
	expect("CREATE_SESSION \"dup\" again", err, EEXIST);
	{
		struct liveupdate_ioctl_create_session a = { .size = 4 };
		expect("CREATE_SESSION size=4 (< min)",
		       xioctl(luo, LIVEUPDATE_IOCTL_CREATE_SESSION, &a), EINVAL);
	}
	{
		struct { struct liveupdate_ioctl_create_session c; uint64_t tail; } a = { 0 };
		a.c.size = sizeof(a);
		strcpy((char *)a.c.name, "bigger");
		a.tail = 1;
		expect("CREATE_SESSION size+8, non-zero tail",
		       xioctl(luo, LIVEUPDATE_IOCTL_CREATE_SESSION, &a), E2BIG);
		a.tail = 0;
		err = xioctl(luo, LIVEUPDATE_IOCTL_CREATE_SESSION, &a);
		expect("CREATE_SESSION size+8, zero tail", err, 0);
		if (!err)
			close(a.c.fd);
	}
	{
		struct liveupdate_ioctl_create_session a = { .size = sizeof(a) };
		expect("/dev/liveupdate ioctl nr 0x02 (unknown)",
		       xioctl(luo, _IO(LIVEUPDATE_IOCTL_TYPE, 0x02), &a), EINVAL);
		expect("/dev/liveupdate _IOW(0xBA,0,int) (bad cmd bits)",
		       xioctl(luo, _IOW(LIVEUPDATE_IOCTL_TYPE, 0x00, int), &a), ENOTTY);
		expect("/dev/liveupdate session ioctl PRESERVE_FD",
		       xioctl(luo, LIVEUPDATE_SESSION_PRESERVE_FD, &a), EINVAL);
	}
	retrieve_session(luo, "nope", &err);
	expect("RETRIEVE_SESSION unknown (fresh boot)", err, ENOENT);

	/* Session fd ioctls (outgoing session) */
	expect("PRESERVE_FD bad fd 9999", preserve_fd(s, 9999, 1), EBADF);
	if (pipe(p) == 0) {
		expect("PRESERVE_FD pipe (no handler)", preserve_fd(s, p[0], 1), ENOENT);
		close(p[0]);
		close(p[1]);
	}
	{
		int f = open("/tmp-file-for-smoke", O_RDWR | O_CREAT, 0600);
		/* rootfs file, not shmem-unlinked: memfd handler refuses */
		expect("PRESERVE_FD regular rootfs file", preserve_fd(s, f, 1), ENOENT);
		close(f);
		unlink("/tmp-file-for-smoke");
	}
	{
		int k = open("/dev/kvm", O_RDWR);
		if (k >= 0) {
			expect("PRESERVE_FD /dev/kvm fd", preserve_fd(s, k, 1), ENOENT);
			int vm = ioctl(k, KVM_CREATE_VM, 0);
			if (vm >= 0) {
				expect("PRESERVE_FD KVM VM fd", preserve_fd(s, vm, 1), ENOENT);
				close(vm);
			}
			close(k);
		}
	}
	mfd = new_memfd("a", 1);
	mfd2 = new_memfd("b", 2);
	expect("PRESERVE_FD memfd token 1", preserve_fd(s, mfd, 1), 0);
	expect("PRESERVE_FD same memfd, token 2", preserve_fd(s, mfd, 2), EBUSY);
	expect("PRESERVE_FD other memfd, token 1 again", preserve_fd(s, mfd2, 1), EEXIST);
	s2 = create_session(luo, "other", &err);
	expect("PRESERVE_FD same memfd in another session", preserve_fd(s2, mfd, 3), EBUSY);
	retrieve_fd(s, 1, &err);
	expect("RETRIEVE_FD on outgoing session", err, EINVAL);
	expect("FINISH on outgoing session", finish_session(s), EINVAL);
	{
		struct liveupdate_session_get_name a = { .size = sizeof(a) };
		err = xioctl(s, LIVEUPDATE_SESSION_GET_NAME, &a);
		expect("GET_NAME", err, 0);
		printf("SMOKE: GET_NAME -> \"%s\"\n", (char *)a.name);
		a.reserved = 1;
		expect("GET_NAME reserved=1", xioctl(s, LIVEUPDATE_SESSION_GET_NAME, &a), EINVAL);
		expect("session ioctl nr 0x44 (unknown)",
		       xioctl(s, _IO(LIVEUPDATE_IOCTL_TYPE, 0x44), &a), EINVAL);
		expect("session fd CREATE_SESSION (nr 0x00)",
		       xioctl(s, LIVEUPDATE_IOCTL_CREATE_SESSION, &a), EINVAL);
	}
	/* closing a session unpreserves its files: the memfd can go elsewhere */
	close(s);
	expect("PRESERVE_FD memfd after its session closed", preserve_fd(s2, mfd, 3), 0);
	close(s2);
	s = create_session(luo, "dup", &err);
	expect("CREATE_SESSION \"dup\" after close", err, 0);
	close(s);
	close(mfd);
	close(mfd2);
	close(luo);
	luo2 = open(LUO_DEV, O_RDWR);
	expect("reopen /dev/liveupdate after close", luo2 < 0 ? errno : 0, 0);
	if (luo2 >= 0)
		close(luo2);
	printf("SMOKE: errnos done, %d mismatch(es)\n", failures);
	return failures ? 1 : 0;
}

/* kexec_file_load + reboot(LINUX_REBOOT_CMD_KEXEC); returns only on failure. */
static int do_kexec(const char *kernel, const char *initrd, const char *cmdline)
{
	int kfd = open(kernel, O_RDONLY), ifd = open(initrd, O_RDONLY);
	double t;

	if (kfd < 0 || ifd < 0) {
		printf("SMOKE: open %s / %s: %s\n", kernel, initrd, strerror(errno));
		return 1;
	}
	t = now_ms();
	/* flags 0; the cmdline length includes the terminating NUL */
	if (syscall(SYS_kexec_file_load, kfd, ifd, strlen(cmdline) + 1, cmdline, 0UL) < 0) {
		printf("SMOKE: kexec_file_load: %s\n", strerror(errno));
		return 1;
	}
	printf("SMOKE: kexec_file_load ok in %.1f ms; cmdline: %s\n", now_ms() - t, cmdline);
	printf("SMOKE: kexec now (uptime %.3f s)\n", uptime_s());
	fflush(stdout);
	reboot(RB_KEXEC);
	printf("SMOKE: reboot(LINUX_REBOOT_CMD_KEXEC) returned: %s\n", strerror(errno));
	return 1;
}

static int cmd_cycle(int argc, char **argv)
{
	int err, luo, s, mfd = -1;
	uint64_t counter = 0;
	double t;

	luo = open(LUO_DEV, O_RDWR);
	if (luo < 0) {
		printf("SMOKE: open %s: %s\n", LUO_DEV, strerror(errno));
		return 1;
	}
	t = now_ms();
	s = retrieve_session(luo, COUNTER_SESSION, &err);
	if (err == ENOENT) {
		printf("SMOKE: no incoming session \"%s\" (first kernel)\n", COUNTER_SESSION);
	} else if (err) {
		printf("SMOKE: RETRIEVE_SESSION: %s\n", ename(err));
		return 1;
	} else {
		retrieve_session(luo, COUNTER_SESSION, &err);
		expect("RETRIEVE_SESSION twice", err, EINVAL);
		retrieve_fd(s, 0xdead, &err);
		expect("RETRIEVE_FD unknown token", err, ENOENT);
		expect("PRESERVE_FD on incoming session", preserve_fd(s, 0, 7), EINVAL);
		mfd = retrieve_fd(s, COUNTER_TOKEN, &err);
		if (err) {
			printf("SMOKE: RETRIEVE_FD: %s\n", ename(err));
			return 1;
		}
		{
			int again = retrieve_fd(s, COUNTER_TOKEN, &err);
			expect("RETRIEVE_FD same token twice", err, 0);
			if (again >= 0)
				close(again);
		}
		if (pread(mfd, &counter, sizeof(counter), 0) != sizeof(counter)) {
			printf("SMOKE: read counter: %s\n", strerror(errno));
			return 1;
		}
		{
			struct liveupdate_session_get_name a = { .size = sizeof(a) };
			xioctl(s, LIVEUPDATE_SESSION_GET_NAME, &a);
			printf("SMOKE: incoming session GET_NAME -> \"%s\"\n", (char *)a.name);
		}
		err = finish_session(s);
		expect("FINISH incoming session", err, 0);
		close(s);
		printf("SMOKE: retrieved counter=%llu in %.1f ms\n",
		       (unsigned long long)counter, now_ms() - t);
	}
	counter++;
	printf("SMOKE: counter=%llu\n", (unsigned long long)counter);

	if (argc < 3) {
		close(luo);
		return failures ? 1 : 0;
	}

	/* Preserve the counter and kexec. */
	t = now_ms();
	if (mfd < 0)
		mfd = new_memfd("counter", counter);
	else if (pwrite(mfd, &counter, sizeof(counter), 0) != sizeof(counter))
		return 1;
	s = create_session(luo, COUNTER_SESSION, &err);
	if (err) {
		printf("SMOKE: CREATE_SESSION: %s\n", ename(err));
		return 1;
	}
	err = preserve_fd(s, mfd, COUNTER_TOKEN);
	if (err) {
		printf("SMOKE: PRESERVE_FD: %s\n", ename(err));
		return 1;
	}
	printf("SMOKE: preserved counter=%llu in %.1f ms\n", (unsigned long long)counter,
	       now_ms() - t);

	/* Sessions (s, luo) stay open: the kernel serializes them at reboot(). */
	return do_kexec(argv[0], argv[1], argv[2]);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 2 && !strcmp(argv[1], "devices"))
		return cmd_devices();
	if (argc >= 2 && !strcmp(argv[1], "errnos"))
		return cmd_errnos();
	if (argc >= 2 && !strcmp(argv[1], "cycle"))
		return cmd_cycle(argc - 2, argv + 2);
	if (argc == 5 && !strcmp(argv[1], "kexec"))
		return do_kexec(argv[2], argv[3], argv[4]);
	fprintf(stderr, "usage: luo-smoke devices | errnos | cycle [KERNEL INITRD CMDLINE]"
		" | kexec KERNEL INITRD CMDLINE\n");
	return 2;
}
