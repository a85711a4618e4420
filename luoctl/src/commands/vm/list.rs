//! `luoctl vm list`.

use super::super::{Ctx, Failed, unexpected};
use crate::output::{self, Text};
use liveupdate::protocol::{Request, Response, VmInfo};
use serde::Serialize;

/// `vm list` takes no arguments.
#[derive(Debug, clap::Args)]
pub struct ListArgs {}

/// `vm list --json`: `{"ok": true, "vms": [{name, owner_uid, tokens, phase,
/// detail, blackout_ms}]}` (`detail` and `blackout_ms` are `null` until the
/// VM's VMM reports them).
#[derive(Debug, Serialize)]
struct ListJson<'a> {
    vms: &'a [VmInfo],
}

/// Asks luod for the VMs and prints them.
pub fn run(_args: &ListArgs, ctx: &Ctx) -> Result<(), Failed> {
    let req = Request::VmList;
    let vms = match ctx.call("vm list", &req)? {
        Response::Vms(v) => v,
        other => return Err(unexpected("vm list", &req, &other).into()),
    };
    if ctx.json() {
        output::json_success(ListJson { vms: &vms });
        return Ok(());
    }
    let mut t = Text::new();
    if vms.is_empty() {
        t.line("no VMs");
    } else {
        let rows: Vec<Vec<String>> = vms
            .iter()
            .map(|v| {
                let tokens: Vec<String> = v.tokens.iter().map(u64::to_string).collect();
                vec![
                    v.name.clone(),
                    v.owner_uid.to_string(),
                    tokens.join(","),
                    v.phase.clone(),
                    v.blackout_ms.map_or("-".into(), |ms| format!("{ms} ms")),
                    v.detail.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        t.table("", &["VM", "OWNER", "TOKENS", "PHASE", "BLACKOUT", "DETAIL"], &rows);
    }
    t.print();
    Ok(())
}
