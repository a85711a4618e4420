//! `luoctl session retrieve NAME --token N --output PATH`: take a preserved
//! file back after an update and write its contents to PATH.
//!
//! The contents go to a temporary file beside PATH that is renamed over PATH
//! once complete and flushed: a failure leaves PATH as it was. The temporary
//! file is created before luod is asked, because a retrieved file cannot be
//! retrieved again.

use super::super::{Ctx, Failed, unexpected};
use super::parse_token;
use crate::error::Failure;
use crate::exit::ExitCode;
use crate::{output, progress};
use liveupdate::protocol::{Request, Response};
use serde::Serialize;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// `session retrieve`'s arguments.
#[derive(Debug, clap::Args)]
pub struct RetrieveArgs {
    /// Session name.
    pub name: String,

    /// Token the file was preserved under: decimal or 0x-hex u64.
    #[arg(long, value_parser = parse_token)]
    pub token: u64,

    /// Where to write the contents (replaced atomically; created mode 0600).
    #[arg(long, value_name = "PATH")]
    pub output: PathBuf,
}

/// `session retrieve --json`.
#[derive(Debug, Serialize)]
struct RetrievedJson<'a> {
    session: &'a str,
    token: u64,
    size: u64,
    output: String,
}

/// A temporary file beside the destination; removed on drop unless
/// [`TempOutput::persist`] renamed it into place.
#[derive(Debug)]
struct TempOutput {
    file: File,
    tmp: PathBuf,
    dest: PathBuf,
    dir: PathBuf,
    persisted: bool,
}

impl TempOutput {
    /// Checks `dest` and creates the temporary file beside it.
    fn create(dest: &Path) -> Result<TempOutput, String> {
        let is_dir = dest.as_os_str().as_encoded_bytes().ends_with(b"/") || dest.is_dir();
        let Some(name) = dest.file_name().filter(|_| !is_dir) else {
            return Err(format!(
                "--output {} is a directory: give the path of a file",
                dest.display()
            ));
        };
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".luoctl-{}.tmp", std::process::id()));
        let tmp = dir.join(tmp_name);
        let file = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| format!("cannot create a file in {} for --output: {e}", dir.display()))?;
        Ok(TempOutput {
            file,
            tmp,
            dest: dest.to_path_buf(),
            dir,
            persisted: false,
        })
    }

    /// Flushes the contents and renames the file over the destination.
    fn persist(&mut self) -> std::io::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.tmp, &self.dest)?;
        self.persisted = true;
        // Make the rename itself durable; the data is in place either way.
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Retrieves the file and writes it to `--output`.
pub fn run(args: &RetrieveArgs, ctx: &Ctx) -> Result<(), Failed> {
    let what = format!("session retrieve {} token {}", args.name, args.token);
    let local = |msg: String| Failure::new(&what, ExitCode::LocalIo, msg);
    let mut out = TempOutput::create(&args.output).map_err(local)?;

    let req = Request::SessionRetrieve {
        name: args.name.clone(),
        token: args.token,
    };
    let (size, fds) = match ctx.call_fds(&what, &req, &[])? {
        (Response::Fd { size }, fds) => (size, fds),
        (other, _) => return Err(unexpected(&what, &req, &other).into()),
    };
    // From here on luod counts the file as retrieved: say so if we fail.
    let lost = |msg: String| {
        local(msg).with_hint(format!(
            "luod handed the file over and counts it as retrieved; session {} token {} cannot be retrieved again",
            args.name, args.token
        ))
    };
    let Some(fd) = fds.into_iter().next() else {
        return Err(
            Failure::new(&what, ExitCode::Internal, "luod answered without the file descriptor")
                .with_hint("see luod's log")
                .into(),
        );
    };
    let mut src = File::from(fd);
    src.seek(SeekFrom::Start(0))
        .map_err(|e| lost(format!("cannot read the retrieved file: {e}")))?;
    let label = format!("writing {}", args.output.display());
    let copied = progress::copy(&src, &out.file, Some(size), &label)
        .map_err(|e| lost(format!("cannot write --output {}: {e}", args.output.display())))?;
    out.persist()
        .map_err(|e| lost(format!("cannot write --output {}: {e}", args.output.display())))?;

    if ctx.json() {
        output::json_success(RetrievedJson {
            session: &args.name,
            token: args.token,
            size: copied,
            output: args.output.display().to_string(),
        });
    } else {
        output::print(&format!(
            "retrieved session {} token {} into {} ({})\n",
            args.name,
            args.token,
            args.output.display(),
            output::bytes(copied)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::fake::FakeLuod;
    use liveupdate::kernel::memfd;
    use liveupdate::protocol::{ErrorKind, ErrorReply};
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_retrieved_contents_land_at_the_output_path() {
        let luod = FakeLuod::start(|req, _| {
            assert_eq!(
                req,
                &Request::SessionRetrieve {
                    name: "vm0".into(),
                    token: 0x10
                }
            );
            let fd = memfd::from_bytes("t", b"guest ram").unwrap();
            // The fd's offset is shared: start from somewhere else.
            let mut f = File::from(fd);
            f.seek(SeekFrom::Start(5)).unwrap();
            (Response::Fd { size: 9 }, vec![f.into()])
        });
        let out = luod.dir.path().join("ram");
        let args = RetrieveArgs {
            name: "vm0".into(),
            token: 0x10,
            output: out.clone(),
        };
        run(&args, &luod.ctx()).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"guest ram");
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(luod.thread.join().unwrap());
        let names: Vec<_> = std::fs::read_dir(luod.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "socket and output, no temporary file: {names:?}");
    }

    #[test]
    fn a_refused_retrieve_leaves_nothing_behind() {
        let luod = FakeLuod::start(|_, _| {
            let reply = ErrorReply {
                kind: ErrorKind::WrongState,
                message: "retrieving a file is not allowed in state normal".into(),
                hint: String::new(),
                step: None,
            };
            (Response::Error(reply), vec![])
        });
        let out = luod.dir.path().join("ram");
        let args = RetrieveArgs {
            name: "vm0".into(),
            token: 1,
            output: out.clone(),
        };
        let failed = run(&args, &luod.ctx()).unwrap_err();
        assert_eq!(failed.failure.code, ExitCode::WrongState);
        drop(luod.thread.join().unwrap());
        let names: Vec<_> = std::fs::read_dir(luod.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("s")]);
    }

    #[test]
    fn output_lands_only_when_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("ram");
        {
            let mut out = TempOutput::create(&dest).unwrap();
            out.file.write_all(b"half").unwrap();
        }
        assert!(!dest.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the temporary file is gone"
        );

        std::fs::write(&dest, b"old").unwrap();
        let mut out = TempOutput::create(&dest).unwrap();
        out.file.write_all(b"new").unwrap();
        out.persist().unwrap();
        drop(out);
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_directory_is_not_an_output() {
        let dir = tempfile::tempdir().unwrap();
        let err = TempOutput::create(dir.path()).unwrap_err();
        assert!(err.ends_with("is a directory: give the path of a file"), "{err}");
        let slash = PathBuf::from(format!("{}/missing/", dir.path().display()));
        assert!(TempOutput::create(&slash).is_err());
    }

    #[test]
    fn a_missing_directory_is_refused_before_asking_luod() {
        let err = TempOutput::create(Path::new("/nonexistent/dir/ram")).unwrap_err();
        assert!(
            err.starts_with("cannot create a file in /nonexistent/dir for --output: "),
            "{err}"
        );
    }
}
