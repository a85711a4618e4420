//! `luoctl session create NAME`.

use super::super::{Ctx, Failed};
use liveupdate::protocol::Request;

/// `session create`'s arguments.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Session name (1 to 63 bytes, no '/'; unique on the host).
    pub name: String,
}

/// Asks luod to create the session.
pub fn run(args: &CreateArgs, ctx: &Ctx) -> Result<(), Failed> {
    let req = Request::SessionCreate {
        name: args.name.clone(),
    };
    let (what, done) = (
        format!("session create {}", args.name),
        format!("created session {}", args.name),
    );
    super::session_request(ctx, &what, req, &args.name, &done)
}
