//! Session names, validated by the same rules as the kernel's LUO.
//!
//! The kernel stores a session name in a `char name[64]` that must be
//! NUL-terminated, so a name is 1 to 63 bytes with no NUL byte. luod also
//! refuses `/` and control characters: names appear in paths, logs and
//! terminal output, where they would mislead an operator.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest session name in bytes (the kernel's `LIVEUPDATE_SESSION_NAME_LENGTH` minus the NUL).
pub const MAX_NAME_LEN: usize = 63;

/// Why a session name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("session name is empty: give a name of 1 to {MAX_NAME_LEN} bytes")]
    Empty,
    /// The name is longer than the kernel allows.
    #[error("session name is {len} bytes long: the kernel allows at most {MAX_NAME_LEN} bytes")]
    TooLong {
        /// Length of the refused name in bytes.
        len: usize,
    },
    /// The name contains a NUL byte.
    #[error("session name contains a NUL byte at offset {offset}: names are C strings in the kernel")]
    Nul {
        /// Byte offset of the first NUL.
        offset: usize,
    },
    /// The name contains a character luod refuses.
    #[error("session name contains {found:?} at offset {offset}: use printable characters other than '/'")]
    BadChar {
        /// The refused character.
        found: char,
        /// Byte offset of the character.
        offset: usize,
    },
}

/// A valid session name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SessionName(String);

impl SessionName {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        validate(&name)?;
        Ok(SessionName(name))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks a name without taking ownership.
pub fn validate(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { len: name.len() });
    }
    for (offset, c) in name.char_indices() {
        if c == '\0' {
            return Err(NameError::Nul { offset });
        }
        if c == '/' || c.is_control() {
            return Err(NameError::BadChar { found: c, offset });
        }
    }
    Ok(())
}

impl TryFrom<String> for SessionName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        SessionName::new(s)
    }
}

impl From<SessionName> for String {
    fn from(n: SessionName) -> String {
        n.0
    }
}

impl fmt::Display for SessionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for SessionName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SessionName::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_one_to_sixty_three_bytes() {
        assert!(SessionName::new("a").is_ok());
        assert!(SessionName::new("x".repeat(63)).is_ok());
        assert!(SessionName::new("vm-0001.ram").is_ok());
    }

    #[test]
    fn refuses_empty_long_nul_and_slash() {
        assert_eq!(SessionName::new(""), Err(NameError::Empty));
        assert_eq!(SessionName::new("x".repeat(64)), Err(NameError::TooLong { len: 64 }));
        assert_eq!(SessionName::new("ab\0c"), Err(NameError::Nul { offset: 2 }));
        assert_eq!(
            SessionName::new("a/b"),
            Err(NameError::BadChar { found: '/', offset: 1 })
        );
        assert_eq!(
            SessionName::new("a\nb"),
            Err(NameError::BadChar { found: '\n', offset: 1 })
        );
    }

    #[test]
    fn deserializing_validates() {
        let bytes = postcard::to_allocvec(&String::new()).unwrap();
        assert!(postcard::from_bytes::<SessionName>(&bytes).is_err());
    }
}
