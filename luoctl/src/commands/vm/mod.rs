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
    ///
    /// Beside luod's phase, each VM shows what its VMM reported: BLACKOUT, the VM's blackout in the last live
    /// update as the VMM measured it, and DETAIL, free text such as `QEMU 11.1.3, running` or why a relaunch
    /// failed ("-" until the VMM reports; `null` in --json).
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
