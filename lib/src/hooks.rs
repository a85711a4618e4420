//! Operator hooks: executables luod runs at fixed points of a cycle.
//!
//! Each phase has a directory under the hooks root (`luod --hooks-dir`,
//! default `/etc/luod/hooks.d`): `pre-prepare.d`, `pre-freeze.d`,
//! `post-update.d`, `post-finish.d`, `on-failure.d`. The executables in it
//! run one after the other in lexical (byte) order of their names, each
//! with a timeout (`luod --hook-timeout`), the cycle in `LUOD_*` environment
//! variables and as one JSON object on stdin. Names starting with `.` or
//! ending with `~` are skipped (editors' and package managers' leftovers).
//!
//! luod runs as root, so a hook is code run as root: only files a
//! non-root user cannot have written are run. The hooks root, the phase's
//! directory and the hook itself must belong to root and not be writable by
//! group or others, and the hook must be a regular file (not a symbolic
//! link) executable by its owner. Anything else is refused with a log line
//! saying why, and counts as a failed hook: a pre-phase vetoes, a
//! post-update fails the validation.
//!
//! A failing `pre-*` hook stops its phase (later hooks do not run); so does
//! a failing `post-update` hook. `post-finish` and `on-failure` hooks all
//! run, whatever the others did: their failures are logged and recorded.

use crate::progress::ProgressCell;
use crate::record::HookRun;
use serde::Serialize;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Default hooks root.
pub const DEFAULT_ROOT: &str = "/etc/luod/hooks.d";

/// Default time a hook may run before it is killed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest last line kept from a hook's output (bytes, at a character
/// boundary): it goes into the record and into error messages.
pub const LAST_LINE_MAX: usize = 512;

/// When a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before `prepare` loads anything: a failure vetoes the update.
    PrePrepare,
    /// Before `freeze` starts the blackout: a failure vetoes the freeze.
    PreFreeze,
    /// In the new kernel, before clients take anything back: a failure is a
    /// failed validation.
    PostUpdate,
    /// After `finish` closed the cycle.
    PostFinish,
    /// After a transition failed (or a validation).
    OnFailure,
}

impl Phase {
    /// Every phase.
    pub const ALL: [Phase; 5] = [
        Phase::PrePrepare,
        Phase::PreFreeze,
        Phase::PostUpdate,
        Phase::PostFinish,
        Phase::OnFailure,
    ];

    /// Its name (`pre-prepare`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::PrePrepare => "pre-prepare",
            Phase::PreFreeze => "pre-freeze",
            Phase::PostUpdate => "post-update",
            Phase::PostFinish => "post-finish",
            Phase::OnFailure => "on-failure",
        }
    }

    /// True when a failing hook stops the phase (and what it guards).
    pub fn stops_at_failure(self) -> bool {
        matches!(self, Phase::PrePrepare | Phase::PreFreeze | Phase::PostUpdate)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a hook is told about the cycle: the JSON object on its stdin, and
/// (flattened) its `LUOD_*` environment variables.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HookContext {
    /// The phase.
    pub phase: String,
    /// The cycle's id (`LUOD_CYCLE`), when a cycle is in flight.
    pub cycle: Option<u64>,
    /// luod's state when the phase runs (`LUOD_STATE`).
    pub state: String,
    /// The backend (`LUOD_BACKEND`).
    pub backend: String,
    /// Release of the running kernel (`LUOD_RELEASE`).
    pub release: String,
    /// The target kernel image (`LUOD_KERNEL`), when one is known.
    pub kernel: Option<String>,
    /// Its SHA-256 (`LUOD_KERNEL_SHA256`), once luod digested it.
    pub kernel_sha256: Option<String>,
    /// The target initrd (`LUOD_INITRD`).
    pub initrd: Option<String>,
    /// The target command line (`LUOD_CMDLINE`).
    pub cmdline: Option<String>,
    /// The kernel a rollback would go back to (`LUOD_PREVIOUS_KERNEL`).
    pub previous_kernel: Option<String>,
    /// Set when the cycle is the rollback of that cycle (`LUOD_ROLLBACK_OF`).
    pub rollback_of: Option<u64>,
    /// Sessions and files carried (`LUOD_SESSIONS`, `LUOD_FILES`).
    pub sessions: u64,
    /// Files carried.
    pub files: u64,
    /// For `on-failure`: the step that failed (`LUOD_FAILED_STEP`).
    pub failed_step: Option<String>,
    /// For `on-failure`: why (`LUOD_FAILURE`).
    pub failure: Option<String>,
}

impl HookContext {
    /// The `LUOD_*` variables.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("LUOD_PHASE".to_string(), self.phase.clone()),
            ("LUOD_STATE".to_string(), self.state.clone()),
            ("LUOD_BACKEND".to_string(), self.backend.clone()),
            ("LUOD_RELEASE".to_string(), self.release.clone()),
            ("LUOD_SESSIONS".to_string(), self.sessions.to_string()),
            ("LUOD_FILES".to_string(), self.files.to_string()),
        ];
        let mut opt = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                env.push((k.to_string(), v));
            }
        };
        opt("LUOD_CYCLE", self.cycle.map(|c| c.to_string()));
        opt("LUOD_KERNEL", self.kernel.clone());
        opt("LUOD_KERNEL_SHA256", self.kernel_sha256.clone());
        opt("LUOD_INITRD", self.initrd.clone());
        opt("LUOD_CMDLINE", self.cmdline.clone());
        opt("LUOD_PREVIOUS_KERNEL", self.previous_kernel.clone());
        opt("LUOD_ROLLBACK_OF", self.rollback_of.map(|c| c.to_string()));
        opt("LUOD_FAILED_STEP", self.failed_step.clone());
        opt("LUOD_FAILURE", self.failure.clone());
        env
    }
}

/// The first hook that failed in a phase that stops at a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookFailure {
    /// The phase.
    pub phase: Phase,
    /// The hook's file name.
    pub hook: String,
    /// Its reason: its last line of output, or how it ended.
    pub reason: String,
}

/// What a phase did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PhaseOutcome {
    /// Every hook run (or refused), in order.
    pub runs: Vec<HookRun>,
    /// The first failure, if any.
    pub failure: Option<HookFailure>,
}

/// The hooks luod runs: where they are and how long each may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hooks {
    /// The hooks root (its phase directories are `PHASE.d`).
    pub root: PathBuf,
    /// Time each hook may run.
    pub timeout: Duration,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            root: PathBuf::from(DEFAULT_ROOT),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Why a path may not hold a hook, or `None` when it may: it must belong to
/// root and not be writable by group or others.
fn unsafe_owner(meta: &std::fs::Metadata) -> Option<String> {
    if meta.uid() != 0 {
        return Some(format!("it belongs to uid {}, not root", meta.uid()));
    }
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        return Some(format!("group or others may write to it (mode {:04o})", mode & 0o7777));
    }
    None
}

/// Keeps the last `LAST_LINE_MAX` bytes of a line, at a character boundary.
fn clip(line: &str) -> String {
    let line = line.trim_end();
    if line.len() <= LAST_LINE_MAX {
        return line.to_string();
    }
    let mut start = line.len() - LAST_LINE_MAX;
    while !line.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &line[start..])
}

/// A hook's entry in its directory, before it runs.
enum Entry {
    Run(PathBuf),
    Refused(String),
}

impl Hooks {
    /// The phase's directory.
    pub fn dir(&self, phase: Phase) -> PathBuf {
        self.root.join(format!("{}.d", phase.as_str()))
    }

    /// The phase's hooks in lexical order, each checked; `Err` when a
    /// directory itself may not hold hooks (the whole phase is refused).
    /// A missing directory holds no hooks.
    fn entries(&self, phase: Phase) -> Result<Vec<(String, Entry)>, String> {
        let dir = self.dir(phase);
        for d in [&self.root, &dir] {
            match std::fs::symlink_metadata(d) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(format!("cannot read {}: {e}", d.display())),
                Ok(m) if !m.is_dir() => return Err(format!("{} is not a directory", d.display())),
                Ok(m) => {
                    if let Some(why) = unsafe_owner(&m) {
                        return Err(format!(
                            "hook directory {} is refused: {why} (hooks run as root, so their directories must \
                             belong to root and not be writable by group or others)",
                            d.display()
                        ));
                    }
                }
            }
        }
        let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(&dir)
            .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .filter(|n| {
                let b = n.as_encoded_bytes();
                !b.starts_with(b".") && !b.ends_with(b"~")
            })
            .collect();
        names.sort();
        Ok(names
            .into_iter()
            .map(|n| {
                let name = n.to_string_lossy().into_owned();
                let path = dir.join(&n);
                let entry = match std::fs::symlink_metadata(&path) {
                    Err(e) => Entry::Refused(format!("cannot read it: {e}")),
                    Ok(m) if m.file_type().is_symlink() => {
                        Entry::Refused("it is a symbolic link: put the executable itself there".into())
                    }
                    Ok(m) if !m.is_file() => Entry::Refused("it is not a regular file".into()),
                    Ok(m) => match unsafe_owner(&m) {
                        Some(why) => Entry::Refused(why),
                        None if m.permissions().mode() & 0o100 == 0 => {
                            Entry::Refused("it is not executable by its owner (chmod u+x)".into())
                        }
                        None => Entry::Run(path),
                    },
                };
                (name, entry)
            })
            .collect())
    }

    /// Runs the hooks of `ctx.phase`'s `phase` with `ctx`; shows each one
    /// in `progress` while it runs.
    pub fn run(&self, phase: Phase, ctx: &HookContext, progress: &ProgressCell) -> PhaseOutcome {
        let mut out = PhaseOutcome::default();
        let entries = match self.entries(phase) {
            Ok(e) => e,
            Err(why) => {
                tracing::error!("{phase} hooks refused: {why}");
                let run = HookRun {
                    phase: phase.as_str().into(),
                    hook: self.dir(phase).display().to_string(),
                    ok: false,
                    status: "refused".into(),
                    duration_ns: 0,
                    last_line: clip(&why),
                };
                out.failure = Some(HookFailure {
                    phase,
                    hook: run.hook.clone(),
                    reason: run.last_line.clone(),
                });
                out.runs.push(run);
                return out;
            }
        };
        let mut ctx = ctx.clone();
        ctx.phase = phase.as_str().into();
        let input = serde_json::to_vec(&ctx).unwrap_or_default();
        for (name, entry) in entries {
            let run = match entry {
                Entry::Refused(why) => {
                    let why = format!(
                        "hook {} refused: {why} (hooks run as root: only root's files, not writable by group or others)",
                        self.dir(phase).join(&name).display()
                    );
                    tracing::error!("{why}");
                    HookRun {
                        phase: phase.as_str().into(),
                        hook: name.clone(),
                        ok: false,
                        status: "refused".into(),
                        duration_ns: 0,
                        last_line: clip(&why),
                    }
                }
                Entry::Run(path) => {
                    progress.waiting_for(|| format!("hook {phase}/{name}"));
                    self.run_one(phase, &name, &path, &ctx, &input)
                }
            };
            let failed = !run.ok;
            if failed && out.failure.is_none() {
                out.failure = Some(HookFailure {
                    phase,
                    hook: name.clone(),
                    reason: if run.last_line.is_empty() {
                        run.status.clone()
                    } else {
                        run.last_line.clone()
                    },
                });
            }
            out.runs.push(run);
            if failed && phase.stops_at_failure() {
                break;
            }
        }
        out
    }

    /// Runs one hook to its end or its timeout.
    fn run_one(&self, phase: Phase, name: &str, path: &Path, ctx: &HookContext, input: &[u8]) -> HookRun {
        let started = Instant::now();
        let mut cmd = Command::new(path);
        cmd.env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LUOD_HOOK", name)
            .envs(ctx.env())
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that a timeout kills what it started too.
            .process_group(0);
        let done = |status: String, ok: bool, last_line: String| HookRun {
            phase: phase.as_str().into(),
            hook: name.into(),
            ok,
            status,
            duration_ns: started.elapsed().as_nanos() as u64,
            last_line,
        };
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let why = format!("cannot start hook {}: {e}", path.display());
                tracing::error!("{why}");
                return done("not started".into(), false, clip(&why));
            }
        };
        tracing::info!("{phase} hook {name} started (pid {})", child.id());
        if let Some(mut stdin) = child.stdin.take() {
            let input = input.to_vec();
            // A hook that does not read its stdin must not block luod.
            let _ = std::thread::Builder::new().name("luod-hook-in".into()).spawn(move || {
                let _ = stdin.write_all(&input);
            });
        }
        let (tx, rx) = std::sync::mpsc::channel::<(bool, Option<String>)>();
        let mut readers = 0;
        for (is_err, pipe) in [
            (false, child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>)),
            (true, child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>)),
        ] {
            let Some(pipe) = pipe else { continue };
            let tx = tx.clone();
            let label = format!("{phase} hook {name}");
            let spawned = std::thread::Builder::new().name("luod-hook-out".into()).spawn(move || {
                let mut last = None;
                for line in BufReader::new(pipe).split(b'\n').map_while(Result::ok) {
                    let line = String::from_utf8_lossy(&line).trim_end().to_string();
                    if is_err {
                        tracing::warn!("{label}: {line}");
                    } else {
                        tracing::info!("{label}: {line}");
                    }
                    if !line.is_empty() {
                        last = Some(line);
                    }
                }
                let _ = tx.send((is_err, last));
            });
            if spawned.is_ok() {
                readers += 1;
            }
        }
        drop(tx);
        let deadline = started + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Ok(status),
                Ok(None) if Instant::now() >= deadline => {
                    // SAFETY: kill(2) with the negated pid of the group the
                    // child leads (process_group(0) made it its leader) and a
                    // valid signal; it touches no memory.
                    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                    let _ = child.wait();
                    break Err(());
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let why = format!("cannot wait for hook {}: {e}", path.display());
                    tracing::error!("{why}");
                    return done("lost".into(), false, clip(&why));
                }
            }
        };
        // Its output, as far as it came: a process it left behind holding
        // the pipes does not hold luod (one second at most).
        let (mut last_err, mut last_out) = (None, None);
        let collect_until = Instant::now() + Duration::from_secs(1);
        for _ in 0..readers {
            let left = collect_until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((true, l)) => last_err = l,
                Ok((false, l)) => last_out = l,
                Err(_) => break,
            }
        }
        let last_line = clip(&last_err.or(last_out).unwrap_or_default());
        let run = match status {
            Ok(s) if s.success() => done("exit 0".into(), true, last_line),
            Ok(s) => match (s.code(), s.signal()) {
                (Some(code), _) => done(format!("exit {code}"), false, last_line),
                (None, Some(sig)) => done(format!("killed by signal {sig}"), false, last_line),
                _ => done(format!("{s}"), false, last_line),
            },
            Err(()) => done(
                format!(
                    "timed out after {} (luod --hook-timeout); killed",
                    humantime::format_duration(self.timeout)
                ),
                false,
                last_line,
            ),
        };
        let line = format!(
            "{phase} hook {name}: {} in {:.0} ms{}",
            run.status,
            run.duration_ns as f64 / 1e6,
            if run.last_line.is_empty() {
                String::new()
            } else {
                format!(" ({})", run.last_line)
            }
        );
        if run.ok {
            tracing::info!("{line}");
        } else {
            tracing::error!("{line}");
        }
        run
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn hook(dir: &Path, phase: Phase, name: &str, body: &str) -> PathBuf {
        let d = dir.join(format!("{}.d", phase.as_str()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn hooks(dir: &Path) -> Hooks {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Hooks {
            root: dir.to_path_buf(),
            timeout: Duration::from_secs(5),
        }
    }

    /// Hooks run only from root's files: these tests run as root, as CI runs them.
    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "run as root: hooks must belong to root"
        );
    }

    #[test]
    fn a_missing_directory_holds_no_hooks() {
        let h = Hooks {
            root: PathBuf::from("/nonexistent/luod-hooks"),
            timeout: Duration::from_secs(1),
        };
        let out = h.run(Phase::PrePrepare, &HookContext::default(), &ProgressCell::default());
        assert_eq!(out, PhaseOutcome::default());
    }

    #[test]
    fn hooks_run_in_lexical_order_and_a_pre_phase_stops_at_the_first_failure() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        hook(dir.path(), Phase::PrePrepare, "20-b", "echo b; exit 0");
        hook(dir.path(), Phase::PrePrepare, "10-a", "echo a");
        hook(
            dir.path(),
            Phase::PrePrepare,
            "30-c",
            "echo 'first line' >&2; echo 'not enough memory' >&2; exit 3",
        );
        hook(dir.path(), Phase::PrePrepare, "40-d", "echo never");
        hook(dir.path(), Phase::PrePrepare, ".hidden", "exit 1");
        hook(dir.path(), Phase::PrePrepare, "50-e~", "exit 1");
        let out = hooks(dir.path()).run(Phase::PrePrepare, &HookContext::default(), &ProgressCell::default());
        let names: Vec<(&str, &str, &str)> = out
            .runs
            .iter()
            .map(|r| (r.hook.as_str(), r.status.as_str(), r.last_line.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("10-a", "exit 0", "a"),
                ("20-b", "exit 0", "b"),
                ("30-c", "exit 3", "not enough memory")
            ]
        );
        assert_eq!(
            out.failure,
            Some(HookFailure {
                phase: Phase::PrePrepare,
                hook: "30-c".into(),
                reason: "not enough memory".into()
            })
        );
    }

    #[test]
    fn post_finish_hooks_all_run_whatever_fails() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        hook(dir.path(), Phase::PostFinish, "1", "exit 1");
        hook(dir.path(), Phase::PostFinish, "2", "exit 0");
        let out = hooks(dir.path()).run(Phase::PostFinish, &HookContext::default(), &ProgressCell::default());
        assert_eq!(out.runs.len(), 2);
        assert_eq!(out.failure.map(|f| f.reason), Some("exit 1".to_string()));
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed_with_what_it_started() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        hook(
            dir.path(),
            Phase::PreFreeze,
            "slow",
            "echo starting >&2; sleep 30 & sleep 30",
        );
        let mut h = hooks(dir.path());
        h.timeout = Duration::from_millis(300);
        let started = Instant::now();
        let out = h.run(Phase::PreFreeze, &HookContext::default(), &ProgressCell::default());
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        assert_eq!(
            out.runs[0].status,
            "timed out after 300ms (luod --hook-timeout); killed"
        );
        assert_eq!(out.failure.unwrap().reason, "starting");
    }

    #[test]
    fn a_group_writable_hook_is_refused_and_not_run() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let p = hook(
            dir.path(),
            Phase::PrePrepare,
            "10-x",
            &format!("touch {}", marker.display()),
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o775)).unwrap();
        let out = hooks(dir.path()).run(Phase::PrePrepare, &HookContext::default(), &ProgressCell::default());
        assert!(!marker.exists());
        assert_eq!(out.runs[0].status, "refused");
        assert_eq!(
            out.failure.unwrap().reason,
            format!(
                "hook {} refused: group or others may write to it (mode 0775) (hooks run as root: only root's files, \
                 not writable by group or others)",
                p.display()
            )
        );
    }
}
