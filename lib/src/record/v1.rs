//! The handover record as format version 1 wrote it. Frozen: these types
//! never change again. A v1 payload decodes into them and converts into the
//! format 2's types (`From<v1::HandoverRecord>` below), which convert into
//! the current model in turn (`v2.rs`).
//!
//! Only the types that format 2 changed are copied here; the others are the
//! current model's, whose encoding format 2 left as it was. A later format
//! that changes one of those copies it here first (the v1 fixture test in
//! `lib/tests/record_compat.rs` fails otherwise).

use super::model::{self, Extent, KernelImage, Section, SessionRecord, Timestamps};
use super::v2::{self, Cycle};
use crate::state::State;
use serde::{Deserialize, Serialize};

/// Format 1's record.
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
}

/// Format 1's handover: no nonce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    pub boot_id: String,
    pub simulated: bool,
    pub kernel_release: String,
}

/// Format 1's cycle in flight: no nonce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub id: u64,
    pub from_release: String,
    pub target: Option<KernelImage>,
    pub timestamps: Timestamps,
}

impl From<HandoverRecord> for v2::HandoverRecord {
    fn from(v1: HandoverRecord) -> Self {
        v2::HandoverRecord {
            state: v1.state,
            backend: v1.backend,
            handover: v1.handover.map(|h| model::Handover {
                boot_id: h.boot_id,
                simulated: h.simulated,
                kernel_release: h.kernel_release,
                nonce: None,
            }),
            update: v1.update.map(|u| v2::Update {
                id: u.id,
                from_release: u.from_release,
                target: u.target,
                timestamps: u.timestamps,
                nonce: None,
            }),
            sessions: v1.sessions,
            subsystems: v1.subsystems,
            extents: v1.extents,
            history: v1.history,
            live_updates: v1.live_updates,
            next_cycle_id: v1.next_cycle_id,
            events: Vec::new(),
        }
    }
}
