//! Process exit codes: the contract scripts branch on.
//!
//! The values are stable: a new failure class gets a new number, an existing
//! number never changes meaning. `CLI.md` has the same table.

use liveupdate::protocol::ErrorKind;

/// How luoctl exits.
///
/// 0 is success; 1 to 9 are failures found by luoctl itself (usage, the
/// connection, local files); 10 and up are luod's refusals, one per
/// [`ErrorKind`]. When luod refuses a request, nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ExitCode {
    /// The command did what was asked.
    Success = 0,
    /// Something unexpected: luod reported an internal error, or answered
    /// something that does not fit the request. See luod's log.
    Internal = 1,
    /// The command line is wrong (unknown option, missing or malformed
    /// argument, e.g. a `--token` that is not a number). luod was not asked.
    Usage = 2,
    /// `check` ran and found that `prepare` would be refused.
    CheckFailed = 3,
    /// luod's socket could not be reached (not running, wrong `--socket`,
    /// no permission on the socket).
    Unreachable = 4,
    /// luod speaks another protocol version (or refused the frame).
    Protocol = 5,
    /// The connection broke in the middle of a request, or luod's answer
    /// could not be decoded.
    Connection = 6,
    /// A local file named on the command line could not be read or written
    /// (`session preserve --file`, `session retrieve --output`,
    /// `prepare`/`check --kernel`/`--initrd`).
    LocalIo = 7,
    /// luod did not answer within luoctl's timeout for the request (short
    /// for reads, long for transitions; `--timeout` sets it).
    Timeout = 8,
    /// `check --kernel K`: K is the running kernel already (same version
    /// string as the running one, same SHA-256 as the kernel the last update
    /// loaded): a rolling update skips this host.
    AlreadyOnTarget = 9,
    /// luod: an argument is invalid (e.g. a session name, a kernel image).
    InvalidArgument = 10,
    /// luod: the command is not allowed in the current state.
    WrongState = 11,
    /// luod: the caller lacks root/`CAP_SYS_BOOT`, or does not own the session.
    PermissionDenied = 12,
    /// luod: a subsystem vetoed `prepare`; the reason is in the message.
    Vetoed = 13,
    /// luod: a subsystem failed a step; the transition was undone.
    SubsystemFailed = 14,
    /// luod: no such session or token.
    NotFound = 15,
    /// luod: the session or token exists already.
    AlreadyExists = 16,
    /// luod: the kernel (or the backend emulating it) refused.
    Kernel = 17,
    /// luod: the handover record or region could not be read or written.
    Record = 18,
    /// luod: a per-uid quota (sessions, files, bytes) would be passed, or a
    /// uid is over its bytes quota and the cycle cannot go on.
    QuotaExceeded = 19,
    /// luod: a kernel image or initrd is not the one its pinned SHA-256
    /// (`--sha256`, `--initrd-sha256`) names; nothing was loaded.
    DigestMismatch = 20,
}

impl ExitCode {
    /// Every code, in numeric order (for the reference table and tests).
    pub const ALL: [ExitCode; 21] = [
        ExitCode::Success,
        ExitCode::Internal,
        ExitCode::Usage,
        ExitCode::CheckFailed,
        ExitCode::Unreachable,
        ExitCode::Protocol,
        ExitCode::Connection,
        ExitCode::LocalIo,
        ExitCode::Timeout,
        ExitCode::AlreadyOnTarget,
        ExitCode::InvalidArgument,
        ExitCode::WrongState,
        ExitCode::PermissionDenied,
        ExitCode::Vetoed,
        ExitCode::SubsystemFailed,
        ExitCode::NotFound,
        ExitCode::AlreadyExists,
        ExitCode::Kernel,
        ExitCode::Record,
        ExitCode::QuotaExceeded,
        ExitCode::DigestMismatch,
    ];

    /// The numeric status.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The `kind` string of the JSON error object for this code. For luod's
    /// refusals it is the protocol's [`ErrorKind`] name.
    pub fn kind(self) -> &'static str {
        match self {
            ExitCode::Success => "ok",
            ExitCode::Internal => "internal",
            ExitCode::Usage => "usage",
            ExitCode::CheckFailed => "check-failed",
            ExitCode::Unreachable => "unreachable",
            ExitCode::Protocol => "protocol",
            ExitCode::Connection => "connection",
            ExitCode::LocalIo => "local-io",
            ExitCode::Timeout => "timeout",
            ExitCode::AlreadyOnTarget => "already-on-target",
            ExitCode::InvalidArgument => "invalid-argument",
            ExitCode::WrongState => "wrong-state",
            ExitCode::PermissionDenied => "permission-denied",
            ExitCode::Vetoed => "vetoed",
            ExitCode::SubsystemFailed => "subsystem-failed",
            ExitCode::NotFound => "not-found",
            ExitCode::AlreadyExists => "already-exists",
            ExitCode::Kernel => "kernel",
            ExitCode::Record => "record",
            ExitCode::QuotaExceeded => "quota-exceeded",
            ExitCode::DigestMismatch => "digest-mismatch",
        }
    }
}

impl From<ErrorKind> for ExitCode {
    fn from(kind: ErrorKind) -> ExitCode {
        match kind {
            ErrorKind::InvalidArgument => ExitCode::InvalidArgument,
            ErrorKind::WrongState => ExitCode::WrongState,
            ErrorKind::PermissionDenied => ExitCode::PermissionDenied,
            ErrorKind::Vetoed => ExitCode::Vetoed,
            ErrorKind::SubsystemFailed => ExitCode::SubsystemFailed,
            ErrorKind::NotFound => ExitCode::NotFound,
            ErrorKind::AlreadyExists => ExitCode::AlreadyExists,
            ErrorKind::Kernel => ExitCode::Kernel,
            ErrorKind::Record => ExitCode::Record,
            ErrorKind::Protocol => ExitCode::Protocol,
            ErrorKind::Internal => ExitCode::Internal,
            ErrorKind::QuotaExceeded => ExitCode::QuotaExceeded,
            ErrorKind::DigestMismatch => ExitCode::DigestMismatch,
        }
    }
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(code: ExitCode) -> std::process::ExitCode {
        std::process::ExitCode::from(code.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const KINDS: [ErrorKind; 13] = [
        ErrorKind::InvalidArgument,
        ErrorKind::WrongState,
        ErrorKind::PermissionDenied,
        ErrorKind::Vetoed,
        ErrorKind::SubsystemFailed,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::Kernel,
        ErrorKind::Record,
        ErrorKind::Protocol,
        ErrorKind::Internal,
        ErrorKind::QuotaExceeded,
        ErrorKind::DigestMismatch,
    ];

    #[test]
    fn codes_have_their_documented_values() {
        let table: Vec<(u8, &str)> = ExitCode::ALL.iter().map(|c| (c.code(), c.kind())).collect();
        assert_eq!(
            table,
            [
                (0, "ok"),
                (1, "internal"),
                (2, "usage"),
                (3, "check-failed"),
                (4, "unreachable"),
                (5, "protocol"),
                (6, "connection"),
                (7, "local-io"),
                (8, "timeout"),
                (9, "already-on-target"),
                (10, "invalid-argument"),
                (11, "wrong-state"),
                (12, "permission-denied"),
                (13, "vetoed"),
                (14, "subsystem-failed"),
                (15, "not-found"),
                (16, "already-exists"),
                (17, "kernel"),
                (18, "record"),
                (19, "quota-exceeded"),
                (20, "digest-mismatch"),
            ]
        );
    }

    #[test]
    fn every_server_error_kind_maps_to_a_failure_code() {
        for kind in KINDS {
            assert_ne!(ExitCode::from(kind), ExitCode::Success, "{kind:?}");
        }
    }

    #[test]
    fn each_refusal_kind_has_its_own_code_except_internal() {
        let codes: HashSet<u8> = KINDS.iter().map(|k| ExitCode::from(*k).code()).collect();
        assert_eq!(codes.len(), KINDS.len());
        assert_eq!(ExitCode::from(ErrorKind::Internal), ExitCode::Internal);
        assert_eq!(ExitCode::from(ErrorKind::Vetoed).code(), 13);
        assert_eq!(ExitCode::from(ErrorKind::WrongState).code(), 11);
        assert_eq!(ExitCode::from(ErrorKind::Protocol), ExitCode::Protocol);
    }

    #[test]
    fn json_kind_of_a_refusal_is_the_protocol_name_of_its_error_kind() {
        for kind in KINDS {
            let wire = serde_json::to_value(kind).expect("ErrorKind serializes");
            assert_eq!(wire.as_str(), Some(ExitCode::from(kind).kind()), "{kind:?}");
        }
    }

    #[test]
    fn usage_connection_and_protocol_failures_have_distinct_codes() {
        let local = [
            ExitCode::Usage,
            ExitCode::Unreachable,
            ExitCode::Protocol,
            ExitCode::Connection,
            ExitCode::LocalIo,
            ExitCode::CheckFailed,
            ExitCode::AlreadyOnTarget,
        ];
        let codes: HashSet<u8> = local.iter().map(|c| c.code()).collect();
        assert_eq!(codes.len(), local.len());
    }
}
