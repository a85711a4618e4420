//! `luoctl vm ...`: the VMs VMMs registered with luod.
//!
//! VMMs register their VMs themselves (through the protocol, see the
//! README's "For VMM developers"); an operator lists them and, when a VM's
//! VMM will not come back after an update, abandons it so `finish` can go on.

pub mod abandon;
pub mod list;

use super::{Ctx, Failed};
use clap::Subcommand;

/// The vm subcommands.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// List the VMs: registered (and whether their VMM is connected), or, after an update, awaiting a claim.
    List(list::ListArgs),
    /// Give up on a VM: its preserved memory is released and `finish` no longer waits for it.
    Abandon(abandon::AbandonArgs),
}

impl VmCommand {
    /// Runs the subcommand.
    pub fn run(&self, ctx: &Ctx) -> Result<(), Failed> {
        match self {
            VmCommand::List(a) => list::run(a, ctx),
            VmCommand::Abandon(a) => abandon::run(a, ctx),
        }
    }
}
