//! Files and directories luod writes: private, and never redirected.
//!
//! Everything luod creates on disk goes through here: the region file, the
//! bytes of a truncated region kept aside (`region.truncated`), pid files,
//! the state directory. A file is created `0600` with
//! `O_CREAT | O_EXCL | O_NOFOLLOW`; an existing one is opened with
//! `O_NOFOLLOW` and used only when it is a regular file owned by luod's uid
//! (its mode is then tightened to `0600`). A symbolic link in the last
//! component is never followed: the error says where it points, so the
//! operator can pass that path instead. A directory luod keeps files in must
//! belong to luod's uid and be writable by nobody else.

use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of every file luod creates.
pub const FILE_MODE: u32 = 0o600;

/// Mode of a directory luod creates for its own files.
pub const DIR_MODE: u32 = 0o700;

/// Why a private file or directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The path is a symbolic link; luod does not follow it.
    #[error(
        "{what} {path} is a symbolic link (to {target}); luod does not follow links for the files it writes: \
         pass the resolved path {resolved} instead, or remove the link"
    )]
    Symlink {
        /// What the path is for (`region`, `pid file`, ...).
        what: &'static str,
        /// The path.
        path: String,
        /// Where the link points, as written in it.
        target: String,
        /// The link resolved to an absolute path.
        resolved: String,
    },
    /// The path exists but is not a regular file.
    #[error(
        "{what} {path} exists and is not a regular file (it is a {kind}); luod leaves it alone: remove it or choose another path"
    )]
    NotRegular {
        /// What the path is for.
        what: &'static str,
        /// The path.
        path: String,
        /// What it is (`directory`, `fifo`, ...).
        kind: &'static str,
    },
    /// The file or directory belongs to another user.
    #[error(
        "{what} {path} is owned by uid {owner}, not by luod's uid {uid}: another user could read or replace luod's files there; \
         chown it to uid {uid}, or choose another path"
    )]
    WrongOwner {
        /// What the path is for.
        what: &'static str,
        /// The path.
        path: String,
        /// Its owner.
        owner: u32,
        /// luod's effective uid.
        uid: u32,
    },
    /// The directory is writable by group or others.
    #[error(
        "{what} {path} is writable by group or others (mode {mode:04o}): another user could plant or replace luod's files there; \
         `chmod go-w` it, or choose another path"
    )]
    Writable {
        /// What the path is for.
        what: &'static str,
        /// The path.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// A system call failed.
    #[error("cannot {op} {what} {path}: {source}")]
    Io {
        /// What was being done (`create`, `open`, `stat`, ...).
        op: &'static str,
        /// What the path is for.
        what: &'static str,
        /// The path.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl FileError {
    fn io(op: &'static str, what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FileError + use<> {
        let path = path.display().to_string();
        move |source| FileError::Io { op, what, path, source }
    }
}

/// The effective uid of this process: the owner every file must have.
pub fn own_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// What a file type is, in words (`regular file`, `fifo`, ...).
pub fn kind_of(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "directory"
    } else if ft.is_symlink() {
        "symbolic link"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else {
        "regular file"
    }
}

/// The error for a symbolic link at `path`.
fn symlink_error(what: &'static str, path: &Path) -> FileError {
    let target = std::fs::read_link(path)
        .map(|t| t.display().to_string())
        .unwrap_or_else(|_| "?".into());
    let resolved = std::fs::canonicalize(path)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| {
            let t = PathBuf::from(&target);
            match path.parent() {
                Some(dir) if t.is_relative() => dir.join(t).display().to_string(),
                _ => target.clone(),
            }
        });
    FileError::Symlink {
        what,
        path: path.display().to_string(),
        target,
        resolved,
    }
}

/// Refuses a symbolic link at `path` (the last component); a missing path is fine.
pub fn refuse_symlink(what: &'static str, path: &Path) -> Result<(), FileError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(symlink_error(what, path)),
        _ => Ok(()),
    }
}

/// Refuses `path` (of metadata `meta`) when luod's uid does not own it.
fn check_owner(what: &'static str, path: &Path, meta: &std::fs::Metadata) -> Result<(), FileError> {
    let uid = own_uid();
    if meta.uid() != uid {
        return Err(FileError::WrongOwner {
            what,
            path: path.display().to_string(),
            owner: meta.uid(),
            uid,
        });
    }
    Ok(())
}

/// Checks that an open file is a regular file owned by luod's uid, and makes
/// its mode `0600` if it was wider.
fn check_own_regular(what: &'static str, path: &Path, file: &File) -> Result<(), FileError> {
    let meta = file.metadata().map_err(FileError::io("stat", what, path))?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular {
            what,
            path: path.display().to_string(),
            kind: kind_of(meta.file_type()),
        });
    }
    check_owner(what, path, &meta)?;
    if meta.mode() & 0o7777 != FILE_MODE {
        tracing::info!(
            "{what} {} had mode {:04o}; making it {FILE_MODE:04o}",
            path.display(),
            meta.mode() & 0o7777
        );
        file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
            .map_err(FileError::io("chmod", what, path))?;
    }
    Ok(())
}

/// Creates a new file at `path`, mode `0600`, read-write
/// (`O_CREAT | O_EXCL | O_NOFOLLOW`). Fails when anything exists there.
pub fn create_new(what: &'static str, path: &Path) -> Result<File, FileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => symlink_error(what, path),
            _ => FileError::io("create", what, path)(e),
        })?;
    // The umask may have taken bits off; 0600 exactly, whatever it is.
    file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
        .map_err(FileError::io("chmod", what, path))?;
    Ok(file)
}

/// Opens an existing file at `path` read-write without following a link
/// (`O_NOFOLLOW | O_NONBLOCK`), and checks that it is a regular file owned
/// by luod's uid (tightening its mode to `0600`).
pub fn open_existing(what: &'static str, path: &Path) -> Result<File, FileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => symlink_error(what, path),
            _ => FileError::io("open", what, path)(e),
        })?;
    check_own_regular(what, path, &file)?;
    Ok(file)
}

/// Opens the file at `path` ([`open_existing`]), or creates it
/// ([`create_new`]) when it is missing. Returns the file and whether it was
/// created now.
pub fn open_or_create(what: &'static str, path: &Path) -> Result<(File, bool), FileError> {
    // A file appearing between the two calls is opened by the next round.
    for _ in 0..3 {
        match open_existing(what, path) {
            Ok(file) => return Ok((file, false)),
            Err(FileError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        match create_new(what, path) {
            Ok(file) => return Ok((file, true)),
            Err(FileError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Err(FileError::io("create", what, path)(io::Error::other(
        "it keeps appearing and disappearing",
    )))
}

/// Replaces the contents of the file at `path` with `bytes` (a pid file, the
/// bytes of a region kept aside): created `0600` when missing, otherwise
/// opened without following a link and checked like [`open_existing`].
pub fn write_private(what: &'static str, path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    use std::io::Write;
    let (mut file, _) = open_or_create(what, path)?;
    file.set_len(0).map_err(FileError::io("truncate", what, path))?;
    file.write_all(bytes).map_err(FileError::io("write", what, path))?;
    Ok(())
}

/// Creates the directories of `path` that are missing with mode `mode`
/// (the existing ones are left as they are).
pub fn create_dirs(what: &'static str, path: &Path, mode: u32) -> Result<(), FileError> {
    if path.as_os_str().is_empty() || path.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(FileError::io("create", what, path))
}

/// Makes sure `path` is a directory luod may keep private files in:
/// created with mode `0700` when missing; refused when it is a symbolic link,
/// not a directory, owned by another uid, or writable by group or others.
pub fn private_dir(what: &'static str, path: &Path) -> Result<(), FileError> {
    refuse_symlink(what, path)?;
    if !path.exists() {
        create_dirs(what, path, DIR_MODE)?;
        // DirBuilder's mode goes through the umask; the last component is
        // ours and gets exactly 0700.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(DIR_MODE))
            .map_err(FileError::io("chmod", what, path))?;
    }
    let meta = std::fs::symlink_metadata(path).map_err(FileError::io("stat", what, path))?;
    if meta.file_type().is_symlink() {
        return Err(symlink_error(what, path));
    }
    if !meta.is_dir() {
        return Err(FileError::NotRegular {
            what,
            path: path.display().to_string(),
            kind: kind_of(meta.file_type()),
        });
    }
    check_owner(what, path, &meta)?;
    if meta.mode() & 0o022 != 0 {
        return Err(FileError::Writable {
            what,
            path: path.display().to_string(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_new_file_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        create_new("test file", &path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert!(matches!(
            create_new("test file", &path),
            Err(FileError::Io { op: "create", .. })
        ));
    }

    #[test]
    fn an_existing_file_of_ours_is_opened_and_its_mode_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"kept").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (_, created) = open_or_create("test file", &path).unwrap();
        assert!(!created);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"kept");
    }

    #[test]
    fn a_symlink_is_never_followed_and_its_target_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"precious").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = write_private("pid file", &link, b"123\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "pid file {} is a symbolic link (to {t}); luod does not follow links for the files it writes: \
                 pass the resolved path {t} instead, or remove the link",
                link.display(),
                t = target.display()
            )
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        // A dangling link is refused the same way, and nothing is created.
        let dangling = dir.path().join("dangling");
        let nowhere = dir.path().join("nowhere");
        std::os::unix::fs::symlink(&nowhere, &dangling).unwrap();
        assert!(matches!(
            open_or_create("region", &dangling),
            Err(FileError::Symlink { .. })
        ));
        assert!(!nowhere.exists());
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = open_or_create("region", &path).unwrap_err();
        assert!(matches!(err, FileError::NotRegular { kind: "fifo", .. }), "{err}");
    }

    #[test]
    fn a_missing_dir_is_created_0700_and_a_wide_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/state");
        private_dir("state directory", &state).unwrap();
        assert_eq!(mode(&state), 0o700);
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let err = private_dir("state directory", &state).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "state directory {} is writable by group or others (mode 1777): another user could plant or replace \
                 luod's files there; `chmod go-w` it, or choose another path",
                state.display()
            )
        );
    }
}
