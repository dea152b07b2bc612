//! The partition state machine: applies committed writes to the engine deterministically.
//!
//! Everything here depends only on the entry (including the leader's timestamp) and the engine's
//! contents, so every replica computes identical bytes and identical results.

use crate::keys;
use prost::Message as _;
use raft::eraftpb::ConfState;
use std::collections::HashMap;
use tern_core::{codec, TernError};
use tern_engine::{KvEngine, WriteBatch};
use tern_proto::{write_request::Op, CheckType, RaftCommand, WriteRequest, WriteResponse};

/// How long a deduplicated write's result is remembered (retries must finish well within it).
pub const DEDUP_RESULT_TTL_MS: u64 = 10 * 60 * 1000;
/// Results below a client's floor are deleted once the floor crosses a multiple of this.
pub const DEDUP_GC_CHUNK: u64 = 1024;

/// What the engine records about how far the state machine has got.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApplyState {
    pub applied_index: u64,
    pub applied_term: u64,
    pub conf_state: ConfState,
}

impl ApplyState {
    fn encode(&self) -> Vec<u8> {
        use protobuf::Message as _;
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&self.applied_index.to_be_bytes());
        out.extend_from_slice(&self.applied_term.to_be_bytes());
        out.extend_from_slice(&self.conf_state.write_to_bytes().expect("encode conf state"));
        out
    }

    fn decode(bytes: &[u8]) -> Result<ApplyState, TernError> {
        use protobuf::Message as _;
        if bytes.len() < 16 {
            return Err(TernError::Corruption(format!("apply state of {} bytes", bytes.len())));
        }
        let conf_state = ConfState::parse_from_bytes(&bytes[16..])
            .map_err(|e| TernError::Corruption(format!("apply state conf state: {e}")))?;
        Ok(ApplyState {
            applied_index: u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes")),
            applied_term: u64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes")),
            conf_state,
        })
    }
}

pub fn engine_error(e: tern_engine::EngineError) -> TernError {
    match e {
        tern_engine::EngineError::Corruption(m) => TernError::Corruption(m),
        tern_engine::EngineError::Io(m) => TernError::Internal(m),
    }
}

pub struct StateMachine {
    engine: Box<dyn KvEngine>,
    state: ApplyState,
}

impl StateMachine {
    /// Opens the state machine on an engine; a fresh engine starts from `initial` (and records it).
    pub fn open(engine: Box<dyn KvEngine>, initial: ApplyState) -> Result<StateMachine, TernError> {
        let state = match engine.get(keys::APPLY_STATE_KEY).map_err(engine_error)? {
            Some(bytes) => ApplyState::decode(&bytes)?,
            None => {
                // Synced: the initial conf state exists nowhere else, and a replica that lost it
                // (power failure before the engine's first sync) could never vote or campaign again.
                // Found by the simulator (regression seeds in tern-sim/tests/sim.rs).
                let mut wb = WriteBatch::default();
                wb.put(keys::APPLY_STATE_KEY.to_vec(), initial.encode());
                engine.write(wb).map_err(engine_error)?;
                engine.sync().map_err(engine_error)?;
                initial
            }
        };
        Ok(StateMachine { engine, state })
    }

    pub fn state(&self) -> &ApplyState {
        &self.state
    }

    pub fn engine(&self) -> &dyn KvEngine {
        self.engine.as_ref()
    }

    /// Starts a batch of applies; nothing is visible until `finish`.
    pub fn begin(&self) -> ApplyBatch {
        ApplyBatch { wb: WriteBatch::default(), overlay: HashMap::new(), state: self.state.clone() }
    }

    /// Writes the batch and the new apply state atomically.
    pub fn finish(&mut self, mut batch: ApplyBatch) -> Result<(), TernError> {
        if batch.state == self.state && batch.wb.is_empty() {
            return Ok(());
        }
        batch.wb.put(keys::APPLY_STATE_KEY.to_vec(), batch.state.encode());
        self.engine.write(batch.wb).map_err(engine_error)?;
        self.state = batch.state;
        Ok(())
    }
}

/// Writes pending in one apply round, with a read-your-writes overlay so that later entries in the
/// same round (an incr after a set) see earlier ones.
pub struct ApplyBatch {
    wb: WriteBatch,
    overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
    state: ApplyState,
}

impl ApplyBatch {
    pub fn set_applied(&mut self, index: u64, term: u64) {
        debug_assert!(index > self.state.applied_index, "applied index must grow");
        self.state.applied_index = index;
        self.state.applied_term = term;
    }

    pub fn set_conf_state(&mut self, conf_state: ConfState) {
        self.state.conf_state = conf_state;
    }

    fn get(&self, engine: &dyn KvEngine, key: &[u8]) -> Result<Option<Vec<u8>>, TernError> {
        match self.overlay.get(key) {
            Some(v) => Ok(v.clone()),
            None => engine.get(key).map_err(engine_error),
        }
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.overlay.insert(key.clone(), Some(value.clone()));
        self.wb.put(key, value);
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.overlay.insert(key.clone(), None);
        self.wb.delete(key);
    }

    /// The live (unexpired, checksum-verified) record at `key`: (expire_at_ms, value).
    fn live_record(&self, engine: &dyn KvEngine, key: &[u8], now_ms: u64) -> Result<Option<(u64, Vec<u8>)>, TernError> {
        let Some(stored) = self.get(engine, key)? else { return Ok(None) };
        let (expire, value) = codec::decode_value(&stored)?;
        if codec::is_expired(expire, now_ms) {
            return Ok(None);
        }
        Ok(Some((expire, value.to_vec())))
    }

    /// Applies one committed command and returns the client's answer. Errors that come from the
    /// request (wrong type, overflow) are answers too: deterministic, no state change.
    pub fn apply_command(&mut self, engine: &dyn KvEngine, data: &[u8]) -> WriteResponse {
        let command = match RaftCommand::decode(data) {
            Ok(c) => c,
            Err(e) => return error_response(TernError::Corruption(format!("undecodable raft command: {e}"))),
        };
        let now = command.now_unix_ms;
        let Some(write) = command.write else {
            return error_response(TernError::invalid("raft command without a write"));
        };
        let dedup = (write.client_id != 0).then(|| keys::dedup_key(write.client_id, write.seq));
        if let Some(key) = &dedup {
            match self.live_record(engine, key, now) {
                Ok(Some((_, remembered))) => {
                    return WriteResponse::decode(&remembered[..]).unwrap_or_else(|e| {
                        error_response(TernError::Corruption(format!("remembered result: {e}")))
                    });
                }
                Ok(None) => {}
                Err(e) => return error_response(e),
            }
        }
        // Results below the client's floor were forgotten: a request that old is a late duplicate of
        // one the client has finished with, and must not apply again.
        let floor_key = keys::dedup_floor_key(write.client_id);
        let floor = match &dedup {
            None => 0,
            Some(_) => match self.live_record(engine, &floor_key, now) {
                Ok(Some((_, v))) => v.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0),
                Ok(None) => 0,
                Err(e) => return error_response(e),
            },
        };
        if dedup.is_some() && write.seq < floor {
            return error_response(TernError::ProposalDropped(format!(
                "request {} of client {} is older than its acknowledged sequence {floor}; ignored",
                write.seq, write.client_id
            )));
        }
        let response = match self.execute(engine, &write, now) {
            Ok(r) => r,
            Err(e) => error_response(e),
        };
        if let Some(key) = dedup {
            let new_floor = write.first_incomplete_seq.min(write.seq).max(floor);
            // The floor moves, and forgotten results are removed, in chunks: one range tombstone and
            // one floor record per DEDUP_GC_CHUNK sequence numbers, not per write (thousands of
            // memtable range tombstones made every engine read re-fragment them: most of a server's
            // CPU under write load). Results at or above the stored floor are never removed, so a
            // request above it either has its result here or never applied.
            let (old_chunk, new_chunk) = (floor / DEDUP_GC_CHUNK, new_floor / DEDUP_GC_CHUNK);
            if new_chunk > old_chunk {
                let from = keys::dedup_key(write.client_id, old_chunk * DEDUP_GC_CHUNK);
                self.wb.delete_range(from, keys::dedup_key(write.client_id, new_chunk * DEDUP_GC_CHUNK));
                self.put(floor_key, codec::encode_value(now + DEDUP_RESULT_TTL_MS, &new_floor.to_be_bytes()));
            }
            self.put(key, codec::encode_value(now + DEDUP_RESULT_TTL_MS, &response.encode_to_vec()));
        }
        response
    }

    fn execute(&mut self, engine: &dyn KvEngine, write: &WriteRequest, now: u64) -> Result<WriteResponse, TernError> {
        let mut response = WriteResponse::default();
        match &write.op {
            None => return Err(TernError::invalid("write request without an operation")),
            Some(Op::Set(set)) => {
                for v in &set.values {
                    let expire = codec::expiry(now, v.ttl_seconds, v.expire_at_ms);
                    self.put(keys::data_key(&set.hashkey, &v.sortkey), codec::encode_value(expire, &v.value));
                }
            }
            Some(Op::Del(del)) => {
                for sortkey in &del.sortkeys {
                    let key = keys::data_key(&del.hashkey, sortkey);
                    if self.live_record(engine, &key, now)?.is_some() {
                        response.count += 1;
                    }
                    self.delete(key);
                }
            }
            Some(Op::Incr(incr)) => {
                let key = keys::data_key(&incr.hashkey, &incr.sortkey);
                let (old, old_expire) = match self.live_record(engine, &key, now)? {
                    None => (0, 0),
                    Some((expire, v)) => (parse_integer(&v)?, expire),
                };
                let new = old.checked_add(incr.delta).ok_or_else(|| {
                    TernError::invalid(format!("incr of {old} by {} overflows a signed 64-bit integer", incr.delta))
                })?;
                let expire = if incr.ttl_seconds > 0 { codec::expiry_from_ttl(now, incr.ttl_seconds) } else { old_expire };
                self.put(key, codec::encode_value(expire, new.to_string().as_bytes()));
                response.new_value = new;
            }
            Some(Op::CheckAndSet(cas)) => {
                let check_key = keys::data_key(&cas.hashkey, &cas.check_sortkey);
                let current = self.live_record(engine, &check_key, now)?;
                let passed = match CheckType::try_from(cas.check_type) {
                    Ok(CheckType::NoCheck) => true,
                    Ok(CheckType::ValueNotExist) => current.is_none(),
                    Ok(CheckType::ValueExist) => current.is_some(),
                    Ok(CheckType::ValueEqual) => current.as_ref().is_some_and(|(_, v)| v[..] == cas.check_operand[..]),
                    Err(_) => return Err(TernError::invalid(format!("unknown check type {}", cas.check_type))),
                };
                if cas.return_check_value {
                    response.check_value_exists = current.is_some();
                    response.check_value = current.map(|(_, v)| v.into()).unwrap_or_default();
                }
                if passed {
                    let key = keys::data_key(&cas.hashkey, &cas.set_sortkey);
                    if cas.set_delete {
                        self.delete(key);
                    } else {
                        let expire = codec::expiry(now, cas.set_ttl_seconds, cas.set_expire_at_ms);
                        self.put(key, codec::encode_value(expire, &cas.set_value));
                    }
                }
                response.set_done = passed;
            }
        }
        Ok(response)
    }
}

/// Integers are stored as decimal text (like Redis and Pegasus), so `get` shows them readably.
pub fn parse_integer(value: &[u8]) -> Result<i64, TernError> {
    if value.is_empty() {
        return Ok(0);
    }
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| TernError::WrongType("value is not an integer or out of range".into()))
}

pub fn error_response(e: TernError) -> WriteResponse {
    WriteResponse { error: Some(e.into()), ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_engine::MemoryEngine;
    use tern_proto::{Incr, MultiDel, MultiSet, SortkeyValue};

    fn command(now: u64, client_id: u64, seq: u64, op: Op) -> Vec<u8> {
        RaftCommand {
            now_unix_ms: now,
            write: Some(WriteRequest { client_id, seq, first_incomplete_seq: seq, op: Some(op), ..Default::default() }),
        }
        .encode_to_vec()
    }

    fn set(hk: &str, sk: &str, v: &str, ttl: u32) -> Op {
        Op::Set(MultiSet {
            hashkey: hk.as_bytes().to_vec().into(),
            values: vec![SortkeyValue { sortkey: sk.as_bytes().to_vec().into(), value: v.as_bytes().to_vec().into(), ttl_seconds: ttl, expire_at_ms: 0 }],
        })
    }

    fn incr(delta: i64) -> Op {
        Op::Incr(Incr { hashkey: "h".into(), sortkey: "n".into(), delta, ttl_seconds: 0 })
    }

    fn apply(sm: &mut StateMachine, index: u64, data: Vec<u8>) -> WriteResponse {
        let mut batch = sm.begin();
        let r = batch.apply_command(sm.engine(), &data);
        batch.set_applied(index, 1);
        sm.finish(batch).unwrap();
        r
    }

    fn open() -> StateMachine {
        StateMachine::open(Box::new(MemoryEngine::new()), ApplyState::default()).unwrap()
    }

    /// A retried write with the same (client, seq) returns the first result and applies once.
    #[test]
    fn dedup_makes_incr_exactly_once() {
        let mut sm = open();
        assert_eq!(apply(&mut sm, 1, command(1000, 7, 1, incr(5))).new_value, 5);
        assert_eq!(apply(&mut sm, 2, command(1000, 7, 1, incr(5))).new_value, 5, "retry answered from memory");
        assert_eq!(apply(&mut sm, 3, command(1000, 7, 2, incr(5))).new_value, 10, "next seq applies");
        assert_eq!(apply(&mut sm, 4, command(1000, 0, 0, incr(1))).new_value, 11, "client 0 opts out");
        assert_eq!(apply(&mut sm, 5, command(1000, 0, 0, incr(1))).new_value, 12);
    }

    /// Remembered results below the client's first incomplete seq are forgotten, and a late duplicate
    /// of a forgotten request is refused instead of applied again.
    #[test]
    fn dedup_results_are_garbage_collected() {
        let mut sm = open();
        apply(&mut sm, 1, command(1000, 7, 1, incr(1)));
        apply(&mut sm, 2, command(1000, 7, 2, incr(1)));
        let late = apply(&mut sm, 3, command(1000, 7, 1, incr(1)));
        assert_eq!(late.new_value, 1, "a remembered result still answers a duplicate below the floor until its chunk is collected");
        apply(&mut sm, 4, command(1000, 7, DEDUP_GC_CHUNK + 1, incr(1)));
        assert!(sm.engine().get(&keys::dedup_key(7, 2)).unwrap().is_none(), "seqs below the floor's chunk are forgotten");
        assert!(sm.engine().get(&keys::dedup_key(7, DEDUP_GC_CHUNK + 1)).unwrap().is_some());
        let late = apply(&mut sm, 5, command(1000, 7, 1, incr(1)));
        assert_eq!(late.error.unwrap().code, tern_proto::ErrorCode::ProposalDropped as i32);
        assert_eq!(apply(&mut sm, 6, command(1000, 0, 0, incr(0))).new_value, 3, "the late duplicate did not apply");
    }

    /// Remembered results expire by the leader's clock, deterministically.
    #[test]
    fn dedup_results_expire() {
        let mut sm = open();
        apply(&mut sm, 1, command(1000, 7, 1, incr(1)));
        let later = 1000 + DEDUP_RESULT_TTL_MS + 1;
        assert_eq!(apply(&mut sm, 2, command(later, 7, 1, incr(1))).new_value, 2);
    }

    /// incr on a non-integer is a typed error and changes nothing; overflow is rejected.
    #[test]
    fn incr_type_errors() {
        let mut sm = open();
        apply(&mut sm, 1, command(1000, 0, 0, set("h", "n", "abc", 0)));
        let r = apply(&mut sm, 2, command(1000, 0, 0, incr(1)));
        assert_eq!(r.error.unwrap().code, tern_proto::ErrorCode::WrongType as i32);
        apply(&mut sm, 3, command(1000, 0, 0, set("h", "n", &i64::MAX.to_string(), 0)));
        let r = apply(&mut sm, 4, command(1000, 0, 0, incr(1)));
        assert_eq!(r.error.unwrap().code, tern_proto::ErrorCode::InvalidArgument as i32);
    }

    /// Expired records count as absent at apply time (incr restarts from 0, delete counts 0).
    #[test]
    fn ttl_at_apply_time() {
        let mut sm = open();
        apply(&mut sm, 1, command(1000, 0, 0, set("h", "n", "41", 1)));
        assert_eq!(apply(&mut sm, 2, command(1500, 0, 0, incr(1))).new_value, 42, "live at 1.5s, TTL kept");
        assert_eq!(apply(&mut sm, 3, command(2500, 0, 0, incr(1))).new_value, 1, "expired at 2.5s");
        apply(&mut sm, 4, command(3000, 0, 0, set("h", "x", "v", 1)));
        let del = Op::Del(MultiDel { hashkey: "h".into(), sortkeys: vec!["x".into()] });
        assert_eq!(apply(&mut sm, 5, command(9000, 0, 0, del)).count, 0);
    }

    /// Later commands in one batch see the writes of earlier ones.
    #[test]
    fn batch_reads_its_own_writes() {
        let mut sm = open();
        let mut batch = sm.begin();
        batch.apply_command(sm.engine(), &command(1000, 0, 0, incr(2)));
        let r = batch.apply_command(sm.engine(), &command(1000, 0, 0, incr(3)));
        assert_eq!(r.new_value, 5);
        batch.set_applied(1, 1);
        sm.finish(batch).unwrap();
        assert_eq!(sm.state().applied_index, 1);
    }

    /// The apply state survives reopening.
    #[test]
    fn apply_state_round_trip() {
        let mut cs = ConfState::default();
        cs.voters = vec![1, 2, 3];
        let s = ApplyState { applied_index: 9, applied_term: 4, conf_state: cs };
        assert_eq!(ApplyState::decode(&s.encode()).unwrap(), s);
        assert!(ApplyState::decode(&[1, 2]).is_err());
    }
}
