//! The handover record as format version 2 wrote it. Frozen: these types
//! never change again. A v2 payload decodes into them and converts into the
//! current model (`From<v2::HandoverRecord>` below); a v1 payload converts
//! into them first (`v1.rs`).
//!
//! Only the types that format 3 changed are copied here (the record, the
//! cycle in flight, the history's cycles); the others are the current
//! model's, whose encoding format 3 left as it was. A later format that
//! changes one of those copies it here first (the v2 fixture test in
//! `lib/tests/record_compat.rs` fails otherwise).

use super::model::{self, Event, Extent, Handover, KernelImage, Outcome, Section, SessionRecord, Timestamps};
use crate::state::State;
use serde::{Deserialize, Serialize};

/// Format 2's record: no `booted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverRecord {
    pub state: State,
    pub backend: String,
    pub handover: Option<Handover>,
    pub update: Option<Update>,
    pub sessions: Vec<SessionRecord>,
    pub subsystems: Vec<Section>,
    pub extents: Vec<Extent>,
    pub history: Vec<Cycle>,
    pub live_updates: u64,
    pub next_cycle_id: u64,
    pub events: Vec<Event>,
}

/// Format 2's cycle in flight: no previous kernel, rollback, validation or hooks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub id: u64,
    pub from_release: String,
    pub target: Option<KernelImage>,
    pub timestamps: Timestamps,
    pub nonce: Option<String>,
}

/// Format 2's (and 1's) cycle in the history. Its outcome is never
/// `RolledBack` (format 3 added it after the others, so the numbers of the
/// older ones did not change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cycle {
    pub id: u64,
    pub outcome: Outcome,
    pub target: Option<KernelImage>,
    pub from_release: String,
    pub to_release: String,
    pub timestamps: Timestamps,
    pub sessions: u32,
    pub files: u32,
    pub bytes: u64,
}

impl From<Update> for model::Update {
    fn from(u: Update) -> Self {
        model::Update {
            id: u.id,
            from_release: u.from_release,
            target: u.target,
            timestamps: u.timestamps,
            nonce: u.nonce,
            previous: None,
            rollback_of: None,
            validation: None,
            hooks: Vec::new(),
        }
    }
}

impl From<Cycle> for model::Cycle {
    fn from(c: Cycle) -> Self {
        model::Cycle {
            id: c.id,
            outcome: c.outcome,
            target: c.target,
            from_release: c.from_release,
            to_release: c.to_release,
            timestamps: c.timestamps,
            sessions: c.sessions,
            files: c.files,
            bytes: c.bytes,
            previous: None,
            rollback_of: None,
            rolled_back_by: None,
            validation: None,
            hooks: Vec::new(),
        }
    }
}

impl From<HandoverRecord> for model::HandoverRecord {
    fn from(v2: HandoverRecord) -> Self {
        model::HandoverRecord {
            state: v2.state,
            backend: v2.backend,
            handover: v2.handover,
            update: v2.update.map(model::Update::from),
            sessions: v2.sessions,
            subsystems: v2.subsystems,
            extents: v2.extents,
            history: v2.history.into_iter().map(model::Cycle::from).collect(),
            live_updates: v2.live_updates,
            next_cycle_id: v2.next_cycle_id,
            events: v2.events,
            booted: None,
        }
    }
}
