//! PCI devices (in progress).
