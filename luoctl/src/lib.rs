//! luoctl's commands, as a library: the `luoctl` binary runs them, and the
//! packaging generator (`packaging/gen`) renders the man page and shell
//! completions from the same clap definition.

pub mod commands;
pub mod error;
pub mod exit;
pub mod output;
pub mod progress;

/// luoctl's command line as clap sees it: the one definition `luoctl`
/// parses with, for the man page and shell completions.
pub fn command() -> clap::Command {
    <commands::Cli as clap::CommandFactory>::command()
}
