//! On-disk encodings, stable forever once data exists:
//! - the partition hash of a hashkey (of its hash tag, when it has one: `hash_tag`);
//! - the storage key of a record: `[hashkey length: u16 BE][hashkey][sortkey]`, so the records of one
//!   hashkey are contiguous and ordered by sortkey;
//! - the stored value: a header followed by the user value. Format 1 (13 bytes):
//!   `[1][expire_at_ms: u64 BE][crc32]`; format 2 (21 bytes), what user records are written with:
//!   `[2][expire_at_ms: u64 BE][version: u64 BE][crc32]`. The checksum covers everything after the
//!   format byte but itself, and the value. Format 1 reads as version 0;
//! - a record's version (format 2): `hybrid-logical-clock ms (44 bits) | logical (8) | cluster tag
//!   (12)`, compared as an integer: the later write wins, ties go to the higher cluster tag.

use crate::error::TernError;
use crate::limits::HASHKEY_BYTES_MAX;

/// Stable 64-bit hash of a hashkey: FNV-1a followed by a strong finalizer so that the low bits (which
/// choose the partition) depend on every input byte.
pub fn partition_hash(hashkey: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in hashkey {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The part of a hashkey that chooses its partition: its hash tag, by Redis Cluster's rule (the
/// bytes between the first `{` and the first `}` after it, when there are any), else all of it.
/// Hashkeys with one tag (`{user:1}:feed`, `{user:1}:likes`) share a partition, so commands on
/// several of them can be atomic.
pub fn hash_tag(hashkey: &[u8]) -> &[u8] {
    if let Some(open) = hashkey.iter().position(|&b| b == b'{') {
        let rest = &hashkey[open + 1..];
        if let Some(len) = rest.iter().position(|&b| b == b'}') {
            if len > 0 {
                return &rest[..len];
            }
        }
    }
    hashkey
}

/// The partition a hashkey belongs to in a table of `partition_count` (a power of two) partitions:
/// by the hash of its hash tag (`hash_tag`).
pub fn partition_of(hashkey: &[u8], partition_count: u32) -> u32 {
    debug_assert!(partition_count.is_power_of_two());
    (partition_hash(hash_tag(hashkey)) & (partition_count as u64 - 1)) as u32
}

/// Encodes a record's storage key. The hashkey must already be checked against its limit.
pub fn encode_key(hashkey: &[u8], sortkey: &[u8]) -> Vec<u8> {
    assert!(hashkey.len() <= HASHKEY_BYTES_MAX, "hashkey length checked at the edge");
    let mut key = Vec::with_capacity(2 + hashkey.len() + sortkey.len());
    key.extend_from_slice(&(hashkey.len() as u16).to_be_bytes());
    key.extend_from_slice(hashkey);
    key.extend_from_slice(sortkey);
    key
}

/// The common prefix of every storage key of one hashkey.
pub fn encode_hashkey_prefix(hashkey: &[u8]) -> Vec<u8> {
    encode_key(hashkey, b"")
}

/// Splits a storage key into (hashkey, sortkey).
pub fn decode_key(key: &[u8]) -> Result<(&[u8], &[u8]), TernError> {
    if key.len() < 2 {
        return Err(TernError::Corruption(format!("storage key of {} bytes is too short", key.len())));
    }
    let len = u16::from_be_bytes([key[0], key[1]]) as usize;
    if key.len() < 2 + len {
        return Err(TernError::Corruption(format!("storage key says hashkey is {len} bytes but only {} follow", key.len() - 2)));
    }
    Ok((&key[2..2 + len], &key[2 + len..]))
}

/// The smallest byte string greater than every string with this prefix, or None if there is none.
pub fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

pub const VALUE_HEADER_BYTES: usize = 13;
pub const VERSIONED_HEADER_BYTES: usize = 21;
const FORMAT_PLAIN: u8 = 1;
const FORMAT_VERSIONED: u8 = 2;

/// Bits of a version that name the cluster that wrote it.
pub const VERSION_TAG_BITS: u32 = 12;
/// Bits of a version below its milliseconds (logical counter and cluster tag).
pub const VERSION_MS_SHIFT: u32 = 20;
pub const CLUSTER_TAG_MAX: u32 = (1 << VERSION_TAG_BITS) - 1;

/// A cluster's tag (1-4095), derived from its id: what versions carry to break ties.
pub fn cluster_tag(cluster_id: u64) -> u32 {
    if cluster_id == 0 {
        0
    } else {
        (cluster_id % CLUSTER_TAG_MAX as u64) as u32 + 1
    }
}

/// The cluster tag of a version.
pub fn version_tag(version: u64) -> u32 {
    (version & CLUSTER_TAG_MAX as u64) as u32
}

/// The milliseconds of a version.
pub fn version_ms(version: u64) -> u64 {
    version >> VERSION_MS_SHIFT
}

/// Encodes a stored value with its expiry (0 = never) and checksum, without a version (records
/// that never travel between clusters: remembered results, floors).
pub fn encode_value(expire_at_ms: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(VALUE_HEADER_BYTES + value.len());
    out.push(FORMAT_PLAIN);
    out.extend_from_slice(&expire_at_ms.to_be_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&expire_at_ms.to_be_bytes());
    hasher.update(value);
    out.extend_from_slice(&hasher.finalize().to_be_bytes());
    out.extend_from_slice(value);
    out
}

/// Encodes a user record's stored value: expiry (0 = never), version, checksum, value.
pub fn encode_versioned(expire_at_ms: u64, version: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(VERSIONED_HEADER_BYTES + value.len());
    out.push(FORMAT_VERSIONED);
    out.extend_from_slice(&expire_at_ms.to_be_bytes());
    out.extend_from_slice(&version.to_be_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&out[1..17]);
    hasher.update(value);
    out.extend_from_slice(&hasher.finalize().to_be_bytes());
    out.extend_from_slice(value);
    out
}

/// Reads only the expiry of a stored value, without verifying the checksum (compaction filter path).
pub fn peek_expire_at_ms(stored: &[u8]) -> Option<u64> {
    match stored.first() {
        Some(&FORMAT_PLAIN) if stored.len() >= VALUE_HEADER_BYTES => {}
        Some(&FORMAT_VERSIONED) if stored.len() >= VERSIONED_HEADER_BYTES => {}
        _ => return None,
    }
    Some(u64::from_be_bytes(stored[1..9].try_into().expect("8 bytes")))
}

/// Reads only the version of a stored value (0 for format 1, or anything unrecognised), without
/// verifying the checksum (compaction filter path).
pub fn peek_version(stored: &[u8]) -> u64 {
    match stored.first() {
        Some(&FORMAT_VERSIONED) if stored.len() >= VERSIONED_HEADER_BYTES => u64::from_be_bytes(stored[9..17].try_into().expect("8 bytes")),
        _ => 0,
    }
}

/// A decoded, verified stored value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredValue<'a> {
    pub expire_at_ms: u64,
    /// 0 for format 1.
    pub version: u64,
    pub value: &'a [u8],
}

/// Decodes and verifies a stored value of either format.
pub fn decode_stored(stored: &[u8]) -> Result<StoredValue<'_>, TernError> {
    let (header, version) = match stored.first() {
        Some(&FORMAT_PLAIN) => (VALUE_HEADER_BYTES, None),
        Some(&FORMAT_VERSIONED) => (VERSIONED_HEADER_BYTES, Some(())),
        Some(other) => return Err(TernError::Corruption(format!("unknown value format version {other}"))),
        None => return Err(TernError::Corruption("stored value is empty".into())),
    };
    if stored.len() < header {
        return Err(TernError::Corruption(format!("stored value of {} bytes has no header", stored.len())));
    }
    let crc = u32::from_be_bytes(stored[header - 4..header].try_into().expect("4 bytes"));
    let value = &stored[header..];
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&stored[1..header - 4]);
    hasher.update(value);
    if hasher.finalize() != crc {
        return Err(TernError::Corruption("stored value failed its checksum".into()));
    }
    let word = |i: usize| u64::from_be_bytes(stored[i..i + 8].try_into().expect("8 bytes"));
    Ok(StoredValue { expire_at_ms: word(1), version: version.map_or(0, |_| word(9)), value })
}

/// Decodes and verifies a stored value: (expire_at_ms, user value).
pub fn decode_value(stored: &[u8]) -> Result<(u64, &[u8]), TernError> {
    decode_stored(stored).map(|s| (s.expire_at_ms, s.value))
}

/// Whether a record with this expiry is expired at `now_ms`.
pub fn is_expired(expire_at_ms: u64, now_ms: u64) -> bool {
    expire_at_ms != 0 && expire_at_ms <= now_ms
}

/// Absolute expiry for a TTL given in seconds (0 = never).
pub fn expiry_from_ttl(now_ms: u64, ttl_seconds: u32) -> u64 {
    if ttl_seconds == 0 {
        0
    } else {
        now_ms + ttl_seconds as u64 * 1000
    }
}

/// A write's expiry: an absolute time when given (non-zero), else a TTL from `now_ms` (0 = never).
pub fn expiry(now_ms: u64, ttl_seconds: u32, expire_at_ms: u64) -> u64 {
    if expire_at_ms != 0 {
        expire_at_ms
    } else {
        expiry_from_ttl(now_ms, ttl_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash is a fixed function: these values must never change, or data would move partitions.
    #[test]
    fn partition_hash_is_stable() {
        assert_eq!(partition_hash(b"tern"), 0x65ee6f41a1d54595);
        assert_eq!(partition_hash(b"user:1"), 0x4ce53ee4648cef41);
        assert_eq!(partition_hash(b""), 0xefd01f60ba992926);
        assert_eq!(partition_of(b"user:1", 8), 1);
        assert_eq!(partition_of(b"user:1", 1), 0);
        assert_eq!(hash_tag(b"{user:1}:feed"), b"user:1");
        assert_eq!(hash_tag(b"a{b}c{d}"), b"b");
        assert_eq!(hash_tag(b"{}x"), b"{}x");
        assert_eq!(hash_tag(b"x{y"), b"x{y");
        assert_eq!(hash_tag(b"{{a}}"), b"{a");
        assert_eq!(partition_of(b"{user:1}:feed", 64), partition_of(b"user:1", 64));
    }

    /// Keys of many hashkeys spread roughly evenly over partitions.
    #[test]
    fn partition_spread() {
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[partition_of(format!("key{i}").as_bytes(), 8) as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread {counts:?}");
        }
    }

    /// Storage keys round-trip, and records of one hashkey sort by sortkey and share a prefix.
    #[test]
    fn key_codec() {
        let k = encode_key(b"hk", b"sk");
        assert_eq!(decode_key(&k).unwrap(), (&b"hk"[..], &b"sk"[..]));
        let empty = encode_key(b"", b"");
        assert_eq!(decode_key(&empty).unwrap(), (&b""[..], &b""[..]));
        assert!(encode_key(b"hk", b"a") < encode_key(b"hk", b"b"));
        assert!(encode_key(b"hk", b"a").starts_with(&encode_hashkey_prefix(b"hk")));
        assert!(!encode_key(b"hk2", b"").starts_with(&encode_hashkey_prefix(b"hk")));
        assert!(decode_key(&[0]).is_err());
        assert!(decode_key(&[0, 5, 1]).is_err());
    }

    /// prefix_successor bounds every string with the prefix.
    #[test]
    fn successor() {
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_successor(&[0xff, 0xff]), None);
    }

    /// Values carry expiry and checksum; a flipped bit is reported as corruption, never served.
    #[test]
    fn value_header() {
        let v = encode_value(1234, b"hello");
        assert_eq!(decode_value(&v).unwrap(), (1234, &b"hello"[..]));
        assert_eq!(peek_expire_at_ms(&v), Some(1234));
        let mut bad = v.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(decode_value(&bad), Err(TernError::Corruption(_))));
        assert!(decode_value(&v[..5]).is_err());
        assert_eq!(decode_stored(&v).unwrap().version, 0, "format 1 reads as version 0");
        let versioned = encode_versioned(1234, 0xabc_def0_1234, b"hello");
        assert_eq!(versioned.len(), VERSIONED_HEADER_BYTES + 5);
        assert_eq!(decode_stored(&versioned).unwrap(), StoredValue { expire_at_ms: 1234, version: 0xabc_def0_1234, value: b"hello" });
        assert_eq!(peek_expire_at_ms(&versioned), Some(1234));
        for i in 1..versioned.len() {
            let mut bad = versioned.clone();
            bad[i] ^= 1;
            assert!(matches!(decode_stored(&bad), Err(TernError::Corruption(_))), "byte {i} is covered by the checksum");
        }
        assert!(decode_stored(&versioned[..20]).is_err());
        assert!(decode_stored(&[9, 0, 0]).is_err());
        assert!(is_expired(1000, 1000));
        assert!(!is_expired(0, u64::MAX));
        assert_eq!(expiry_from_ttl(5000, 2), 7000);
        assert_eq!(expiry_from_ttl(5000, 0), 0);
        assert_eq!(expiry(5000, 0, 9000), 9000);
        assert_eq!(expiry(5000, 2, 0), 7000);
    }

    /// Cluster tags fit the version's low bits and are never 0 for a known cluster.
    #[test]
    fn cluster_tags() {
        assert_eq!(cluster_tag(0), 0);
        for id in [1, 4095, 4096, u64::MAX, 0x1234_5678_9abc_def0] {
            let tag = cluster_tag(id);
            assert!((1..=CLUSTER_TAG_MAX).contains(&tag), "{id}: {tag}");
        }
        let v = (77u64 << VERSION_MS_SHIFT) | (3 << VERSION_TAG_BITS) | 9;
        assert_eq!((version_ms(v), version_tag(v)), (77, 9));
    }
}
