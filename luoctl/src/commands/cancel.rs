//! `luoctl cancel`: prepared | frozen -> normal, undoing every step.

use super::{Ctx, Failed, print_transition, transition};
use liveupdate::protocol::Request;

/// `cancel` takes no arguments.
#[derive(Debug, clap::Args)]
pub struct CancelArgs {}

/// Asks luod to cancel the cycle and prints what happened.
pub fn run(_args: &CancelArgs, ctx: &Ctx) -> Result<(), Failed> {
    let report = transition(ctx, "cancel", &Request::Cancel)?;
    print_transition(ctx, "cancel", &report);
    Ok(())
}
