//! Explicit size and count limits. Every request is checked against these before it is proposed, and
//! the error names the limit.

use crate::error::TernError;

/// Largest hashkey, in bytes. Keys are stored with a 16-bit length prefix, so 64 KiB - 1.
pub const HASHKEY_BYTES_MAX: usize = 65_535;
/// Largest sortkey, in bytes.
pub const SORTKEY_BYTES_MAX: usize = 65_536;
/// Largest value, in bytes.
pub const VALUE_BYTES_MAX: usize = 1024 * 1024;
/// Largest write request (sum of keys and values), in bytes.
pub const WRITE_REQUEST_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Largest number of records one multi_set / multi_del / multi_get may name.
pub const MULTI_RECORDS_MAX: usize = 10_000;
/// Most partitions a table may have; the count must also be a power of two.
pub const PARTITION_COUNT_MAX: u32 = 65_536;
/// Replica count range.
pub const REPLICA_COUNT_MIN: u32 = 1;
pub const REPLICA_COUNT_MAX: u32 = 5;
/// Most records a single read returns; larger scans page with a resume token.
pub const READ_RECORDS_MAX: u32 = 10_000;
/// Largest table name, in bytes.
pub const TABLE_NAME_BYTES_MAX: usize = 128;
/// Largest gRPC message a server accepts (a write request plus framing).
pub const GRPC_MESSAGE_BYTES_MAX: usize = WRITE_REQUEST_BYTES_MAX + 64 * 1024;
/// Largest batch of raft messages one node sends another in one stream message (the receiver's
/// decoding limit). Senders fill batches to half of it, so any single raft message (at most one
/// write request of entries beyond raft's per-message size) always fits.
pub const RAFT_BATCH_BYTES_MAX: usize = 2 * GRPC_MESSAGE_BYTES_MAX;

pub fn check_hashkey(hashkey: &[u8]) -> Result<(), TernError> {
    if hashkey.len() > HASHKEY_BYTES_MAX {
        return Err(TernError::invalid(format!("hashkey is {} bytes; the limit is {HASHKEY_BYTES_MAX} bytes", hashkey.len())));
    }
    Ok(())
}

pub fn check_sortkey(sortkey: &[u8]) -> Result<(), TernError> {
    if sortkey.len() > SORTKEY_BYTES_MAX {
        return Err(TernError::invalid(format!("sortkey is {} bytes; the limit is {SORTKEY_BYTES_MAX} bytes", sortkey.len())));
    }
    Ok(())
}

pub fn check_value(value: &[u8]) -> Result<(), TernError> {
    if value.len() > VALUE_BYTES_MAX {
        return Err(TernError::invalid(format!("value is {} bytes; the limit is {VALUE_BYTES_MAX} bytes", value.len())));
    }
    Ok(())
}

pub fn check_write_size(bytes: usize) -> Result<(), TernError> {
    if bytes > WRITE_REQUEST_BYTES_MAX {
        return Err(TernError::invalid(format!("write request is {bytes} bytes; the limit is {WRITE_REQUEST_BYTES_MAX} bytes")));
    }
    Ok(())
}

pub fn check_record_count(count: usize) -> Result<(), TernError> {
    if count > MULTI_RECORDS_MAX {
        return Err(TernError::invalid(format!("request names {count} records; the limit is {MULTI_RECORDS_MAX}")));
    }
    Ok(())
}

pub fn check_partition_count(count: u32) -> Result<(), TernError> {
    if count == 0 || !count.is_power_of_two() || count > PARTITION_COUNT_MAX {
        return Err(TernError::invalid(format!("partition count {count} must be a power of two between 1 and {PARTITION_COUNT_MAX}")));
    }
    Ok(())
}

pub fn check_replica_count(count: u32) -> Result<(), TernError> {
    if !(REPLICA_COUNT_MIN..=REPLICA_COUNT_MAX).contains(&count) {
        return Err(TernError::invalid(format!("replica count {count} must be between {REPLICA_COUNT_MIN} and {REPLICA_COUNT_MAX}")));
    }
    Ok(())
}

pub fn check_table_name(name: &str) -> Result<(), TernError> {
    let valid_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.';
    if name.is_empty() || name.len() > TABLE_NAME_BYTES_MAX || !name.chars().all(valid_char) {
        return Err(TernError::invalid(format!("table name {name:?} must be 1 to {TABLE_NAME_BYTES_MAX} characters of [A-Za-z0-9_.-]")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Limits accept their boundary values and reject one past them, naming the limit.
    #[test]
    fn boundaries() {
        assert!(check_hashkey(&vec![0; HASHKEY_BYTES_MAX]).is_ok());
        let e = check_hashkey(&vec![0; HASHKEY_BYTES_MAX + 1]).unwrap_err();
        assert!(e.to_string().contains("65535"), "{e}");
        assert!(check_sortkey(&vec![0; SORTKEY_BYTES_MAX]).is_ok());
        assert!(check_sortkey(&vec![0; SORTKEY_BYTES_MAX + 1]).is_err());
        assert!(check_value(&vec![0; VALUE_BYTES_MAX]).is_ok());
        assert!(check_value(&vec![0; VALUE_BYTES_MAX + 1]).is_err());
        assert!(check_write_size(WRITE_REQUEST_BYTES_MAX + 1).is_err());
    }

    /// Partition counts must be powers of two within range; replica counts 1..=5.
    #[test]
    fn counts() {
        for ok in [1, 2, 8, 65536] {
            assert!(check_partition_count(ok).is_ok(), "{ok}");
        }
        for bad in [0, 3, 12, 131072] {
            assert!(check_partition_count(bad).is_err(), "{bad}");
        }
        assert!(check_replica_count(0).is_err());
        assert!(check_replica_count(3).is_ok());
        assert!(check_replica_count(6).is_err());
    }

    /// Table names are restricted to a safe alphabet.
    #[test]
    fn table_names() {
        assert!(check_table_name("demo").is_ok());
        assert!(check_table_name("a.b-c_1").is_ok());
        assert!(check_table_name("").is_err());
        assert!(check_table_name("a b").is_err());
        assert!(check_table_name(&"x".repeat(129)).is_err());
    }
}
