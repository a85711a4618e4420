//! `luoctl vm abandon NAME`.

use super::super::{Ctx, Failed, unexpected};
use crate::output;
use liveupdate::protocol::{Request, Response};
use serde::Serialize;

/// `vm abandon`'s arguments.
#[derive(Debug, clap::Args)]
pub struct AbandonArgs {
    /// VM name.
    pub name: String,
}

/// `vm abandon --json`: `{"ok": true, "vm": NAME}`.
#[derive(Debug, Serialize)]
struct AbandonJson<'a> {
    vm: &'a str,
}

/// Asks luod to give the VM up.
pub fn run(args: &AbandonArgs, ctx: &Ctx) -> Result<(), Failed> {
    let what = format!("vm abandon {}", args.name);
    let req = Request::VmAbandon {
        name: args.name.clone(),
    };
    match ctx.call(&what, &req)? {
        Response::Done => {}
        other => return Err(unexpected(&what, &req, &other).into()),
    }
    if ctx.json() {
        output::json_success(AbandonJson { vm: &args.name });
    } else {
        output::print(&format!(
            "abandoned VM {}: its preserved memory is released\n",
            args.name
        ));
    }
    Ok(())
}
