//! IOMMU groups: captured before the update, verified after it.
//!
//! A device can be passed through to a VM (vfio-pci) only when it sits in an
//! IOMMU group, and it shares the group with every device it cannot be
//! isolated from. The kernel lists the groups in `/sys/kernel/iommu_groups`:
//! `N/devices/ADDR` links to each member, `N/type` holds the group's default
//! domain type (`DMA`, `DMA-FQ`, `identity`, `blocked`, `unmanaged`).
//!
//! The [`Iommu`] subsystem:
//!
//! - `prepare`: takes a [`Snapshot`] (kept in the record as a versioned
//!   postcard blob) and vetoes when a device marked for preservation has no
//!   group, or when the target kernel's command line turns the IOMMU off.
//! - `restore` (new kernel): takes a snapshot again and compares it with the
//!   old one. Differences are [`Drift`]s, published in a [`DriftReport`]
//!   through [`Iommu::report`] and logged as one line. Only a preserved
//!   device without a group fails `restore`: VMs cannot get it back.
//!
//! Group numbers are handed out in probe order, so the same hardware and
//! kernel configuration normally get the same numbers; a group whose number
//! changed but whose members did not is reported once, as
//! [`Drift::GroupRenumbered`], not as every device moving.

use super::{PciAddress, Report};
use crate::subsystem::{Blob, PrepareContext, Subsystem, SubsystemError};
use nix::errno::Errno;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// Version of the [`Snapshot`] blob (postcard).
pub const SNAPSHOT_VERSION: u32 = 1;

/// Why the groups could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IommuError {
    /// A file or directory of the tree could not be read.
    #[error("cannot read {}: {errno}", path.display())]
    Read {
        /// What.
        path: PathBuf,
        /// Why.
        errno: Errno,
    },
    /// An entry is not what the kernel puts there.
    #[error("{} is not what the kernel writes there: {what}; is the sysfs root right?", path.display())]
    Malformed {
        /// What.
        path: PathBuf,
        /// How it differs.
        what: String,
    },
}

/// A group's default domain type (`/sys/kernel/iommu_groups/N/type`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DomainType {
    /// `DMA`: translated, strict invalidation.
    Dma,
    /// `DMA-FQ`: translated, lazy (flush-queue) invalidation.
    DmaFq,
    /// `identity`: passthrough (`iommu=pt`), DMA is not translated.
    Identity,
    /// `blocked`: all DMA blocked.
    Blocked,
    /// `unmanaged`: owned by a user such as VFIO.
    Unmanaged,
    /// Any other text the kernel wrote (`unknown`, future types).
    Other(String),
    /// No `type` file (kernels before 5.11).
    NotReported,
}

impl DomainType {
    /// Parses the content of a `type` file.
    pub fn parse(text: &str) -> DomainType {
        match text.trim() {
            "DMA" => DomainType::Dma,
            "DMA-FQ" => DomainType::DmaFq,
            "identity" => DomainType::Identity,
            "blocked" => DomainType::Blocked,
            "unmanaged" => DomainType::Unmanaged,
            other => DomainType::Other(other.to_string()),
        }
    }
}

impl fmt::Display for DomainType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DomainType::Dma => "DMA",
            DomainType::DmaFq => "DMA-FQ",
            DomainType::Identity => "identity",
            DomainType::Blocked => "blocked",
            DomainType::Unmanaged => "unmanaged",
            DomainType::Other(s) => s,
            DomainType::NotReported => "(not reported)",
        })
    }
}

/// One IOMMU group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Its default domain type.
    pub domain_type: DomainType,
    /// Its members, by device name (PCI addresses on x86).
    pub devices: BTreeSet<String>,
}

/// Every IOMMU group of a kernel, by group number.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The groups.
    pub groups: BTreeMap<u32, Group>,
}

fn read_err(path: &Path, e: &std::io::Error) -> IommuError {
    IommuError::Read {
        path: path.to_path_buf(),
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

fn entries(dir: &Path) -> Result<Vec<String>, IommuError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| read_err(dir, &e))? {
        let entry = entry.map_err(|e| read_err(dir, &e))?;
        let name = entry.file_name().into_string().map_err(|name| IommuError::Malformed {
            path: dir.join(&name),
            what: "the name is not UTF-8".to_string(),
        })?;
        names.push(name);
    }
    Ok(names)
}

impl Snapshot {
    /// Reads `<sysfs>/kernel/iommu_groups` (`sysfs` is `/sys` on a host). A
    /// kernel without IOMMU support has no such directory: that reads as no
    /// groups, like an IOMMU that is off.
    pub fn read(sysfs: &Path) -> Result<Snapshot, IommuError> {
        let root = sysfs.join("kernel/iommu_groups");
        if !root.exists() {
            return Ok(Snapshot::default());
        }
        let mut groups = BTreeMap::new();
        for name in entries(&root)? {
            let dir = root.join(&name);
            let number: u32 = name.parse().map_err(|_| IommuError::Malformed {
                path: dir.clone(),
                what: "a group directory is named by its number".to_string(),
            })?;
            let type_path = dir.join("type");
            let domain_type = match std::fs::read_to_string(&type_path) {
                Ok(text) => DomainType::parse(&text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => DomainType::NotReported,
                Err(e) => return Err(read_err(&type_path, &e)),
            };
            let devices = entries(&dir.join("devices"))?.into_iter().collect();
            groups.insert(number, Group { domain_type, devices });
        }
        Ok(Snapshot { groups })
    }

    /// The group `device` is in.
    pub fn group_of(&self, device: &str) -> Option<u32> {
        self.groups
            .iter()
            .find(|(_, g)| g.devices.contains(device))
            .map(|(n, _)| *n)
    }

    /// Number of devices in all groups.
    pub fn device_count(&self) -> usize {
        self.groups.values().map(|g| g.devices.len()).sum()
    }

    /// The blob kept in the record.
    pub fn to_blob(&self) -> Result<Blob, postcard::Error> {
        Ok(Blob {
            version: SNAPSHOT_VERSION,
            data: postcard::to_stdvec(self)?,
        })
    }

    /// Reads a blob written by [`Snapshot::to_blob`].
    pub fn from_blob(blob: &Blob) -> Result<Snapshot, String> {
        if blob.version != SNAPSHOT_VERSION {
            return Err(format!(
                "the IOMMU snapshot in the record has format version {}, this luod reads version {SNAPSHOT_VERSION}",
                blob.version
            ));
        }
        postcard::from_bytes(&blob.data).map_err(|e| format!("the IOMMU snapshot in the record is damaged: {e}"))
    }

    fn device_groups(&self) -> BTreeMap<&str, u32> {
        self.groups
            .iter()
            .flat_map(|(n, g)| g.devices.iter().map(move |d| (d.as_str(), *n)))
            .collect()
    }
}

/// One difference between the groups before and after the update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Drift {
    /// A group number is gone (its devices are reported on their own).
    GroupVanished {
        /// The group's number in the old kernel.
        group: u32,
    },
    /// A new group number (its devices are reported on their own).
    GroupAppeared {
        /// The group's number in the new kernel.
        group: u32,
    },
    /// The same members are in a group with another number.
    GroupRenumbered {
        /// Old number.
        from: u32,
        /// New number.
        to: u32,
    },
    /// A device is in another group than before.
    DeviceMoved {
        /// The device.
        device: String,
        /// Old group.
        from: u32,
        /// New group.
        to: u32,
    },
    /// A device was in a group and is in none now (or is gone).
    DeviceLostGroup {
        /// The device.
        device: String,
        /// Its old group.
        group: u32,
    },
    /// A device is in a group and was in none before.
    DeviceGainedGroup {
        /// The device.
        device: String,
        /// Its new group.
        group: u32,
    },
    /// A group's default domain type changed (e.g. `DMA-FQ` to `identity`
    /// when `iommu=pt` was added).
    DomainTypeChanged {
        /// The group (its new number).
        group: u32,
        /// Old type.
        from: DomainType,
        /// New type.
        to: DomainType,
    },
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::GroupVanished { group } => write!(f, "group {group} vanished"),
            Drift::GroupAppeared { group } => write!(f, "group {group} appeared"),
            Drift::GroupRenumbered { from, to } => write!(f, "group {from} is now group {to}"),
            Drift::DeviceMoved { device, from, to } => write!(f, "{device} moved from group {from} to group {to}"),
            Drift::DeviceLostGroup { device, group } => write!(f, "{device} lost its group (was {group})"),
            Drift::DeviceGainedGroup { device, group } => write!(f, "{device} joined group {group}"),
            Drift::DomainTypeChanged { group, from, to } => {
                write!(f, "group {group} default domain changed from {from} to {to}")
            }
        }
    }
}

/// The differences from `old` to `new`, in a stable order: renumbered,
/// vanished and appeared groups, domain type changes, then devices by name.
pub fn diff(old: &Snapshot, new: &Snapshot) -> Vec<Drift> {
    let mut drift = Vec::new();
    // Groups whose members are the same under another number.
    let mut renumbered: BTreeMap<u32, u32> = BTreeMap::new();
    for (n, g) in &old.groups {
        if new.groups.get(n).is_some_and(|h| h.devices == g.devices) || g.devices.is_empty() {
            continue;
        }
        if let Some((m, _)) = new.groups.iter().find(|(m, h)| *m != n && h.devices == g.devices) {
            renumbered.insert(*n, *m);
            drift.push(Drift::GroupRenumbered { from: *n, to: *m });
        }
    }
    let renumbered_to: BTreeSet<u32> = renumbered.values().copied().collect();
    for n in old.groups.keys() {
        if !new.groups.contains_key(n) && !renumbered.contains_key(n) {
            drift.push(Drift::GroupVanished { group: *n });
        }
    }
    for n in new.groups.keys() {
        if !old.groups.contains_key(n) && !renumbered_to.contains(n) {
            drift.push(Drift::GroupAppeared { group: *n });
        }
    }
    for (n, g) in &old.groups {
        let to = renumbered.get(n).copied().unwrap_or(*n);
        if let Some(h) = new.groups.get(&to)
            && h.domain_type != g.domain_type
        {
            drift.push(Drift::DomainTypeChanged {
                group: to,
                from: g.domain_type.clone(),
                to: h.domain_type.clone(),
            });
        }
    }
    let (before, after) = (old.device_groups(), new.device_groups());
    let names: BTreeSet<&str> = before.keys().chain(after.keys()).copied().collect();
    for device in names {
        let d = device.to_string();
        match (before.get(device), after.get(device)) {
            (Some(&from), Some(&to)) if from != to && renumbered.get(&from) != Some(&to) => {
                drift.push(Drift::DeviceMoved { device: d, from, to });
            }
            (Some(&group), None) => drift.push(Drift::DeviceLostGroup { device: d, group }),
            (None, Some(&group)) => drift.push(Drift::DeviceGainedGroup { device: d, group }),
            _ => {}
        }
    }
    drift
}

/// What `restore` found: the drift from the old kernel's groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftReport {
    /// Groups in the old kernel, or `None` when the record held no snapshot
    /// (nothing to compare with).
    pub groups_before: Option<usize>,
    /// Groups in the new kernel.
    pub groups_after: usize,
    /// Devices in groups in the new kernel.
    pub devices_after: usize,
    /// The differences.
    pub drift: Vec<Drift>,
}

/// At most this many drifts are spelled out in [`DriftReport::summary`].
const SUMMARY_ITEMS: usize = 5;

impl DriftReport {
    /// One line for logs, e.g. `IOMMU groups unchanged (4 groups, 6
    /// devices)` or `IOMMU groups drifted (2 changes): group 3 default domain
    /// changed from DMA-FQ to identity; ...`.
    pub fn summary(&self) -> String {
        let now = format!("{} groups, {} devices", self.groups_after, self.devices_after);
        if self.groups_before.is_none() {
            return format!("IOMMU groups not compared: the record holds no snapshot from the old kernel ({now})");
        }
        if self.drift.is_empty() {
            return format!("IOMMU groups unchanged ({now})");
        }
        let mut items: Vec<String> = self.drift.iter().take(SUMMARY_ITEMS).map(Drift::to_string).collect();
        if self.drift.len() > SUMMARY_ITEMS {
            items.push(format!("and {} more", self.drift.len() - SUMMARY_ITEMS));
        }
        format!(
            "IOMMU groups drifted ({} changes, now {now}): {}",
            self.drift.len(),
            items.join("; ")
        )
    }
}

/// Kernel parameters that turn the IOMMU off.
const IOMMU_OFF: &[&str] = &["intel_iommu=off", "amd_iommu=off", "iommu=off"];

/// The IOMMU subsystem. See the module docs.
#[derive(Debug)]
pub struct Iommu {
    sysfs: PathBuf,
    preserved: Vec<PciAddress>,
    report: Report<DriftReport>,
}

impl Iommu {
    /// Reads groups under `sysfs` (`/sys` on a host); `preserved` are the
    /// devices that must keep a group across the update.
    pub fn new(sysfs: impl Into<PathBuf>, preserved: Vec<PciAddress>) -> Iommu {
        Iommu {
            sysfs: sysfs.into(),
            preserved,
            report: Report::default(),
        }
    }

    /// A handle on the report of the last `restore`; keep one before handing
    /// the subsystem to the registry.
    pub fn report(&self) -> Report<DriftReport> {
        self.report.clone()
    }

    /// The report of the last `restore`, if one ran.
    pub fn last_report(&self) -> Option<DriftReport> {
        self.report.get()
    }

    fn snapshot(&self) -> Result<Snapshot, SubsystemError> {
        Snapshot::read(&self.sysfs).map_err(|e| SubsystemError::Failed(format!("cannot read the IOMMU groups: {e}")))
    }

    /// The preserved devices that have no group in `snap`.
    fn groupless(&self, snap: &Snapshot) -> Vec<PciAddress> {
        self.preserved
            .iter()
            .filter(|a| snap.group_of(&a.to_string()).is_none())
            .copied()
            .collect()
    }

    fn no_group_advice(&self, snap: &Snapshot) -> String {
        if snap.groups.is_empty() {
            format!(
                "this kernel has no IOMMU groups at all ({} is empty or missing), so the IOMMU is off: \
                 boot with intel_iommu=on (or amd_iommu=on on AMD), and enable the IOMMU (VT-d, AMD-Vi) in the firmware",
                self.sysfs.join("kernel/iommu_groups").display()
            )
        } else {
            "check the address with `lspci -D`: the device does not exist or no IOMMU covers it \
             (boot with intel_iommu=on, or amd_iommu=on on AMD)"
                .to_string()
        }
    }
}

fn list(addrs: &[PciAddress]) -> String {
    addrs.iter().map(PciAddress::to_string).collect::<Vec<_>>().join(", ")
}

impl Subsystem for Iommu {
    fn name(&self) -> &str {
        "iommu"
    }

    fn prepare(&mut self, ctx: &PrepareContext) -> Result<Option<Blob>, SubsystemError> {
        let snap = self.snapshot()?;
        let missing = self.groupless(&snap);
        if !missing.is_empty() {
            let (noun, verb) = if missing.len() == 1 {
                ("device", "is")
            } else {
                ("devices", "are")
            };
            return Err(SubsystemError::Veto(format!(
                "{noun} {} {verb} marked for preservation but {} no IOMMU group: {}",
                list(&missing),
                if missing.len() == 1 { "has" } else { "have" },
                self.no_group_advice(&snap)
            )));
        }
        if !self.preserved.is_empty()
            && let Some(cmdline) = &ctx.target_cmdline
            && let Some(off) = cmdline.split_whitespace().find(|w| IOMMU_OFF.contains(w))
        {
            return Err(SubsystemError::Veto(format!(
                "the target kernel's command line has {off}, so the preserved device(s) {} would have no IOMMU group \
                 after the update: remove {off} from it",
                list(&self.preserved)
            )));
        }
        let blob = snap
            .to_blob()
            .map_err(|e| SubsystemError::Failed(format!("cannot encode the IOMMU snapshot: {e}")))?;
        Ok(Some(blob))
    }

    fn freeze(&mut self) -> Result<Option<Blob>, SubsystemError> {
        // The snapshot taken at prepare stays in the record.
        Ok(None)
    }

    fn cancel(&mut self) -> Result<(), SubsystemError> {
        Ok(())
    }

    fn unfreeze(&mut self) -> Result<(), SubsystemError> {
        Ok(())
    }

    fn restore(&mut self, blob: Option<&Blob>) -> Result<(), SubsystemError> {
        let now = self.snapshot()?;
        let old = blob
            .map(Snapshot::from_blob)
            .transpose()
            .map_err(SubsystemError::Failed)?;
        let report = DriftReport {
            groups_before: old.as_ref().map(|o| o.groups.len()),
            groups_after: now.groups.len(),
            devices_after: now.device_count(),
            drift: old.as_ref().map(|o| diff(o, &now)).unwrap_or_default(),
        };
        if report.drift.is_empty() {
            tracing::info!("{}", report.summary());
        } else {
            tracing::warn!("{}", report.summary());
        }
        self.report.set(Some(report));
        let missing = self.groupless(&now);
        if !missing.is_empty() {
            return Err(SubsystemError::Failed(format!(
                "preserved device(s) {} have no IOMMU group in the new kernel, so no VM can get them back: {}",
                list(&missing),
                self.no_group_advice(&now)
            )));
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), SubsystemError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(groups: &[(u32, &str, &[&str])]) -> Snapshot {
        Snapshot {
            groups: groups
                .iter()
                .map(|(n, t, devs)| {
                    (
                        *n,
                        Group {
                            domain_type: DomainType::parse(t),
                            devices: devs.iter().map(|d| d.to_string()).collect(),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn identical_snapshots_have_no_drift() {
        let a = snap(&[
            (0, "DMA", &["0000:00:00.0"]),
            (1, "DMA-FQ", &["0000:00:01.0", "0000:00:01.1"]),
        ]);
        assert!(diff(&a, &a.clone()).is_empty());
    }

    #[test]
    fn a_renumbered_group_is_one_drift_not_every_device_moving() {
        let a = snap(&[
            (0, "DMA", &["0000:00:00.0"]),
            (1, "DMA", &["0000:00:01.0", "0000:00:01.1"]),
        ]);
        let b = snap(&[
            (0, "DMA", &["0000:00:00.0"]),
            (5, "identity", &["0000:00:01.0", "0000:00:01.1"]),
        ]);
        assert_eq!(
            diff(&a, &b),
            [
                Drift::GroupRenumbered { from: 1, to: 5 },
                Drift::DomainTypeChanged {
                    group: 5,
                    from: DomainType::Dma,
                    to: DomainType::Identity
                },
            ]
        );
    }

    #[test]
    fn split_groups_report_the_devices_that_moved() {
        let a = snap(&[(0, "DMA", &["0000:00:1f.0", "0000:00:1f.2"])]);
        let b = snap(&[
            (0, "DMA", &["0000:00:1f.0"]),
            (1, "DMA", &["0000:00:1f.2", "0000:00:1f.3"]),
        ]);
        assert_eq!(
            diff(&a, &b),
            [
                Drift::GroupAppeared { group: 1 },
                Drift::DeviceMoved {
                    device: "0000:00:1f.2".into(),
                    from: 0,
                    to: 1
                },
                Drift::DeviceGainedGroup {
                    device: "0000:00:1f.3".into(),
                    group: 1
                },
            ]
        );
    }

    #[test]
    fn summary_is_one_line_and_caps_the_list() {
        let mut r = DriftReport {
            groups_before: Some(2),
            groups_after: 2,
            devices_after: 3,
            drift: vec![],
        };
        assert_eq!(r.summary(), "IOMMU groups unchanged (2 groups, 3 devices)");
        r.drift = (0..7).map(|group| Drift::GroupAppeared { group }).collect();
        assert_eq!(
            r.summary(),
            "IOMMU groups drifted (7 changes, now 2 groups, 3 devices): group 0 appeared; group 1 appeared; \
             group 2 appeared; group 3 appeared; group 4 appeared; and 2 more"
        );
        r.groups_before = None;
        assert!(r.summary().starts_with("IOMMU groups not compared"));
    }

    #[test]
    fn snapshot_blob_round_trips_and_refuses_other_versions() {
        let a = snap(&[(3, "DMA-FQ", &["0000:00:03.0"]), (4, "weird", &[])]);
        let blob = a.to_blob().unwrap();
        assert_eq!(blob.version, SNAPSHOT_VERSION);
        assert_eq!(Snapshot::from_blob(&blob).unwrap(), a);
        let newer = Blob {
            version: 2,
            data: blob.data.clone(),
        };
        assert_eq!(
            Snapshot::from_blob(&newer).unwrap_err(),
            "the IOMMU snapshot in the record has format version 2, this luod reads version 1"
        );
        let damaged = Blob {
            version: 1,
            data: vec![0xff; 3],
        };
        assert!(
            Snapshot::from_blob(&damaged)
                .unwrap_err()
                .starts_with("the IOMMU snapshot in the record is damaged")
        );
    }
}
