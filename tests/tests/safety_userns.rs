//! The issue 7 attacks an unprivileged member of the socket's group can make
//! through luod's socket, each made twice: as uid 65534, and as uid 65534
//! inside a user namespace of its own (`unshare -Ur`: root with every
//! capability in there, 65534 on the host). luod must answer both alike:
//! the same exact error and exit code, luod still running, root's `status`
//! answered within 2 s and unchanged, and root's preserved bytes the same
//! after a full cycle at the end of each test.
//!
//! - item 1: every privileged request refused in every state, and root's
//!   sessions invisible (`status`, `session list`, `history`);
//! - item 2: a FIFO, a directory, `/dev/null` or an unreadable file as
//!   `--kernel` of `check`/`prepare`: one prompt error;
//! - items 3 and 4: the fd holder's socket refused (mode, then
//!   `SO_PEERCRED`), and no file luod created can be opened;
//! - item 8: a trickled frame cut off at the whole-frame deadline, a
//!   silent connection closed at the same deadline, and the per-uid and the
//!   overall connection caps;
//! - item 9: each per-uid quota with its exact error, and a memfd reopened
//!   write-only, read-only or `O_PATH` refused at `session preserve`;
//! - item 10: bytes after a message in a frame.
//!
//! Runs as root, as CI does; the attacker runs copies of `luoctl`,
//! `luo-test-client`, `luo-raw-client` and `luo-holder-probe` from the
//! test's directory (`tests/src/attack.rs`).

use liveupdate::protocol::frame;
use liveupdate::protocol::{ErrorKind, PROTOCOL_VERSION, Request, Response, StatusReport};
use liveupdate::state::State;
use liveupdate_tests::attack::{self, NOBODY, Who};
use liveupdate_tests::*;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long root's `status` may take after an attack.
const STATUS_PROMPT: Duration = Duration::from_secs(2);

/// How long an attacker's command may take: luod never waits on it.
const COMMAND_PROMPT: Duration = Duration::from_secs(5);

/// The hint of every privilege refusal.
const NOT_PRIVILEGED_HINT: &str = "run as root (or with CAP_SYS_BOOT) in the host's user namespace; \
                                   root inside a user namespace of your own does not count";

/// Where an inherited memfd sits in the test client (`LUO_TEST_CLIENT_FD`).
const CHILD_FD: i32 = 100;

/// uid 65534, without (`false`) or with (`true`) a user namespace of its own.
fn attacker(ns: bool) -> Who {
    if ns { Who::NobodyInOwnUserns } else { Who::Nobody }
}

/// Both attackers, the plain one first.
const BOTH: [bool; 2] = [false, true];

/// A luod with `flags` whose socket group 65534 reaches, the attacker's
/// binaries copied into its directory, and root's session `root-vm` holding
/// two files; what root preserved.
fn shared_luod(flags: &[&str]) -> (Luod, Vec<Preserved>) {
    let mut luod = Luod::new("16M").arg("--socket-group").arg(NOBODY.to_string());
    for f in flags {
        luod = luod.arg(f);
    }
    let luod = luod.launched();
    attack::share(&luod);
    for bin in ["luo-raw-client", "luo-holder-probe"] {
        copy_binary(bin, &luod.dir().join(bin));
    }
    let set = preserve_set(&mut luod.client(), &["root-vm"], &[4096, 65536]);
    (luod, set)
}

/// luod runs and answers root's `status` within [`STATUS_PROMPT`]; the report.
#[track_caller]
fn root_status_promptly(luod: &mut Luod) -> StatusReport {
    assert!(luod.is_running(), "luod is still running");
    let started = Instant::now();
    let status = luod.status();
    assert!(
        started.elapsed() < STATUS_PROMPT,
        "root's status took {:?}",
        started.elapsed()
    );
    status
}

/// After an attack: luod runs, root's `status` comes promptly and equals `before`.
#[track_caller]
fn assert_survived(luod: &mut Luod, before: &StatusReport, what: &str) {
    let after = root_status_promptly(luod);
    assert_eq!(&after, before, "{what}: status changed");
}

/// Runs `cmd` to its end, within [`COMMAND_PROMPT`] (killed and failed after).
#[track_caller]
fn run_promptly(mut cmd: Command, what: &str) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{what}: spawn: {e}"));
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("the command's output");
        }
        if started.elapsed() > COMMAND_PROMPT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {COMMAND_PROMPT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs luoctl as `who` on luod's socket; (exit code, stderr, stdout).
#[track_caller]
fn luoctl_as(who: Who, luod: &Luod, args: &[&str]) -> (i32, String, String) {
    let socket = luod.socket();
    let mut all = vec!["--socket", socket.to_str().expect("UTF-8 path")];
    all.extend_from_slice(args);
    let cmd = attack::command_as(who, &luod.dir().join("luoctl"), &all);
    let out = run_promptly(cmd, &format!("luoctl {args:?} as {who:?}"));
    (
        out.status.code().expect("luoctl exited"),
        attack::stderr(&out),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `luoctl --json ARGS` as `who`, which must succeed; its JSON.
#[track_caller]
fn luoctl_json_as(who: Who, luod: &Luod, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, stderr, stdout) = luoctl_as(who, luod, &all);
    assert_eq!(code, 0, "luoctl {all:?} as {who:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("luoctl {all:?} as {who:?}: {e}: {stdout}"))
}

/// Sends `requests` on one connection as `who` through the test client; a
/// `SessionPreserve` carries `fd` when given (else a fresh 4096-byte memfd).
#[track_caller]
fn client_as(who: Who, luod: &Luod, fd: Option<BorrowedFd<'_>>, requests: &[Request]) -> Vec<Reply<Response>> {
    let socket = luod.socket();
    let json: Vec<String> = requests
        .iter()
        .map(|r| serde_json::to_string(r).expect("request as JSON"))
        .collect();
    let mut args = vec![socket.to_str().expect("UTF-8 path")];
    args.extend(json.iter().map(String::as_str));
    let mut cmd = attack::command_as(who, &attack::test_client(luod.dir()), &args);
    if let Some(fd) = fd {
        let raw = fd.as_raw_fd();
        assert_ne!(raw, CHILD_FD, "the memfd must not already sit where the client looks");
        cmd.env("LUO_TEST_CLIENT_FD", CHILD_FD.to_string());
        let dup = move || {
            // SAFETY: dup2 is async-signal-safe, so it may run between fork
            // and exec; `raw` is open in the parent (borrowed for the whole
            // spawn), hence in the child, and the copy is not close-on-exec,
            // so it survives `unshare`'s exec and the client's.
            if unsafe { libc::dup2(raw, CHILD_FD) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: the closure only calls dup2 (see above): nothing that
        // allocates or takes a lock in the forked child.
        unsafe {
            cmd.pre_exec(dup);
        }
    }
    let out = run_promptly(cmd, &format!("the test client as {who:?}"));
    assert!(
        out.status.success(),
        "the test client as {who:?} failed ({}): {}",
        out.status,
        attack::stderr(&out)
    );
    serde_json::from_slice(&out.stdout).expect("the client's JSON answers")
}

#[track_caller]
fn assert_refused_reply(reply: &Reply<Response>, kind: ErrorKind, message: &str, who: Who) {
    match reply {
        Err(e) => assert_eq!(
            (e.kind, e.message.as_str()),
            (kind, message),
            "{who:?} (hint: {:?})",
            e.hint
        ),
        Ok(r) => panic!("{who:?}: expected {kind:?} {message:?}, got {r:?}"),
    }
}

#[track_caller]
fn assert_done(replies: &[Reply<Response>], who: Who) {
    for r in replies {
        assert!(matches!(r, Ok(Response::Done)), "{who:?}: {replies:?}");
    }
}

/// From `normal` (after the attacks): prepare, freeze, reboot (simulated),
/// start the new kernel's luod, take every file of `set` back with the same
/// bytes, finish.
#[track_caller]
fn full_cycle(luod: &mut Luod, set: &[Preserved]) {
    let mut c = luod.client();
    assert_eq!(c.status().state, State::Normal);
    c.prepare().expect("root prepares");
    c.freeze().expect("root freezes");
    c.reboot().expect("root reboots");
    drop(c);
    luod.expect_kexec_exit();
    luod.start();
    let mut c = luod.client();
    assert_eq!(c.status().state, State::Updated);
    retrieve_and_compare(&mut c, set);
    c.finish().expect("root finishes");
    assert_eq!(c.status().state, State::Normal);
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// luoctl's line for a refusal of `what` that needs privilege.
fn not_privileged(command: &str, what: &str) -> String {
    format!("luoctl: {command}: {what} needs root or CAP_SYS_BOOT; {NOT_PRIVILEGED_HINT}\n")
}

// ---- item 1 ----------------------------------------------------------------

/// Every request that needs privilege or another uid's session, with what
/// luoctl must answer: the same in every state, with or without a user
/// namespace of its own.
fn privileged_attacks(file: &str, out: &str) -> Vec<(Vec<String>, i32, String)> {
    let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let not_found = |command: &str| {
        format!("luoctl: {command}: no session named root-vm; `luoctl session list` shows your sessions\n")
    };
    vec![
        (own(&["prepare"]), 12, not_privileged("prepare", "prepare")),
        (own(&["freeze"]), 12, not_privileged("freeze", "freeze")),
        (own(&["reboot"]), 12, not_privileged("reboot", "reboot")),
        (own(&["cancel"]), 12, not_privileged("cancel", "cancel")),
        (own(&["finish"]), 12, not_privileged("finish", "finish")),
        (
            own(&["session", "evict", "root-vm"]),
            12,
            not_privileged("session evict root-vm", "session evict"),
        ),
        (
            own(&["discard-record", "--yes"]),
            12,
            not_privileged("discard-record", "discard-record"),
        ),
        (
            own(&["session", "finish", "root-vm"]),
            15,
            not_found("session finish root-vm"),
        ),
        (
            own(&["session", "retrieve", "root-vm", "--token", "1", "--output", out]),
            15,
            not_found("session retrieve root-vm token 1"),
        ),
        (
            own(&["session", "preserve", "root-vm", "--token", "9", "--file", file]),
            15,
            not_found("session preserve root-vm token 9"),
        ),
    ]
}

#[test]
fn every_privileged_request_is_refused_alike_in_every_state_and_roots_sessions_stay_invisible() {
    let (mut luod, set) = shared_luod(&[]);
    // An event of root's in the history, which the attacker must not see.
    let mut c = luod.client();
    c.create("root-gone").expect("root creates root-gone");
    c.call(&Request::SessionEvict {
        name: "root-gone".into(),
    })
    .expect("root evicts root-gone");
    drop(c);
    let file = luod.dir().join("bytes");
    std::fs::write(&file, pattern(9, 100)).expect("write a file");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod 0644");
    let outdir = luod.dir().join("out");
    std::fs::create_dir(&outdir).expect("mkdir out");
    std::fs::set_permissions(&outdir, std::fs::Permissions::from_mode(0o777)).expect("chmod 0777");
    let out = outdir.join("got");
    let attacks = privileged_attacks(path(&file), path(&out));

    for state in [State::Normal, State::Prepared, State::Frozen, State::Updated] {
        match state {
            State::Normal => {}
            State::Prepared => drop(luod.client().prepare().expect("root prepares")),
            State::Frozen => drop(luod.client().freeze().expect("root freezes")),
            State::Updated => {
                luod.client().reboot().expect("root reboots");
                luod.expect_kexec_exit();
                luod.start();
            }
        }
        let before = root_status_promptly(&mut luod);
        assert_eq!(before.state, state);
        assert_eq!(
            before.sessions.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["root-vm"]
        );
        let root_events = luod.client().history_report().events;
        assert_eq!(root_events.len(), 1, "root sees its eviction");
        for ns in BOTH {
            let who = attacker(ns);
            for (args, code, stderr) in &attacks {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let got = luoctl_as(who, &luod, &args);
                assert_eq!(
                    (got.0, got.1.as_str()),
                    (*code, stderr.as_str()),
                    "luoctl {args:?} as {who:?} in {state:?}"
                );
                assert_survived(&mut luod, &before, &format!("luoctl {args:?} as {who:?} in {state:?}"));
            }
            assert!(!out.exists(), "nothing was retrieved into {}", out.display());

            // Root's sessions and events are invisible to both.
            let status = luoctl_json_as(who, &luod, &["status"]);
            assert_eq!(
                (
                    &status["sessions"],
                    status["state"].as_str(),
                    status["generation"].as_u64()
                ),
                (
                    &serde_json::json!([]),
                    Some(state.to_string().as_str()),
                    Some(before.generation)
                ),
                "status as {who:?} in {state:?}: {status}"
            );
            let list = luoctl_json_as(who, &luod, &["session", "list"]);
            assert_eq!(list["sessions"], serde_json::json!([]), "{who:?} in {state:?}: {list}");
            let history = luoctl_json_as(who, &luod, &["history"]);
            assert_eq!(
                history["events"],
                serde_json::json!([]),
                "{who:?} in {state:?}: {history}"
            );
            let replies = client_as(
                who,
                &luod,
                None,
                &[
                    Request::SessionList,
                    Request::SessionRetrieve {
                        name: "root-vm".into(),
                        token: 2,
                    },
                ],
            );
            assert!(
                matches!(&replies[0], Ok(Response::Sessions(s)) if s.is_empty()),
                "{who:?}: {:?}",
                replies[0]
            );
            assert_refused_reply(&replies[1], ErrorKind::NotFound, "no session named root-vm", who);
            assert_survived(
                &mut luod,
                &before,
                &format!("the visibility checks as {who:?} in {state:?}"),
            );
        }
    }
    // Updated: root takes back both files, byte for byte, and finishes.
    let mut c = luod.client();
    retrieve_and_compare(&mut c, &set);
    c.finish().expect("root finishes");
    assert_eq!(c.status().state, State::Normal);
}

// ---- item 2 ----------------------------------------------------------------

/// Why luod refuses an image that is not a regular file.
fn not_regular(role: &str, p: &Path, what: &str) -> String {
    format!(
        "{role} {} is {what}, not a regular file: luod reads only regular files, which cannot block it",
        p.display()
    )
}

/// luoctl's line for a `check` as uid 65534 whose target kernel is refused
/// for `why` (privilege fails too).
fn check_failed(why: &str) -> String {
    format!(
        "luoctl: check: prepare would be refused (2 of 7 checks failed): privilege: transitions need root or \
         CAP_SYS_BOOT; target kernel: {why}; fix what failed, then check again\n"
    )
}

#[test]
fn a_fifo_a_directory_a_device_or_an_unreadable_file_as_kernel_gets_one_prompt_error() {
    let (mut luod, set) = shared_luod(&[]);
    let fifo = luod.dir().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).expect("mkfifo");
    std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o666)).expect("chmod the FIFO");
    let dir = luod.dir().join("boot");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod the directory");
    let secret = luod.dir().join("root-only-vmlinuz");
    std::fs::write(&secret, pattern(7, 4096)).expect("write the image");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod 0600");
    let null = Path::new("/dev/null");
    let before = root_status_promptly(&mut luod);

    let refused = [
        (fifo.as_path(), not_regular("kernel image", &fifo, "a FIFO")),
        (dir.as_path(), not_regular("kernel image", &dir, "a directory")),
        (null, not_regular("kernel image", null, "a character device")),
    ];
    for ns in BOTH {
        let who = attacker(ns);
        for (image, why) in &refused {
            let check = ["check", "--kernel", path(image), "--cmdline", "quiet"];
            let got = luoctl_as(who, &luod, &check);
            assert_eq!((got.0, got.1), (3, check_failed(why)), "{check:?} as {who:?}");
            assert_survived(&mut luod, &before, &format!("{check:?} as {who:?}"));
            let prepare = ["prepare", "--kernel", path(image), "--cmdline", "quiet"];
            let got = luoctl_as(who, &luod, &prepare);
            assert_eq!(
                (got.0, got.1),
                (12, not_privileged("prepare", "prepare")),
                "{prepare:?} as {who:?}"
            );
            assert_survived(&mut luod, &before, &format!("{prepare:?} as {who:?}"));
        }
        // A file the caller cannot read: luoctl cannot open it, whatever
        // capabilities its own namespace gives, and luod is never asked.
        for command in ["check", "prepare"] {
            let args = [command, "--kernel", path(&secret), "--cmdline", "quiet"];
            let got = luoctl_as(who, &luod, &args);
            assert_eq!(
                (got.0, got.1),
                (
                    7,
                    format!(
                        "luoctl: {command}: cannot open --kernel {}: Permission denied (os error 13)\n",
                        secret.display()
                    )
                ),
                "{args:?} as {who:?}"
            );
            assert_survived(&mut luod, &before, &format!("{args:?} as {who:?}"));
        }
    }
    // Root gets the same one error for each (and the cycle is untouched).
    for (image, why) in &refused {
        let out = luod.luoctl(&["prepare", "--kernel", path(image), "--cmdline", "quiet"]);
        assert_eq!(out.status.code(), Some(10), "{}", attack::stderr(&out));
        assert!(
            attack::stderr(&out).starts_with(&format!("luoctl: prepare: {why}; ")),
            "{}",
            attack::stderr(&out)
        );
        assert_survived(&mut luod, &before, &format!("root's prepare with {}", image.display()));
    }
    full_cycle(&mut luod, &set);
}

// ---- items 3 and 4 ---------------------------------------------------------

/// Runs `luo-holder-probe HOLDER_SOCKET put` as `who`; (exit code, stdout).
fn holder_probe(who: Who, luod: &Luod) -> (i32, String) {
    let socket = luod.state_dir().join("holder.sock");
    let cmd = attack::command_as(who, &luod.dir().join("luo-holder-probe"), &[path(&socket), "put"]);
    let out = run_promptly(cmd, &format!("luo-holder-probe as {who:?}"));
    (
        out.status.code().expect("the probe exited"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `cat FILE` and an open for appending as `who`: (exit code, stderr) of each.
fn read_and_append(who: Who, file: &Path) -> [(i32, String); 2] {
    let cat = attack::command_as(who, Path::new("cat"), &[path(file)]);
    let cat = run_promptly(cat, &format!("cat {} as {who:?}", file.display()));
    let append = attack::command_as(
        who,
        Path::new("sh"),
        &["-c", "exec 3>>\"$1\" && echo opened", "sh", path(file)],
    );
    let append = run_promptly(append, &format!("append to {} as {who:?}", file.display()));
    [
        (cat.status.code().expect("cat exited"), attack::stderr(&cat)),
        (append.status.code().expect("sh exited"), attack::stderr(&append)),
    ]
}

#[test]
fn the_holder_socket_and_every_file_luod_created_are_closed_to_the_attacker() {
    let (mut luod, set) = shared_luod(&[]);
    let state = luod.state_dir();
    let holder_pid = std::fs::read_to_string(state.join("holder.pid")).expect("holder.pid");
    let before = root_status_promptly(&mut luod);

    // The state directory is 0700: nothing in it can even be looked up.
    for ns in BOTH {
        let who = attacker(ns);
        let (code, out) = holder_probe(who, &luod);
        assert_eq!(
            (code, out.as_str()),
            (1, "connect: Permission denied (os error 13)\n"),
            "{who:?}"
        );
        assert_survived(&mut luod, &before, &format!("the probe as {who:?}"));
    }

    // Opened to everyone, the files themselves still refuse: every regular
    // file in the state directory, and the region.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).expect("chmod 0755");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&state)
        .expect("read the state directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(files.contains(&state.join("holder.pid")), "{files:?}");
    files.push(luod.region());
    for ns in BOTH {
        let who = attacker(ns);
        for file in &files {
            let [cat, append] = read_and_append(who, file);
            assert_eq!(
                cat,
                (1, format!("cat: {}: Permission denied\n", file.display())),
                "{who:?}"
            );
            assert_ne!(append.0, 0, "{who:?} opened {} for writing", file.display());
            assert!(
                append.1.ends_with(&format!("{}: Permission denied\n", file.display())),
                "{who:?}: {}",
                append.1
            );
        }
        // The holder's socket is 0600.
        let (code, out) = holder_probe(who, &luod);
        assert_eq!(
            (code, out.as_str()),
            (1, "connect: Permission denied (os error 13)\n"),
            "{who:?}"
        );
        assert_survived(&mut luod, &before, &format!("the opens as {who:?}"));
    }

    // With the socket's mode widened by mistake, the holder still serves
    // only luod's uid (SO_PEERCRED, which maps the namespace's root to 65534).
    let socket = state.join("holder.sock");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod 0666");
    let refused = format!(
        "luod fd holder (pid {}): refused a connection from uid {NOBODY} (pid ",
        holder_pid.trim()
    );
    for (n, ns) in BOTH.into_iter().enumerate() {
        let who = attacker(ns);
        let (code, out) = holder_probe(who, &luod);
        assert_eq!((code, out.as_str()), (1, "closed unanswered\n"), "{who:?}");
        let lines = poll(Duration::from_secs(2), || {
            let n_lines = luod.log().lines().filter(|l| l.starts_with(&refused)).count();
            (n_lines == n + 1).then_some(n_lines)
        });
        assert_eq!(
            lines,
            Some(n + 1),
            "one log line per refused connection:\n{}",
            luod.log()
        );
        assert_survived(&mut luod, &before, &format!("the probe as {who:?} on a 0666 socket"));
    }
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).expect("chmod 0600");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod 0700");
    assert_eq!(
        std::fs::read_to_string(state.join("holder.pid")).expect("holder.pid"),
        holder_pid,
        "the same holder serves luod"
    );
    // The holder still has luod's files: a crash of luod loses nothing.
    luod.kill();
    luod.start();
    assert_eq!(root_status_promptly(&mut luod), before);
    full_cycle(&mut luod, &set);
}

// ---- item 8 ----------------------------------------------------------------

/// What `luo-raw-client MODE` printed, run as `who`: luod's answer to the
/// broken frame, milliseconds until it came, and what the next read found.
fn raw_client_output(out: &Output, who: Who) -> (Response, u64, String) {
    assert!(
        out.status.success(),
        "luo-raw-client as {who:?} failed ({}): {}",
        out.status,
        attack::stderr(out)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the raw client's JSON");
    (
        serde_json::from_value(v["reply"].clone()).expect("a response"),
        v["ms"].as_u64().expect("ms"),
        v["then"].as_str().expect("then").to_string(),
    )
}

fn raw_client(who: Who, luod: &Luod, mode: &str) -> Command {
    let socket = luod.socket();
    attack::command_as(who, &luod.dir().join("luo-raw-client"), &[path(&socket), mode])
}

#[test]
fn a_trickled_frame_is_cut_off_at_the_whole_frame_deadline() {
    let (mut luod, set) = shared_luod(&["--client-timeout", "1"]);
    let before = root_status_promptly(&mut luod);
    for ns in BOTH {
        let who = attacker(ns);
        let child = raw_client(who, &luod, "trickle")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn luo-raw-client");
        // While the frame trickles in, root is served.
        std::thread::sleep(Duration::from_millis(300));
        assert_survived(&mut luod, &before, &format!("during the trickle of {who:?}"));
        let out = child.wait_with_output().expect("luo-raw-client's output");
        let (reply, ms, then) = raw_client_output(&out, who);
        let Response::Error(e) = reply else {
            panic!("{who:?}: expected a protocol error, got {reply:?}")
        };
        assert_eq!(e.kind, ErrorKind::Protocol, "{who:?}");
        let got: usize = e
            .message
            .strip_prefix("frame not complete within 1 s (")
            .and_then(|m| m.strip_suffix(" of 204 bytes received); closing the connection"))
            .unwrap_or_else(|| panic!("{who:?}: {}", e.message))
            .parse()
            .expect("bytes received");
        // 4 bytes of length, then about 10 a second; a busy machine may
        // delay the sender's wake-ups, never the deadline.
        assert!(
            (4..=20).contains(&got),
            "{who:?}: {got} bytes arrived in about a second"
        );
        assert!((900..4000).contains(&ms), "{who:?}: cut off after {ms} ms");
        assert!(then == "closed" || then == "reset", "{who:?}: then {then}");
        assert_survived(&mut luod, &before, &format!("the trickle of {who:?}"));

        // A connection that never says hello gets the same deadline.
        let out = raw_client(who, &luod, "silent").output().expect("run luo-raw-client");
        let (reply, ms, then) = raw_client_output(&out, who);
        match reply {
            Response::Error(e) => assert_eq!(
                (e.kind, e.message.as_str()),
                (
                    ErrorKind::Protocol,
                    "nothing received within 1 s of connecting; a client says hello first"
                ),
                "{who:?}"
            ),
            other => panic!("{who:?}: expected a protocol error, got {other:?}"),
        }
        assert!((900..4000).contains(&ms), "{who:?}: closed after {ms} ms");
        assert_eq!(then, "closed", "{who:?}");
        assert_survived(&mut luod, &before, &format!("the silent connection of {who:?}"));
    }
    full_cycle(&mut luod, &set);
}

/// A connection held open by the test client running as `who`; closed when
/// dropped (its stdin closes and it exits).
struct Held(Child);

impl Held {
    fn open(who: Who, luod: &Luod) -> Held {
        use std::io::BufRead;
        let socket = luod.socket();
        let mut child = attack::command_as(who, &attack::test_client(luod.dir()), &[path(&socket), "--hold"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the test client");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("the client's answer");
        assert_eq!(line, "[]\n", "{who:?} connected and was greeted");
        Held(child)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

#[test]
fn the_per_uid_connection_cap_counts_a_user_namespace_as_its_uid() {
    let (mut luod, set) = shared_luod(&["--max-connections", "8", "--max-connections-per-uid", "2"]);
    let before = root_status_promptly(&mut luod);
    let refusal = format!(
        "luoctl: status: uid {NOBODY} has 2 connections to luod open, the most one user may have \
         (--max-connections-per-uid); close one and try again\n"
    );
    for ns in BOTH {
        let who = attacker(ns);
        let held = [Held::open(who, &luod), Held::open(who, &luod)];
        // Neither the same attacker nor the other one gets a third.
        for other in BOTH {
            let got = luoctl_as(attacker(other), &luod, &["status"]);
            assert_eq!(
                (got.0, got.1.as_str()),
                (5, refusal.as_str()),
                "{:?} while {who:?} holds 2",
                attacker(other)
            );
        }
        assert_survived(&mut luod, &before, &format!("{who:?} holding its 2 connections"));
        drop(held);
        let back = poll(Duration::from_secs(5), || {
            (luoctl_as(who, &luod, &["status"]).0 == 0).then_some(())
        });
        assert!(back.is_some(), "{who:?} gets in once its connections closed");
        assert_survived(&mut luod, &before, &format!("{who:?} after its connections closed"));
    }

    // The overall cap: root fills it; neither attacker gets in, and root
    // still has its reserve (uid 0 on the host only).
    let full = "luoctl: status: luod serves at most 8 connections at once (--max-connections) and all are in use; \
                try again later\n";
    let roots: Vec<UnixStream> = (0..8).map(|_| greeted(&luod)).collect();
    for ns in BOTH {
        let who = attacker(ns);
        let got = luoctl_as(who, &luod, &["status"]);
        assert_eq!((got.0, got.1.as_str()), (5, full), "{who:?} with the cap used up");
        assert_survived(&mut luod, &before, &format!("{who:?} with the cap used up"));
    }
    drop(roots);
    full_cycle(&mut luod, &set);
}

/// A raw connection of root that said hello (luod has accepted it and
/// counts it).
fn greeted(luod: &Luod) -> UnixStream {
    let sock = UnixStream::connect(luod.socket()).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let hello = Request::Hello {
        version: PROTOCOL_VERSION,
        client: "raw".into(),
    };
    frame::send(&sock, &hello, &[]).expect("send hello");
    match frame::recv::<Response>(&sock).expect("hello answer").0 {
        Response::Hello { .. } => sock,
        other => panic!("hello answered {other:?}"),
    }
}

// ---- item 9 ----------------------------------------------------------------

/// `fd` opened again through `/proc/self/fd` with `flags`.
fn reopen(fd: BorrowedFd<'_>, flags: nix::fcntl::OFlag) -> OwnedFd {
    let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    nix::fcntl::open(
        &path,
        flags | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .expect("reopen")
}

#[test]
fn each_quota_and_a_memfd_not_open_read_write_are_refused_alike() {
    use nix::fcntl::OFlag;
    let (mut luod, set) = shared_luod(&[
        "--max-sessions-per-uid",
        "2",
        "--max-files-per-uid",
        "3",
        "--max-bytes-per-uid",
        "10000",
    ]);
    let empty = luod.dir().join("empty");
    std::fs::write(&empty, b"").expect("write an empty file");
    std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o644)).expect("chmod 0644");
    let create = |name: &str| Request::SessionCreate { name: name.into() };
    let preserve = |name: &str, token| Request::SessionPreserve {
        name: name.into(),
        token,
    };
    let finish = |name: &str| Request::SessionFinish { name: name.into() };
    let ram = memfd_with("ram", &pattern(3, 8192));

    for ns in BOTH {
        let who = attacker(ns);
        let start = root_status_promptly(&mut luod);
        let replies = client_as(
            who,
            &luod,
            None,
            &[
                create("a"),
                create("b"),
                create("c"),
                preserve("a", 1),
                preserve("a", 2),
                preserve("a", 3),
            ],
        );
        assert_done(&replies[..2], who);
        assert_refused_reply(
            &replies[2],
            ErrorKind::QuotaExceeded,
            "quota exceeded: uid 65534 holds 2 session(s), and 1 more would pass its quota of 2 (luod \
             --max-sessions-per-uid)",
            who,
        );
        assert_done(&replies[3..5], who);
        assert_refused_reply(
            &replies[5],
            ErrorKind::QuotaExceeded,
            "quota exceeded: uid 65534 holds 8192 bytes of preserved files, and 4096 more would pass its quota of \
             10000 (luod --max-bytes-per-uid)",
            who,
        );
        // The files quota, through luoctl: exit 19.
        let file = ["session", "preserve", "b", "--token", "1", "--file", path(&empty)];
        assert_eq!(luoctl_as(who, &luod, &file).0, 0, "an empty file fits in the bytes");
        let file = ["session", "preserve", "b", "--token", "2", "--file", path(&empty)];
        let got = luoctl_as(who, &luod, &file);
        assert_eq!(
            (got.0, got.1.as_str()),
            (
                19,
                "luoctl: session preserve b token 2: quota exceeded: uid 65534 holds 3 preserved file(s), and 1 \
                 more would pass its quota of 3 (luod --max-files-per-uid); finish a session you no longer need, or \
                 ask the operator to raise luod --max-files-per-uid\n"
            ),
            "{who:?}"
        );
        let status = root_status_promptly(&mut luod);
        let seen: Vec<(String, u32, Vec<u64>)> = status
            .sessions
            .iter()
            .map(|s| (s.name.clone(), s.owner_uid, s.files.iter().map(|f| f.token).collect()))
            .collect();
        assert_eq!(
            seen,
            [
                ("root-vm".to_string(), 0, vec![1, 2]),
                ("a".to_string(), NOBODY, vec![1, 2]),
                ("b".to_string(), NOBODY, vec![1])
            ],
            "{who:?}: nothing of the refused requests was added"
        );
        assert_eq!(
            (status.state, status.generation),
            (State::Normal, start.generation + 2),
            "{who:?}: only the 5 accepted requests were recorded (2 sessions, each a generation; 3 files, each a \
             journal entry)"
        );
        assert_done(&client_as(who, &luod, None, &[finish("a"), finish("b")]), who);
        let status = root_status_promptly(&mut luod);
        assert_eq!(sessions_seen(&status.sessions), sessions_of(&set), "{who:?}");

        // Only a memfd open read-write is preserved.
        assert_done(&client_as(who, &luod, None, &[create("m")]), who);
        let with_m = root_status_promptly(&mut luod);
        for (flags, mode) in [
            (OFlag::O_PATH, "with O_PATH"),
            (OFlag::O_WRONLY, "write-only"),
            (OFlag::O_RDONLY, "read-only"),
        ] {
            let fd = reopen(ram.as_fd(), flags);
            let replies = client_as(who, &luod, Some(fd.as_fd()), &[preserve("m", 1)]);
            assert_refused_reply(
                &replies[0],
                ErrorKind::InvalidArgument,
                &format!(
                    "cannot preserve /memfd:luod:ram (deleted): it is open {mode}; only a memfd open read-write \
                     (O_RDWR) can be preserved"
                ),
                who,
            );
            assert_survived(&mut luod, &with_m, &format!("{who:?} preserving a memfd open {mode}"));
        }
        let fd = reopen(ram.as_fd(), OFlag::O_RDWR);
        let replies = client_as(who, &luod, Some(fd.as_fd()), &[preserve("m", 1), finish("m")]);
        assert_done(&replies, who);
        let status = root_status_promptly(&mut luod);
        assert_eq!(sessions_seen(&status.sessions), sessions_of(&set), "{who:?}");
    }
    full_cycle(&mut luod, &set);
}

// ---- item 10 ---------------------------------------------------------------

#[test]
fn bytes_after_a_message_are_a_protocol_error() {
    let (mut luod, set) = shared_luod(&[]);
    let before = root_status_promptly(&mut luod);
    for ns in BOTH {
        let who = attacker(ns);
        for mode in ["trailing-hello", "trailing-status"] {
            let out = run_promptly(
                raw_client(who, &luod, mode),
                &format!("luo-raw-client {mode} as {who:?}"),
            );
            let (reply, _, then) = raw_client_output(&out, who);
            match reply {
                Response::Error(e) => assert_eq!(
                    (e.kind, e.message.as_str()),
                    (
                        ErrorKind::Protocol,
                        "malformed frame: 3 bytes follow the message; closing the connection"
                    ),
                    "{mode} as {who:?}"
                ),
                other => panic!("{mode} as {who:?}: expected a protocol error, got {other:?}"),
            }
            assert!(then == "closed" || then == "reset", "{mode} as {who:?}: then {then}");
            assert_survived(&mut luod, &before, &format!("{mode} as {who:?}"));
        }
    }
    full_cycle(&mut luod, &set);
}

// ---- the attackers ---------------------------------------------------------

/// `(uid, CapEff, user namespace)` of a process run as `who`, as it sees itself.
fn identity(who: Who) -> (String, u64, String) {
    let cmd = attack::command_as(
        who,
        Path::new("sh"),
        &["-c", "cat /proc/self/status && readlink /proc/self/ns/user"],
    );
    let out = run_promptly(cmd, &format!("sh as {who:?}"));
    assert!(out.status.success(), "{who:?}: {}", attack::stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {text}"))
            .trim()
            .to_string()
    };
    let cap_eff = u64::from_str_radix(&field("CapEff:"), 16).expect("CapEff");
    let ns = text.lines().last().expect("the namespace").to_string();
    (field("Uid:"), cap_eff, ns)
}

#[test]
fn the_attacker_in_its_own_user_namespace_is_root_there_with_every_capability() {
    let ours = std::fs::read_link("/proc/self/ns/user")
        .expect("our user namespace")
        .display()
        .to_string();
    let (uid, cap_eff, ns) = identity(attacker(false));
    assert_eq!(
        (uid.as_str(), cap_eff, ns.as_str()),
        ("65534\t65534\t65534\t65534", 0, ours.as_str())
    );
    let (uid, cap_eff, ns) = identity(attacker(true));
    assert_eq!(uid, "0\t0\t0\t0", "root inside");
    const CAP_SYS_BOOT: u32 = 22;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_DAC_OVERRIDE: u32 = 1;
    for cap in [CAP_SYS_BOOT, CAP_SYS_ADMIN, CAP_DAC_OVERRIDE] {
        assert_ne!(cap_eff & (1 << cap), 0, "capability {cap} in CapEff {cap_eff:#x}");
    }
    assert_ne!(ns, ours, "a user namespace of its own");
}
