//! Subsystems of a hypervisor host: QEMU VMs driven over QMP ([`qmp`]), IOMMU
//! groups ([`iommu`]) and PCI devices passed through to VMs ([`devices`]).
//!
//! Each implements [`Subsystem`](crate::subsystem::Subsystem) and reads the
//! kernel's state from a configurable sysfs root (`/sys` on a host), so the
//! logic is tested on recorded or generated trees without root.
//!
//! The registry owns its subsystems as trait objects, so what a subsystem
//! learns without failing (the IOMMU drift after a kexec, the result of each
//! device rebind) is published through a [`Report`] handle that luod keeps
//! before registering the subsystem.

pub mod devices;
pub mod iommu;
pub mod qmp;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

/// A PCI address in the kernel's sysfs form, `DDDD:BB:DD.F` (domain, bus,
/// device, function), e.g. `0000:00:03.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PciAddress {
    /// PCI domain (segment). 16 bits on most hosts; VMD domains go above.
    pub domain: u32,
    /// Bus number.
    pub bus: u8,
    /// Device (slot) number, 0 to 31.
    pub device: u8,
    /// Function number, 0 to 7.
    pub function: u8,
}

/// A string that is not a PCI address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not a PCI address: {reason}; write it as DDDD:BB:DD.F in hex, as `lspci -D` prints it (e.g. 0000:00:03.0)"
)]
pub struct BadPciAddress {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for PciAddress {
    type Err = BadPciAddress;

    /// Parses `DDDD:BB:DD.F` (hex digits, either case; the domain may have 4
    /// to 8 digits).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| BadPciAddress {
            input: s.to_string(),
            reason,
        };
        let hex = |part: &str, min: usize, max: usize, what| {
            if part.len() < min || part.len() > max || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(what));
            }
            u32::from_str_radix(part, 16).map_err(|_| bad(what))
        };
        let mut colon = s.split(':');
        let (Some(domain), Some(bus), Some(rest), None) = (colon.next(), colon.next(), colon.next(), colon.next())
        else {
            return Err(bad("it needs exactly two ':' (domain:bus:device.function)"));
        };
        let Some((device, function)) = rest.split_once('.') else {
            return Err(bad("it needs a '.' before the function number"));
        };
        let domain = hex(domain, 4, 8, "the domain must be 4 to 8 hex digits")?;
        let bus = hex(bus, 2, 2, "the bus must be 2 hex digits")?;
        let device = hex(device, 2, 2, "the device must be 2 hex digits")?;
        let function = hex(function, 1, 1, "the function must be 1 digit")?;
        if device > 0x1f {
            return Err(bad("the device number is at most 1f"));
        }
        if function > 7 {
            return Err(bad("the function number is at most 7"));
        }
        // The ranges were checked above: bus has 2 hex digits, device <= 0x1f, function <= 7.
        Ok(PciAddress {
            domain,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// A value a subsystem publishes for luod to read after a callback, e.g. the
/// IOMMU drift found at `restore`.
///
/// Cloning gives another handle on the same value. luod keeps a clone before
/// handing the subsystem to the registry.
#[derive(Debug)]
pub struct Report<T>(Arc<Mutex<Option<T>>>);

impl<T> Clone for Report<T> {
    fn clone(&self) -> Self {
        Report(Arc::clone(&self.0))
    }
}

impl<T> Default for Report<T> {
    fn default() -> Self {
        Report(Arc::new(Mutex::new(None)))
    }
}

impl<T: Clone> Report<T> {
    /// The last value published, if any.
    pub fn get(&self) -> Option<T> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    pub(crate) fn set(&self, value: Option<T>) {
        *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = value;
    }
}

/// Serde for an [`Errno`](nix::errno::Errno), as its number.
pub(crate) mod errno_serde {
    use nix::errno::Errno;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(errno: &Errno, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32(*errno as i32)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Errno, D::Error> {
        Ok(Errno::from_raw(i32::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_address_round_trips_in_sysfs_form() {
        let a: PciAddress = "0000:00:03.0".parse().unwrap();
        assert_eq!(
            a,
            PciAddress {
                domain: 0,
                bus: 0,
                device: 3,
                function: 0
            }
        );
        assert_eq!(a.to_string(), "0000:00:03.0");
        let b: PciAddress = "10000:E1:1F.7".parse().unwrap();
        assert_eq!(b.to_string(), "10000:e1:1f.7");
    }

    #[test]
    fn pci_address_refuses_what_lspci_would_not_print() {
        for (input, reason) in [
            ("00:03.0", "it needs exactly two ':' (domain:bus:device.function)"),
            ("0000:00:03", "it needs a '.' before the function number"),
            ("000:00:03.0", "the domain must be 4 to 8 hex digits"),
            ("0000:0:03.0", "the bus must be 2 hex digits"),
            ("0000:00:20.0", "the device number is at most 1f"),
            ("0000:00:03.8", "the function number is at most 7"),
            ("0000:00:+3.0", "the device must be 2 hex digits"),
            (
                "0000:00:03.0:1",
                "it needs exactly two ':' (domain:bus:device.function)",
            ),
        ] {
            let err = input.parse::<PciAddress>().unwrap_err();
            assert_eq!(
                err,
                BadPciAddress {
                    input: input.into(),
                    reason
                },
                "{input}"
            );
        }
        assert_eq!(
            "x".parse::<PciAddress>().unwrap_err().to_string(),
            "\"x\" is not a PCI address: it needs exactly two ':' (domain:bus:device.function); \
             write it as DDDD:BB:DD.F in hex, as `lspci -D` prints it (e.g. 0000:00:03.0)"
        );
    }

    #[test]
    fn report_handles_share_one_value() {
        let a: Report<u32> = Report::default();
        let b = a.clone();
        assert_eq!(b.get(), None);
        a.set(Some(7));
        assert_eq!(b.get(), Some(7));
    }
}
