//! IOMMU groups (in progress).
