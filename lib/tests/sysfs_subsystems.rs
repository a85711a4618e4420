//! The IOMMU and device subsystems on sysfs trees recorded from real kernels.
//!
//! Each test rebuilds a tree from `fixtures/sysfs/*.tree` (format and
//! provenance in `fixtures/sysfs/README.md`) in a temporary directory, with
//! the kernel's layout and relative symlinks, and points the subsystem's
//! sysfs root at it.

use liveupdate::subsystem::{Blob, PrepareContext, Subsystem, SubsystemError};
use liveupdate::subsystems::PciAddress;
use liveupdate::subsystems::devices::{
    DeviceError, DeviceInfo, Devices, NotBoundReason, RebindOutcome, Rebound, VfioFdPreserver,
};
use liveupdate::subsystems::iommu::{DomainType, Drift, DriftReport, Iommu, IommuError, Snapshot};
use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use std::collections::HashMap;
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A sysfs tree rebuilt in a temporary directory.
struct Tree {
    dir: tempfile::TempDir,
}

/// `base/rel` with `..` resolved lexically.
fn resolve(base: &Path, rel: &str) -> PathBuf {
    let mut out = base.to_path_buf();
    for c in Path::new(rel).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

impl Tree {
    /// The tree recorded in `fixtures/sysfs/<name>.tree`.
    fn fixture(name: &str) -> Tree {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/sysfs")
            .join(format!("{name}.tree"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Tree::build(&text)
    }

    /// A tree from lines in the fixture format.
    fn build(text: &str) -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("bus/pci/devices")).unwrap();
        write(&root.join("bus/pci/drivers_probe"), "");
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let mut words = line.split_whitespace();
            match words.next().unwrap() {
                "kernel" => {}
                "iommu_groups" => std::fs::create_dir_all(root.join("kernel/iommu_groups")).unwrap(),
                "drivers" => {
                    for d in words {
                        for f in ["bind", "unbind", "new_id", "remove_id"] {
                            write(&root.join("bus/pci/drivers").join(d).join(f), "");
                        }
                    }
                }
                "group" => {
                    let n = words.next().unwrap();
                    let ty = words.next().unwrap();
                    let g = root.join("kernel/iommu_groups").join(n);
                    std::fs::create_dir_all(g.join("devices")).unwrap();
                    if ty != "-" {
                        write(&g.join("type"), &format!("{ty}\n"));
                    }
                    for addr in words {
                        symlink(
                            format!("../../../../devices/pci0000:00/{addr}"),
                            g.join("devices").join(addr),
                        )
                        .unwrap();
                    }
                }
                "pci" => {
                    let addr = words.next().unwrap();
                    let field = |k: &str| {
                        line.split_whitespace()
                            .find_map(|w| w.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
                            .unwrap_or_else(|| panic!("no {k}= in {line}"))
                            .to_string()
                    };
                    let link = field("link");
                    let dev = resolve(&root.join("bus/pci/devices"), &link);
                    write(&dev.join("vendor"), &format!("{}\n", field("vendor")));
                    write(&dev.join("device"), &format!("{}\n", field("device")));
                    write(&dev.join("driver_override"), &format!("{}\n", field("override")));
                    symlink(&link, root.join("bus/pci/devices").join(addr)).unwrap();
                    let driver = field("driver");
                    if driver != "-" {
                        symlink(format!("../../../bus/pci/drivers/{driver}"), dev.join("driver")).unwrap();
                    }
                    let group = field("group");
                    if !group.is_empty() {
                        symlink(&group, dev.join("iommu_group")).unwrap();
                    }
                    let vfio = field("vfio-dev");
                    if vfio != "-" {
                        std::fs::create_dir_all(dev.join("vfio-dev").join(vfio)).unwrap();
                    }
                }
                other => panic!("unknown fixture line kind {other:?}: {line}"),
            }
        }
        Tree { dir }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Loads a PCI driver (`modprobe`): creates `bus/pci/drivers/<name>/`.
    fn load_driver(&self, name: &str) {
        for f in ["bind", "unbind", "new_id", "remove_id"] {
            write(&self.root().join("bus/pci/drivers").join(name).join(f), "");
        }
    }
}

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn devices(list: &[&str]) -> std::collections::BTreeSet<String> {
    list.iter().map(|d| d.to_string()).collect()
}

// ---- IOMMU: parsing ----

#[test]
fn iommu_snapshot_of_a_q35_guest_with_intel_iommu() {
    let tree = Tree::fixture("q35-intel-iommu-dma");
    let snap = Snapshot::read(tree.root()).unwrap();
    assert_eq!(snap.groups.keys().copied().collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert!(snap.groups.values().all(|g| g.domain_type == DomainType::DmaFq));
    assert_eq!(snap.groups[&1].devices, devices(&["0000:00:01.0"]));
    // The ICH9 functions cannot be isolated from each other: one group.
    assert_eq!(
        snap.groups[&3].devices,
        devices(&["0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3"])
    );
    assert_eq!(snap.group_of("0000:00:1f.2"), Some(3));
    assert_eq!(snap.group_of("0000:00:09.0"), None);
    assert_eq!(snap.device_count(), 6);
}

#[test]
fn iommu_snapshot_reads_the_passthrough_domain_type() {
    let snap = Snapshot::read(Tree::fixture("q35-intel-iommu-pt").root()).unwrap();
    assert_eq!(snap.groups.len(), 4);
    assert!(snap.groups.values().all(|g| g.domain_type == DomainType::Identity));
}

#[test]
fn iommu_snapshot_is_empty_when_the_iommu_is_off_or_absent() {
    for fixture in ["q35-intel-iommu-off", "build-host-no-iommu"] {
        assert_eq!(
            Snapshot::read(Tree::fixture(fixture).root()).unwrap(),
            Snapshot::default(),
            "{fixture}"
        );
    }
    // A kernel without CONFIG_IOMMU_API has no groups directory at all.
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(Snapshot::read(empty.path()).unwrap(), Snapshot::default());
}

#[test]
fn iommu_snapshot_of_an_old_kernel_without_type_files() {
    let tree = Tree::build("iommu_groups\ngroup 7 - 0000:00:03.0\ngroup 8 unknown 0000:00:04.0\n");
    let snap = Snapshot::read(tree.root()).unwrap();
    assert_eq!(snap.groups[&7].domain_type, DomainType::NotReported);
    assert_eq!(snap.groups[&8].domain_type, DomainType::Other("unknown".into()));
}

#[test]
fn iommu_snapshot_refuses_a_tree_that_is_not_sysfs() {
    let tree = Tree::build("iommu_groups\n");
    std::fs::create_dir_all(tree.root().join("kernel/iommu_groups/notanumber/devices")).unwrap();
    let err = Snapshot::read(tree.root()).unwrap_err();
    let path = tree.root().join("kernel/iommu_groups/notanumber");
    assert_eq!(
        err,
        IommuError::Malformed {
            path: path.clone(),
            what: "a group directory is named by its number".into()
        }
    );
    assert_eq!(
        err.to_string(),
        format!(
            "{} is not what the kernel writes there: a group directory is named by its number; is the sysfs root right?",
            path.display()
        )
    );
}

// ---- IOMMU: prepare ----

#[test]
fn iommu_prepare_keeps_the_snapshot_in_a_versioned_blob() {
    let tree = Tree::fixture("q35-intel-iommu-dma");
    let mut iommu = Iommu::new(tree.root(), vec![addr("0000:00:01.0"), addr("0000:00:02.0")]);
    assert_eq!(iommu.name(), "iommu");
    let blob = iommu.prepare(&PrepareContext::default()).unwrap().unwrap();
    assert_eq!(blob.version, 1);
    assert_eq!(
        Snapshot::from_blob(&blob).unwrap(),
        Snapshot::read(tree.root()).unwrap()
    );
    assert_eq!(
        iommu.freeze().unwrap(),
        None,
        "the prepare snapshot stays in the record"
    );
}

#[test]
fn iommu_prepare_vetoes_a_preserved_device_when_the_iommu_is_off() {
    let tree = Tree::fixture("q35-intel-iommu-off");
    let mut iommu = Iommu::new(tree.root(), vec![addr("0000:00:01.0")]);
    let err = iommu.prepare(&PrepareContext::default()).unwrap_err();
    assert_eq!(
        err,
        SubsystemError::Veto(format!(
            "device 0000:00:01.0 is marked for preservation but has no IOMMU group: this kernel has no IOMMU groups \
             at all ({}/kernel/iommu_groups is empty or missing), so the IOMMU is off: boot with intel_iommu=on \
             (or amd_iommu=on on AMD), and enable the IOMMU (VT-d, AMD-Vi) in the firmware",
            tree.root().display()
        ))
    );
    // Without preserved devices there is nothing to veto.
    Iommu::new(tree.root(), vec![])
        .prepare(&PrepareContext::default())
        .unwrap();
}

#[test]
fn iommu_prepare_vetoes_an_address_that_is_in_no_group() {
    let tree = Tree::fixture("q35-intel-iommu-dma");
    let mut iommu = Iommu::new(
        tree.root(),
        vec![addr("0000:00:01.0"), addr("0000:00:09.0"), addr("0000:00:0a.0")],
    );
    let err = iommu.prepare(&PrepareContext::default()).unwrap_err();
    assert_eq!(
        err,
        SubsystemError::Veto(
            "devices 0000:00:09.0, 0000:00:0a.0 are marked for preservation but have no IOMMU group: check the \
             address with `lspci -D`: the device does not exist or no IOMMU covers it (boot with intel_iommu=on, \
             or amd_iommu=on on AMD)"
                .into()
        )
    );
}

#[test]
fn iommu_prepare_vetoes_a_target_kernel_that_turns_the_iommu_off() {
    let tree = Tree::fixture("q35-intel-iommu-dma");
    let mut iommu = Iommu::new(tree.root(), vec![addr("0000:00:01.0")]);
    let ctx = PrepareContext {
        target_cmdline: Some("console=ttyS0 intel_iommu=off quiet".into()),
        ..Default::default()
    };
    assert_eq!(
        iommu.prepare(&ctx).unwrap_err(),
        SubsystemError::Veto(
            "the target kernel's command line has intel_iommu=off, so the preserved device(s) 0000:00:01.0 would \
             have no IOMMU group after the update: remove intel_iommu=off from it"
                .into()
        )
    );
    let ctx = PrepareContext {
        target_cmdline: Some("console=ttyS0 intel_iommu=on".into()),
        ..Default::default()
    };
    iommu.prepare(&ctx).unwrap();
}

// ---- IOMMU: restore and drift ----

/// Runs prepare on the `before` tree and restore on the `after` tree, with
/// `preserved` devices; returns restore's result and the report.
fn update(before: &str, after: &str, preserved: &[&str]) -> (Result<(), SubsystemError>, DriftReport) {
    let preserved: Vec<PciAddress> = preserved.iter().map(|a| addr(a)).collect();
    let old_tree = Tree::fixture(before);
    let blob = Iommu::new(old_tree.root(), preserved.clone())
        .prepare(&PrepareContext::default())
        .unwrap()
        .unwrap();
    let new_tree = Tree::fixture(after);
    let mut iommu = Iommu::new(new_tree.root(), preserved);
    let report = iommu.report();
    let result = iommu.restore(Some(&blob));
    assert_eq!(iommu.last_report(), report.get());
    (result, report.get().expect("restore publishes a report"))
}

#[test]
fn iommu_restore_on_the_same_groups_reports_no_drift() {
    let (result, report) = update("q35-intel-iommu-dma", "q35-intel-iommu-dma-vfio", &["0000:00:01.0"]);
    result.unwrap();
    assert_eq!(
        report,
        DriftReport {
            groups_before: Some(4),
            groups_after: 4,
            devices_after: 6,
            drift: vec![]
        }
    );
    assert_eq!(report.summary(), "IOMMU groups unchanged (4 groups, 6 devices)");
}

#[test]
fn iommu_restore_reports_domain_type_changes_without_failing() {
    let (result, report) = update("q35-intel-iommu-dma", "q35-intel-iommu-pt", &["0000:00:01.0"]);
    result.unwrap();
    let changed = |group| Drift::DomainTypeChanged {
        group,
        from: DomainType::DmaFq,
        to: DomainType::Identity,
    };
    assert_eq!(report.drift, [changed(0), changed(1), changed(2), changed(3)]);
    assert_eq!(
        report.summary(),
        "IOMMU groups drifted (4 changes, now 4 groups, 6 devices): group 0 default domain changed from DMA-FQ to \
         identity; group 1 default domain changed from DMA-FQ to identity; group 2 default domain changed from \
         DMA-FQ to identity; group 3 default domain changed from DMA-FQ to identity"
    );
}

#[test]
fn iommu_restore_fails_when_a_preserved_device_lost_its_group() {
    let (result, report) = update("q35-intel-iommu-dma", "q35-intel-iommu-off", &["0000:00:01.0"]);
    let SubsystemError::Failed(msg) = result.unwrap_err() else {
        panic!("not Failed")
    };
    assert!(
        msg.starts_with(
            "preserved device(s) 0000:00:01.0 have no IOMMU group in the new kernel, so no VM can get them back: \
             this kernel has no IOMMU groups at all"
        ),
        "{msg}"
    );
    // The report is there all the same.
    assert_eq!(report.groups_after, 0);
    assert_eq!(
        report.drift.len(),
        4 + 6,
        "4 groups vanished, 6 devices lost theirs: {:?}",
        report.drift
    );
    assert!(report.drift.contains(&Drift::GroupVanished { group: 3 }));
    assert!(report.drift.contains(&Drift::DeviceLostGroup {
        device: "0000:00:01.0".into(),
        group: 1
    }));
}

#[test]
fn iommu_restore_without_preserved_devices_only_reports_lost_groups() {
    let (result, report) = update("q35-intel-iommu-dma", "q35-intel-iommu-off", &[]);
    result.unwrap();
    assert!(
        report
            .summary()
            .starts_with("IOMMU groups drifted (10 changes, now 0 groups, 0 devices): group 0 vanished")
    );
}

#[test]
fn iommu_restore_after_a_device_was_added_reports_renumbering_once() {
    let (result, report) = update("q35-intel-iommu-dma", "q35-intel-iommu-extra-device", &["0000:00:01.0"]);
    result.unwrap();
    assert_eq!(
        report.drift,
        [
            Drift::GroupRenumbered { from: 3, to: 4 },
            Drift::DeviceGainedGroup {
                device: "0000:00:03.0".into(),
                group: 3
            },
        ]
    );
}

#[test]
fn iommu_restore_without_an_old_snapshot_says_it_did_not_compare() {
    let tree = Tree::fixture("q35-intel-iommu-dma");
    let mut iommu = Iommu::new(tree.root(), vec![]);
    iommu.restore(None).unwrap();
    let report = iommu.last_report().unwrap();
    assert_eq!(report.groups_before, None);
    assert_eq!(
        report.summary(),
        "IOMMU groups not compared: the record holds no snapshot from the old kernel (4 groups, 6 devices)"
    );
}

#[test]
fn iommu_restore_refuses_a_snapshot_from_a_newer_luod() {
    let tree = Tree::fixture("q35-intel-iommu-dma");
    let err = Iommu::new(tree.root(), vec![])
        .restore(Some(&Blob {
            version: 9,
            data: vec![],
        }))
        .unwrap_err();
    assert_eq!(
        err,
        SubsystemError::Failed(
            "the IOMMU snapshot in the record has format version 9, this luod reads version 1".into()
        )
    );
}

// ---- Devices: the kernel side of a rebind ----

/// One write the device subsystem made: the file (relative to the sysfs
/// root, as the subsystem named it) and what it wrote.
type Write = (String, String);

/// The kernel's side of the rebind, emulated on a fake tree. It watches every
/// file the device subsystem may write (one inotify queue, so the log is in
/// the order of the writes) and applies their effect as the kernel does:
/// `driver/unbind` removes the `driver` link; `drivers_probe` binds the
/// device to the driver named in its `driver_override` if that driver is
/// loaded, except that vfio-pci refuses a device without an IOMMU group (as
/// the recorded `q35-intel-iommu-off-after-rebind` tree shows).
struct FakeKernel {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Write>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn apply(root: &Path, file: &str, content: &str, vfio_count: &mut u32) {
    let pci = root.join("bus/pci");
    if let Some(driver) = file
        .strip_prefix("bus/pci/drivers/")
        .and_then(|r| r.strip_suffix("/unbind"))
    {
        let dev = pci.join("devices").join(content);
        std::fs::remove_file(dev.join("driver")).unwrap();
        if driver == "vfio-pci" {
            std::fs::remove_dir_all(dev.join("vfio-dev")).unwrap();
        }
    } else if file == "bus/pci/drivers_probe" {
        let dev = pci.join("devices").join(content);
        let wanted = std::fs::read_to_string(dev.join("driver_override"))
            .unwrap()
            .trim()
            .to_string();
        if dev.join("driver").exists() || !pci.join("drivers").join(&wanted).exists() {
            return;
        }
        if wanted == "vfio-pci" {
            if !dev.join("iommu_group").exists() {
                return; // vfio-pci: "no iommu_group", probe fails
            }
            std::fs::create_dir_all(dev.join("vfio-dev").join(format!("vfio{vfio_count}"))).unwrap();
            *vfio_count += 1;
        }
        symlink(format!("../../../bus/pci/drivers/{wanted}"), dev.join("driver")).unwrap();
    }
}

impl FakeKernel {
    fn start(tree: &Tree) -> FakeKernel {
        let root = tree.root().to_path_buf();
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
        let mut files: HashMap<WatchDescriptor, String> = HashMap::new();
        let mut watch = |rel: String| {
            let wd = inotify
                .add_watch(&root.join(&rel), AddWatchFlags::IN_CLOSE_WRITE)
                .unwrap();
            files.insert(wd, rel);
        };
        for e in std::fs::read_dir(root.join("bus/pci/devices")).unwrap() {
            watch(format!(
                "bus/pci/devices/{}/driver_override",
                e.unwrap().file_name().to_string_lossy()
            ));
        }
        for e in std::fs::read_dir(root.join("bus/pci/drivers")).unwrap() {
            watch(format!(
                "bus/pci/drivers/{}/unbind",
                e.unwrap().file_name().to_string_lossy()
            ));
        }
        watch("bus/pci/drivers_probe".to_string());
        let stop = Arc::new(AtomicBool::new(false));
        let log: Arc<Mutex<Vec<Write>>> = Arc::default();
        let (stop2, log2) = (stop.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            let mut vfio_count = 0;
            loop {
                // Read the stop flag first: a stop seen before an empty read
                // means every write was processed.
                let stopping = stop2.load(Ordering::SeqCst);
                match inotify.read_events() {
                    Ok(events) => {
                        for ev in events {
                            let file = &files[&ev.wd];
                            let content = std::fs::read_to_string(root.join(file)).unwrap();
                            log2.lock().unwrap().push((file.clone(), content.clone()));
                            apply(&root, file, content.trim(), &mut vfio_count);
                        }
                    }
                    Err(Errno::EAGAIN) if stopping => return,
                    Err(Errno::EAGAIN) => std::thread::sleep(Duration::from_millis(1)),
                    Err(e) => panic!("inotify: {e}"),
                }
            }
        });
        FakeKernel {
            stop,
            log,
            thread: Some(thread),
        }
    }

    /// Stops the emulation once every write was handled; returns them.
    fn writes(mut self) -> Vec<Write> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl Drop for FakeKernel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn w(file: &str, content: &str) -> Write {
    (file.to_string(), content.to_string())
}

fn read(tree: &Tree, a: &str) -> DeviceInfo {
    DeviceInfo::read(tree.root(), &addr(a)).unwrap()
}

/// The blob `prepare` writes for `devices` on the recorded tree `fixture`.
fn devices_blob(fixture: &str, devices: &[&str]) -> Blob {
    let tree = Tree::fixture(fixture);
    let list = devices.iter().map(|a| addr(a)).collect();
    Devices::new(tree.root(), list)
        .prepare(&PrepareContext::default())
        .unwrap()
        .unwrap()
}

// ---- Devices: parsing ----

#[test]
fn device_info_of_a_device_on_a_host_driver() {
    let tree = Tree::fixture("q35-intel-iommu-dma");
    assert_eq!(
        read(&tree, "0000:00:02.0"),
        DeviceInfo {
            addr: addr("0000:00:02.0"),
            vendor: 0x8086,
            device: 0x100e,
            driver: Some("e1000".into()),
            driver_override: None,
            iommu_group: Some(2),
            vfio_dev: None,
        }
    );
    let edu = read(&tree, "0000:00:01.0");
    assert_eq!(
        (edu.ids(), edu.driver, edu.iommu_group),
        ("1234:11e8".to_string(), None, Some(1))
    );
}

#[test]
fn device_info_of_a_device_bound_to_vfio_pci() {
    let tree = Tree::fixture("q35-intel-iommu-dma-vfio");
    let edu = read(&tree, "0000:00:01.0");
    assert!(edu.bound_to_vfio());
    assert_eq!(edu.driver_override.as_deref(), Some("vfio-pci"));
    assert_eq!(edu.vfio_dev.as_deref(), Some("vfio0"));
}

#[test]
fn device_info_of_a_host_without_iommu() {
    let tree = Tree::fixture("build-host-no-iommu");
    let nic = read(&tree, "0000:00:03.0");
    assert_eq!(
        (nic.ids(), nic.driver.as_deref(), nic.iommu_group),
        ("1af4:1041".to_string(), Some("virtio-pci"), None)
    );
}

#[test]
fn device_info_refuses_ids_the_kernel_would_not_write() {
    let tree = Tree::fixture("q35-intel-iommu-dma");
    let vendor = tree.root().join("devices/pci0000:00/0000:00:01.0/vendor");
    std::fs::write(&vendor, "8086\n").unwrap();
    assert_eq!(
        DeviceInfo::read(tree.root(), &addr("0000:00:01.0")).unwrap_err(),
        DeviceError::Malformed {
            path: tree.root().join("bus/pci/devices/0000:00:01.0/vendor"),
            content: "8086".into()
        }
    );
}

// ---- Devices: prepare ----

#[test]
fn devices_prepare_records_devices_bound_to_vfio_pci() {
    let tree = Tree::fixture("q35-intel-iommu-dma-vfio");
    let mut devices = Devices::new(
        tree.root(),
        vec![addr("0000:00:01.0"), addr("0000:00:02.0"), addr("0000:00:01.0")],
    );
    assert_eq!(devices.name(), "devices");
    assert_eq!(
        devices.devices(),
        [addr("0000:00:01.0"), addr("0000:00:02.0")],
        "duplicates are ignored"
    );
    let blob = devices.prepare(&PrepareContext::default()).unwrap().unwrap();
    assert_eq!(blob.version, 1);
    let list: Vec<DeviceInfo> = postcard::from_bytes(&blob.data).unwrap();
    assert_eq!(list, [read(&tree, "0000:00:01.0"), read(&tree, "0000:00:02.0")]);
}

#[test]
fn devices_prepare_veto_gives_the_commands_that_bind_to_vfio_pci() {
    let tree = Tree::fixture("q35-intel-iommu-dma");
    tree.load_driver("vfio-pci");
    let mut devices = Devices::new(tree.root(), vec![addr("0000:00:02.0")]);
    let d = tree.root().join("bus/pci/devices/0000:00:02.0");
    assert_eq!(
        devices.prepare(&PrepareContext::default()).unwrap_err(),
        SubsystemError::Veto(format!(
            "device 0000:00:02.0 (8086:100e) is bound to e1000, not vfio-pci: run `echo vfio-pci > {0}/driver_override; \
             echo 0000:00:02.0 > {0}/driver/unbind; echo 0000:00:02.0 > {1}/bus/pci/drivers_probe`",
            d.display(),
            tree.root().display()
        ))
    );
}

#[test]
fn devices_prepare_veto_lists_every_device_that_is_not_ready() {
    // vfio-pci is not loaded in this recording: the commands start with modprobe.
    let tree = Tree::fixture("q35-intel-iommu-dma");
    let mut devices = Devices::new(tree.root(), vec![addr("0000:00:01.0"), addr("0000:00:09.0")]);
    let (root, d) = (tree.root().display(), tree.root().join("bus/pci/devices/0000:00:01.0"));
    assert_eq!(
        devices.prepare(&PrepareContext::default()).unwrap_err(),
        SubsystemError::Veto(format!(
            "2 devices to preserve are not ready: device 0000:00:01.0 (1234:11e8) is bound to no driver, not vfio-pci: \
             run `modprobe vfio-pci; echo vfio-pci > {}/driver_override; echo 0000:00:01.0 > {root}/bus/pci/drivers_probe`; \
             PCI device 0000:00:09.0 does not exist (no {root}/bus/pci/devices/0000:00:09.0): check the address with \
             `lspci -D`, or remove it from the devices to preserve",
            d.display()
        ))
    );
}

/// A [`VfioFdPreserver`] that logs its calls and refuses one device.
#[derive(Debug, Clone, Default)]
struct Preserver {
    log: Arc<Mutex<Vec<String>>>,
    refuse: Option<(PciAddress, Errno)>,
}

impl VfioFdPreserver for Preserver {
    fn preserve_fd(&mut self, device: &DeviceInfo) -> Result<(), Errno> {
        self.log.lock().unwrap().push(format!("preserve {}", device.addr));
        match self.refuse {
            Some((a, errno)) if a == device.addr => Err(errno),
            _ => Ok(()),
        }
    }
    fn unpreserve_fd(&mut self, device: &DeviceInfo) {
        self.log.lock().unwrap().push(format!("unpreserve {}", device.addr));
    }
}

#[test]
fn devices_prepare_surfaces_the_kernels_refusal_of_a_vfio_fd_as_a_veto() {
    let tree = Tree::fixture("q35-intel-iommu-dma-vfio");
    let p = Preserver {
        refuse: Some((addr("0000:00:02.0"), Errno::ENOENT)),
        ..Default::default()
    };
    let log = p.log.clone();
    let mut devices =
        Devices::new(tree.root(), vec![addr("0000:00:01.0"), addr("0000:00:02.0")]).with_fd_preserver(Box::new(p));
    assert_eq!(
        devices.prepare(&PrepareContext::default()).unwrap_err(),
        SubsystemError::Veto(
            "the kernel refused to preserve the VFIO fd of device 0000:00:02.0 (8086:100e): ENOENT: No such file or \
             directory; this kernel cannot carry VFIO devices over a live update (kernels up to 7.3 preserve only \
             memfds); remove the device from the devices to preserve, or update this host with a cold reboot"
                .into()
        )
    );
    // The fd preserved before the refusal is released again.
    assert_eq!(
        *log.lock().unwrap(),
        [
            "preserve 0000:00:01.0",
            "preserve 0000:00:02.0",
            "unpreserve 0000:00:01.0"
        ]
    );
}

#[test]
fn devices_cancel_releases_preserved_vfio_fds_in_reverse() {
    let tree = Tree::fixture("q35-intel-iommu-dma-vfio");
    let p = Preserver::default();
    let log = p.log.clone();
    let mut devices =
        Devices::new(tree.root(), vec![addr("0000:00:01.0"), addr("0000:00:02.0")]).with_fd_preserver(Box::new(p));
    devices.prepare(&PrepareContext::default()).unwrap();
    devices.cancel().unwrap();
    devices.cancel().unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        [
            "preserve 0000:00:01.0",
            "preserve 0000:00:02.0",
            "unpreserve 0000:00:02.0",
            "unpreserve 0000:00:01.0"
        ]
    );
}

// ---- Devices: restore ----

#[test]
fn devices_restore_rebinds_in_the_kernels_order_and_ends_as_recorded() {
    // Old kernel: both devices on vfio-pci. New kernel: booted like the
    // recorded one, e1000 took the NIC; vfio-pci is loaded.
    let blob = devices_blob("q35-intel-iommu-dma-vfio", &["0000:00:01.0", "0000:00:02.0"]);
    let tree = Tree::fixture("q35-intel-iommu-dma");
    tree.load_driver("vfio-pci");
    let kernel = FakeKernel::start(&tree);
    let mut devices = Devices::new(tree.root(), vec![addr("0000:00:01.0"), addr("0000:00:02.0")]);
    let report = devices.report();
    devices.restore(Some(&blob)).unwrap();
    assert_eq!(
        kernel.writes(),
        [
            w("bus/pci/devices/0000:00:01.0/driver_override", "vfio-pci"),
            w("bus/pci/drivers_probe", "0000:00:01.0"),
            w("bus/pci/devices/0000:00:02.0/driver_override", "vfio-pci"),
            w("bus/pci/drivers/e1000/unbind", "0000:00:02.0"),
            w("bus/pci/drivers_probe", "0000:00:02.0"),
        ]
    );
    assert_eq!(
        report.get().unwrap(),
        [
            Rebound {
                addr: addr("0000:00:01.0"),
                result: Ok(RebindOutcome::Rebound { from: None })
            },
            Rebound {
                addr: addr("0000:00:02.0"),
                result: Ok(RebindOutcome::Rebound {
                    from: Some("e1000".into())
                })
            },
        ]
    );
    // The same state the real kernel reached with the same writes.
    let recorded = Tree::fixture("q35-intel-iommu-dma-vfio");
    for a in ["0000:00:01.0", "0000:00:02.0"] {
        assert_eq!(read(&tree, a), read(&recorded, a), "{a}");
    }
}

#[test]
fn devices_restore_leaves_devices_already_on_vfio_pci_untouched() {
    let blob = devices_blob("q35-intel-iommu-dma-vfio", &["0000:00:01.0"]);
    let tree = Tree::fixture("q35-intel-iommu-dma-vfio");
    let kernel = FakeKernel::start(&tree);
    let mut devices = Devices::new(tree.root(), vec![addr("0000:00:01.0")]);
    devices.restore(Some(&blob)).unwrap();
    assert_eq!(kernel.writes(), []);
    assert_eq!(
        devices.last_report().unwrap(),
        [Rebound {
            addr: addr("0000:00:01.0"),
            result: Ok(RebindOutcome::AlreadyBound)
        }]
    );
}

#[test]
fn devices_restore_reports_vfio_pci_refusing_devices_without_iommu_group() {
    // The new kernel booted with intel_iommu=off; vfio-pci is loaded.
    let blob = devices_blob("q35-intel-iommu-dma-vfio", &["0000:00:01.0", "0000:00:02.0"]);
    let tree = Tree::fixture("q35-intel-iommu-off");
    tree.load_driver("vfio-pci");
    let kernel = FakeKernel::start(&tree);
    let mut devices = Devices::new(tree.root(), vec![]).settle_timeout(Duration::from_millis(200));
    let err = devices.restore(Some(&blob)).unwrap_err();
    assert_eq!(kernel.writes().len(), 5);
    let not_bound = |a: &str| {
        Err(DeviceError::NotBound {
            addr: addr(a),
            driver: None,
            reason: NotBoundReason::NoIommuGroup,
        })
    };
    assert_eq!(
        devices.last_report().unwrap(),
        [
            Rebound {
                addr: addr("0000:00:01.0"),
                result: not_bound("0000:00:01.0")
            },
            Rebound {
                addr: addr("0000:00:02.0"),
                result: not_bound("0000:00:02.0")
            },
        ]
    );
    assert_eq!(
        err,
        SubsystemError::Failed(
            "0000:00:01.0 not bound: device 0000:00:01.0 is bound to no driver after the rebind, not vfio-pci: the \
             device has no IOMMU group, so vfio-pci refuses it: boot with intel_iommu=on (or amd_iommu=on on AMD); \
             0000:00:02.0 not bound: device 0000:00:02.0 is bound to no driver after the rebind, not vfio-pci: the \
             device has no IOMMU group, so vfio-pci refuses it: boot with intel_iommu=on (or amd_iommu=on on AMD)"
                .into()
        )
    );
    // The same state the real kernel was recorded in after the same writes.
    let recorded = Tree::fixture("q35-intel-iommu-off-after-rebind");
    for a in ["0000:00:01.0", "0000:00:02.0"] {
        assert_eq!(read(&tree, a), read(&recorded, a), "{a}");
    }
}

#[test]
fn devices_restore_reports_vfio_pci_not_loaded() {
    let tree = Tree::fixture("q35-intel-iommu-dma");
    let kernel = FakeKernel::start(&tree);
    let mut devices = Devices::new(tree.root(), vec![addr("0000:00:01.0")]).settle_timeout(Duration::from_millis(100));
    devices.restore(None).unwrap_err();
    assert_eq!(
        kernel.writes(),
        [
            w("bus/pci/devices/0000:00:01.0/driver_override", "vfio-pci"),
            w("bus/pci/drivers_probe", "0000:00:01.0")
        ]
    );
    assert_eq!(
        devices.last_report().unwrap()[0].result,
        Err(DeviceError::NotBound {
            addr: addr("0000:00:01.0"),
            driver: None,
            reason: NotBoundReason::VfioPciNotLoaded
        })
    );
}

#[test]
fn devices_restore_leaves_an_address_that_now_names_another_device_alone() {
    // A device was added in front: 00:01.0 is now a virtio-rng, 00:02.0 the edu.
    let blob = devices_blob("q35-intel-iommu-dma-vfio", &["0000:00:01.0", "0000:00:02.0"]);
    let tree = Tree::fixture("q35-intel-iommu-extra-device");
    tree.load_driver("vfio-pci");
    let kernel = FakeKernel::start(&tree);
    let mut devices = Devices::new(tree.root(), vec![addr("0000:00:01.0"), addr("0000:00:02.0")]);
    let err = devices.restore(Some(&blob)).unwrap_err();
    assert_eq!(
        kernel.writes(),
        [],
        "nothing written to devices that are not the preserved ones"
    );
    assert_eq!(
        devices.last_report().unwrap()[0].result,
        Err(DeviceError::IdsChanged {
            addr: addr("0000:00:01.0"),
            expected: "1234:11e8".into(),
            found: "1af4:1005".into()
        })
    );
    let SubsystemError::Failed(msg) = err else {
        panic!("not Failed")
    };
    assert!(msg.starts_with(
        "0000:00:01.0 not bound: the device at 0000:00:01.0 is now 1af4:1005, not the 1234:11e8 preserved before the \
         update; it was left alone (did the PCI topology change?); 0000:00:02.0 not bound: the device at 0000:00:02.0 \
         is now 1234:11e8, not the 8086:100e"
    ));
}

#[test]
fn devices_restore_also_rebinds_configured_devices_the_old_kernel_did_not_have() {
    let blob = devices_blob("q35-intel-iommu-dma-vfio", &["0000:00:02.0"]);
    let tree = Tree::fixture("q35-intel-iommu-dma");
    tree.load_driver("vfio-pci");
    let kernel = FakeKernel::start(&tree);
    let mut devices = Devices::new(tree.root(), vec![addr("0000:00:01.0")]);
    devices.restore(Some(&blob)).unwrap();
    let order: Vec<PciAddress> = devices.last_report().unwrap().iter().map(|r| r.addr).collect();
    assert_eq!(
        order,
        [addr("0000:00:02.0"), addr("0000:00:01.0")],
        "the record's devices first"
    );
    assert_eq!(kernel.writes().len(), 5);
}

#[test]
fn devices_restore_never_creates_sysfs_files() {
    let tree = Tree::fixture("q35-intel-iommu-dma");
    tree.load_driver("vfio-pci");
    std::fs::remove_file(tree.root().join("bus/pci/drivers_probe")).unwrap();
    let mut devices = Devices::new(tree.root(), vec![addr("0000:00:01.0")]);
    devices.restore(None).unwrap_err();
    let probe = tree.root().join("bus/pci/drivers_probe");
    assert_eq!(
        devices.last_report().unwrap()[0].result,
        Err(DeviceError::Write {
            path: probe.clone(),
            value: "0000:00:01.0".into(),
            errno: Errno::ENOENT
        })
    );
    assert!(!probe.exists());
}

#[test]
fn devices_restore_refuses_a_list_from_a_newer_luod() {
    let tree = Tree::fixture("q35-intel-iommu-dma");
    let err = Devices::new(tree.root(), vec![])
        .restore(Some(&Blob {
            version: 2,
            data: vec![],
        }))
        .unwrap_err();
    assert_eq!(
        err,
        SubsystemError::Failed("the device list in the record has format version 2, this luod reads version 1".into())
    );
}
