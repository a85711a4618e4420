//! `luoctl freeze`: prepared -> frozen. The blackout begins.

use super::{Ctx, Failed, print_transition, transition};
use liveupdate::protocol::Request;

/// `freeze` takes no arguments.
#[derive(Debug, clap::Args)]
pub struct FreezeArgs {}

/// Asks luod to freeze and prints what happened.
pub fn run(_args: &FreezeArgs, ctx: &Ctx) -> Result<(), Failed> {
    let report = transition(ctx, "freeze", &Request::Freeze)?;
    print_transition(ctx, "freeze", &report);
    Ok(())
}
