//! luod's configuration file, `/etc/luod/luod.toml` (`--config PATH`).
//!
//! Every luod flag has a key of the same name (`vm-timeout = 5` is
//! `--vm-timeout 5`), so the file and the command line cannot drift apart:
//! [`KEYS`] lists them, and a test walks clap's command to check that every
//! long flag has a key and every key a flag. A value goes through the flag's
//! own parser, so the file accepts exactly what the command line accepts.
//!
//! Order: a flag given on the command line (or its environment variable,
//! `LUOD_SOCKET`) wins over the file, which wins over the default. A key
//! luod does not know, or a value its flag refuses, is an error naming the
//! key and its line. A missing file is fine at the default path, an error at
//! a path given with `--config`.

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command, CommandFactory, FromArgMatches};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use toml::{Spanned, Value};

use crate::args::Args;

/// Where luod looks for its configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/luod/luod.toml";

/// Declares the keys: one line per flag (`field => "flag-name"`).
macro_rules! keys {
    ($($field:ident => $key:literal,)*) => {
        /// The file's keys as serde reads them; each value keeps its span.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct FileKeys {
            $(
                #[serde(rename = $key)]
                $field: Option<Spanned<Value>>,
            )*
        }

        /// Every key of the file, in the order of `luod --help`; each is
        /// the long name of a luod flag.
        pub const KEYS: &[&str] = &[$($key),*];

        impl FileKeys {
            /// The keys the file sets, with their values, in [`KEYS`] order.
            fn entries(&self) -> Vec<(&'static str, &Spanned<Value>)> {
                let mut set = Vec::new();
                $(
                    if let Some(v) = &self.$field {
                        set.push(($key, v));
                    }
                )*
                set
            }
        }
    };
}

keys! {
    socket => "socket",
    socket_group => "socket-group",
    state_dir => "state-dir",
    backend => "backend",
    region => "region",
    liveupdate_dev => "liveupdate-dev",
    record_size => "record-size",
    region_size => "region-size",
    fd_store => "fd-store",
    systemctl => "systemctl",
    systemd_unit => "systemd-unit",
    client_timeout => "client-timeout",
    max_connections => "max-connections",
    max_connections_per_uid => "max-connections-per-uid",
    vm_timeout => "vm-timeout",
    sysfs_root => "sysfs-root",
    preserve_device => "preserve-device",
    qemu_vm => "qemu-vm",
    qmp_timeout => "qmp-timeout",
    max_sessions_per_uid => "max-sessions-per-uid",
    max_files_per_uid => "max-files-per-uid",
    max_bytes_per_uid => "max-bytes-per-uid",
    hooks_dir => "hooks-dir",
    hook_timeout => "hook-timeout",
    rollback => "rollback",
    rollback_kernel => "rollback-kernel",
    rollback_initrd => "rollback-initrd",
    rollback_cmdline => "rollback-cmdline",
}

/// luod's flags that are not configuration: where the file is, what to do
/// with it, and the internal holder mode.
#[cfg(test)]
pub const NOT_KEYS: &[&str] = &["config", "check-config", "json", "holder", "help", "version"];

/// A configuration luod cannot use: the message names the file, the line
/// and the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Where a key's effective value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The flag on the command line.
    CommandLine,
    /// The flag's environment variable.
    Environment,
    /// The configuration file, at this line.
    File(usize),
    /// The flag's default.
    Default,
    /// Not set (a flag without a default).
    Unset,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::CommandLine => "command line",
            Source::Environment => "environment",
            Source::File(_) => "file",
            Source::Default => "default",
            Source::Unset => "unset",
        }
    }
}

/// One key's effective value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    pub key: &'static str,
    /// The values as the flag would get them (several for a repeatable flag).
    pub values: Vec<String>,
    /// Whether the flag may be given several times (the key takes a list).
    pub list: bool,
    pub source: Source,
}

/// The arguments luod runs with, and how they came about.
#[derive(Debug)]
pub struct Loaded {
    pub args: Args,
    /// The file read, or `None` when the default path had no file.
    pub file: Option<PathBuf>,
    /// The path looked at.
    pub path: PathBuf,
    pub effective: Vec<Effective>,
}

/// Parses luod's command line `argv` (with the program name first), reads
/// the configuration file it names (or the default one) and merges the two.
/// `Err(clap::Error)` for a bad command line (clap reports it),
/// `Ok(Err(ConfigError))` for a bad file.
pub fn load(argv: Vec<OsString>) -> Result<Result<Loaded, ConfigError>, clap::Error> {
    let cli = Args::command().try_get_matches_from(argv.clone())?;
    Ok(load_with(argv, &cli))
}

fn load_with(argv: Vec<OsString>, cli: &ArgMatches) -> Result<Loaded, ConfigError> {
    if cli.contains_id("holder") && cli.value_source("holder") == Some(ValueSource::CommandLine) {
        // The fd holder luod forks reads no configuration.
        let args = Args::from_arg_matches(cli).map_err(|e| ConfigError(clap_reason(&e)))?;
        return Ok(Loaded {
            args,
            file: None,
            path: PathBuf::new(),
            effective: Vec::new(),
        });
    }
    let explicit = cli.get_one::<PathBuf>("config").cloned();
    let path = explicit.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => None,
        Err(e) => {
            return Err(ConfigError(format!(
                "cannot read the configuration file {}: {e}",
                path.display()
            )));
        }
    };
    let file = match &text {
        Some(t) => parse(&path, t)?,
        None => Vec::new(),
    };
    let cmd = Args::command();
    // The file's values go first, and only for flags the command line (or
    // the environment) did not set: clap then parses everything at once.
    let mut merged: Vec<OsString> = vec![argv.first().cloned().unwrap_or_else(|| "luod".into())];
    let mut from_file: BTreeMap<&'static str, usize> = BTreeMap::new();
    for entry in &file {
        let id = arg_id(&cmd, entry.key);
        if matches!(
            cli.value_source(&id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        merged.extend(entry.argv.iter().cloned());
        from_file.insert(entry.key, entry.line);
    }
    merged.extend(argv.into_iter().skip(1));
    // Nothing taken from a file: the command line as parsed already (a
    // second parse costs tens of milliseconds at luod's start under TCG).
    let reparsed;
    let matches = if from_file.is_empty() {
        cli
    } else {
        reparsed = Args::command().try_get_matches_from(merged).map_err(|e| {
            ConfigError(format!(
                "the configuration file and the command line do not fit together: {}",
                clap_reason(&e)
            ))
        })?;
        &reparsed
    };
    let args = Args::from_arg_matches(matches).map_err(|e| ConfigError(clap_reason(&e)))?;
    let effective = KEYS
        .iter()
        .map(|&key| {
            let id = arg_id(&cmd, key);
            let list = is_list(&cmd, key);
            let values: Vec<String> = matches
                .get_raw(&id)
                .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            let source = match (from_file.get(key), matches.value_source(&id)) {
                (Some(line), _) => Source::File(*line),
                (None, Some(ValueSource::CommandLine)) => Source::CommandLine,
                (None, Some(ValueSource::EnvVariable)) => Source::Environment,
                (None, Some(ValueSource::DefaultValue)) => Source::Default,
                (None, _) => Source::Unset,
            };
            Effective {
                key,
                values,
                list,
                source,
            }
        })
        .collect();
    Ok(Loaded {
        args,
        file: text.map(|_| path.clone()),
        path,
        effective,
    })
}

/// One key of the file as the arguments it stands for.
#[derive(Debug)]
struct FileEntry {
    key: &'static str,
    line: usize,
    argv: Vec<OsString>,
}

/// The 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Reads the file's keys and checks each value with its flag's own parser.
fn parse(path: &Path, text: &str) -> Result<Vec<FileEntry>, ConfigError> {
    let at = |line: usize| format!("{} line {line}", path.display());
    let keys: FileKeys = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let line = line_of(text, span.start);
        let message = e.message().trim_end();
        match message.strip_prefix("unknown field `") {
            Some(rest) => {
                let key = rest.split('`').next().unwrap_or(rest);
                ConfigError(format!(
                    "{}: unknown key `{key}`: luod has no flag --{key} (each key is a flag's long name; see `luod \
                     --help`)",
                    at(line)
                ))
            }
            None => ConfigError(format!("{}: {message}", at(line))),
        }
    })?;
    let cmd = Args::command();
    let mut entries = Vec::new();
    for (key, value) in keys.entries() {
        let line = line_of(text, value.span().start);
        let bad = |why: String| ConfigError(format!("{}: key `{key}`: {why}", at(line)));
        let argv = to_argv(&cmd, key, value.get_ref()).map_err(bad)?;
        // The flag's own parser judges the value, alone, so the message is
        // about this key.
        let mut alone: Vec<OsString> = vec!["luod".into()];
        alone.extend(argv.iter().cloned());
        if let Err(e) = Args::command().try_get_matches_from(alone) {
            return Err(bad(clap_reason(&e)));
        }
        entries.push(FileEntry { key, line, argv });
    }
    Ok(entries)
}

/// The clap argument whose long name is `key`.
fn arg<'a>(cmd: &'a Command, key: &str) -> &'a clap::Arg {
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(key))
        .unwrap_or_else(|| panic!("configuration key {key} has no luod flag --{key}"))
}

fn arg_id(cmd: &Command, key: &str) -> String {
    arg(cmd, key).get_id().to_string()
}

fn is_list(cmd: &Command, key: &str) -> bool {
    matches!(arg(cmd, key).get_action(), ArgAction::Append)
}

/// The command-line arguments a key's value stands for.
fn to_argv(cmd: &Command, key: &str, value: &Value) -> Result<Vec<OsString>, String> {
    let flag = format!("--{key}");
    let arg = arg(cmd, key);
    if matches!(arg.get_action(), ArgAction::SetTrue) {
        return match value {
            Value::Boolean(true) => Ok(vec![flag.into()]),
            Value::Boolean(false) => Ok(Vec::new()),
            other => Err(format!("takes true or false, not {}", describe(other))),
        };
    }
    let one = |v: &Value| -> Result<String, String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Integer(i) => Ok(i.to_string()),
            Value::Float(f) => Ok(f.to_string()),
            other => Err(format!("takes a string or a number, not {}", describe(other))),
        }
    };
    let values = match value {
        Value::Array(items) if is_list(cmd, key) => items.iter().map(one).collect::<Result<Vec<_>, _>>()?,
        Value::Array(_) => return Err("takes one value, not a list".into()),
        v => vec![one(v)?],
    };
    Ok(values
        .into_iter()
        .flat_map(|v| [OsString::from(&flag), OsString::from(v)])
        .collect())
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date",
        Value::Array(_) => "a list",
        Value::Table(_) => "a table",
    }
}

/// What clap found wrong with a value, without its usage text.
fn clap_reason(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let value = match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) => v.clone(),
        _ => String::new(),
    };
    match e.kind() {
        ErrorKind::ValueValidation => match std::error::Error::source(e) {
            Some(why) => format!("{value:?} is not valid: {why}"),
            None => format!("{value:?} is not valid"),
        },
        ErrorKind::InvalidValue => match e.get(ContextKind::ValidValue) {
            Some(ContextValue::Strings(valid)) => format!("{value:?} is not one of {}", valid.join(", ")),
            _ => format!("{value:?} is not valid"),
        },
        _ => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("").trim();
            first.strip_prefix("error: ").unwrap_or(first).to_string()
        }
    }
}

impl Loaded {
    /// The effective configuration as a TOML file luod would read, each
    /// line saying where the value came from.
    pub fn render(&self) -> String {
        let mut out = String::new();
        match &self.file {
            Some(p) => out.push_str(&format!("# luod configuration: {}\n", p.display())),
            None => out.push_str(&format!(
                "# luod configuration: {} does not exist: defaults and flags only\n",
                self.path.display()
            )),
        }
        let rows: Vec<(String, String)> = self
            .effective
            .iter()
            .map(|e| {
                let quoted: Vec<String> = e.values.iter().map(|v| Value::String(v.clone()).to_string()).collect();
                let setting = if e.list {
                    format!("{} = [{}]", e.key, quoted.join(", "))
                } else if let Some(v) = quoted.first() {
                    format!("{} = {v}", e.key)
                } else {
                    format!("# {} is not set", e.key)
                };
                let source = match e.source {
                    Source::File(line) => format!("file, line {line}"),
                    s => s.name().to_string(),
                };
                (setting, source)
            })
            .collect();
        let width = rows.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
        for (setting, source) in rows {
            out.push_str(&format!("{setting:width$}  # {source}\n"));
        }
        out
    }

    /// The effective configuration as JSON.
    pub fn json(&self) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = self
            .effective
            .iter()
            .map(|e| {
                let value = if e.list {
                    serde_json::json!(e.values)
                } else {
                    e.values
                        .first()
                        .map_or(serde_json::Value::Null, |v| serde_json::json!(v))
                };
                serde_json::json!({
                    "key": e.key,
                    "value": value,
                    "source": e.source.name(),
                    "line": match e.source { Source::File(l) => Some(l), _ => None },
                })
            })
            .collect();
        serde_json::json!({
            "ok": true,
            "config": self.path.display().to_string(),
            "config_found": self.file.is_some(),
            "keys": keys,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Every long flag of luod but [`NOT_KEYS`], as clap knows them.
    fn flags() -> BTreeSet<String> {
        Args::command()
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| !NOT_KEYS.contains(l))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn every_long_flag_has_a_key_and_every_key_a_flag() {
        let keys: BTreeSet<String> = KEYS.iter().map(|k| k.to_string()).collect();
        let flags = flags();
        let missing: Vec<_> = flags.difference(&keys).collect();
        let extra: Vec<_> = keys.difference(&flags).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "flags without a key in luod/src/config.rs keys!{{}} (add `field => \"flag\",` there and to \
             luod/luod.toml): {missing:?}; keys without a flag: {extra:?}"
        );
        // Every key NOT_KEYS names is a real flag, too (help and version
        // are clap's own).
        let all: BTreeSet<String> = Args::command()
            .get_arguments()
            .filter_map(|a| a.get_long())
            .map(str::to_string)
            .collect();
        for k in NOT_KEYS.iter().filter(|k| !["help", "version"].contains(k)) {
            assert!(all.contains(*k), "{k}");
        }
    }

    #[test]
    fn the_shipped_file_lists_every_key_commented_with_its_default() {
        let shipped = include_str!("../luod.toml");
        // Uncomment the `# key = value` lines: the result must be a valid
        // configuration that changes nothing.
        let uncommented: String = shipped
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.split_once(" = ")
                    .is_some_and(|(k, _)| KEYS.contains(&k) && !k.contains(' '))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("luod.toml");
        std::fs::write(&path, &uncommented).unwrap();
        let listed: Vec<&str> = uncommented.lines().filter_map(|l| l.split(" = ").next()).collect();
        assert_eq!(listed, KEYS, "luod/luod.toml must list every key once, in KEYS order");
        let with_file = load(vec!["luod".into(), "--config".into(), path.into()])
            .unwrap()
            .unwrap();
        let defaults = load(vec!["luod".into(), "--config".into(), "/dev/null".into()])
            .unwrap()
            .unwrap();
        for (f, d) in with_file.effective.iter().zip(&defaults.effective) {
            // A flag without a default (socket-group, region) shows an example.
            if d.source != Source::Unset {
                assert_eq!(
                    (f.key, &f.values),
                    (d.key, &d.values),
                    "the shipped default of {}",
                    f.key
                );
            }
        }
    }

    #[test]
    fn a_value_is_judged_by_its_flags_parser_with_key_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let check = |text: &str| -> String {
            std::fs::write(&path, text).unwrap();
            load(vec!["luod".into(), "--config".into(), path.clone().into()])
                .unwrap()
                .unwrap_err()
                .0
                .replace(&path.display().to_string(), "C")
        };
        assert_eq!(
            check("socket = \"/s\"\nvm-timeout = 0\n"),
            "C line 2: key `vm-timeout`: \"0\" is not valid: 0 seconds is out of range: give more than 0 and at \
             most 3600"
        );
        assert_eq!(
            check("\n\nbackend = \"floppy\"\n"),
            "C line 3: key `backend`: \"floppy\" is not one of auto, luo, reserved-memory, file"
        );
        assert_eq!(
            check("max-connections = [1, 2]\n"),
            "C line 1: key `max-connections`: takes one value, not a list"
        );
        assert_eq!(
            check("preserve-device = [\"0000:00:01.0\", { a = 1 }]\n"),
            "C line 1: key `preserve-device`: takes a string or a number, not a table"
        );
        assert_eq!(
            check("# comment\nsocket = \"/s\"\nvm_timeout = 5\n"),
            "C line 3: unknown key `vm_timeout`: luod has no flag --vm_timeout (each key is a flag's long name; see \
             `luod --help`)"
        );
        let syntax = check("socket = \n");
        assert!(syntax.starts_with("C line 1: "), "{syntax}");
    }

    #[test]
    fn lists_and_numbers_become_the_flags_arguments() {
        let cmd = Args::command();
        let argv = |k: &str, v: &str| -> Vec<OsString> {
            let value: toml::Table = toml::from_str(&format!("x = {v}")).unwrap();
            to_argv(&cmd, k, &value["x"]).unwrap()
        };
        assert_eq!(
            argv("preserve-device", "[\"0000:00:01.0\", \"0000:00:02.0\"]"),
            ["--preserve-device", "0000:00:01.0", "--preserve-device", "0000:00:02.0"]
        );
        assert_eq!(
            argv("preserve-device", "\"0000:00:01.0\""),
            ["--preserve-device", "0000:00:01.0"]
        );
        assert_eq!(argv("vm-timeout", "0.5"), ["--vm-timeout", "0.5"]);
        assert_eq!(argv("vm-timeout", "5.0"), ["--vm-timeout", "5"]);
        assert_eq!(argv("max-connections", "12"), ["--max-connections", "12"]);
    }
}
