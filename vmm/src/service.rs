//! `serve`: luo-test-vmm as a luod-aware VMM. The guest runs on its vCPU
//! thread while the main thread answers luod's calls (see the "For VMM
//! developers" section of the project README): `prepare` (or a veto),
//! `freeze` (pause the vCPU, hand over the state blob), `unfreeze` and
//! `cancel` (resume). A monitor thread prints heartbeats and the first
//! guest progress after each resume, so a harness can follow the guest.
//!
//! The call handling ([`serve_loop`]) is written against two small traits,
//! [`Calls`] (luod's side) and [`Guest`] (the VM), so that it is tested
//! without luod and without `/dev/kvm`.

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use liveupdate::protocol::client::VmConnection;
use liveupdate::protocol::{VmAnswer, VmCall};
use luo_test_vmm::{Pauser, RunningVm, Stamp, Vm, hex, realtime_ns, state, tsc};

/// The token under which the guest RAM memfd is registered with luod.
pub const RAM_TOKEN: u64 = 1;

/// `CLOCK_MONOTONIC` now, in nanoseconds (since this kernel booted).
pub fn mono_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// The clocks a harness can line up with: monotonic, TSC, realtime.
pub fn clocks() -> String {
    format!("mono_ns={} tsc={} realtime_ns={}", mono_ns(), tsc(), realtime_ns())
}

/// A call at which `--hang-at` / `--exit-at` act.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum At {
    /// `VmCall::Prepare`.
    Prepare,
    /// `VmCall::Freeze`.
    Freeze,
}

impl At {
    fn is(self, call: VmCall) -> bool {
        matches!(
            (self, call),
            (At::Prepare, VmCall::Prepare) | (At::Freeze, VmCall::Freeze)
        )
    }
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            At::Prepare => "prepare",
            At::Freeze => "freeze",
        })
    }
}

/// How the VMM behaves toward luod (the knobs of `serve`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Behaviour {
    /// Answer `prepare` with this veto.
    pub veto: Option<String>,
    /// Never answer this call (nor any later one); the guest keeps running.
    pub hang_at: Option<At>,
    /// Exit the process at this call, without answering.
    pub exit_at: Option<At>,
}

/// luod's side of the conversation.
pub trait Calls {
    /// The next call; `None` when luod closed the connection.
    fn next_call(&mut self) -> Result<Option<VmCall>, String>;
    /// Answers the call just received.
    fn answer(&mut self, answer: VmAnswer) -> Result<(), String>;
}

impl Calls for VmConnection {
    fn next_call(&mut self) -> Result<Option<VmCall>, String> {
        VmConnection::next_call(self).map_err(|e| e.to_string())
    }
    fn answer(&mut self, answer: VmAnswer) -> Result<(), String> {
        VmConnection::answer(self, answer).map_err(|e| e.to_string())
    }
}

/// What a pause produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paused {
    /// The state blob for luod.
    pub state: Vec<u8>,
    /// One line describing the pause (counter, timings), without `VMM: `.
    pub report: String,
}

/// The VM as the call handling sees it.
pub trait Guest {
    /// Pauses the vCPU and serializes the VM state.
    fn pause(&mut self) -> Result<Paused, String>;
    /// Resumes the vCPU; returns one line describing the resume.
    fn resume(&mut self) -> Result<String, String>;
    /// Whether the vCPU is paused.
    fn is_paused(&self) -> bool;
    /// The guest counter (at the last progress exit while it runs).
    fn counter(&self) -> u64;
}

/// Why [`serve_loop`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// luod closed the connection (it exited, kexec'd, or gave up on this VMM).
    Closed,
    /// `--exit-at` asked to exit now, without answering.
    Exit(At),
}

fn answer_kind(a: &VmAnswer) -> String {
    match a {
        VmAnswer::Ok { state: Some(s) } => format!("ok state_bytes={}", s.len()),
        VmAnswer::Ok { state: None } => "ok".into(),
        VmAnswer::Veto(r) => format!("veto reason={r:?}"),
        VmAnswer::Failed(r) => format!("failed reason={r:?}"),
    }
}

/// Serves luod's calls until luod closes the connection (or `--exit-at`).
/// Every call, answer and action is one `VMM: ` line on `out`.
pub fn serve_loop(
    calls: &mut impl Calls,
    guest: &mut impl Guest,
    b: &Behaviour,
    out: &mut impl Write,
) -> Result<Ended, String> {
    let mut n = 0u64;
    let mut hung: Option<At> = None;
    let w = |out: &mut dyn Write, line: String| {
        let _ = writeln!(out, "VMM: {line}");
    };
    loop {
        let call = match calls.next_call()? {
            Some(c) => c,
            None => return Ok(Ended::Closed),
        };
        n += 1;
        w(
            out,
            format!(
                "call n={n} {} counter={} paused={} {}",
                call.as_str(),
                guest.counter(),
                if guest.is_paused() { "yes" } else { "no" },
                clocks()
            ),
        );
        if let Some(at) = hung {
            w(
                out,
                format!("call n={n} {} not answered (hung since {at})", call.as_str()),
            );
            continue;
        }
        if let Some(at) = b.exit_at.filter(|a| a.is(call)) {
            w(out, format!("exiting at {at} without answering (--exit-at {at})"));
            return Ok(Ended::Exit(at));
        }
        if let Some(at) = b.hang_at.filter(|a| a.is(call)) {
            hung = Some(at);
            w(
                out,
                format!("hanging at {at}: no answer will come (--hang-at {at}); the guest keeps running"),
            );
            continue;
        }
        let answer = match call {
            VmCall::Prepare => match &b.veto {
                Some(reason) => VmAnswer::Veto(reason.clone()),
                None => VmAnswer::Ok { state: None },
            },
            VmCall::Freeze => match guest.pause() {
                Ok(p) => {
                    w(out, format!("paused n={n} {}", p.report));
                    VmAnswer::Ok { state: Some(p.state) }
                }
                Err(e) => VmAnswer::Failed(format!("pausing the vCPU: {e}")),
            },
            VmCall::Unfreeze | VmCall::Cancel if guest.is_paused() => match guest.resume() {
                Ok(line) => {
                    w(out, format!("resumed n={n} after {} {line}", call.as_str()));
                    VmAnswer::Ok { state: None }
                }
                Err(e) => VmAnswer::Failed(format!("resuming the vCPU: {e}")),
            },
            VmCall::Unfreeze | VmCall::Cancel => VmAnswer::Ok { state: None },
        };
        let kind = answer_kind(&answer);
        calls.answer(answer)?;
        w(out, format!("answered n={n} {} {kind} {}", call.as_str(), clocks()));
    }
}

// ---- the real guest ---------------------------------------------------------

/// What the monitor thread watches (shared with [`KvmGuest`]).
#[derive(Debug, Default)]
pub struct Monitor {
    paused: AtomicBool,
    pauses: AtomicU32,
    stop: AtomicBool,
    /// After a resume: the last progress before the pause, until the first
    /// progress after the resume is reported.
    resumed_from: Mutex<Option<Stamp>>,
}

/// The KVM guest on its vCPU thread, paused and resumed in this process.
#[derive(Debug)]
pub struct KvmGuest {
    running: Option<RunningVm>,
    paused: Option<Vm>,
    pauser: Pauser,
    ram_checksum: bool,
    monitor: Arc<Monitor>,
}

impl KvmGuest {
    /// Starts `vm` on its vCPU thread. With `ram_checksum`, each pause puts
    /// the SHA-256 of all RAM in the state (one pass over RAM, in the blackout).
    pub fn start(vm: Vm, ram_checksum: bool) -> KvmGuest {
        let pauser = vm.pauser();
        KvmGuest {
            running: Some(vm.spawn()),
            paused: None,
            pauser,
            ram_checksum,
            monitor: Arc::default(),
        }
    }

    /// The monitor state, for [`spawn_monitor`].
    pub fn monitor(&self) -> Arc<Monitor> {
        self.monitor.clone()
    }

    /// Pauses the vCPU if it runs and gives the VM back (at the end).
    pub fn stop(mut self) -> Option<Vm> {
        if let Some(r) = self.running.take() {
            let (vm, _) = r.pause_keep();
            return Some(vm);
        }
        self.paused.take()
    }

    /// A handle to the vCPU's progress.
    pub fn pauser(&self) -> &Pauser {
        &self.pauser
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

impl Guest for KvmGuest {
    fn pause(&mut self) -> Result<Paused, String> {
        let Some(running) = self.running.take() else {
            let vm = self.paused.as_ref().ok_or("the VM is gone")?;
            let blob = vm.save_state(self.ram_checksum).map_err(|e| e.to_string())?;
            return Ok(Paused {
                state: blob,
                report: format!("counter={} (was paused already)", vm.counter()),
            });
        };
        let t = Instant::now();
        let (vm, run) = running.pause_keep();
        let latency = t.elapsed();
        let paused_clocks = clocks();
        self.monitor.paused.store(true, Ordering::SeqCst);
        self.monitor.pauses.fetch_add(1, Ordering::SeqCst);
        let run = match run {
            Ok(r) => r,
            Err(e) => {
                self.paused = Some(vm);
                return Err(format!("the vCPU stopped with an error: {e}"));
            }
        };
        let t = Instant::now();
        let blob = vm.save_state(self.ram_checksum);
        let save = t.elapsed();
        let blob = match blob {
            Ok(b) => b,
            Err(e) => {
                self.paused = Some(vm);
                return Err(e.to_string());
            }
        };
        let st = state::decode(&blob).map_err(|e| e.to_string())?;
        let last = run.last_progress.or(run.previous_progress);
        let report = format!(
            "counter={} last_progress_counter={} last_progress_tsc={} last_progress_realtime_ns={} ram_sha256={} \
             state_bytes={} pause_latency_ms={} save_ms={} {paused_clocks}",
            st.counter,
            last.map_or("none".into(), |s| s.counter.to_string()),
            last.map_or("none".into(), |s| s.tsc.to_string()),
            last.map_or("none".into(), |s| s.realtime_ns.to_string()),
            st.ram_sha256.map_or("none".into(), |d| hex(&d)),
            blob.len(),
            ms(latency),
            ms(save),
        );
        self.paused = Some(vm);
        Ok(Paused { state: blob, report })
    }

    fn resume(&mut self) -> Result<String, String> {
        let vm = self.paused.take().ok_or("the VM is not paused")?;
        let counter = vm.counter();
        let from = vm.last_progress();
        self.monitor.paused.store(false, Ordering::SeqCst);
        // `spawn` clears the previous run's first progress before the vCPU
        // runs; only then may the monitor look for the first progress after
        // this resume (set before, it could report the last run's first one).
        self.running = Some(vm.spawn());
        *self.monitor.resumed_from.lock().unwrap_or_else(|e| e.into_inner()) = from;
        Ok(format!("counter={counter} {}", clocks()))
    }

    fn is_paused(&self) -> bool {
        self.running.is_none()
    }

    fn counter(&self) -> u64 {
        match (&self.running, &self.paused) {
            (None, Some(vm)) => vm.counter(),
            _ => self.pauser.progress().last.map_or(0, |s| s.counter),
        }
    }
}

/// Starts the monitor thread: a `VMM: heartbeat` line every `every` (none
/// if zero) and a `VMM: first-progress` line (with the in-process blackout)
/// as soon as the guest progresses after a resume. Stop it with [`stop_monitor`].
pub fn spawn_monitor(name: String, pauser: Pauser, m: Arc<Monitor>, every: Duration) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("monitor".into())
        .spawn(move || {
            let mut next = Instant::now() + every;
            while !m.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
                let p = pauser.progress();
                let resumed = *m.resumed_from.lock().unwrap_or_else(|e| e.into_inner());
                if let (Some(from), Some(first)) = (resumed, p.first_this_run) {
                    // A harness reads this line to see the guest run again.
                    println!(
                        "VMM: first-progress after resume counter={} blackout_ms={} {}",
                        first.counter,
                        ms(Duration::from_nanos(first.realtime_ns.saturating_sub(from.realtime_ns))),
                        clocks()
                    );
                    *m.resumed_from.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                if !every.is_zero() && Instant::now() >= next {
                    next += every;
                    println!(
                        "VMM: heartbeat name={name} counter={} progress_exits={} state={} pauses={} {}",
                        p.last.map_or(0, |s| s.counter),
                        p.exits,
                        if m.paused.load(Ordering::SeqCst) {
                            "paused"
                        } else {
                            "running"
                        },
                        m.pauses.load(Ordering::SeqCst),
                        clocks()
                    );
                }
            }
        })
        .expect("spawning the monitor thread")
}

/// Stops the monitor thread.
pub fn stop_monitor(m: &Monitor, h: JoinHandle<()>) {
    m.stop.store(true, Ordering::SeqCst);
    let _ = h.join();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// luod as a script of calls; records the answers.
    #[derive(Default)]
    struct Script {
        calls: VecDeque<VmCall>,
        answers: Vec<(VmCall, VmAnswer)>,
        last: Option<VmCall>,
    }

    impl Script {
        fn new(calls: &[VmCall]) -> Self {
            Script {
                calls: calls.iter().copied().collect(),
                ..Default::default()
            }
        }
    }

    impl Calls for Script {
        fn next_call(&mut self) -> Result<Option<VmCall>, String> {
            self.last = self.calls.pop_front();
            Ok(self.last)
        }
        fn answer(&mut self, answer: VmAnswer) -> Result<(), String> {
            self.answers
                .push((self.last.expect("an answer follows a call"), answer));
            Ok(())
        }
    }

    /// A guest that only counts pauses and resumes.
    #[derive(Default)]
    struct FakeGuest {
        paused: bool,
        pauses: u32,
        resumes: u32,
        fail_pause: bool,
    }

    impl Guest for FakeGuest {
        fn pause(&mut self) -> Result<Paused, String> {
            if self.fail_pause {
                return Err("vCPU error".into());
            }
            self.paused = true;
            self.pauses += 1;
            Ok(Paused {
                state: vec![self.pauses as u8; 3],
                report: "fake".into(),
            })
        }
        fn resume(&mut self) -> Result<String, String> {
            self.paused = false;
            self.resumes += 1;
            Ok("fake".into())
        }
        fn is_paused(&self) -> bool {
            self.paused
        }
        fn counter(&self) -> u64 {
            42
        }
    }

    fn run(calls: &[VmCall], b: &Behaviour, g: &mut FakeGuest) -> (Ended, Vec<(VmCall, VmAnswer)>, String) {
        let mut s = Script::new(calls);
        let mut out = Vec::new();
        let ended = serve_loop(&mut s, g, b, &mut out).expect("serve");
        (ended, s.answers, String::from_utf8(out).expect("utf-8"))
    }

    const OK: VmAnswer = VmAnswer::Ok { state: None };

    #[test]
    fn a_full_cycle_pauses_at_freeze_and_hands_the_state_over() {
        let mut g = FakeGuest::default();
        let (ended, answers, out) = run(&[VmCall::Prepare, VmCall::Freeze], &Behaviour::default(), &mut g);
        assert_eq!(ended, Ended::Closed);
        assert_eq!(
            answers,
            [
                (VmCall::Prepare, OK),
                (
                    VmCall::Freeze,
                    VmAnswer::Ok {
                        state: Some(vec![1, 1, 1])
                    }
                )
            ]
        );
        assert!(g.paused);
        assert!(
            out.contains("VMM: call n=1 prepare counter=42 paused=no mono_ns="),
            "{out}"
        );
        assert!(out.contains("VMM: paused n=2 fake"), "{out}");
        assert!(out.contains("VMM: answered n=2 freeze ok state_bytes=3"), "{out}");
    }

    #[test]
    fn unfreeze_and_cancel_resume_a_paused_guest_only() {
        let mut g = FakeGuest::default();
        let calls = [
            VmCall::Prepare,
            VmCall::Freeze,
            VmCall::Unfreeze,
            VmCall::Cancel,
            VmCall::Prepare,
            VmCall::Freeze,
            VmCall::Cancel,
        ];
        let (_, answers, out) = run(&calls, &Behaviour::default(), &mut g);
        assert_eq!(answers.len(), calls.len(), "every call answered");
        assert_eq!((g.pauses, g.resumes, g.paused), (2, 2, false));
        assert!(out.contains("VMM: resumed n=3 after unfreeze fake"), "{out}");
        assert!(out.contains("VMM: resumed n=7 after cancel fake"), "{out}");
        assert!(
            !out.contains("resumed n=4"),
            "cancel of a running guest does nothing: {out}"
        );
    }

    #[test]
    fn a_veto_answers_prepare_and_never_pauses() {
        let mut g = FakeGuest::default();
        let b = Behaviour {
            veto: Some("guest is migrating".into()),
            ..Default::default()
        };
        let (_, answers, out) = run(&[VmCall::Prepare, VmCall::Prepare], &b, &mut g);
        assert_eq!(
            answers[0],
            (VmCall::Prepare, VmAnswer::Veto("guest is migrating".into()))
        );
        assert_eq!(answers.len(), 2, "vetoes every prepare");
        assert_eq!(g.pauses, 0);
        assert!(
            out.contains("answered n=1 prepare veto reason=\"guest is migrating\""),
            "{out}"
        );
    }

    #[test]
    fn hang_at_freeze_never_answers_again_and_keeps_the_guest_running() {
        let mut g = FakeGuest::default();
        let b = Behaviour {
            hang_at: Some(At::Freeze),
            ..Default::default()
        };
        let (ended, answers, out) = run(&[VmCall::Prepare, VmCall::Freeze, VmCall::Unfreeze], &b, &mut g);
        assert_eq!(ended, Ended::Closed);
        assert_eq!(answers, [(VmCall::Prepare, OK)]);
        assert!(!g.paused && g.pauses == 0);
        assert!(out.contains("hanging at freeze"), "{out}");
        assert!(
            out.contains("call n=3 unfreeze not answered (hung since freeze)"),
            "{out}"
        );
    }

    #[test]
    fn hang_at_prepare_answers_nothing() {
        let mut g = FakeGuest::default();
        let b = Behaviour {
            hang_at: Some(At::Prepare),
            ..Default::default()
        };
        let (_, answers, _) = run(&[VmCall::Prepare, VmCall::Prepare], &b, &mut g);
        assert!(answers.is_empty());
    }

    #[test]
    fn exit_at_freeze_returns_before_answering() {
        let mut g = FakeGuest::default();
        let b = Behaviour {
            exit_at: Some(At::Freeze),
            ..Default::default()
        };
        let (ended, answers, out) = run(&[VmCall::Prepare, VmCall::Freeze, VmCall::Unfreeze], &b, &mut g);
        assert_eq!(ended, Ended::Exit(At::Freeze));
        assert_eq!(answers, [(VmCall::Prepare, OK)]);
        assert!(out.contains("exiting at freeze without answering"), "{out}");
    }

    #[test]
    fn a_failed_pause_is_answered_as_failed() {
        let mut g = FakeGuest {
            fail_pause: true,
            ..Default::default()
        };
        let (_, answers, _) = run(&[VmCall::Freeze], &Behaviour::default(), &mut g);
        assert_eq!(
            answers,
            [(VmCall::Freeze, VmAnswer::Failed("pausing the vCPU: vCPU error".into()))]
        );
    }

    #[test]
    fn clocks_are_printed_as_numbers() {
        let c = clocks();
        for key in ["mono_ns=", "tsc=", "realtime_ns="] {
            let v = c.split(key).nth(1).and_then(|r| r.split(' ').next()).expect(key);
            assert!(v.parse::<u64>().is_ok_and(|n| n > 0), "{c}");
        }
        assert!(mono_ns() <= mono_ns());
    }
}
