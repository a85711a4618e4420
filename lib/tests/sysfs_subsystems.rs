//! The IOMMU and device subsystems on sysfs trees recorded from real kernels.
//!
//! Each test rebuilds a tree from `fixtures/sysfs/*.tree` (format and
//! provenance in `fixtures/sysfs/README.md`) in a temporary directory, with
//! the kernel's layout and relative symlinks, and points the subsystem's
//! sysfs root at it.

use liveupdate::subsystem::{Blob, PrepareContext, Subsystem, SubsystemError};
use liveupdate::subsystems::PciAddress;
use liveupdate::subsystems::iommu::{DomainType, Drift, DriftReport, Iommu, IommuError, Snapshot};
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

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
