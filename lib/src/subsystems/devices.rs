//! PCI devices passed through to VMs: checked before the update, rebound to
//! vfio-pci after it.
//!
//! The operator names the devices to preserve by PCI address. For each, the
//! subsystem reads from `<sysfs>/bus/pci/devices/ADDR/` (`sysfs` is `/sys` on
//! a host, a recorded or fake tree in tests) a [`DeviceInfo`]: vendor and
//! device ids, the bound driver (the `driver` symlink), `driver_override`,
//! the IOMMU group and the VFIO device node.
//!
//! - `prepare` requires every device to exist and be bound to vfio-pci, and
//!   otherwise vetoes with the exact commands that get it there. The
//!   [`DeviceInfo`]s go into the record (a versioned postcard blob).
//! - `restore` (new kernel, before VMMs restore) rebinds each device to
//!   vfio-pci, in the order the kernel needs: write `vfio-pci` to
//!   `driver_override`, unbind it from the driver the new kernel gave it (if
//!   any and not vfio-pci), write its address to `bus/pci/drivers_probe`;
//!   then it checks the binding and publishes one [`Rebound`] per device
//!   through [`Devices::report`]. A device whose ids differ from the recorded
//!   ones is left alone: the address now names another device.
//!
//! # Preserving VFIO fds: the hook for future kernels
//!
//! Kernels up to 7.3 preserve only memfds over LUO: a VFIO device fd (and the
//! iommufd and KVM fds around it) is refused with an errno. The day a kernel
//! accepts them, a device can stay bound and its DMA mappings live across
//! the kexec instead of being rebound afterwards. The subsystem is ready for
//! that: given a [`VfioFdPreserver`], `prepare` asks it to preserve each
//! device's fd once the binding checks passed. luod's implementation would
//! take the fd a VMM registered for the device (or open its VFIO cdev,
//! `/dev/vfio/devices/<`[`DeviceInfo::vfio_dev`]`>`) and hand it to LUO
//! `PRESERVE_FD` in a session luod keeps open until the reboot. A refusal
//! returns the kernel's errno, which becomes a `prepare` veto naming the
//! device and the errno: the operator learns it while everything still runs,
//! not at reboot. The fds preserved before a refusal are released again, and
//! `cancel` releases them all. Without a preserver (the default today) only
//! the rebind after the kexec happens.

use super::{PciAddress, Report};
use crate::subsystem::{Blob, PrepareContext, Subsystem, SubsystemError};
use nix::errno::Errno;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The driver devices must be bound to.
pub const VFIO_PCI: &str = "vfio-pci";

/// Version of the device list blob (postcard of `Vec<DeviceInfo>`).
pub const DEVICES_VERSION: u32 = 1;

/// How long `restore` waits for a device to show as bound after
/// `drivers_probe` (probing is synchronous unless `driver_async_probe=` is
/// set, so this is only a bound).
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(2);

/// Why vfio-pci did not take a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NotBoundReason {
    /// `bus/pci/drivers/vfio-pci` does not exist.
    VfioPciNotLoaded,
    /// The device has no IOMMU group, and vfio-pci refuses such devices.
    NoIommuGroup,
    /// Nothing visible in sysfs explains it.
    Unknown,
}

impl fmt::Display for NotBoundReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotBoundReason::VfioPciNotLoaded => {
                "vfio-pci is not loaded: run `modprobe vfio-pci` (or load it from the initramfs) before luod restores"
            }
            NotBoundReason::NoIommuGroup => {
                "the device has no IOMMU group, so vfio-pci refuses it: boot with intel_iommu=on (or amd_iommu=on on AMD)"
            }
            NotBoundReason::Unknown => "see `dmesg` for why vfio-pci did not take it",
        })
    }
}

/// Why a device could not be read, checked or rebound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum DeviceError {
    /// No such device.
    #[error(
        "PCI device {addr} does not exist (no {}): check the address with `lspci -D`, or remove it from the devices \
         to preserve",
        path.display()
    )]
    NotFound {
        /// The device.
        addr: PciAddress,
        /// The directory that is missing.
        path: PathBuf,
    },
    /// A sysfs file could not be read.
    #[error("cannot read {}: {errno}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[serde(with = "super::errno_serde")]
        errno: Errno,
    },
    /// A sysfs file holds something the kernel does not write there.
    #[error("{} holds {content:?}, which is not what the kernel writes there; is the sysfs root right?", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Its content.
        content: String,
    },
    /// A sysfs write failed.
    #[error("cannot write {value:?} to {}: {errno}{}", path.display(), write_hint(*errno))]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// Why.
        #[serde(with = "super::errno_serde")]
        errno: Errno,
    },
    /// The address names another device than before the update.
    #[error(
        "the device at {addr} is now {found}, not the {expected} preserved before the update; it was left alone \
         (did the PCI topology change?)"
    )]
    IdsChanged {
        /// The address.
        addr: PciAddress,
        /// `vendor:device` recorded before the update.
        expected: String,
        /// `vendor:device` found now.
        found: String,
    },
    /// vfio-pci did not take the device.
    #[error("device {addr} is bound to {} after the rebind, not vfio-pci: {reason}", driver.as_deref().unwrap_or("no driver"))]
    NotBound {
        /// The device.
        addr: PciAddress,
        /// The driver it is bound to, if any.
        driver: Option<String>,
        /// Why, as far as sysfs tells.
        reason: NotBoundReason,
    },
}

fn write_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::EACCES | Errno::EPERM => "; rebinding devices needs root",
        _ => "",
    }
}

fn errno_of(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// What sysfs says about a PCI device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Its address.
    pub addr: PciAddress,
    /// PCI vendor id (`vendor`).
    pub vendor: u16,
    /// PCI device id (`device`).
    pub device: u16,
    /// The bound driver (basename of the `driver` symlink), if any.
    pub driver: Option<String>,
    /// `driver_override`, if set (`(null)` reads as none).
    pub driver_override: Option<String>,
    /// Its IOMMU group (the `iommu_group` symlink), if any.
    pub iommu_group: Option<u32>,
    /// Its VFIO device name under `vfio-dev/` (e.g. `vfio0`), present while
    /// vfio-pci is bound; the cdev is `/dev/vfio/devices/<name>` on kernels
    /// with `CONFIG_VFIO_DEVICE_CDEV`.
    pub vfio_dev: Option<String>,
}

/// `<sysfs>/bus/pci/devices/<addr>`.
pub fn device_dir(sysfs: &Path, addr: &PciAddress) -> PathBuf {
    sysfs.join("bus/pci/devices").join(addr.to_string())
}

fn read_id(path: &Path) -> Result<u16, DeviceError> {
    let text = std::fs::read_to_string(path).map_err(|e| DeviceError::Read {
        path: path.into(),
        errno: errno_of(&e),
    })?;
    let t = text.trim();
    t.strip_prefix("0x")
        .and_then(|hex| u16::from_str_radix(hex, 16).ok())
        .ok_or_else(|| DeviceError::Malformed {
            path: path.into(),
            content: t.to_string(),
        })
}

/// The basename of the symlink at `path`, or `None` when there is none.
fn link_name(path: &Path) -> Result<Option<String>, DeviceError> {
    match std::fs::read_link(path) {
        Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DeviceError::Read {
            path: path.into(),
            errno: errno_of(&e),
        }),
    }
}

impl DeviceInfo {
    /// Reads the device at `addr` under `sysfs`.
    pub fn read(sysfs: &Path, addr: &PciAddress) -> Result<DeviceInfo, DeviceError> {
        let dir = device_dir(sysfs, addr);
        if !dir.exists() {
            return Err(DeviceError::NotFound { addr: *addr, path: dir });
        }
        let override_path = dir.join("driver_override");
        let driver_override = match std::fs::read_to_string(&override_path) {
            Ok(text) => Some(text.trim().to_string()).filter(|t| !t.is_empty() && t != "(null)"),
            // Kernels before 3.16 have no driver_override.
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => {
                return Err(DeviceError::Read {
                    path: override_path,
                    errno: errno_of(&e),
                });
            }
        };
        let group_path = dir.join("iommu_group");
        let iommu_group = match link_name(&group_path)? {
            Some(name) => Some(name.parse().map_err(|_| DeviceError::Malformed {
                path: group_path,
                content: name,
            })?),
            None => None,
        };
        let vfio_dev = match std::fs::read_dir(dir.join("vfio-dev")) {
            Ok(mut entries) => entries
                .next()
                .and_then(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned()),
            Err(_) => None,
        };
        Ok(DeviceInfo {
            addr: *addr,
            vendor: read_id(&dir.join("vendor"))?,
            device: read_id(&dir.join("device"))?,
            driver: link_name(&dir.join("driver"))?,
            driver_override,
            iommu_group,
            vfio_dev,
        })
    }

    /// `vendor:device` in hex, as `lspci -n` prints it.
    pub fn ids(&self) -> String {
        format!("{:04x}:{:04x}", self.vendor, self.device)
    }

    /// True when vfio-pci drives the device.
    pub fn bound_to_vfio(&self) -> bool {
        self.driver.as_deref() == Some(VFIO_PCI)
    }
}

/// The shell commands that bind `info`'s device to vfio-pci, as one line.
pub fn bind_commands(sysfs: &Path, info: &DeviceInfo) -> String {
    let dir = device_dir(sysfs, &info.addr);
    let a = info.addr;
    let mut steps = Vec::new();
    if !sysfs.join("bus/pci/drivers").join(VFIO_PCI).exists() {
        steps.push("modprobe vfio-pci".to_string());
    }
    steps.push(format!("echo {VFIO_PCI} > {}", dir.join("driver_override").display()));
    if info.driver.is_some() {
        steps.push(format!("echo {a} > {}", dir.join("driver/unbind").display()));
    }
    steps.push(format!("echo {a} > {}", sysfs.join("bus/pci/drivers_probe").display()));
    steps.join("; ")
}

/// Preserves VFIO device fds over the kexec, for kernels that accept them.
/// See the module docs.
pub trait VfioFdPreserver: Send + fmt::Debug {
    /// Hands the VFIO fd of `device` to the kernel for the next kernel.
    /// `Err` carries the kernel's errno (or the one that kept the fd from
    /// being opened).
    fn preserve_fd(&mut self, device: &DeviceInfo) -> Result<(), Errno>;
    /// Undoes a successful [`VfioFdPreserver::preserve_fd`] (the update was
    /// vetoed later or cancelled).
    fn unpreserve_fd(&mut self, device: &DeviceInfo);
}

/// What `restore` did to a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RebindOutcome {
    /// It was bound to vfio-pci already; nothing was written.
    AlreadyBound,
    /// It is bound to vfio-pci now; `from` is the driver it was unbound from.
    Rebound {
        /// The driver the new kernel had given it, if any.
        from: Option<String>,
    },
}

/// The result of rebinding one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebound {
    /// The device.
    pub addr: PciAddress,
    /// What happened.
    pub result: Result<RebindOutcome, DeviceError>,
}

impl fmt::Display for Rebound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.result {
            Ok(RebindOutcome::AlreadyBound) => write!(f, "{} already bound to {VFIO_PCI}", self.addr),
            Ok(RebindOutcome::Rebound { from: Some(d) }) => write!(f, "{} rebound from {d} to {VFIO_PCI}", self.addr),
            Ok(RebindOutcome::Rebound { from: None }) => write!(f, "{} bound to {VFIO_PCI}", self.addr),
            Err(e) => write!(f, "{} not bound: {e}", self.addr),
        }
    }
}

/// One line for logs about a rebind report.
pub fn rebind_summary(report: &[Rebound]) -> String {
    let failed = report.iter().filter(|r| r.result.is_err()).count();
    let items: Vec<String> = report.iter().map(Rebound::to_string).collect();
    if report.is_empty() {
        return "no devices to rebind".to_string();
    }
    format!(
        "{} of {} device(s) bound to {VFIO_PCI}: {}",
        report.len() - failed,
        report.len(),
        items.join("; ")
    )
}

/// The device subsystem. See the module docs.
#[derive(Debug)]
pub struct Devices {
    sysfs: PathBuf,
    devices: Vec<PciAddress>,
    preserver: Option<Box<dyn VfioFdPreserver>>,
    preserved: Vec<DeviceInfo>,
    settle: Duration,
    report: Report<Vec<Rebound>>,
}

impl Devices {
    /// The devices at `devices` (duplicates ignored), read under `sysfs`.
    pub fn new(sysfs: impl Into<PathBuf>, devices: Vec<PciAddress>) -> Devices {
        let mut unique = Vec::new();
        for d in devices {
            if !unique.contains(&d) {
                unique.push(d);
            }
        }
        Devices {
            sysfs: sysfs.into(),
            devices: unique,
            preserver: None,
            preserved: Vec::new(),
            settle: DEFAULT_SETTLE,
            report: Report::default(),
        }
    }

    /// Preserves each device's VFIO fd at `prepare` through `preserver`.
    pub fn with_fd_preserver(mut self, preserver: Box<dyn VfioFdPreserver>) -> Devices {
        self.preserver = Some(preserver);
        self
    }

    /// How long `restore` waits for each device to show as bound (default
    /// [`DEFAULT_SETTLE`]).
    pub fn settle_timeout(mut self, settle: Duration) -> Devices {
        self.settle = settle;
        self
    }

    /// The devices to preserve.
    pub fn devices(&self) -> &[PciAddress] {
        &self.devices
    }

    /// A handle on the report of the last `restore`; keep one before handing
    /// the subsystem to the registry.
    pub fn report(&self) -> Report<Vec<Rebound>> {
        self.report.clone()
    }

    /// The report of the last `restore`, if one ran.
    pub fn last_report(&self) -> Option<Vec<Rebound>> {
        self.report.get()
    }

    fn write(&self, path: PathBuf, value: &str) -> Result<(), DeviceError> {
        // No O_CREAT: a sysfs attribute that is missing must fail, not turn
        // into a new file. One write(2): sysfs takes a store per call.
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .and_then(|mut f| f.write_all(value.as_bytes()))
            .map_err(|e| DeviceError::Write {
                path,
                value: value.to_string(),
                errno: errno_of(&e),
            })
    }

    /// Binds the device at `addr` to vfio-pci; `expected` are the ids it had
    /// before the update.
    fn rebind(&self, addr: &PciAddress, expected: Option<&DeviceInfo>) -> Result<RebindOutcome, DeviceError> {
        let info = DeviceInfo::read(&self.sysfs, addr)?;
        if let Some(old) = expected
            && (old.vendor, old.device) != (info.vendor, info.device)
        {
            return Err(DeviceError::IdsChanged {
                addr: *addr,
                expected: old.ids(),
                found: info.ids(),
            });
        }
        if info.bound_to_vfio() {
            return Ok(RebindOutcome::AlreadyBound);
        }
        let dir = device_dir(&self.sysfs, addr);
        if info.driver_override.as_deref() != Some(VFIO_PCI) {
            self.write(dir.join("driver_override"), VFIO_PCI)?;
        }
        if info.driver.is_some() {
            self.write(dir.join("driver/unbind"), &addr.to_string())?;
        }
        self.write(self.sysfs.join("bus/pci/drivers_probe"), &addr.to_string())?;
        let deadline = Instant::now() + self.settle;
        loop {
            let now = DeviceInfo::read(&self.sysfs, addr)?;
            if now.bound_to_vfio() {
                return Ok(RebindOutcome::Rebound { from: info.driver });
            }
            if Instant::now() >= deadline {
                let reason = if !self.sysfs.join("bus/pci/drivers").join(VFIO_PCI).exists() {
                    NotBoundReason::VfioPciNotLoaded
                } else if now.iommu_group.is_none() {
                    NotBoundReason::NoIommuGroup
                } else {
                    NotBoundReason::Unknown
                };
                return Err(DeviceError::NotBound {
                    addr: *addr,
                    driver: now.driver,
                    reason,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn release_preserved(&mut self) {
        if let Some(p) = self.preserver.as_mut() {
            for info in self.preserved.iter().rev() {
                p.unpreserve_fd(info);
            }
        }
        self.preserved.clear();
    }
}

fn errno_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::ENOENT | Errno::EOPNOTSUPP | Errno::EINVAL => {
            "this kernel cannot carry VFIO devices over a live update (kernels up to 7.3 preserve only memfds)"
        }
        Errno::EBUSY => "the fd is preserved already (by luod or another agent)",
        _ => "see dmesg",
    }
}

impl Subsystem for Devices {
    fn name(&self) -> &str {
        "devices"
    }

    fn prepare(&mut self, _: &PrepareContext) -> Result<Option<Blob>, SubsystemError> {
        let mut infos = Vec::new();
        let mut problems = Vec::new();
        for addr in &self.devices {
            match DeviceInfo::read(&self.sysfs, addr) {
                Ok(info) if info.bound_to_vfio() => infos.push(info),
                Ok(info) => problems.push(format!(
                    "device {addr} ({}) is bound to {}, not {VFIO_PCI}: run `{}`",
                    info.ids(),
                    info.driver.as_deref().unwrap_or("no driver"),
                    bind_commands(&self.sysfs, &info)
                )),
                Err(e) => problems.push(e.to_string()),
            }
        }
        if !problems.is_empty() {
            let head = if problems.len() == 1 {
                String::new()
            } else {
                format!("{} devices to preserve are not ready: ", problems.len())
            };
            return Err(SubsystemError::Veto(format!("{head}{}", problems.join("; "))));
        }
        self.release_preserved();
        let mut refused = None;
        if let Some(preserver) = self.preserver.as_mut() {
            for info in &infos {
                if let Err(errno) = preserver.preserve_fd(info) {
                    refused = Some((info, errno));
                    break;
                }
                self.preserved.push(info.clone());
            }
        }
        if let Some((info, errno)) = refused {
            self.release_preserved();
            return Err(SubsystemError::Veto(format!(
                "the kernel refused to preserve the VFIO fd of device {} ({}): {errno}; {}; remove the device from \
                 the devices to preserve, or update this host with a cold reboot",
                info.addr,
                info.ids(),
                errno_hint(errno)
            )));
        }
        let data = postcard::to_stdvec(&infos)
            .map_err(|e| SubsystemError::Failed(format!("cannot encode the device list: {e}")))?;
        Ok(Some(Blob {
            version: DEVICES_VERSION,
            data,
        }))
    }

    fn freeze(&mut self) -> Result<Option<Blob>, SubsystemError> {
        Ok(None)
    }

    fn cancel(&mut self) -> Result<(), SubsystemError> {
        self.release_preserved();
        Ok(())
    }

    fn unfreeze(&mut self) -> Result<(), SubsystemError> {
        Ok(())
    }

    /// Rebinds the devices of the old kernel's list, then the configured
    /// ones it did not have; every device is tried.
    fn restore(&mut self, blob: Option<&Blob>) -> Result<(), SubsystemError> {
        let recorded: Vec<DeviceInfo> = match blob {
            None => Vec::new(),
            Some(b) if b.version != DEVICES_VERSION => {
                return Err(SubsystemError::Failed(format!(
                    "the device list in the record has format version {}, this luod reads version {DEVICES_VERSION}",
                    b.version
                )));
            }
            Some(b) => postcard::from_bytes(&b.data)
                .map_err(|e| SubsystemError::Failed(format!("the device list in the record is damaged: {e}")))?,
        };
        let mut todo: Vec<(PciAddress, Option<&DeviceInfo>)> = recorded.iter().map(|i| (i.addr, Some(i))).collect();
        for addr in &self.devices {
            if !todo.iter().any(|(a, _)| a == addr) {
                todo.push((*addr, None));
            }
        }
        let report: Vec<Rebound> = todo
            .iter()
            .map(|(addr, old)| Rebound {
                addr: *addr,
                result: self.rebind(addr, *old),
            })
            .collect();
        let summary = rebind_summary(&report);
        let failed: Vec<String> = report
            .iter()
            .filter(|r| r.result.is_err())
            .map(Rebound::to_string)
            .collect();
        self.report.set(Some(report));
        if failed.is_empty() {
            tracing::info!("{summary}");
            Ok(())
        } else {
            tracing::warn!("{summary}");
            Err(SubsystemError::Failed(failed.join("; ")))
        }
    }

    fn finish(&mut self) -> Result<(), SubsystemError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(driver: Option<&str>) -> DeviceInfo {
        DeviceInfo {
            addr: "0000:00:02.0".parse().unwrap(),
            vendor: 0x8086,
            device: 0x100e,
            driver: driver.map(str::to_string),
            driver_override: None,
            iommu_group: Some(2),
            vfio_dev: None,
        }
    }

    #[test]
    fn bind_commands_follow_the_kernel_order() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path();
        std::fs::create_dir_all(sys.join("bus/pci/drivers/vfio-pci")).unwrap();
        let d = sys.join("bus/pci/devices/0000:00:02.0");
        assert_eq!(
            bind_commands(sys, &info(Some("e1000"))),
            format!(
                "echo vfio-pci > {0}/driver_override; echo 0000:00:02.0 > {0}/driver/unbind; \
                 echo 0000:00:02.0 > {1}/bus/pci/drivers_probe",
                d.display(),
                sys.display()
            )
        );
        assert_eq!(
            bind_commands(sys, &info(None)),
            format!(
                "echo vfio-pci > {}/driver_override; echo 0000:00:02.0 > {}/bus/pci/drivers_probe",
                d.display(),
                sys.display()
            )
        );
        std::fs::remove_dir(sys.join("bus/pci/drivers/vfio-pci")).unwrap();
        assert!(bind_commands(sys, &info(None)).starts_with("modprobe vfio-pci; echo vfio-pci > "));
    }

    #[test]
    fn rebind_report_lines() {
        let a: PciAddress = "0000:00:02.0".parse().unwrap();
        let r = [
            Rebound {
                addr: a,
                result: Ok(RebindOutcome::Rebound {
                    from: Some("e1000".into()),
                }),
            },
            Rebound {
                addr: a,
                result: Ok(RebindOutcome::AlreadyBound),
            },
            Rebound {
                addr: a,
                result: Err(DeviceError::NotBound {
                    addr: a,
                    driver: None,
                    reason: NotBoundReason::VfioPciNotLoaded,
                }),
            },
        ];
        assert_eq!(
            rebind_summary(&r),
            "2 of 3 device(s) bound to vfio-pci: 0000:00:02.0 rebound from e1000 to vfio-pci; 0000:00:02.0 already \
             bound to vfio-pci; 0000:00:02.0 not bound: device 0000:00:02.0 is bound to no driver after the rebind, \
             not vfio-pci: vfio-pci is not loaded: run `modprobe vfio-pci` (or load it from the initramfs) before \
             luod restores"
        );
        assert_eq!(rebind_summary(&[]), "no devices to rebind");
    }

    #[test]
    fn device_list_blob_round_trips() {
        let list = vec![info(Some("vfio-pci")), info(None)];
        let bytes = postcard::to_stdvec(&list).unwrap();
        assert_eq!(postcard::from_bytes::<Vec<DeviceInfo>>(&bytes).unwrap(), list);
    }
}
