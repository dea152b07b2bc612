//! Reads against a replica's engine. Expired records are invisible; corrupt ones are reported, never
//! served. So are records of hashkeys the partition no longer owns (a split left them behind): a
//! request for one is told to refresh its routing, and scans and checksums skip them.

use crate::apply::{engine_error, Owner};
use crate::keys;
use tern_core::{codec, limits::READ_RECORDS_MAX, TernError};
use tern_engine::KvEngine;
use tern_proto::{read_request::Op, ReadRequest, ReadResponse, Record};

pub fn execute_read(engine: &dyn KvEngine, request: &ReadRequest, now_ms: u64, owner: Owner) -> ReadResponse {
    match read(engine, request, now_ms, owner) {
        Ok(r) => r,
        Err(e) => ReadResponse { error: Some(e.into()), ..Default::default() },
    }
}

fn effective_limit(limit: u32) -> usize {
    if limit == 0 || limit > READ_RECORDS_MAX {
        READ_RECORDS_MAX as usize
    } else {
        limit as usize
    }
}

fn record(hashkey: &[u8], sortkey: &[u8], stored: &[u8], now_ms: u64, no_value: bool) -> Result<Option<Record>, TernError> {
    let (expire, value) = codec::decode_value(stored)?;
    if codec::is_expired(expire, now_ms) {
        return Ok(None);
    }
    Ok(Some(Record {
        hashkey: hashkey.to_vec().into(),
        sortkey: sortkey.to_vec().into(),
        value: if no_value { Default::default() } else { value.to_vec().into() },
        expire_at_ms: expire,
    }))
}

fn read(engine: &dyn KvEngine, request: &ReadRequest, now_ms: u64, owner: Owner) -> Result<ReadResponse, TernError> {
    let mut response = ReadResponse::default();
    match &request.op {
        Some(Op::Get(tern_proto::MultiGet { hashkey, .. }) | Op::Count(tern_proto::Count { hashkey })) => owner.check(hashkey)?,
        Some(Op::Scan(scan)) if !scan.full_table => owner.check(&scan.hashkey)?,
        _ => {}
    }
    match &request.op {
        None => return Err(TernError::invalid("read request without an operation")),
        Some(Op::Get(get)) if !get.sortkeys.is_empty() => {
            for sortkey in &get.sortkeys {
                if let Some(stored) = engine.get(&keys::data_key(&get.hashkey, sortkey)).map_err(engine_error)? {
                    if let Some(r) = record(&get.hashkey, sortkey, &stored, now_ms, get.no_value)? {
                        response.records.push(r);
                    }
                }
            }
        }
        Some(Op::Get(get)) => {
            // Every sortkey of the hashkey, bounded.
            let scan = tern_proto::Scan { hashkey: get.hashkey.clone(), limit: get.limit, no_value: get.no_value, ..Default::default() };
            return scan_hashkey(engine, &scan, now_ms);
        }
        Some(Op::Scan(scan)) if scan.full_table => return scan_partition(engine, scan, now_ms, owner),
        Some(Op::Scan(scan)) => return scan_hashkey(engine, scan, now_ms),
        Some(Op::Redis(command)) => response.redis_reply = crate::redis::read(engine, &command.args, now_ms, owner)?.into(),
        Some(Op::Count(count)) => {
            let prefix = keys::hashkey_prefix(&count.hashkey);
            let end = codec::prefix_successor(&prefix);
            try_scan(engine, &prefix, end.as_deref(), |_, v| {
                let (expire, _) = codec::decode_value(v)?;
                if !codec::is_expired(expire, now_ms) {
                    response.count += 1;
                }
                Ok(true)
            })?;
        }
    }
    Ok(response)
}

/// Sortkeys of one hashkey in [start, stop), optionally with a sortkey prefix.
fn scan_hashkey(engine: &dyn KvEngine, scan: &tern_proto::Scan, now_ms: u64) -> Result<ReadResponse, TernError> {
    let limit = effective_limit(scan.limit);
    let hashkey_prefix = keys::hashkey_prefix(&scan.hashkey);
    let mut start_sortkey = scan.start.to_vec();
    if !scan.prefix.is_empty() && start_sortkey < scan.prefix.to_vec() {
        start_sortkey = scan.prefix.to_vec();
    }
    let start = keys::data_key(&scan.hashkey, &start_sortkey);
    let mut end = codec::prefix_successor(&hashkey_prefix);
    if !scan.stop.is_empty() {
        end = Some(keys::data_key(&scan.hashkey, &scan.stop));
    }
    let mut response = ReadResponse::default();
    let prefix_len = hashkey_prefix.len();
    try_scan(engine, &start, end.as_deref(), |k, v| {
        let sortkey = &k[prefix_len..];
        if !scan.prefix.is_empty() && !sortkey.starts_with(&scan.prefix) {
            return Ok(false); // sorted: past the prefix range
        }
        if response.records.len() == limit {
            response.resume = sortkey.to_vec().into();
            return Ok(false);
        }
        response.records.extend(record(&scan.hashkey, sortkey, v, now_ms, scan.no_value)?);
        Ok(true)
    })?;
    Ok(response)
}

/// Every record of the partition, resumable: `start` is the storage key to continue from.
fn scan_partition(engine: &dyn KvEngine, scan: &tern_proto::Scan, now_ms: u64, owner: Owner) -> Result<ReadResponse, TernError> {
    let limit = effective_limit(scan.limit);
    let start = if scan.start.is_empty() && !scan.hashkey.is_empty() {
        keys::hashkey_prefix(&scan.hashkey) // from a hashkey on (a short range scan)
    } else if scan.start.is_empty() {
        vec![keys::DATA_PREFIX]
    } else {
        scan.start.to_vec()
    };
    if start.first() != Some(&keys::DATA_PREFIX) {
        return Err(TernError::invalid("full scan resume token is malformed"));
    }
    let end = keys::data_end();
    let mut response = ReadResponse::default();
    try_scan(engine, &start, Some(&end), |k, v| {
        if response.records.len() == limit {
            response.resume = k.to_vec().into();
            return Ok(false);
        }
        let (hashkey, sortkey) = codec::decode_key(&k[1..])?;
        if owner.owns(hashkey) {
            response.records.extend(record(hashkey, sortkey, v, now_ms, scan.no_value)?);
        }
        Ok(true)
    })?;
    Ok(response)
}

/// Scans [start, end) with a visitor that may fail; the first failure stops the scan and is returned.
fn try_scan(
    engine: &dyn KvEngine,
    start: &[u8],
    end: Option<&[u8]>,
    mut visit: impl FnMut(&[u8], &[u8]) -> Result<bool, TernError>,
) -> Result<(), TernError> {
    let mut failure = None;
    engine
        .scan(start, end, &mut |k, v| match visit(k, v) {
            Ok(more) => more,
            Err(e) => {
                failure = Some(e);
                false
            }
        })
        .map_err(engine_error)?;
    failure.map_or(Ok(()), Err)
}

/// A checksum of the replicated contents (records and remembered results, not the apply state), with
/// records expired at `now_ms` left out so that compaction timing does not matter.
pub fn checksum(engine: &dyn KvEngine, now_ms: u64, owner: Owner) -> Result<(u64, u64), TernError> {
    let mut mixer = Mixer::default();
    engine
        .scan(&[0x00, b'b'], None, &mut |k, v| {
            if !keys::is_expired_at(k, v, now_ms) && !owner.foreign_data_key(k) {
                mixer.record(&[k, v]);
            }
            true
        })
        .map_err(engine_error)?;
    Ok((mixer.hash, mixer.count))
}

/// A checksum over user records only, of what a reader sees: key, expiry and value, not how they
/// are stored (a replica restored from a backup, or a table duplicated to another cluster, has
/// exactly these records; a record of format 1 equals the same record of format 2).
pub fn data_checksum(engine: &dyn KvEngine, now_ms: u64, owner: Owner) -> Result<(u64, u64), TernError> {
    let mut failure = None;
    let mut mixer = Mixer::default();
    engine
        .scan(&[keys::DATA_PREFIX], Some(&keys::data_end()), &mut |k, v| match codec::decode_stored(v) {
            Ok(_) if owner.foreign_data_key(k) => true,
            Ok(s) if codec::is_expired(s.expire_at_ms, now_ms) => true,
            Ok(s) => {
                mixer.record(&[k, &s.expire_at_ms.to_be_bytes(), s.value]);
                true
            }
            Err(e) => {
                failure = Some(e);
                false
            }
        })
        .map_err(engine_error)?;
    failure.map_or(Ok((mixer.hash, mixer.count)), Err)
}

/// FNV-1a over length-prefixed fields, counting records.
struct Mixer {
    hash: u64,
    count: u64,
}

impl Default for Mixer {
    fn default() -> Self {
        Mixer { hash: 0xcbf2_9ce4_8422_2325, count: 0 }
    }
}

impl Mixer {
    /// Adds one record's fields.
    fn record(&mut self, fields: &[&[u8]]) {
        for field in fields {
            for &b in (field.len() as u32).to_be_bytes().iter().chain(field.iter()) {
                self.hash ^= b as u64;
                self.hash = self.hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        self.count += 1;
    }
}
