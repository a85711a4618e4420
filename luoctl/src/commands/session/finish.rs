//! `luoctl session finish NAME`.

use super::super::{Ctx, Failed};
use liveupdate::protocol::Request;

/// `session finish`'s arguments.
#[derive(Debug, clap::Args)]
pub struct FinishArgs {
    /// Session name.
    pub name: String,
}

/// Asks luod to close the session.
pub fn run(args: &FinishArgs, ctx: &Ctx) -> Result<(), Failed> {
    let req = Request::SessionFinish {
        name: args.name.clone(),
    };
    let (what, done) = (
        format!("session finish {}", args.name),
        format!("finished session {}", args.name),
    );
    super::session_request(ctx, &what, req, &args.name, &done)
}
