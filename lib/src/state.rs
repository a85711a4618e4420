//! The live-update state machine.
//!
//! The kernel keeps no live-update state of its own; this is userspace's view
//! of where a host is in a cycle:
//!
//! ```text
//! normal --prepare--> prepared --freeze--> frozen --reboot(kexec)--> [new kernel] updated --finish--> normal
//!    ^                    |                   |
//!    +------cancel--------+-------cancel------+      (reboot failure: unfreeze, back to prepared)
//! ```
//!
//! [`transition`] is a pure function: it says which state an event leads to,
//! or why the event is not allowed, and changes nothing.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a host is in a live-update cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// No update in flight.
    Normal,
    /// Target kernel loaded, subsystems prepared; workloads still run.
    Prepared,
    /// Workloads quiesced, final handover record written; the blackout has begun.
    Frozen,
    /// Running the new kernel with an incoming record; clients reclaim resources.
    Updated,
}

impl State {
    /// Every state, in cycle order.
    pub const ALL: [State; 4] = [State::Normal, State::Prepared, State::Frozen, State::Updated];

    /// The lowercase name used on the command line, in JSON and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Normal => "normal",
            State::Prepared => "prepared",
            State::Frozen => "frozen",
            State::Updated => "updated",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that moves the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    /// Load the target kernel and prepare every subsystem.
    Prepare,
    /// Quiesce workloads and write the final handover record.
    Freeze,
    /// Kexec into the target kernel (observed in the new kernel as `updated`).
    Reboot,
    /// Undo of a freeze after a failed reboot.
    Unfreeze,
    /// Close the cycle in the new kernel.
    Finish,
    /// Abandon the cycle before the reboot.
    Cancel,
}

impl Event {
    /// Every event.
    pub const ALL: [Event; 6] = [
        Event::Prepare,
        Event::Freeze,
        Event::Reboot,
        Event::Unfreeze,
        Event::Finish,
        Event::Cancel,
    ];

    /// The lowercase name used on the command line, in JSON and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Prepare => "prepare",
            Event::Freeze => "freeze",
            Event::Reboot => "reboot",
            Event::Unfreeze => "unfreeze",
            Event::Finish => "finish",
            Event::Cancel => "cancel",
        }
    }

    /// The states in which this event is allowed, for error messages.
    pub fn allowed_from(self) -> &'static [State] {
        match self {
            Event::Prepare => &[State::Normal],
            Event::Freeze => &[State::Prepared],
            Event::Reboot => &[State::Frozen],
            Event::Unfreeze => &[State::Frozen],
            Event::Finish => &[State::Updated],
            Event::Cancel => &[State::Prepared, State::Frozen],
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event that is not allowed in the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {event} in state {state}: {event} is allowed only {}", allowed_list(*.event))]
pub struct IllegalTransition {
    /// The state the machine was in.
    pub state: State,
    /// The event that was refused.
    pub event: Event,
}

fn allowed_list(event: Event) -> String {
    let states: Vec<&str> = event.allowed_from().iter().map(|s| s.as_str()).collect();
    format!("in {}", states.join(" or "))
}

/// The state `event` leads to from `state`, or why it is not allowed.
///
/// `reboot` leads to [`State::Updated`]: that is the state the new kernel's
/// luod finds itself in when the handover record is read back.
pub fn transition(state: State, event: Event) -> Result<State, IllegalTransition> {
    use Event as E;
    use State as S;
    match (state, event) {
        (S::Normal, E::Prepare) => Ok(S::Prepared),
        (S::Prepared, E::Freeze) => Ok(S::Frozen),
        (S::Frozen, E::Reboot) => Ok(S::Updated),
        (S::Frozen, E::Unfreeze) => Ok(S::Prepared),
        (S::Updated, E::Finish) => Ok(S::Normal),
        (S::Prepared | S::Frozen, E::Cancel) => Ok(S::Normal),
        _ => Err(IllegalTransition { state, event }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_legal_transition_leads_where_the_design_says() {
        let legal = [
            (State::Normal, Event::Prepare, State::Prepared),
            (State::Prepared, Event::Freeze, State::Frozen),
            (State::Frozen, Event::Reboot, State::Updated),
            (State::Frozen, Event::Unfreeze, State::Prepared),
            (State::Updated, Event::Finish, State::Normal),
            (State::Prepared, Event::Cancel, State::Normal),
            (State::Frozen, Event::Cancel, State::Normal),
        ];
        for (from, event, to) in legal {
            assert_eq!(transition(from, event), Ok(to), "{from} --{event}-->");
        }
    }

    #[test]
    fn every_other_pair_is_an_illegal_transition_naming_state_and_event() {
        let mut illegal = 0;
        for state in State::ALL {
            for event in Event::ALL {
                let allowed = event.allowed_from().contains(&state);
                match transition(state, event) {
                    Ok(_) => assert!(allowed, "{state} --{event}--> should be refused"),
                    Err(e) => {
                        assert!(!allowed, "{state} --{event}--> should be allowed");
                        assert_eq!(e, IllegalTransition { state, event });
                        let msg = e.to_string();
                        assert!(msg.contains(state.as_str()) && msg.contains(event.as_str()), "{msg}");
                        illegal += 1;
                    }
                }
            }
        }
        // 4 states x 6 events, 7 of them legal.
        assert_eq!(illegal, 24 - 7);
    }

    #[test]
    fn illegal_transition_message_says_where_the_event_is_allowed() {
        let e = transition(State::Normal, Event::Cancel).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot cancel in state normal: cancel is allowed only in prepared or frozen"
        );
    }
}
