//! `luoctl reboot`: frozen -> (kexec) -> updated; freezes first when prepared.
//!
//! With a real kexec, luod's answer may never arrive: the host is already
//! booting the new kernel. With the file backend the kexec is simulated: luod
//! answers, then exits with status 75, and must be started again on the same
//! region; the report's notes say so.

use super::{Ctx, Failed, print_transition, transition};
use crate::exit::ExitCode;
use liveupdate::protocol::Request;

/// `reboot` takes no arguments.
#[derive(Debug, clap::Args)]
pub struct RebootArgs {}

/// Asks luod to reboot into the target kernel and prints what happened.
pub fn run(_args: &RebootArgs, ctx: &Ctx) -> Result<(), Failed> {
    let report = transition(ctx, "reboot", &Request::Reboot).map_err(|mut f| {
        if f.code == ExitCode::Connection {
            f.hint = Some(
                "if the host is kexec-ing into the new kernel this is expected: run `luoctl status` once it is up"
                    .into(),
            );
        }
        f
    })?;
    print_transition(ctx, "reboot", &report);
    Ok(())
}
