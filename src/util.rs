//! Small helpers shared by the controller's modules.

/// `YYYYMMDD-HHMMSS` in UTC, for run directory and shared-memory file names.
pub fn timestamp() -> String {
    jiff::Timestamp::now()
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .strftime("%Y%m%d-%H%M%S")
        .to_string()
}
