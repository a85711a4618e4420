//! A region that holds something but no readable record.
//!
//! Zeroed headers, a region cut short or opened with another size, garbage:
//! the record cannot be read, but the region is not blank, or the fd park
//! still holds preserved files. Starting afresh would write over whatever is
//! left of the record and drop the parked files, so luod does neither: it
//! keeps the parked files where they are, writes nothing to the region, says
//! so in `status`, and refuses every change ([`EngineError::RecordUnreadable`])
//! until the operator either restores the region (luod started again on the
//! original file or size finds everything) or discards the record
//! ([`Engine::discard_record`], `luoctl discard-record --yes`), a decision the
//! fresh record keeps as an [`Event`].

use super::{Caller, Engine, EngineError, now};
use crate::kernel::Kernel;
use crate::names::SessionName;
use crate::protocol::DiscardReport;
use crate::record::{Event, HandoverRecord, RecordStore, SlotStatus};
use crate::region::Region;

/// What luod found when the record could not be read.
#[derive(Debug, Clone)]
pub(super) struct Unreadable {
    /// What was found, one clause.
    pub finding: String,
    /// The files the park still holds, as (session, token).
    pub parked: Vec<(SessionName, u64)>,
    /// The note `status` shows while it lasts.
    pub note: String,
}

/// The parked files as `a/1, a/2, b/7` (at most 10, then a count).
fn list_parked(parked: &[(SessionName, u64)]) -> String {
    let mut names: Vec<String> = parked.iter().take(10).map(|(s, t)| format!("{s}/{t}")).collect();
    if parked.len() > 10 {
        names.push(format!("and {} more", parked.len() - 10));
    }
    names.join(", ")
}

fn slots(slots: &[SlotStatus; 2]) -> String {
    let one = |s: &SlotStatus| match s {
        SlotStatus::Empty => "empty".to_string(),
        SlotStatus::Valid { generation } => format!("generation {generation}"),
        SlotStatus::Invalid { reason } => reason.clone(),
        SlotStatus::Newer { version } => format!("format version {version}"),
    };
    format!("slot A: {}; slot B: {}", one(&slots[0]), one(&slots[1]))
}

/// Decides, when the region holds no valid record, whether luod may start
/// afresh: only when the region is blank (every byte zero, or a file of
/// zero bytes) and nothing is parked. Otherwise returns what was found,
/// having written nothing. A blank stand-in region (an empty file) is made
/// a real one here.
pub(super) fn inspect<R: Region>(
    kernel: &mut dyn Kernel,
    store: &mut RecordStore<R>,
    slot_status: &[SlotStatus; 2],
) -> Result<Option<Unreadable>, EngineError> {
    let unusable = store.region().unusable();
    let has_data = match &unusable {
        Some(u) => u.has_data,
        None => store.region().bytes().iter().any(|&b| b != 0),
    };
    // The park keeps its own copies: this only learns what it holds.
    let mut parked = kernel.recover()?;
    parked.sort();
    if !has_data && parked.is_empty() {
        if unusable.is_some() {
            store.region_mut().reinitialize().map_err(EngineError::Region)?;
            store.clear()?;
            tracing::info!("started a fresh region in {}", store.region().describe());
        }
        return Ok(None);
    }
    let mut finding = match unusable {
        Some(u) => u.finding,
        None => format!(
            "{} holds data but no readable record ({})",
            store.region().describe(),
            slots(slot_status)
        ),
    };
    if !parked.is_empty() {
        finding.push_str(&format!(
            "; the fd park still holds {} preserved file(s) ({})",
            parked.len(),
            list_parked(&parked)
        ));
    }
    let note = format!(
        "the handover record cannot be read: {finding}. luod keeps the parked files, writes nothing to the region \
         and refuses every change until you either restore the region (stop luod, put the original region file \
         back, with its original size, and start luod again: everything comes back) or discard the record \
         (`luoctl discard-record --yes`: the parked files are dropped and a fresh record starts)"
    );
    tracing::error!("{note}");
    Ok(Some(Unreadable { finding, parked, note }))
}

impl<R: Region> Engine<R> {
    /// Refuses a change while the record is unreadable.
    pub(super) fn require_readable(&self) -> Result<(), EngineError> {
        match &self.unreadable {
            Some(u) => Err(EngineError::RecordUnreadable(u.finding.clone())),
            None => Ok(()),
        }
    }

    /// `discard-record`: gives up an unreadable record (privileged). The
    /// region is made usable (a file too short for a region has its bytes
    /// kept aside in `PATH.truncated` first), both slot headers are cleared,
    /// a fresh record is written with an `record-discarded` event saying what
    /// was given up and by whom, and then the parked files are dropped.
    /// When the record is readable there is nothing to discard.
    pub fn discard_record(&mut self, caller: &Caller) -> Result<DiscardReport, EngineError> {
        Self::require_privileged(caller, "discard-record")?;
        if self.handed_over {
            return Err(EngineError::HandedOver);
        }
        let Some(found) = self.unreadable.clone() else {
            return Err(EngineError::RecordReadable(self.generation));
        };
        self.store.region_mut().reinitialize().map_err(EngineError::Region)?;
        self.store.clear()?;
        let mut next = HandoverRecord::new(self.kernel.name());
        let dropped = if found.parked.is_empty() {
            "no parked file".to_string()
        } else {
            format!(
                "{} parked file(s) dropped ({})",
                found.parked.len(),
                list_parked(&found.parked)
            )
        };
        next.push_event(Event {
            at: now(),
            uid: caller.uid,
            action: "record-discarded".into(),
            subject: self.store.region().describe(),
            detail: format!("an unreadable record was discarded: {}; {dropped}", found.finding),
        });
        let generation = self.commit(next)?;
        self.unreadable = None;
        if let Err(e) = self.kernel.discard_all() {
            let note = format!("discarding the parked files failed: {e}");
            tracing::error!("{note}");
            self.notes.push(note);
        }
        self.notes.retain(|n| *n != found.note);
        let note = format!(
            "uid {} discarded the unreadable record ({dropped}); a fresh record started at generation {generation}",
            caller.uid
        );
        tracing::warn!("{note}");
        self.notes.push(note);
        Ok(DiscardReport {
            finding: found.finding,
            files: found.parked.len() as u64,
            generation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::fake::FakeKernel;
    use crate::region::MemRegion;
    use crate::subsystem::Registry;

    fn open(bytes: Vec<u8>) -> Engine<MemRegion> {
        let (kernel, _) = FakeKernel::new();
        let store = RecordStore::new(MemRegion(bytes)).unwrap();
        let host = super::super::HostInfo {
            boot_id: "boot".into(),
            kernel_release: "7.0".into(),
            cmdline: String::new(),
            started: 0,
        };
        Engine::open(Box::new(kernel), Registry::new(), store, host).unwrap()
    }

    #[test]
    fn a_blank_region_starts_fresh_without_a_note() {
        let e = open(vec![0; 64 << 10]);
        assert!(e.unreadable.is_none());
        assert!(e.notes().is_empty());
        assert!(e.require_live().is_ok());
    }

    #[test]
    fn a_region_with_data_but_no_record_is_kept_until_discarded() {
        let mut bytes = vec![0; 64 << 10];
        bytes[5000] = 1; // past the zeroed header of slot A
        let mut e = open(bytes.clone());
        let err = e.session_create(&Caller::ROOT, "s").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the handover record cannot be read (memory (64 KiB) holds data but no readable record (slot A: empty; \
             slot B: empty)); luod changes nothing until the region is restored or the record discarded"
        );
        assert_eq!(err.kind(), crate::protocol::ErrorKind::Record);
        assert!(e.prepare(&Caller::ROOT, &Default::default(), Vec::new()).is_err());
        assert_eq!(e.store.region().0, bytes, "nothing written");
        assert!(e.notes()[0].starts_with("the handover record cannot be read: memory (64 KiB) holds data"));
        let user = Caller {
            uid: 1000,
            pid: 1,
            privileged: false,
        };
        assert!(matches!(e.discard_record(&user), Err(EngineError::NotPrivileged(_))));
        let report = e.discard_record(&Caller::ROOT).unwrap();
        assert_eq!((report.files, report.generation), (0, 1));
        let events = &e.record().events;
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].action.as_str(), events[0].uid), ("record-discarded", 0));
        e.session_create(&Caller::ROOT, "s").unwrap();
        assert!(matches!(
            e.discard_record(&Caller::ROOT),
            Err(EngineError::RecordReadable(2))
        ));
    }
}
