//! A failed command: what failed, why, what to do, and the exit code.
//!
//! Every failure, whether luoctl found it or luod refused, becomes one
//! [`Failure`]; `output` prints it once, as one line on stderr or as a JSON
//! object on stdout.

use crate::exit::ExitCode;
use liveupdate::protocol::client::ClientError;
use liveupdate::subsystem::StepError;

/// A command that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What failed: the operation, e.g. `prepare` or `session preserve vm0 token 1`.
    pub what: String,
    /// Exit code (and JSON `kind`).
    pub code: ExitCode,
    /// Why, one sentence (luod's message verbatim when luod refused).
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
    /// The subsystem step that failed, when a subsystem vetoed or failed.
    pub step: Option<Box<StepError>>,
}

impl Failure {
    /// A failure found by luoctl itself.
    pub fn new(what: impl Into<String>, code: ExitCode, message: impl Into<String>) -> Failure {
        Failure {
            what: what.into(),
            code,
            message: message.into(),
            hint: None,
            step: None,
        }
    }

    /// Adds a hint (an empty one is ignored).
    pub fn with_hint(mut self, hint: impl Into<String>) -> Failure {
        let hint = hint.into();
        self.hint = (!hint.is_empty()).then_some(hint);
        self
    }

    /// A failed call to luod, while doing `what`.
    pub fn client(what: impl Into<String>, err: ClientError) -> Failure {
        let hint = err.hint();
        match err {
            ClientError::Server(reply) => Failure {
                what: what.into(),
                code: reply.kind.into(),
                message: reply.message,
                hint: (!reply.hint.is_empty()).then_some(reply.hint),
                step: reply.step.map(Box::new),
            },
            other => {
                let (code, fallback) = match &other {
                    ClientError::Connect { .. } => (ExitCode::Unreachable, None),
                    ClientError::Frame(_) => (
                        ExitCode::Connection,
                        Some("luod may have exited or restarted; see its log, then retry"),
                    ),
                    ClientError::Version { .. } => (ExitCode::Protocol, None),
                    ClientError::Timeout { .. } => (ExitCode::Timeout, None),
                    ClientError::Unexpected { .. } => {
                        (ExitCode::Internal, Some("luoctl and luod may be different versions"))
                    }
                    ClientError::Server(_) => (ExitCode::Internal, None),
                };
                let hint = hint.or(fallback.map(str::to_string));
                Failure {
                    what: what.into(),
                    code,
                    message: other.to_string(),
                    hint,
                    step: None,
                }
            }
        }
    }

    /// The one line printed on stderr (without the trailing newline):
    /// `luoctl: <what>: <why>; <hint>`.
    pub fn line(&self) -> String {
        let mut s = format!("luoctl: {}: {}", self.what, self.message);
        if let Some(h) = &self.hint {
            s.push_str("; ");
            s.push_str(h);
        }
        // One line, whatever the message holds.
        s.replace(['\n', '\r'], " ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use liveupdate::protocol::frame::FrameError;
    use liveupdate::protocol::{ErrorKind, ErrorReply};
    use liveupdate::subsystem::{Step, SubsystemError};

    fn veto() -> ErrorReply {
        let step = StepError {
            step: Step::Prepare,
            subsystem: "region-capacity".into(),
            error: SubsystemError::Veto("preserved files need 96 MiB, the region holds 64 MiB".into()),
            undo_failures: Vec::new(),
        };
        ErrorReply {
            kind: ErrorKind::Vetoed,
            message: step.to_string(),
            hint: "resolve what subsystem region-capacity reports, then prepare again".into(),
            step: Some(step),
        }
    }

    #[test]
    fn a_veto_keeps_its_reason_hint_and_step() {
        let f = Failure::client("prepare", ClientError::Server(Box::new(veto())));
        assert_eq!(f.code, ExitCode::Vetoed);
        assert_eq!(
            f.line(),
            "luoctl: prepare: subsystem region-capacity failed prepare: vetoed: preserved files need 96 MiB, \
             the region holds 64 MiB; resolve what subsystem region-capacity reports, then prepare again"
        );
        assert_eq!(f.step.map(|s| s.subsystem), Some("region-capacity".to_string()));
    }

    #[test]
    fn an_empty_server_hint_is_no_hint() {
        let reply = ErrorReply {
            kind: ErrorKind::NotFound,
            message: "no session named vm0".into(),
            hint: String::new(),
            step: None,
        };
        let f = Failure::client("session finish vm0", ClientError::Server(Box::new(reply)));
        assert_eq!(f.hint, None);
        assert_eq!(f.line(), "luoctl: session finish vm0: no session named vm0");
        assert_eq!(f.code, ExitCode::NotFound);
    }

    #[test]
    fn an_unreachable_socket_says_so_with_the_library_hint() {
        let err = ClientError::Connect {
            path: "/run/luod/luod.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let f = Failure::client("status", err);
        assert_eq!(f.code, ExitCode::Unreachable);
        assert!(
            f.line()
                .starts_with("luoctl: status: cannot connect to luod at /run/luod/luod.sock: ")
        );
        assert!(
            f.line()
                .ends_with("; is luod running? start it, or pass --socket with its path")
        );
    }

    #[test]
    fn a_broken_connection_is_a_connection_failure() {
        let f = Failure::client("freeze", ClientError::Frame(FrameError::Closed));
        assert_eq!(f.code, ExitCode::Connection);
        assert_eq!(f.message, "talking to luod: connection closed by peer");
        assert!(f.hint.is_some());
    }

    #[test]
    fn a_version_mismatch_is_a_protocol_failure() {
        let reply = ErrorReply {
            kind: ErrorKind::Protocol,
            message: "luod speaks protocol version 2, the client 1; use matching luod and client versions".into(),
            hint: String::new(),
            step: None,
        };
        let f = Failure::client("status", ClientError::Server(Box::new(reply)));
        assert_eq!(f.code, ExitCode::Protocol);
    }

    #[test]
    fn the_line_never_spans_lines() {
        let f = Failure::new("x", ExitCode::Usage, "a\nb").with_hint("c\r\nd");
        assert_eq!(f.line(), "luoctl: x: a b; c  d");
        assert!(Failure::new("x", ExitCode::Usage, "m").with_hint("").hint.is_none());
    }
}
