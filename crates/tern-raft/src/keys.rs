//! The key layout inside a replica's engine. Every replica of a partition holds identical bytes.
//!
//! - `0x01 ++ codec::encode_key(hashkey, sortkey)`: user records (value: codec value header + value);
//! - `0x00 'a'`: the apply state (applied index and term, conf state);
//! - `0x00 'd' ++ client_id (u64 BE) ++ seq (u64 BE)`: remembered results of deduplicated writes
//!   (value: codec value header with an expiry + encoded WriteResponse);
//! - `0x00 'f' ++ client_id (u64 BE)`: the client's floor (see `dedup_floor_key`), apart from the
//!   results so that every sequence number, u64::MAX included, has a result key of its own.

use tern_core::codec;

pub const DATA_PREFIX: u8 = 0x01;
pub const APPLY_STATE_KEY: &[u8] = &[0x00, b'a'];
const DEDUP_PREFIX: &[u8] = &[0x00, b'd'];
const DEDUP_FLOOR_PREFIX: &[u8] = &[0x00, b'f'];

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

/// Records whose value header says they have expired: user records, remembered results and floors.
/// The apply state and anything unrecognised are always kept.
pub fn is_expired_record(key: &[u8], value: &[u8], now_unix_ms: u64) -> bool {
    let ttl_bearing = key.first() == Some(&DATA_PREFIX) || key.starts_with(DEDUP_PREFIX) || key.starts_with(DEDUP_FLOOR_PREFIX);
    ttl_bearing && codec::peek_expire_at_ms(value).is_some_and(|e| codec::is_expired(e, now_unix_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only records with an expiry in the past are dropped by the compaction filter.
    #[test]
    fn expiry_filter_scope() {
        let expired = codec::encode_value(100, b"v");
        let live = codec::encode_value(0, b"v");
        assert!(is_expired_record(&data_key(b"h", b"s"), &expired, 200));
        assert!(!is_expired_record(&data_key(b"h", b"s"), &expired, 50));
        assert!(!is_expired_record(&data_key(b"h", b"s"), &live, 200));
        assert!(is_expired_record(&dedup_key(1, 2), &expired, 200));
        assert!(is_expired_record(&dedup_floor_key(1), &expired, 200));
        assert!(!is_expired_record(APPLY_STATE_KEY, &expired, 200));
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
        assert_eq!(dedup_seq(&data_key(b"h", b"s")), None);
    }
}
