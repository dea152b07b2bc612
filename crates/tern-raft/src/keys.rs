//! The key layout inside a replica's engine. Every replica of a partition holds identical bytes.
//!
//! - `0x01 ++ codec::encode_key(hashkey, sortkey)`: user records (value: codec value header + value);
//! - `0x00 'a'`: the apply state (applied index and term, conf state);
//! - `0x00 'd' ++ client_id (u64 BE) ++ seq (u64 BE)`: remembered results of deduplicated writes
//!   (value: codec value header with an expiry + encoded WriteResponse);
//! - `0x00 'f' ++ client_id (u64 BE)`: the client's floor (see `dedup_floor_key`), apart from the
//!   results so that every sequence number, u64::MAX included, has a result key of its own;
//! - `0x00 'c' ++ index (u64 BE)`: the change log, a write's effects kept for duplication
//!   (value: `DupLogEntry`);
//! - `0x00 't' ++ codec::encode_key(hashkey, sortkey)`: a tombstone, the version of a delete kept
//!   for duplication (value: a versioned value header with no data, `apply::encode_tombstone`),
//!   and `0x00 'v' ++ version (u64 BE) ++ the same storage key`: the tombstones in version order,
//!   for their collection;
//! - `0x00 'u'`: the partition's duplication state (value: codec value header + `PartitionDupState`);
//!   the change log's values are `DupLogEntry`s behind a value header too (checksummed).
//!
//! Everything from `0x00 'b'` on is replicated state, identical on every replica (the checksum).

use tern_core::codec;

pub const DATA_PREFIX: u8 = 0x01;
pub const APPLY_STATE_KEY: &[u8] = &[0x00, b'a'];
const DEDUP_PREFIX: &[u8] = &[0x00, b'd'];
const DEDUP_FLOOR_PREFIX: &[u8] = &[0x00, b'f'];
const CHANGE_LOG_PREFIX: &[u8] = &[0x00, b'c'];
const TOMBSTONE_PREFIX: &[u8] = &[0x00, b't'];
const TOMBSTONE_BY_VERSION_PREFIX: &[u8] = &[0x00, b'v'];
pub const DUP_STATE_KEY: &[u8] = &[0x00, b'u'];

pub fn change_log_key(index: u64) -> Vec<u8> {
    let mut key = CHANGE_LOG_PREFIX.to_vec();
    key.extend_from_slice(&index.to_be_bytes());
    key
}

/// The index of a change-log key.
pub fn change_log_index(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.strip_prefix(CHANGE_LOG_PREFIX)?.try_into().ok()?))
}

/// The end of the change log's key range.
pub fn change_log_end() -> Vec<u8> {
    vec![CHANGE_LOG_PREFIX[0], CHANGE_LOG_PREFIX[1] + 1]
}

/// A data key's tombstone key.
pub fn tombstone_key(data_key: &[u8]) -> Vec<u8> {
    debug_assert_eq!(data_key.first(), Some(&DATA_PREFIX));
    let mut key = TOMBSTONE_PREFIX.to_vec();
    key.extend_from_slice(&data_key[1..]);
    key
}

/// The data key a tombstone key stands for.
pub fn data_key_of_tombstone(key: &[u8]) -> Option<Vec<u8>> {
    let rest = key.strip_prefix(TOMBSTONE_PREFIX)?;
    let mut data = Vec::with_capacity(rest.len() + 1);
    data.push(DATA_PREFIX);
    data.extend_from_slice(rest);
    Some(data)
}

/// Every tombstone key: [start, end).
pub fn tombstone_range() -> (Vec<u8>, Vec<u8>) {
    (TOMBSTONE_PREFIX.to_vec(), vec![TOMBSTONE_PREFIX[0], TOMBSTONE_PREFIX[1] + 1])
}

/// A tombstone's entry in version order.
pub fn tombstone_by_version_key(version: u64, data_key: &[u8]) -> Vec<u8> {
    let mut key = TOMBSTONE_BY_VERSION_PREFIX.to_vec();
    key.extend_from_slice(&version.to_be_bytes());
    key.extend_from_slice(&data_key[1..]);
    key
}

/// (version, data key) of a tombstone's version-order entry.
pub fn parse_tombstone_by_version(key: &[u8]) -> Option<(u64, Vec<u8>)> {
    let rest = key.strip_prefix(TOMBSTONE_BY_VERSION_PREFIX)?;
    let version = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let mut data = vec![DATA_PREFIX];
    data.extend_from_slice(&rest[8..]);
    Some((version, data))
}

/// Version-order tombstone entries below `version`: [start, end).
pub fn tombstones_below(version: u64) -> (Vec<u8>, Vec<u8>) {
    let mut end = TOMBSTONE_BY_VERSION_PREFIX.to_vec();
    end.extend_from_slice(&version.to_be_bytes());
    (TOMBSTONE_BY_VERSION_PREFIX.to_vec(), end)
}

pub fn data_key(hashkey: &[u8], sortkey: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(3 + hashkey.len() + sortkey.len());
    key.push(DATA_PREFIX);
    key.extend_from_slice(&codec::encode_key(hashkey, sortkey));
    key
}

pub fn hashkey_prefix(hashkey: &[u8]) -> Vec<u8> {
    data_key(hashkey, b"")
}

/// The first key after every data key.
pub fn data_end() -> Vec<u8> {
    vec![DATA_PREFIX + 1]
}

/// The lowest sequence number of a client whose result may still be remembered (below it, results
/// were forgotten and requests are refused as late duplicates).
pub fn dedup_floor_key(client_id: u64) -> Vec<u8> {
    let mut key = DEDUP_FLOOR_PREFIX.to_vec();
    key.extend_from_slice(&client_id.to_be_bytes());
    key
}

pub fn dedup_key(client_id: u64, seq: u64) -> Vec<u8> {
    let mut key = DEDUP_PREFIX.to_vec();
    key.extend_from_slice(&client_id.to_be_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Every result key of one client: [start, end).
pub fn dedup_range(client_id: u64) -> (Vec<u8>, Vec<u8>) {
    let end = match client_id.checked_add(1) {
        Some(next) => dedup_key(next, 0),
        None => vec![DEDUP_PREFIX[0], DEDUP_PREFIX[1] + 1],
    };
    (dedup_key(client_id, 0), end)
}

/// The sequence number of a result key.
pub fn dedup_seq(key: &[u8]) -> Option<u64> {
    let seq = key.strip_prefix(DEDUP_PREFIX)?.get(8..)?;
    Some(u64::from_be_bytes(seq.try_into().ok()?))
}

/// Records compaction may drop: remembered results and floors whose value header says they have
/// expired by the horizon's time, and user records too when their version is also below the
/// horizon's version (while a partition takes part in duplication, an expired record's version
/// still decides which duplicated write wins, until no older one can arrive; see
/// `apply::StateMachine::version_horizon`). The apply state and anything unrecognised are kept.
pub fn is_expired_record(key: &[u8], value: &[u8], horizon: tern_engine::Horizon) -> bool {
    let expired = || codec::peek_expire_at_ms(value).is_some_and(|e| codec::is_expired(e, horizon.unix_ms));
    if key.first() == Some(&DATA_PREFIX) {
        // A record of the other half of a partition that split (`owner_word`), by a durable state.
        let owner = crate::apply::Owner { partition: (horizon.owner >> 32) as u32, count: horizon.owner as u32 };
        return owner.foreign_data_key(key) || (expired() && codec::peek_version(value) < horizon.version);
    }
    (key.starts_with(DEDUP_PREFIX) || key.starts_with(DEDUP_FLOOR_PREFIX)) && expired()
}

/// Whether a record is expired at `now_unix_ms` (for reading: whatever its version).
pub fn is_expired_at(key: &[u8], value: &[u8], now_unix_ms: u64) -> bool {
    is_expired_record(key, value, tern_engine::Horizon { unix_ms: now_unix_ms, version: u64::MAX, owner: 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a split, compaction drops the other half's user records, and nothing else.
    #[test]
    fn compaction_drops_the_other_half_after_a_split() {
        let live = codec::encode_value(0, b"v");
        let owner = |partition: u64, count: u64| tern_engine::Horizon { owner: partition << 32 | count, ..Default::default() };
        let (mine, other) = {
            let key = |want| (0..).map(|i: u32| i.to_be_bytes()).find(|k| codec::partition_of(k, 2) == want).unwrap();
            (key(0), key(1))
        };
        assert!(!is_expired_record(&data_key(&mine, b""), &live, owner(0, 2)));
        assert!(is_expired_record(&data_key(&other, b""), &live, owner(0, 2)));
        assert!(!is_expired_record(&data_key(&other, b""), &live, owner(0, 1)), "before the split it owned both");
        assert!(!is_expired_record(&data_key(&other, b""), &live, tern_engine::Horizon::default()), "nothing said");
        assert!(!is_expired_record(&dedup_key(1, 2), &live, owner(0, 2)));
    }

    /// Only records with an expiry in the past are dropped by the compaction filter.
    #[test]
    fn expiry_filter_scope() {
        let expired = codec::encode_value(100, b"v");
        let live = codec::encode_value(0, b"v");
        assert!(is_expired_at(&data_key(b"h", b"s"), &expired, 200));
        assert!(!is_expired_at(&data_key(b"h", b"s"), &expired, 50));
        assert!(!is_expired_at(&data_key(b"h", b"s"), &live, 200));
        assert!(is_expired_at(&dedup_key(1, 2), &expired, 200));
        assert!(is_expired_at(&dedup_floor_key(1), &expired, 200));
        assert!(!is_expired_at(APPLY_STATE_KEY, &expired, 200));
        // A versioned user record goes only below the version horizon as well.
        let versioned = codec::encode_versioned(100, 50, b"v");
        let at = |version| tern_engine::Horizon { unix_ms: 200, version, owner: 0 };
        assert!(!is_expired_record(&data_key(b"h", b"s"), &versioned, at(50)), "its version may still decide a duplicated write");
        assert!(is_expired_record(&data_key(b"h", b"s"), &versioned, at(51)));
        assert!(is_expired_record(&dedup_key(1, 2), &expired, at(0)), "remembered results carry no version");
    }

    /// Dedup keys of one client sort by sequence number, so a range covers "every seq below N".
    #[test]
    fn dedup_key_order() {
        assert!(dedup_key(1, 2) < dedup_key(1, 3));
        assert!(dedup_key(1, u64::MAX) < dedup_key(2, 0));
        assert_ne!(dedup_key(1, u64::MAX), dedup_floor_key(1), "every sequence number has its own result key");
        assert!(data_key(b"", b"") < data_end());
        for client in [0, 7, u64::MAX] {
            let (start, end) = dedup_range(client);
            for seq in [0, 1, u64::MAX] {
                let key = dedup_key(client, seq);
                assert!(start <= key && key < end);
                assert_eq!(dedup_seq(&key), Some(seq));
            }
            assert!(dedup_floor_key(client) >= end || dedup_floor_key(client) < start);
        }
        assert!(dedup_key(8, 0) >= dedup_range(7).1);
        let data = data_key(b"h", b"s");
        assert_eq!(data_key_of_tombstone(&tombstone_key(&data)), Some(data.clone()));
        assert_eq!(parse_tombstone_by_version(&tombstone_by_version_key(7, &data)), Some((7, data.clone())));
        let (start, end) = tombstones_below(8);
        assert!(start <= tombstone_by_version_key(7, &data) && tombstone_by_version_key(7, &data) < end);
        assert!(tombstone_by_version_key(8, &data) >= end);
        assert_eq!(change_log_index(&change_log_key(42)), Some(42));
        assert!(change_log_key(u64::MAX) < change_log_end());
        for key in [change_log_key(1), tombstone_key(&data), tombstone_by_version_key(1, &data), DUP_STATE_KEY.to_vec()] {
            assert!(key.as_slice() > [0x00, b'b'].as_slice() && key < data, "replicated state, inside the checksum");
        }
        assert_eq!(dedup_seq(&data_key(b"h", b"s")), None);
    }
}
