//! luod's command line, as a library: `luod` parses it, and the packaging
//! generator (`packaging/gen`) renders its man page and shell completions
//! from the same definition.

pub mod args;

/// luod's command line as clap sees it: the one definition `luod` parses
/// with, for the man page and shell completions.
pub fn command() -> clap::Command {
    <args::Args as clap::CommandFactory>::command()
}
