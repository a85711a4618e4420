//! `luoctl finish`: updated -> normal; closes the cycle and prints its
//! summary (blackout, what was carried).

use super::{Ctx, Failed, print_transition, unexpected};
use crate::error::Failure;
use crate::output::{self, Text};
use liveupdate::protocol::{CycleSummary, Request, Response, TransitionReport};
use serde::Serialize;

/// `finish`'s options.
#[derive(Debug, clap::Args)]
pub struct FinishArgs {
    /// Keep the update although its validation (a post-update hook) failed;
    /// the acceptance is recorded in the cycle.
    #[arg(long)]
    pub accept_failed_validation: bool,
}

/// `finish --json`: the transition report and the cycle it closed.
#[derive(Debug, Serialize)]
struct Finished<'a> {
    #[serde(flatten)]
    report: &'a TransitionReport,
    /// The cycle just closed (`null` if luod could not say).
    cycle: Option<CycleSummary>,
}

/// Asks luod to finish the cycle, then for its summary.
pub fn run(args: &FinishArgs, ctx: &Ctx) -> Result<(), Failed> {
    let what = "finish";
    let req = if args.accept_failed_validation {
        Request::FinishAccepting
    } else {
        Request::Finish
    };
    let mut client = ctx.connect_for(what, &req)?;
    let report = match client.call(&req).map_err(|e| Failure::client(what, e))? {
        Response::Transition(r) => r,
        other => return Err(unexpected(what, &req, &other).into()),
    };
    // The cycle is closed whatever happens next: the summary is a bonus.
    let cycle = match client.call(&Request::Status) {
        Ok(Response::Status(s)) => s.last_cycle,
        _ => None,
    };
    if ctx.json() {
        output::json_success(Finished { report: &report, cycle });
        return Ok(());
    }
    print_transition(ctx, what, &report);
    if let Some(c) = cycle {
        let mut t = Text::new();
        let mut line = format!("cycle #{} {}", c.id, c.outcome);
        if let Some(b) = c.blackout_ns {
            line.push_str(&format!(", blackout {}", output::duration(b)));
        }
        t.line(line);
        super::status::timestamps(&mut t, &c.timestamps, output::now());
        t.print();
    }
    Ok(())
}
