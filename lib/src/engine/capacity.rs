//! The region-capacity subsystem: vetoes `prepare` when the preserved data
//! would not fit in the region of a copying backend.

use crate::subsystem::{Blob, PrepareContext, Subsystem, SubsystemError};

/// Vetoes `prepare` with the numbers when the preserved files exceed the
/// region's data capacity.
#[derive(Debug)]
pub struct RegionCapacity {
    capacity: u64,
}

impl RegionCapacity {
    /// A check against `capacity` bytes of data.
    pub fn new(capacity: u64) -> Self {
        RegionCapacity { capacity }
    }
}

impl Subsystem for RegionCapacity {
    fn name(&self) -> &str {
        "region-capacity"
    }
    fn prepare(&mut self, ctx: &PrepareContext) -> Result<Option<Blob>, SubsystemError> {
        if ctx.preserved_bytes > self.capacity {
            return Err(SubsystemError::Veto(format!(
                "{} preserved file(s) hold {} bytes but the region holds at most {} bytes of data ({} bytes short); \
                 give luod a larger region or preserve less",
                ctx.preserved_files,
                ctx.preserved_bytes,
                self.capacity,
                ctx.preserved_bytes - self.capacity
            )));
        }
        Ok(None)
    }
    fn freeze(&mut self) -> Result<Option<Blob>, SubsystemError> {
        Ok(None)
    }
    fn cancel(&mut self) -> Result<(), SubsystemError> {
        Ok(())
    }
    fn unfreeze(&mut self) -> Result<(), SubsystemError> {
        Ok(())
    }
    fn restore(&mut self, _: Option<&Blob>) -> Result<(), SubsystemError> {
        Ok(())
    }
    fn finish(&mut self) -> Result<(), SubsystemError> {
        Ok(())
    }
}
