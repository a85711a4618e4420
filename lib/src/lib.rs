//! liveupdate: userspace orchestration of Linux kernel live update.
//!
//! The library holds everything but the process shells: the state machine
//! ([`state`]), subsystem callbacks ([`subsystem`]), the handover record
//! ([`record`]) and the regions it lives in ([`region`]), the kernel
//! interfaces ([`kernel`]), the client protocol ([`protocol`]), the holder
//! that keeps preserved files alive across a crash of luod ([`holder`]), and
//! the engine that ties them together for luod ([`engine`]).

pub mod engine;
pub mod fsutil;
pub mod holder;
pub mod hooks;
pub mod kernel;
pub mod names;
pub mod progress;
pub mod protocol;
pub mod record;
pub mod region;
pub mod state;
pub mod subsystem;
pub mod subsystems;
pub mod systemd;
