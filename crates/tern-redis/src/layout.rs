//! Where each Redis type keeps its data among the records (sortkeys) of its key's hashkey.
//!
//! - string: one record at sortkey `""`;
//! - hash: one record per field at sortkey `field` (a field that is empty or starts with byte 0 is
//!   stored as `[0, 0] ++ field`), no metadata: a hash is a hashkey with sortkeys, as Tern's own
//!   API sees it;
//! - list, set, sorted set: a metadata record at `[0, 1]` (type, element count, list head and
//!   tail) and element records from `[0, 2]` on:
//!   - list: `[0, 2] ++ position` (i64 with its sign bit flipped, big-endian, so positions sort),
//!     value the element; the list holds positions head..tail;
//!   - set: `[0, 2] ++ member`, empty value;
//!   - sorted set: `[0, 2] ++ member` with the score (f64 bits, big-endian) as value, and the score
//!     index `[0, 3] ++ order-preserving score ++ member` with an empty value.
//!
//! A key holds one type, so its first record tells which: `""` a string, `[0, 1]` the metadata's
//! type, anything else a hash. Every record of a key carries the key's expiry.

use crate::{fail, Records, Res, WRONGTYPE};

pub const META: &[u8] = &[0, 1];
pub const ELEMENTS: &[u8] = &[0, 2];
pub const SCORES: &[u8] = &[0, 3];
/// The end of the sorted-set score index.
pub const SCORES_END: &[u8] = &[0, 4];
const ESCAPED_FIELD: &[u8] = &[0, 0];

/// Largest member of a set or sorted set, and largest hash field: what fits a sortkey with its
/// prefix and score.
pub const MEMBER_BYTES_MAX: usize = tern_core::limits::SORTKEY_BYTES_MAX - 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    None,
    String,
    Hash,
    List,
    Set,
    ZSet,
}

impl KeyType {
    pub fn name(self) -> &'static str {
        match self {
            KeyType::None => "none",
            KeyType::String => "string",
            KeyType::Hash => "hash",
            KeyType::List => "list",
            KeyType::Set => "set",
            KeyType::ZSet => "zset",
        }
    }

    fn code(self) -> u8 {
        match self {
            KeyType::List => b'l',
            KeyType::Set => b's',
            KeyType::ZSet => b'z',
            _ => 0,
        }
    }

    fn from_code(c: u8) -> Option<KeyType> {
        Some(match c {
            b'l' => KeyType::List,
            b's' => KeyType::Set,
            b'z' => KeyType::ZSet,
            _ => return None,
        })
    }
}

/// The sortkey of a hash field.
pub fn hash_sortkey(field: &[u8]) -> Vec<u8> {
    if field.first().is_some_and(|&b| b != 0) {
        field.to_vec()
    } else {
        [ESCAPED_FIELD, field].concat()
    }
}

/// The hash field a sortkey stores, if it is one.
pub fn hash_field_of_sortkey(sortkey: &[u8]) -> Option<&[u8]> {
    match sortkey {
        [] => None,
        [0, 0, rest @ ..] => Some(rest),
        [0, ..] => None,
        field => Some(field),
    }
}

/// A collection's metadata.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Meta {
    pub kind: KeyType,
    pub count: u64,
    /// Lists: the position of the first element, and one past the last.
    pub head: i64,
    pub tail: i64,
    pub expire_at_ms: u64,
}

impl Meta {
    pub fn new(kind: KeyType) -> Meta {
        Meta { kind, count: 0, head: 0, tail: 0, expire_at_ms: 0 }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(25);
        out.push(self.kind.code());
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(&self.head.to_be_bytes());
        out.extend_from_slice(&self.tail.to_be_bytes());
        out
    }

    fn decode(v: &[u8], expire_at_ms: u64) -> Option<Meta> {
        if v.len() != 25 {
            return None;
        }
        let word = |i: usize| u64::from_be_bytes(v[1 + 8 * i..9 + 8 * i].try_into().expect("8 bytes"));
        Some(Meta { kind: KeyType::from_code(v[0])?, count: word(0), head: word(1) as i64, tail: word(2) as i64, expire_at_ms })
    }
}

/// What a key holds: its type, its expiry, and a collection's metadata.
#[derive(Clone, Copy, Debug)]
pub struct Key {
    pub kind: KeyType,
    pub expire_at_ms: u64,
    pub meta: Option<Meta>,
}

/// Reads what `key` holds from its first record.
pub fn lookup(r: &mut dyn Records, key: &[u8]) -> Res<Key> {
    let mut first: Option<(Vec<u8>, u64, Vec<u8>)> = None;
    r.scan(key, b"", None, false, &mut |sk, expire, v| {
        first = Some((sk.to_vec(), expire, if sk == META { v.to_vec() } else { Vec::new() }));
        false
    })?;
    let Some((sortkey, expire_at_ms, value)) = first else {
        return Ok(Key { kind: KeyType::None, expire_at_ms: 0, meta: None });
    };
    if sortkey.is_empty() {
        return Ok(Key { kind: KeyType::String, expire_at_ms, meta: None });
    }
    if sortkey == META {
        let Some(meta) = Meta::decode(&value, expire_at_ms) else { return crate::malformed(format!("collection metadata of {} bytes", value.len())) };
        return Ok(Key { kind: meta.kind, expire_at_ms, meta: Some(meta) });
    }
    if hash_field_of_sortkey(&sortkey).is_some() {
        return Ok(Key { kind: KeyType::Hash, expire_at_ms, meta: None });
    }
    crate::malformed("collection elements without metadata")
}

/// The key's collection metadata when it holds `kind` (None when it holds nothing), WRONGTYPE when
/// it holds another type.
pub fn collection(r: &mut dyn Records, key: &[u8], kind: KeyType) -> Res<Option<Meta>> {
    let k = lookup(r, key)?;
    match k.kind {
        KeyType::None => Ok(None),
        t if t == kind => Ok(k.meta),
        _ => fail(WRONGTYPE),
    }
}

/// Writes a collection's metadata, or deletes it when the collection is empty (an empty collection
/// does not exist in Redis).
pub fn store_meta(r: &mut dyn Records, key: &[u8], meta: &Meta) -> Res<()> {
    if meta.count == 0 {
        r.delete(key, META)?;
    } else {
        r.put(key, META, meta.expire_at_ms, &meta.encode())?;
    }
    Ok(())
}

/// Records a key-wide operation holds in memory at once.
const CHUNK: usize = 1024;

/// A chunk of a key's records: (sortkey, expire_at_ms, value).
pub type Chunk = Vec<(Vec<u8>, u64, Vec<u8>)>;

/// Hands every record of `key` to `f`, a chunk of (sortkey, expire_at_ms, value) at a time, so
/// that a key of any size takes bounded memory; `f` may write `key`'s records already handed
/// over. Whether the key had any.
pub fn each_chunk(r: &mut dyn Records, key: &[u8], f: &mut dyn FnMut(&mut dyn Records, Chunk) -> Res<()>) -> Res<bool> {
    let mut from = Vec::new();
    let mut any = false;
    loop {
        let mut chunk = Vec::new();
        r.scan(key, &from, None, false, &mut |sk, expire, v| {
            chunk.push((sk.to_vec(), expire, v.to_vec()));
            chunk.len() < CHUNK
        })?;
        let Some((last, _, _)) = chunk.last() else { return Ok(any) };
        any = true;
        from = [last.as_slice(), &[0]].concat();
        let done = chunk.len() < CHUNK;
        f(r, chunk)?;
        if done {
            return Ok(true);
        }
    }
}

/// Deletes every record of `key`; whether it existed.
pub fn delete_key(r: &mut dyn Records, key: &[u8]) -> Res<bool> {
    each_chunk(r, key, &mut |r, chunk| {
        for (sk, _, _) in &chunk {
            r.delete(key, sk)?;
        }
        Ok(())
    })
}

/// Sets the expiry of every record of `key` (0: none); whether the key exists.
pub fn set_expiry(r: &mut dyn Records, key: &[u8], expire_at_ms: u64) -> Res<bool> {
    each_chunk(r, key, &mut |r, chunk| {
        for (sk, _, v) in &chunk {
            r.put(key, sk, expire_at_ms, v)?;
        }
        Ok(())
    })
}

/// A list position as a sortkey.
pub fn list_sortkey(position: i64) -> Vec<u8> {
    let mut out = ELEMENTS.to_vec();
    out.extend_from_slice(&((position as u64) ^ (1 << 63)).to_be_bytes());
    out
}

/// A set or sorted-set member's sortkey.
pub fn member_sortkey(member: &[u8]) -> Vec<u8> {
    [ELEMENTS, member].concat()
}

/// The member a member sortkey holds.
pub fn member_of(sortkey: &[u8]) -> &[u8] {
    sortkey.strip_prefix(ELEMENTS).unwrap_or(&[])
}

/// Scores as bytes that sort as the numbers do (-0 as 0; NaN never stored).
pub fn score_bytes(score: f64) -> [u8; 8] {
    let score = if score == 0.0 { 0.0 } else { score };
    let bits = score.to_bits();
    let ordered = if bits >> 63 == 1 { !bits } else { bits | (1 << 63) };
    ordered.to_be_bytes()
}

pub fn score_of_bytes(b: &[u8]) -> f64 {
    let ordered = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
    let bits = if ordered >> 63 == 1 { ordered & !(1 << 63) } else { !ordered };
    f64::from_bits(bits)
}

/// A sorted-set score index entry's sortkey.
pub fn score_sortkey(score: f64, member: &[u8]) -> Vec<u8> {
    let mut out = SCORES.to_vec();
    out.extend_from_slice(&score_bytes(score));
    out.extend_from_slice(member);
    out
}

/// (score, member) of a score index sortkey.
pub fn parse_score_sortkey(sortkey: &[u8]) -> Option<(f64, &[u8])> {
    let rest = sortkey.strip_prefix(SCORES)?;
    (rest.len() >= 8).then(|| (score_of_bytes(&rest[..8]), &rest[8..]))
}

/// Checks a member or field against the sortkey limit.
pub fn check_member(m: &[u8]) -> Res<()> {
    if m.len() > MEMBER_BYTES_MAX {
        return fail(format!("ERR member or field of {} bytes is too large; the limit is {MEMBER_BYTES_MAX} bytes", m.len()));
    }
    Ok(())
}

/// Checks a value against the record value limit.
pub fn check_value(v: &[u8]) -> Res<()> {
    tern_core::limits::check_value(v).or_else(|e| fail(format!("ERR {}", e.message())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_sort_as_numbers() {
        let scores = [f64::NEG_INFINITY, -1e300, -2.5, -1.0, -0.0, 0.0, 1e-300, 1.0, 2.5, 1e300, f64::INFINITY];
        for w in scores.windows(2) {
            assert!(score_bytes(w[0]) <= score_bytes(w[1]), "{} {}", w[0], w[1]);
        }
        for s in scores {
            assert_eq!(score_of_bytes(&score_bytes(s)), if s == 0.0 { 0.0 } else { s });
        }
        assert!(list_sortkey(-5) < list_sortkey(-1) && list_sortkey(-1) < list_sortkey(0) && list_sortkey(0) < list_sortkey(7));
        assert_eq!(hash_field_of_sortkey(&hash_sortkey(b"")), Some(&b""[..]));
        assert_eq!(hash_field_of_sortkey(&hash_sortkey(b"\0x")), Some(&b"\0x"[..]));
        assert_eq!(hash_field_of_sortkey(&hash_sortkey(b"f")), Some(&b"f"[..]));
        assert!(hash_sortkey(b"") < META.to_vec());
    }
}
