//! `luoctl session preserve NAME --token N --file PATH`: copy a file's
//! contents into a new memfd and hand the memfd to luod (`SCM_RIGHTS`).

use super::super::{Ctx, Failed, unexpected};
use super::parse_token;
use crate::error::Failure;
use crate::exit::ExitCode;
use crate::{output, progress};
use liveupdate::kernel::memfd;
use liveupdate::protocol::{Request, Response};
use serde::Serialize;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

/// `session preserve`'s arguments.
#[derive(Debug, clap::Args)]
pub struct PreserveArgs {
    /// Session name.
    pub name: String,

    /// Token to preserve the file under, unique in the session: decimal or 0x-hex u64.
    #[arg(long, value_parser = parse_token)]
    pub token: u64,

    /// File whose contents to preserve (read to its end; luod gets a copy in a memfd).
    #[arg(long, value_name = "PATH")]
    pub file: PathBuf,
}

/// `session preserve --json`.
#[derive(Debug, Serialize)]
struct PreservedJson<'a> {
    session: &'a str,
    token: u64,
    size: u64,
    file: String,
}

/// Opens the file to preserve: it must exist, be readable and not be a
/// directory. Returns it and its size when it has one (a regular file).
fn open_source(what: &str, path: &Path) -> Result<(File, Option<u64>), Failure> {
    let fail = |msg: String| Failure::new(what, ExitCode::LocalIo, msg);
    let file = File::open(path).map_err(|e| fail(format!("cannot open --file {}: {e}", path.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| fail(format!("cannot stat --file {}: {e}", path.display())))?;
    if meta.is_dir() {
        return Err(fail(format!("--file {} is a directory", path.display())));
    }
    Ok((file, meta.is_file().then_some(meta.len())))
}

/// Copies the file into a memfd, then preserves the memfd.
pub fn run(args: &PreserveArgs, ctx: &Ctx) -> Result<(), Failed> {
    let what = format!("session preserve {} token {}", args.name, args.token);
    let (src, size) = open_source(&what, &args.file)?;
    let local = |msg: String| Failure::new(&what, ExitCode::LocalIo, msg);
    let memfd = memfd::create(&format!("{}/{}", args.name, args.token))
        .map_err(|e| local(format!("cannot create a memfd: {e}")))?;
    let memfd = File::from(memfd);
    let label = format!("copying {}", args.file.display());
    let copied = progress::copy(&src, &memfd, size, &label)
        .map_err(|e| local(format!("cannot copy --file {} into a memfd: {e}", args.file.display())))?;
    // Connect only now: luod drops a connection that stays idle for long,
    // and copying a large file takes a while.
    let req = Request::SessionPreserve {
        name: args.name.clone(),
        token: args.token,
    };
    match ctx.call_fds(&what, &req, &[memfd.as_fd()])? {
        (Response::Done, _) => {}
        (other, _) => return Err(unexpected(&what, &req, &other).into()),
    }
    if ctx.json() {
        output::json_success(PreservedJson {
            session: &args.name,
            token: args.token,
            size: copied,
            file: args.file.display().to_string(),
        });
    } else {
        output::print(&format!(
            "preserved {} in session {} under token {} ({})\n",
            args.file.display(),
            args.name,
            args.token,
            output::bytes(copied)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::fake::FakeLuod;

    #[test]
    fn the_file_travels_to_luod_as_a_memfd_with_its_contents() {
        let luod = FakeLuod::start(|req, fds| {
            assert_eq!(
                req,
                &Request::SessionPreserve {
                    name: "vm0".into(),
                    token: 7
                }
            );
            assert_eq!(fds.len(), 1);
            assert!(memfd::is_memfd(fds[0].as_fd()));
            let file = File::from(fds.into_iter().next().unwrap());
            let mut all = vec![0u8; memfd::size(file.as_fd()).unwrap() as usize];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut all, 0).unwrap();
            assert_eq!(all, b"device state");
            (Response::Done, vec![])
        });
        let src = luod.dir.path().join("state");
        std::fs::write(&src, b"device state").unwrap();
        let args = PreserveArgs {
            name: "vm0".into(),
            token: 7,
            file: src,
        };
        run(&args, &luod.ctx()).unwrap();
        assert_eq!(luod.thread.join().unwrap().len(), 1);
    }

    #[test]
    fn a_missing_file_is_refused_before_asking_luod() {
        let f = open_source("session preserve vm0 token 1", Path::new("/nonexistent/ram")).unwrap_err();
        assert_eq!(f.code, ExitCode::LocalIo);
        assert!(
            f.message.starts_with("cannot open --file /nonexistent/ram: "),
            "{}",
            f.message
        );
    }

    #[test]
    fn a_directory_is_not_a_file_to_preserve() {
        let f = open_source("session preserve vm0 token 1", Path::new("/")).unwrap_err();
        assert_eq!(f.message, "--file / is a directory");
    }
}
