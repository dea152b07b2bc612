//! On-disk encodings, stable forever once data exists:
//! - the partition hash of a hashkey;
//! - the storage key of a record: `[hashkey length: u16 BE][hashkey][sortkey]`, so the records of one
//!   hashkey are contiguous and ordered by sortkey;
//! - the stored value: a 13-byte header `[version: u8][expire_at_ms: u64 BE][crc32 of the rest]`
//!   followed by the user value. The checksum covers the expiry and the value.

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

/// The partition a hashkey belongs to in a table of `partition_count` (a power of two) partitions.
pub fn partition_of(hashkey: &[u8], partition_count: u32) -> u32 {
    debug_assert!(partition_count.is_power_of_two());
    (partition_hash(hashkey) & (partition_count as u64 - 1)) as u32
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
const VALUE_FORMAT_VERSION: u8 = 1;

/// Encodes a stored value with its expiry (0 = never) and checksum.
pub fn encode_value(expire_at_ms: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(VALUE_HEADER_BYTES + value.len());
    out.push(VALUE_FORMAT_VERSION);
    out.extend_from_slice(&expire_at_ms.to_be_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&expire_at_ms.to_be_bytes());
    hasher.update(value);
    out.extend_from_slice(&hasher.finalize().to_be_bytes());
    out.extend_from_slice(value);
    out
}

/// Reads only the expiry of a stored value, without verifying the checksum (compaction filter path).
pub fn peek_expire_at_ms(stored: &[u8]) -> Option<u64> {
    if stored.len() < VALUE_HEADER_BYTES || stored[0] != VALUE_FORMAT_VERSION {
        return None;
    }
    Some(u64::from_be_bytes(stored[1..9].try_into().expect("8 bytes")))
}

/// Decodes and verifies a stored value: (expire_at_ms, user value).
pub fn decode_value(stored: &[u8]) -> Result<(u64, &[u8]), TernError> {
    if stored.len() < VALUE_HEADER_BYTES {
        return Err(TernError::Corruption(format!("stored value of {} bytes has no header", stored.len())));
    }
    if stored[0] != VALUE_FORMAT_VERSION {
        return Err(TernError::Corruption(format!("unknown value format version {}", stored[0])));
    }
    let expire = u64::from_be_bytes(stored[1..9].try_into().expect("8 bytes"));
    let crc = u32::from_be_bytes(stored[9..13].try_into().expect("4 bytes"));
    let value = &stored[VALUE_HEADER_BYTES..];
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&stored[1..9]);
    hasher.update(value);
    if hasher.finalize() != crc {
        return Err(TernError::Corruption("stored value failed its checksum".into()));
    }
    Ok((expire, value))
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
        assert!(is_expired(1000, 1000));
        assert!(!is_expired(0, u64::MAX));
        assert_eq!(expiry_from_ttl(5000, 2), 7000);
        assert_eq!(expiry_from_ttl(5000, 0), 0);
        assert_eq!(expiry(5000, 0, 9000), 9000);
        assert_eq!(expiry(5000, 2, 0), 7000);
    }
}
