//! `luoctl rollback`: a full live update back to the kernel the last update
//! came from. luod prepares the cycle (the previous kernel's image, initrd
//! and command line as recorded at that update's `prepare`, checked against
//! their digests), then luoctl asks for `freeze` and `reboot`, printing each
//! step as it completes. `--no-reboot` stops once prepared.

use super::{Ctx, Failed, transition, transition_line};
use crate::exit::ExitCode;
use crate::output::{self, Text};
use liveupdate::protocol::{Request, TransitionReport};
use serde::Serialize;

/// `rollback`'s options.
#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// Stop once the rollback is prepared (then `luoctl freeze`, `luoctl reboot`).
    #[arg(long)]
    pub no_reboot: bool,
}

/// `rollback --json`: each step's report, as far as the rollback went.
#[derive(Debug, Default, Serialize)]
struct RolledBack {
    prepare: Option<TransitionReport>,
    freeze: Option<TransitionReport>,
    reboot: Option<TransitionReport>,
}

/// Runs the rollback's steps.
pub fn run(args: &RollbackArgs, ctx: &Ctx) -> Result<(), Failed> {
    let mut done = RolledBack::default();
    let step = |what: &str, r: &TransitionReport| {
        if !ctx.json() {
            let mut t = Text::new();
            t.line(transition_line(what, r));
            for note in &r.notes {
                t.line(format!("  note: {note}"));
            }
            t.print();
        }
    };
    let report = transition(ctx, "rollback", &Request::Rollback)?;
    step("rollback", &report);
    done.prepare = Some(report);
    if !args.no_reboot {
        let report = transition(ctx, "rollback (freeze)", &Request::Freeze)?;
        step("rollback (freeze)", &report);
        done.freeze = Some(report);
        let report = transition(ctx, "rollback (reboot)", &Request::Reboot).map_err(|mut f| {
            if f.code == ExitCode::Connection {
                f.hint = Some(
                    "if the host is kexec-ing back into the previous kernel this is expected: run `luoctl status` \
                     once it is up"
                        .into(),
                );
            }
            f
        })?;
        step("rollback (reboot)", &report);
        done.reboot = Some(report);
    }
    if ctx.json() {
        output::json_success(done);
    }
    Ok(())
}
