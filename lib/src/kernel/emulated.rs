//! LUO emulated in userspace, for kernels without it.
//!
//! luod itself holds the files it preserves, exactly as the kernel would hold
//! them after `PRESERVE_FD`, and the engine copies their contents into its
//! region at the handover ([`Handoff::Copy`]). After the kexec (real or
//! simulated) the engine recreates memfds from the region and hands them back
//! here with [`Kernel::adopt_incoming`].
//!
//! A preserved file must survive a crash of luod before the reboot, so every
//! file is also parked in an [`FdPark`] (the holder process) when one is set;
//! a luod started again takes them back with [`Emulated::recover`].

use super::{Handoff, Kernel, KernelError, KernelLoad, RebootOutcome, kexec, memfd};
use crate::holder::{FdPark, SharedFd};
use crate::names::SessionName;
use crate::record::{PreservedSource, SealedMapping};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

#[derive(Debug)]
struct File {
    /// The file, shared with the park (which keeps it open too): luod holds
    /// each preserved file open once.
    fd: Option<SharedFd>,
    identity: (u64, u64),
    /// A memfd sealed against shrinking, of at least [`MAP_MIN`] bytes, is
    /// mapped when it is preserved: the handover copies it at memory speed
    /// instead of with `pread` (see `record/mapped.rs`).
    map: Option<SealedMapping>,
}

impl File {
    fn new(fd: SharedFd, identity: (u64, u64)) -> File {
        let map = SealedMapping::of(fd.as_fd());
        File {
            fd: Some(fd),
            identity,
            map,
        }
    }
}

/// What `reboot` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KexecMode {
    /// Nothing: luod exits and a luod started again plays the new kernel's
    /// (file backend). Target kernels are checked but not loaded.
    Simulated,
    /// `kexec_file_load` at prepare, `reboot(LINUX_REBOOT_CMD_KEXEC)` at
    /// reboot (reserved-memory backend).
    Real,
}

/// The userspace emulation of LUO.
#[derive(Debug)]
pub struct Emulated {
    name: &'static str,
    mode: KexecMode,
    sessions: BTreeMap<SessionName, BTreeMap<u64, File>>,
    /// Where each file identity was preserved (entries are checked against
    /// `sessions` when looked up, so one left behind by a file taken back
    /// finds nothing), so `preserve_fd` finds a file preserved twice without
    /// a scan of every file.
    by_identity: std::collections::HashMap<(u64, u64), Vec<(SessionName, u64)>>,
    loaded: bool,
    park: Option<Box<dyn FdPark>>,
    /// After a simulated kexec: luod's own descriptors of the files the
    /// kexec dropped, closed when luod exits right after its answer (see
    /// [`Kernel::reboot`] below).
    dropped_at_exit: Vec<BTreeMap<u64, File>>,
}

/// Key of a parked file: token and session name (names cannot hold NUL).
fn park_key(session: &SessionName, token: u64) -> String {
    format!("{token}\0{session}")
}

impl Emulated {
    /// An emulation reporting itself as backend `name`.
    pub fn new(name: &'static str, mode: KexecMode, park: Option<Box<dyn FdPark>>) -> Self {
        Emulated {
            name,
            mode,
            sessions: BTreeMap::new(),
            by_identity: std::collections::HashMap::new(),
            loaded: false,
            park,
            dropped_at_exit: Vec::new(),
        }
    }

    /// Takes back the files parked by a previous luod of this kernel. Returns
    /// what was recovered as (session, token) pairs; files under keys that do
    /// not parse are closed.
    fn recover_parked(&mut self) -> Result<Vec<(SessionName, u64)>, KernelError> {
        let Some(park) = self.park.as_mut() else {
            return Ok(Vec::new());
        };
        let parked = park.fetch_all_shared().map_err(|e| KernelError::Park {
            what: "cannot take back the parked files".into(),
            reason: e.to_string(),
        })?;
        let mut out = Vec::new();
        for (key, fd) in parked {
            let Some((token, name)) = key.split_once('\0') else {
                continue;
            };
            let (Ok(token), Ok(name)) = (token.parse::<u64>(), SessionName::new(name)) else {
                continue;
            };
            let identity = memfd::identity(fd.as_fd()).unwrap_or_default();
            self.by_identity
                .entry(identity)
                .or_default()
                .push((name.clone(), token));
            self.sessions
                .entry(name.clone())
                .or_default()
                .insert(token, File::new(fd, identity));
            out.push((name, token));
        }
        Ok(out)
    }

    /// Forgets every file, as a kexec does (the holder drops its copies too).
    fn forget_all(&mut self) -> Result<(), KernelError> {
        self.sessions.clear();
        self.by_identity.clear();
        if let Some(park) = self.park.as_mut() {
            park.clear().map_err(|e| KernelError::Park {
                what: "cannot drop the parked files".into(),
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }

    fn park(&mut self, session: &SessionName, token: u64, fd: &SharedFd) -> Result<(), KernelError> {
        if let Some(park) = self.park.as_mut() {
            park.put_shared(&park_key(session, token), fd)
                .map_err(|e| KernelError::Park {
                    what: format!("cannot park session {session} token {token}"),
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// The session and token holding the file of `identity`, if one does.
    fn holder_of(&mut self, identity: (u64, u64)) -> Option<(SessionName, u64)> {
        let sessions = &self.sessions;
        let held = |(name, token): &(SessionName, u64)| {
            sessions
                .get(name)
                .and_then(|files| files.get(token))
                .is_some_and(|f| f.fd.is_some() && f.identity == identity)
        };
        let entries = self.by_identity.get_mut(&identity)?;
        entries.retain(held);
        let found = entries.first().cloned();
        if entries.is_empty() {
            self.by_identity.remove(&identity);
        }
        found
    }

    fn unpark(&mut self, session: &SessionName, token: u64) {
        if let Some(park) = self.park.as_mut()
            && let Err(e) = park.remove(&park_key(session, token))
        {
            tracing::warn!("fd holder did not drop {session}/{token}: {e}");
        }
    }
}

fn errno_of(e: &std::io::Error) -> nix::errno::Errno {
    nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

impl Kernel for Emulated {
    fn name(&self) -> &'static str {
        self.name
    }

    fn handoff(&self) -> Handoff {
        Handoff::Copy
    }

    fn simulates_kexec(&self) -> bool {
        self.mode == KexecMode::Simulated
    }

    fn create_session(&mut self, name: &SessionName) -> Result<(), KernelError> {
        if self.sessions.contains_key(name) {
            return Err(KernelError::SessionExists(name.to_string()));
        }
        self.sessions.insert(name.clone(), BTreeMap::new());
        Ok(())
    }

    fn retrieve_session(&mut self, name: &SessionName) -> Result<(), KernelError> {
        self.sessions.entry(name.clone()).or_default();
        Ok(())
    }

    fn preserve_fd(&mut self, session: &SessionName, token: u64, fd: OwnedFd) -> Result<(), KernelError> {
        let files = self
            .sessions
            .get(session)
            .ok_or_else(|| KernelError::NoSuchSession(session.to_string()))?;
        // A token whose file was taken back (a parked file the record never
        // acknowledged, dropped at start) is free again: the engine, which
        // keeps the tokens a session had, refused a taken one already.
        if files.get(&token).is_some_and(|f| f.fd.is_some()) {
            return Err(KernelError::TokenExists {
                session: session.to_string(),
                token,
            });
        }
        if !memfd::is_memfd(fd.as_fd()) {
            return Err(KernelError::Unsupported {
                what: memfd::describe(fd.as_fd()),
            });
        }
        let identity = memfd::identity(fd.as_fd()).map_err(|e| KernelError::Sys {
            op: "fstat".into(),
            errno: errno_of(&e),
        })?;
        if let Some((name, t)) = self.holder_of(identity) {
            return Err(KernelError::AlreadyPreserved {
                session: name.to_string(),
                token: t,
            });
        }
        let fd = Arc::new(fd);
        self.park(session, token, &fd)?;
        self.by_identity
            .entry(identity)
            .or_default()
            .push((session.clone(), token));
        self.sessions
            .get_mut(session)
            .expect("checked above")
            .insert(token, File::new(fd, identity));
        Ok(())
    }

    fn retrieve_fd(&mut self, session: &SessionName, token: u64) -> Result<OwnedFd, KernelError> {
        let files = self
            .sessions
            .get_mut(session)
            .ok_or_else(|| KernelError::NoSuchSession(session.to_string()))?;
        let file = files.get_mut(&token).ok_or_else(|| KernelError::NoSuchToken {
            session: session.to_string(),
            token,
        })?;
        let fd = file.fd.take().ok_or_else(|| KernelError::AlreadyRetrieved {
            session: session.to_string(),
            token,
        })?;
        file.map = None;
        let identity = file.identity;
        self.holder_of(identity);
        self.unpark(session, token);
        // The park let go of its share; one still held elsewhere (a new
        // holder being filled at this moment) leaves a duplicate to hand out.
        Arc::try_unwrap(fd).or_else(|shared| {
            shared.try_clone().map_err(|e| KernelError::Sys {
                op: "dup".into(),
                errno: errno_of(&e),
            })
        })
    }

    fn finish_session(&mut self, session: &SessionName) -> Result<(), KernelError> {
        let files = self
            .sessions
            .remove(session)
            .ok_or_else(|| KernelError::NoSuchSession(session.to_string()))?;
        for (token, f) in &files {
            self.unpark(session, *token);
            self.holder_of(f.identity);
        }
        Ok(())
    }

    fn preserved(&self) -> Vec<(&SessionName, u64, BorrowedFd<'_>)> {
        let mut out = Vec::new();
        for (name, files) in &self.sessions {
            for (token, f) in files {
                if let Some(fd) = &f.fd {
                    out.push((name, *token, fd.as_fd()));
                }
            }
        }
        out
    }

    fn descriptors_per_file(&self) -> u64 {
        // Shared with the park (`FdPark::put_shared`).
        1
    }

    fn preserved_sources(&self) -> Vec<(&SessionName, u64, PreservedSource<'_>)> {
        let mut out = Vec::new();
        for (name, files) in &self.sessions {
            for (token, f) in files {
                if let Some(fd) = &f.fd {
                    let source = PreservedSource {
                        fd: fd.as_fd(),
                        map: f.map.as_ref(),
                    };
                    out.push((name, *token, source));
                }
            }
        }
        out
    }

    fn adopt_incoming(&mut self, session: &SessionName, token: u64, fd: OwnedFd) -> Result<(), KernelError> {
        let fd = Arc::new(fd);
        self.park(session, token, &fd)?;
        let identity = memfd::identity(fd.as_fd()).unwrap_or_default();
        self.by_identity
            .entry(identity)
            .or_default()
            .push((session.clone(), token));
        self.sessions
            .entry(session.clone())
            .or_default()
            .insert(token, File::new(fd, identity));
        Ok(())
    }

    fn recover(&mut self) -> Result<Vec<(SessionName, u64)>, KernelError> {
        self.recover_parked()
    }

    fn discard_all(&mut self) -> Result<(), KernelError> {
        self.forget_all()
    }

    fn check_image(&self, name: &str, image: BorrowedFd<'_>) -> Result<(), KernelError> {
        kexec::check_image(name, image)
    }

    fn kexec_loaded(&self) -> bool {
        match self.mode {
            KexecMode::Simulated => self.loaded,
            KexecMode::Real => kexec::loaded(),
        }
    }

    fn load_kernel(&mut self, load: &KernelLoad<'_>) -> Result<(), KernelError> {
        kexec::check_image(load.kernel_name, load.kernel)?;
        if self.mode == KexecMode::Real {
            kexec::load(load)?;
        }
        self.loaded = true;
        Ok(())
    }

    fn unload_kernel(&mut self) -> Result<(), KernelError> {
        if self.mode == KexecMode::Real && self.loaded {
            kexec::unload()?;
        }
        self.loaded = false;
        Ok(())
    }

    fn park_notes(&self) -> Vec<String> {
        self.park.as_ref().map(|p| p.notes()).unwrap_or_default()
    }

    fn park_notes_cell(&self) -> Option<crate::holder::ParkNotes> {
        self.park.as_ref().and_then(|p| p.notes_cell())
    }

    fn reboot(&mut self) -> Result<RebootOutcome, KernelError> {
        match self.mode {
            KexecMode::Simulated => {
                // The kexec drops every file: the holder lets go of its
                // duplicates now, so the next luod finds none. luod's own
                // descriptors are closed when it exits, right after its
                // answer: a real kexec tears nothing down, and closing the
                // last descriptor of each of thousands of memfds (freeing
                // its pages) would put a cost in the answer's time that
                // only the simulation has.
                let sessions = std::mem::take(&mut self.sessions);
                let cleared = self.forget_all();
                self.dropped_at_exit.extend(sessions.into_values());
                cleared?;
                Ok(RebootOutcome::Simulated)
            }
            KexecMode::Real => {
                tracing::info!("reboot: direct kexec, skipping the orderly shutdown ({REAL_KEXEC_WHY})");
                Err(kexec::reboot_into_loaded())
            }
        }
    }

    fn reboot_path(&self) -> Option<crate::systemd::RebootPath> {
        match self.mode {
            KexecMode::Simulated => None,
            KexecMode::Real => Some(crate::systemd::RebootPath::Direct {
                why: REAL_KEXEC_WHY.into(),
            }),
        }
    }
}

/// Why a copying backend with a real kexec never takes the systemd path.
const REAL_KEXEC_WHY: &str = "the reserved-memory backend keeps its copies in reserved memory, not in a LUO session \
                              systemd could carry";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineError;
    use crate::protocol::ErrorKind;

    /// A park whose holder is gone for good.
    #[derive(Debug)]
    struct BrokenPark;

    impl FdPark for BrokenPark {
        fn put_shared(&mut self, _key: &str, _fd: &crate::holder::SharedFd) -> std::io::Result<()> {
            Err(std::io::Error::other("the holder is gone"))
        }
        fn remove(&mut self, _key: &str) -> std::io::Result<()> {
            Ok(())
        }
        fn fetch_all(&mut self) -> std::io::Result<Vec<(String, OwnedFd)>> {
            Err(std::io::Error::other("the holder is gone"))
        }
        fn clear(&mut self) -> std::io::Result<()> {
            Err(std::io::Error::other("the holder is gone"))
        }
    }

    #[test]
    fn a_park_failure_says_what_it_is_and_preserves_nothing() {
        let mut k = Emulated::new("file", KexecMode::Simulated, Some(Box::new(BrokenPark)));
        let name = SessionName::new("vm0").unwrap();
        k.create_session(&name).unwrap();
        let err = k
            .preserve_fd(&name, 3, memfd::from_bytes("t", b"x").unwrap())
            .unwrap_err();
        assert_eq!(err.to_string(), "cannot park session vm0 token 3: the holder is gone");
        assert!(
            k.preserved().is_empty(),
            "nothing preserved that would not survive a crash"
        );
        let engine_err = EngineError::from(err);
        assert_eq!(engine_err.kind(), ErrorKind::Internal);
        assert_eq!(
            engine_err.hint(),
            "nothing was changed; see luod's log (the fd holder's pid is in STATE_DIR/holder.pid), then retry"
        );
        assert_eq!(
            k.recover().unwrap_err().to_string(),
            "cannot take back the parked files: the holder is gone"
        );
        assert_eq!(
            k.reboot().unwrap_err().to_string(),
            "cannot drop the parked files: the holder is gone"
        );
    }
}
