//! The target kernel's files: descriptors a client sent with `prepare` or
//! `check`, opened with the client's own rights.
//!
//! luod never opens a path a client names (it would do so as root, and a
//! FIFO would block it). It takes only regular files open for reading, whose
//! reads cannot block, and refuses anything else from `fstat` alone, before
//! reading a byte.
//!
//! A regular file on a FUSE filesystem is the exception: a process answers
//! its reads (and even its `fstat` and `close`), and may never answer; any
//! user can mount one in a user namespace of its own. So before anything
//! touches a descriptor, its mount is looked up in `/proc` (`fdinfo` gives
//! the mount id; luod's mount table, then the caller's, give the filesystem
//! type), which never calls into the filesystem. An image on FUSE, or on a
//! mount found in neither table (luod could not tell), is refused, and the
//! request's descriptors are then closed on a thread of their own, since
//! the close may wait for the FUSE server too.

use super::{EngineError, close_elsewhere};
use crate::protocol::{ImageFile, PrepareArgs};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::stat::{FileStat, SFlag, fstat};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;

/// Largest image `kexec_file_load` takes (the kernel's `KEXEC_FILE_SIZE_MAX`).
pub const MAX_IMAGE_SIZE: u64 = 4 << 30;

/// Longest name of an image kept (`PATH_MAX`): the name goes into the record.
pub const MAX_IMAGE_NAME: usize = 4096;

/// Which image a file is, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Kernel,
    Initrd,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Kernel => "kernel image",
            Role::Initrd => "initrd",
        }
    }
}

/// What identifies the contents of a file: if any of it changes, the file
/// was written (or replaced) in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl From<&FileStat> for Stamp {
    fn from(st: &FileStat) -> Stamp {
        Stamp {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

/// One image: a regular file open for reading, and the name its client gave.
#[derive(Debug)]
pub(super) struct Image {
    role: Role,
    /// What the client calls it (its path there); never opened by luod.
    pub name: String,
    file: File,
    stamp: Stamp,
    /// The digest once computed (a pin check, then the record, read it once).
    digest: std::cell::OnceCell<[u8; 32]>,
}

impl Image {
    /// Takes `fd` as the `role` image if it is a regular file open for
    /// reading and no larger than `kexec_file_load` takes. Reads nothing.
    fn new(role: Role, name: String, fd: OwnedFd) -> Result<Image, EngineError> {
        let bad = |why: String| EngineError::BadImage(format!("{} {name} {why}", role.as_str()));
        let st = fstat(fd.as_fd()).map_err(|e| bad(format!("cannot be examined: fstat failed: {e} ({})", e.desc())))?;
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind != SFlag::S_IFREG {
            let what = match kind {
                SFlag::S_IFIFO => "a FIFO",
                SFlag::S_IFCHR => "a character device",
                SFlag::S_IFBLK => "a block device",
                SFlag::S_IFDIR => "a directory",
                SFlag::S_IFSOCK => "a socket",
                SFlag::S_IFLNK => "a symbolic link",
                _ => "of an unknown file type",
            };
            return Err(bad(format!(
                "is {what}, not a regular file: luod reads only regular files, which cannot block it"
            )));
        }
        let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFL)
            .map_err(|e| bad(format!("cannot be examined: fcntl(F_GETFL) failed: {e} ({})", e.desc())))?;
        let flags = OFlag::from_bits_truncate(flags);
        if flags.contains(OFlag::O_PATH) {
            return Err(bad(
                "was opened with O_PATH, which cannot be read: send it opened for reading".into(),
            ));
        }
        if flags & OFlag::O_ACCMODE == OFlag::O_WRONLY {
            return Err(bad(
                "was opened write-only, so it cannot be read: send it opened for reading".into(),
            ));
        }
        let size = st.st_size as u64;
        if size > MAX_IMAGE_SIZE {
            return Err(bad(format!(
                "is {size} bytes, more than the {MAX_IMAGE_SIZE} bytes kexec_file_load takes"
            )));
        }
        Ok(Image {
            role,
            name,
            file: File::from(fd),
            stamp: Stamp::from(&st),
            digest: std::cell::OnceCell::new(),
        })
    }

    /// The open file.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Size in bytes when it was taken.
    pub fn size(&self) -> u64 {
        self.stamp.size as u64
    }

    /// SHA-256 of the whole file, read with `pread` from offset 0 (the
    /// descriptor's offset does not matter, as for `kexec_file_load`); read
    /// once, then kept (`unchanged` tells whether the file changed since).
    pub fn sha256(&self) -> Result<[u8; 32], EngineError> {
        if let Some(d) = self.digest.get() {
            return Ok(*d);
        }
        let d = self.read_sha256()?;
        Ok(*self.digest.get_or_init(|| d))
    }

    /// Refuses when the file's digest is not `pinned`.
    pub fn verify(&self, pinned: &[u8; 32]) -> Result<(), EngineError> {
        let actual = self.sha256()?;
        if &actual == pinned {
            Ok(())
        } else {
            Err(EngineError::DigestMismatch {
                what: self.role.as_str(),
                name: self.name.clone(),
                expected: *pinned,
                actual,
            })
        }
    }

    fn read_sha256(&self) -> Result<[u8; 32], EngineError> {
        let fail =
            |e: std::io::Error| EngineError::BadImage(format!("cannot read {} {}: {e}", self.role.as_str(), self.name));
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0u64;
        loop {
            let n = match self.file.read_at(&mut buf, offset) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(fail(e)),
            };
            h.update(&buf[..n]);
            offset += n as u64;
            if offset > MAX_IMAGE_SIZE {
                return Err(self.changed());
            }
        }
        Ok(h.finalize().into())
    }

    /// Refuses when the file changed since it was taken: what was digested
    /// and loaded might then differ.
    pub fn unchanged(&self) -> Result<(), EngineError> {
        match fstat(self.file.as_fd()) {
            Ok(st) if Stamp::from(&st) == self.stamp => Ok(()),
            _ => Err(self.changed()),
        }
    }

    fn changed(&self) -> EngineError {
        EngineError::BadImage(format!(
            "{} {} changed while luod read it: prepare again once nothing writes it",
            self.role.as_str(),
            self.name
        ))
    }
}

/// The images a `prepare` or `check` request sent: the kernel and, with
/// it, an initrd.
#[derive(Debug)]
pub(super) struct Images {
    pub kernel: Image,
    pub initrd: Option<Image>,
}

/// The filesystem type of the mount `fd` is on, from `/proc` alone (no
/// call into the filesystem): the mount id from `/proc/self/fdinfo`, looked
/// up in luod's mount table, then in the caller's (`caller_pid`). `Err`:
/// the mount id, when neither table has it.
fn fs_type(fd: BorrowedFd<'_>, caller_pid: i32) -> Result<String, String> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap_or_default();
    let Some(mnt_id) = info.lines().find_map(|l| l.strip_prefix("mnt_id:")).map(str::trim) else {
        return Err("unknown".into());
    };
    let tables = [
        "/proc/self/mountinfo".to_string(),
        format!("/proc/{caller_pid}/mountinfo"),
    ];
    tables
        .iter()
        .filter_map(|t| std::fs::read_to_string(t).ok())
        .find_map(|t| mount_fs_type(&t, mnt_id))
        .ok_or_else(|| mnt_id.to_string())
}

/// The filesystem type of mount `mnt_id` in a `mountinfo` table.
fn mount_fs_type(table: &str, mnt_id: &str) -> Option<String> {
    table
        .lines()
        .find(|l| l.split(' ').next() == Some(mnt_id))
        .and_then(|l| l.split_once(" - "))
        .and_then(|(_, rest)| rest.split(' ').next())
        .map(str::to_string)
}

/// True for the filesystem types whose reads a process answers.
fn is_fuse(fs_type: &str) -> bool {
    fs_type == "fuse" || fs_type == "fuseblk" || fs_type.starts_with("fuse.")
}

/// Refuses the request when one of its descriptors is on a FUSE filesystem,
/// or on a mount luod cannot find, before anything touches them. The
/// request's descriptors are then closed on a thread of their own.
/// `name(i)` says what descriptor `i` is, for the message.
pub(super) fn screen(
    fds: Vec<OwnedFd>,
    caller_pid: i32,
    name: impl Fn(usize) -> String,
) -> Result<Vec<OwnedFd>, EngineError> {
    let mut refusal = None;
    for (i, fd) in fds.iter().enumerate() {
        match fs_type(fd.as_fd(), caller_pid) {
            Ok(t) if is_fuse(&t) => {
                refusal = Some(format!(
                    "{} is on a FUSE filesystem ({t}), whose reads a process answers, possibly never: luod does not \
                     read it; copy it to a local filesystem",
                    name(i)
                ));
            }
            Ok(_) => continue,
            Err(mnt_id) => {
                refusal = Some(format!(
                    "{} is on a mount (id {mnt_id}) found in neither luod's nor the caller's mount table, so luod \
                     cannot tell whether reading it could block: send a regular file on a mounted filesystem",
                    name(i)
                ));
            }
        }
        break;
    }
    match refusal {
        None => Ok(fds),
        Some(why) => {
            close_elsewhere(fds);
            Err(EngineError::BadImage(why))
        }
    }
}

/// What descriptor `i` of a `prepare`/`check` request is, by `args`.
pub(super) fn describe(args: &PrepareArgs, i: usize) -> String {
    [(Role::Kernel, &args.kernel), (Role::Initrd, &args.initrd)]
        .into_iter()
        .find_map(|(role, f)| {
            f.as_ref()
                .filter(|f| usize::try_from(f.fd).ok() == Some(i))
                .map(|f| format!("{} {}", role.as_str(), f.name))
        })
        .unwrap_or_else(|| format!("file descriptor {i}"))
}

/// Matches the descriptors that came with a `what` request (`prepare`,
/// `check`) to the images `args` names. `Ok(None)`: no target kernel (and
/// no descriptor). Every descriptor must be named exactly once.
pub(super) fn take(what: &str, args: &PrepareArgs, fds: Vec<OwnedFd>) -> Result<Option<Images>, EngineError> {
    let named: Vec<(Role, &ImageFile)> = [(Role::Kernel, &args.kernel), (Role::Initrd, &args.initrd)]
        .into_iter()
        .filter_map(|(role, f)| f.as_ref().map(|f| (role, f)))
        .collect();
    if fds.len() != named.len() {
        return Err(EngineError::InvalidArgument(format!(
            "{what} names {} image(s) but {} file descriptor(s) came with it: send each image \
             (kernel first, then initrd) as a descriptor with SCM_RIGHTS",
            named.len(),
            fds.len()
        )));
    }
    let mut slots: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let mut kernel = None;
    let mut initrd = None;
    for (role, f) in named {
        if f.name.len() > MAX_IMAGE_NAME {
            return Err(EngineError::InvalidArgument(format!(
                "{what}: the {}'s name is {} bytes; at most {MAX_IMAGE_NAME} (PATH_MAX) are kept",
                role.as_str(),
                f.name.len()
            )));
        }
        let fd = usize::try_from(f.fd)
            .ok()
            .and_then(|i| slots.get_mut(i))
            .and_then(Option::take)
            .ok_or_else(|| {
                EngineError::InvalidArgument(format!(
                    "{what}: the {} {} names descriptor {}, which did not come with the request or is named twice",
                    role.as_str(),
                    f.name,
                    f.fd
                ))
            })?;
        let image = Image::new(role, f.name.clone(), fd)?;
        match role {
            Role::Kernel => kernel = Some(image),
            Role::Initrd => initrd = Some(image),
        }
    }
    match (kernel, initrd) {
        (Some(kernel), initrd) => Ok(Some(Images { kernel, initrd })),
        (None, None) => Ok(None),
        (None, Some(_)) => Err(EngineError::InvalidArgument(
            "--initrd, --cmdline and --reuse-cmdline need --kernel".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_file(fd: u32, name: &str) -> Option<ImageFile> {
        Some(ImageFile { fd, name: name.into() })
    }

    fn kernel_only(name: &str) -> PrepareArgs {
        PrepareArgs {
            kernel: image_file(0, name),
            cmdline: Some("quiet".into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_filesystem_type_comes_from_the_mount_table() {
        let table = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                     91 27 0:55 / /mnt/a\\040b rw,nosuid - fuse.sshfs host:/ rw,user_id=0\n\
                     92 27 0:56 / /mnt/c rw - fuse /dev/fuse rw\n";
        assert_eq!(mount_fs_type(table, "91").as_deref(), Some("fuse.sshfs"));
        assert_eq!(mount_fs_type(table, "22").as_deref(), Some("proc"));
        assert_eq!(mount_fs_type(table, "9"), None);
        assert!(is_fuse("fuse.sshfs") && is_fuse("fuse") && is_fuse("fuseblk"));
        assert!(!is_fuse("ext4") && !is_fuse("tmpfs") && !is_fuse("fusectl"));
        // A file of a test's temporary directory is on a mount luod sees.
        let f = tempfile::tempfile().unwrap();
        let t = fs_type(f.as_fd(), std::process::id() as i32).unwrap();
        assert!(!is_fuse(&t), "{t}");
        let fds = screen(vec![f.into()], std::process::id() as i32, |i| format!("fd {i}")).unwrap();
        assert_eq!(fds.len(), 1);
    }

    #[test]
    fn a_pipe_is_on_no_mount_luod_can_find_and_is_refused() {
        let (r, _w) = nix::unistd::pipe().unwrap();
        let args = kernel_only("pipe");
        let err = screen(vec![r], std::process::id() as i32, |i| describe(&args, i)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("kernel image pipe is on a mount (id ")
                && msg.ends_with(
                    ") found in neither luod's nor the caller's mount table, so luod cannot tell whether reading it \
                     could block: send a regular file on a mounted filesystem"
                ),
            "{msg}"
        );
    }

    fn refusal(r: Result<Option<Images>, EngineError>) -> String {
        r.map(|_| ()).unwrap_err().to_string()
    }

    #[test]
    fn a_fifo_is_refused_from_fstat_without_reading() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Opening for read and write does not block; luod must not read it
        // (a read would block with no data in the pipe).
        let fd: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .unwrap()
            .into();
        assert_eq!(
            refusal(take("check", &kernel_only("/k/fifo"), vec![fd])),
            "kernel image /k/fifo is a FIFO, not a regular file: luod reads only regular files, which cannot block it"
        );
    }

    #[test]
    fn a_directory_and_a_device_are_refused() {
        let dir: OwnedFd = File::open("/").unwrap().into();
        assert_eq!(
            refusal(take("prepare", &kernel_only("/"), vec![dir])),
            "kernel image / is a directory, not a regular file: luod reads only regular files, which cannot block it"
        );
        let null: OwnedFd = File::open("/dev/null").unwrap().into();
        assert_eq!(
            refusal(take("prepare", &kernel_only("/dev/null"), vec![null])),
            "kernel image /dev/null is a character device, not a regular file: luod reads only regular files, which \
             cannot block it"
        );
    }

    #[test]
    fn a_file_not_open_for_reading_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, b"x").unwrap();
        let wronly: OwnedFd = std::fs::OpenOptions::new().write(true).open(&path).unwrap().into();
        assert_eq!(
            refusal(take("prepare", &kernel_only("k"), vec![wronly])),
            "kernel image k was opened write-only, so it cannot be read: send it opened for reading"
        );
        let opath = nix::fcntl::open(&path, OFlag::O_PATH | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty()).unwrap();
        assert_eq!(
            refusal(take("prepare", &kernel_only("k"), vec![opath])),
            "kernel image k was opened with O_PATH, which cannot be read: send it opened for reading"
        );
    }

    #[test]
    fn descriptors_must_match_the_named_images() {
        let f = || -> OwnedFd { tempfile::tempfile().unwrap().into() };
        assert_eq!(
            refusal(take("prepare", &kernel_only("k"), vec![])),
            "prepare names 1 image(s) but 0 file descriptor(s) came with it: send each image (kernel first, then \
             initrd) as a descriptor with SCM_RIGHTS"
        );
        assert_eq!(
            refusal(take("check", &PrepareArgs::default(), vec![f()])),
            "check names 0 image(s) but 1 file descriptor(s) came with it: send each image (kernel first, then \
             initrd) as a descriptor with SCM_RIGHTS"
        );
        let twice = PrepareArgs {
            initrd: image_file(0, "i"),
            ..kernel_only("k")
        };
        assert_eq!(
            refusal(take("prepare", &twice, vec![f(), f()])),
            "prepare: the initrd i names descriptor 0, which did not come with the request or is named twice"
        );
        let out_of_range = PrepareArgs {
            kernel: image_file(7, "k"),
            ..Default::default()
        };
        assert_eq!(
            refusal(take("prepare", &out_of_range, vec![f()])),
            "prepare: the kernel image k names descriptor 7, which did not come with the request or is named twice"
        );
        let initrd_alone = PrepareArgs {
            initrd: image_file(0, "i"),
            ..Default::default()
        };
        assert_eq!(
            refusal(take("prepare", &initrd_alone, vec![f()])),
            "--initrd, --cmdline and --reuse-cmdline need --kernel"
        );
        let long = "k".repeat(MAX_IMAGE_NAME + 1);
        assert_eq!(
            refusal(take("prepare", &kernel_only(&long), vec![f()])),
            "prepare: the kernel image's name is 4097 bytes; at most 4096 (PATH_MAX) are kept"
        );
        assert!(take("prepare", &PrepareArgs::default(), vec![]).unwrap().is_none());
    }

    #[test]
    fn the_digest_is_of_the_whole_file_whatever_the_offset_and_a_change_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, b"kernel bytes").unwrap();
        let mut file = File::open(&path).unwrap();
        std::io::Read::read_exact(&mut file, &mut [0u8; 4]).unwrap();
        let images = take("prepare", &kernel_only("k"), vec![file.into()]).unwrap().unwrap();
        let want: [u8; 32] = Sha256::digest(b"kernel bytes").into();
        assert_eq!(images.kernel.sha256().unwrap(), want);
        assert_eq!(images.kernel.size(), 12);
        images.kernel.unchanged().unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"!"))
            .unwrap();
        assert_eq!(
            images.kernel.unchanged().unwrap_err().to_string(),
            "kernel image k changed while luod read it: prepare again once nothing writes it"
        );
    }
}
