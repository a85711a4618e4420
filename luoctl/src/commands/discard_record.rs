//! `luoctl discard-record --yes`: give up a handover record luod cannot read.

use super::{Ctx, Failed, unexpected};
use crate::error::Failure;
use crate::exit::ExitCode;
use crate::output;
use liveupdate::protocol::{Request, Response};

/// `discard-record`'s arguments.
#[derive(Debug, clap::Args)]
pub struct DiscardRecordArgs {
    /// Confirm: the files luod still keeps for the unreadable record are
    /// dropped for good.
    #[arg(long)]
    pub yes: bool,
}

/// Asks luod to discard the unreadable record and start a fresh one.
pub fn run(args: &DiscardRecordArgs, ctx: &Ctx) -> Result<(), Failed> {
    let what = "discard-record";
    if !args.yes {
        return Err(Failure::new(
            what,
            ExitCode::Usage,
            "discard-record drops the files luod keeps for an unreadable record, for good; nothing was done",
        )
        .with_hint("restore the region instead if you can; otherwise run `luoctl discard-record --yes`")
        .into());
    }
    let req = Request::DiscardRecord;
    let report = match ctx.call(what, &req)? {
        Response::RecordDiscarded(r) => r,
        other => return Err(unexpected(what, &req, &other).into()),
    };
    if ctx.json() {
        output::json_success(&report);
    } else {
        output::print(&format!(
            "discarded the unreadable record ({}); {} parked file(s) dropped; fresh record at generation {}\n",
            report.finding, report.files, report.generation
        ));
    }
    Ok(())
}
