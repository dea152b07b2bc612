//! Checks every client request before it reaches a replica: sizes against `tern_core::limits`, and that
//! the hashkey really belongs to the addressed partition.

use tern_core::codec::partition_of;
use tern_core::limits::{self, check_hashkey, check_record_count, check_sortkey, check_value, check_write_size};
use tern_core::{GroupId, TernError};
use tern_proto::{read_request, write_request, PartitionRef, ReadRequest, WriteRequest};

fn partition(p: &Option<PartitionRef>) -> Result<&PartitionRef, TernError> {
    let p = p.as_ref().ok_or_else(|| TernError::invalid("request has no partition"))?;
    limits::check_partition_count(p.partition_count)?;
    if p.partition >= p.partition_count {
        return Err(TernError::invalid(format!("partition {} is out of range for {} partitions", p.partition, p.partition_count)));
    }
    Ok(p)
}

/// Validates a partition reference alone and returns the group it addresses.
pub fn partition_group(p: &Option<PartitionRef>) -> Result<GroupId, TernError> {
    let p = partition(p)?;
    Ok(GroupId::new(p.table_id, p.partition))
}

fn hashkey_in_partition(hashkey: &[u8], p: &PartitionRef) -> Result<(), TernError> {
    check_hashkey(hashkey)?;
    let expected = partition_of(hashkey, p.partition_count);
    if expected != p.partition {
        return Err(TernError::invalid(format!("hashkey belongs to partition {expected}, not {} (of {})", p.partition, p.partition_count)));
    }
    Ok(())
}

/// A Redis command: a known name with the right number of arguments (the executor answers the
/// rest), keys within the hashkey limit and in this partition. Returns its bytes. `first` is
/// whether no key of the request has been checked yet: the first is the one the request was
/// routed by; a later one elsewhere means keys in different partitions (CROSSSLOT).
fn redis_command(args: &[bytes::Bytes], p: &PartitionRef, write: bool, first: &mut bool) -> Result<usize, TernError> {
    let name = args.first().ok_or_else(|| TernError::invalid("a Redis command needs a name"))?;
    let spec = tern_redis::spec(name).ok_or_else(|| TernError::invalid(format!("unknown Redis command '{}'", String::from_utf8_lossy(name))))?;
    if spec.write && !write {
        return Err(TernError::invalid(format!("Redis command {} writes: send it as a write", spec.name)));
    }
    if spec.arity_ok(args.len()) {
        for i in tern_redis::command_keys(spec, args) {
            redis_key(&args[i], p, first)?;
        }
    }
    Ok(args.iter().map(|a| a.len() + 8).sum())
}

fn redis_key(key: &[u8], p: &PartitionRef, first: &mut bool) -> Result<(), TernError> {
    let checked = hashkey_in_partition(key, p);
    if checked.is_err() && !*first && check_hashkey(key).is_ok() {
        return Err(TernError::invalid("CROSSSLOT Keys in request don't hash to the same slot (they live in different partitions)"));
    }
    *first = false;
    checked
}

fn check_expiry(ttl_seconds: u32, expire_at_ms: u64) -> Result<(), TernError> {
    if ttl_seconds != 0 && expire_at_ms != 0 {
        return Err(TernError::invalid("give either a TTL in seconds or an absolute expiry, not both"));
    }
    Ok(())
}

/// How far ahead of this server's clock a duplicated record's version may be: a cluster whose clock
/// runs ahead pulls the receiving partitions' clocks with it, never past this.
pub const DUP_VERSION_AHEAD_MAX_MS: u64 = 24 * 3600 * 1000;

use tern_core::time::unix_now_ms as now_unix_ms;

/// Validates a write and returns the group it addresses.
pub fn write(request: &WriteRequest) -> Result<GroupId, TernError> {
    let p = partition(&request.partition)?;
    let mut bytes = 0usize;
    match &request.op {
        None => return Err(TernError::invalid("write request has no operation")),
        Some(write_request::Op::Set(set)) => {
            hashkey_in_partition(&set.hashkey, p)?;
            if set.values.is_empty() {
                return Err(TernError::invalid("set needs at least one sortkey and value"));
            }
            check_record_count(set.values.len())?;
            for v in &set.values {
                check_expiry(v.ttl_seconds, v.expire_at_ms)?;
                check_sortkey(&v.sortkey)?;
                check_value(&v.value)?;
                bytes += set.hashkey.len() + v.sortkey.len() + v.value.len();
            }
        }
        Some(write_request::Op::Del(del)) => {
            hashkey_in_partition(&del.hashkey, p)?;
            if del.sortkeys.is_empty() {
                return Err(TernError::invalid("delete needs at least one sortkey"));
            }
            check_record_count(del.sortkeys.len())?;
            for s in &del.sortkeys {
                check_sortkey(s)?;
                bytes += del.hashkey.len() + s.len();
            }
        }
        Some(write_request::Op::Incr(incr)) => {
            hashkey_in_partition(&incr.hashkey, p)?;
            check_sortkey(&incr.sortkey)?;
        }
        Some(write_request::Op::CheckAndSet(cas)) => {
            hashkey_in_partition(&cas.hashkey, p)?;
            check_sortkey(&cas.check_sortkey)?;
            check_sortkey(&cas.set_sortkey)?;
            check_value(&cas.check_operand)?;
            check_value(&cas.set_value)?;
            check_expiry(cas.set_ttl_seconds, cas.set_expire_at_ms)?;
            if cas.set_delete && !cas.set_value.is_empty() {
                return Err(TernError::invalid("check_and_set with set_delete must not carry a value"));
            }
            if tern_proto::CheckType::try_from(cas.check_type).is_err() {
                return Err(TernError::invalid(format!("unknown check type {}", cas.check_type)));
            }
            bytes += cas.hashkey.len() * 2 + cas.check_sortkey.len() + cas.set_sortkey.len() + cas.check_operand.len() + cas.set_value.len();
        }
        Some(write_request::Op::CheckAndMutate(cam)) => {
            hashkey_in_partition(&cam.hashkey, p)?;
            check_sortkey(&cam.check_sortkey)?;
            check_value(&cam.check_operand)?;
            if tern_proto::CheckType::try_from(cam.check_type).is_err() {
                return Err(TernError::invalid(format!("unknown check type {}", cam.check_type)));
            }
            if cam.mutations.is_empty() {
                return Err(TernError::invalid("check_and_mutate needs at least one mutation"));
            }
            check_record_count(cam.mutations.len())?;
            bytes += cam.hashkey.len() + cam.check_sortkey.len() + cam.check_operand.len();
            for m in &cam.mutations {
                check_sortkey(&m.sortkey)?;
                check_value(&m.value)?;
                check_expiry(m.ttl_seconds, m.expire_at_ms)?;
                if m.delete && (!m.value.is_empty() || m.ttl_seconds != 0 || m.expire_at_ms != 0) {
                    return Err(TernError::invalid("a check_and_mutate delete must not carry a value or an expiry"));
                }
                bytes += cam.hashkey.len() + m.sortkey.len() + m.value.len();
            }
        }
        Some(write_request::Op::DupApply(apply)) => {
            if apply.origin_tag > tern_core::codec::CLUSTER_TAG_MAX {
                return Err(TernError::invalid(format!(
                    "cluster tag {} is out of range (1 to {})",
                    apply.origin_tag,
                    tern_core::codec::CLUSTER_TAG_MAX
                )));
            }
            check_record_count(apply.records.len())?;
            let watermark_ahead = tern_core::codec::version_ms(apply.watermark).saturating_sub(now_unix_ms());
            if watermark_ahead > DUP_VERSION_AHEAD_MAX_MS {
                return Err(TernError::invalid(format!(
                    "a duplication watermark is {watermark_ahead} ms ahead of this server's clock; the limit is {DUP_VERSION_AHEAD_MAX_MS} ms"
                )));
            }
            for r in &apply.records {
                hashkey_in_partition(&r.hashkey, p)?;
                check_sortkey(&r.sortkey)?;
                check_value(&r.value)?;
                if r.delete && (!r.value.is_empty() || r.expire_at_ms != 0) {
                    return Err(TernError::invalid("a duplicated delete must not carry a value or an expiry"));
                }
                if r.version == 0 {
                    return Err(TernError::invalid("a duplicated record needs a version"));
                }
                let ahead = tern_core::codec::version_ms(r.version).saturating_sub(now_unix_ms());
                if ahead > DUP_VERSION_AHEAD_MAX_MS {
                    return Err(TernError::invalid(format!(
                        "a duplicated record's version is {ahead} ms ahead of this server's clock; the limit is {DUP_VERSION_AHEAD_MAX_MS} ms (is the sending cluster's clock wrong?)"
                    )));
                }
                bytes += r.hashkey.len() + r.sortkey.len() + r.value.len();
            }
        }
        Some(write_request::Op::DupSync(_) | write_request::Op::DupConfirm(_)) => {
            return Err(TernError::invalid("duplication bookkeeping is proposed by servers, not clients"));
        }
        Some(write_request::Op::Split(_)) => {
            return Err(TernError::invalid("a partition split is proposed by servers at meta's request (`split TABLE`), not by clients"));
        }
        Some(write_request::Op::Redis(redis)) => {
            if redis.commands.is_empty() || (!redis.transaction && redis.commands.len() > 1) {
                return Err(TernError::invalid("a Redis write holds one command, or a transaction of one or more"));
            }
            check_record_count(redis.commands.len())?;
            let mut first = true;
            for c in &redis.commands {
                let watch = redis.transaction && c.args.first().is_some_and(|n| n.eq_ignore_ascii_case(b"TERN.WATCHED"));
                if watch {
                    redis_key(c.args.get(1).ok_or_else(|| TernError::invalid("TERN.WATCHED needs a key"))?, p, &mut first)?;
                    bytes += c.args.iter().map(|a| a.len()).sum::<usize>();
                } else {
                    bytes += redis_command(&c.args, p, true, &mut first)?;
                }
            }
        }
        Some(write_request::Op::Flush(_)) => {}
    }
    check_write_size(bytes)?;
    Ok(GroupId::new(p.table_id, p.partition))
}

/// Validates a read and returns the group it addresses.
pub fn read(request: &ReadRequest) -> Result<GroupId, TernError> {
    let p = partition(&request.partition)?;
    match &request.op {
        None => return Err(TernError::invalid("read request has no operation")),
        Some(read_request::Op::Redis(command)) => {
            check_write_size(redis_command(&command.args, p, false, &mut true)?)?;
        }
        Some(read_request::Op::Get(get)) => {
            hashkey_in_partition(&get.hashkey, p)?;
            check_record_count(get.sortkeys.len())?;
            for s in &get.sortkeys {
                check_sortkey(s)?;
            }
        }
        Some(read_request::Op::Scan(scan)) => {
            if !scan.full_table {
                hashkey_in_partition(&scan.hashkey, p)?;
                check_sortkey(&scan.start)?;
                check_sortkey(&scan.stop)?;
                check_sortkey(&scan.prefix)?;
            } else if !scan.hashkey.is_empty() {
                // A partition scan from a hashkey: the hashkey must live in this partition.
                hashkey_in_partition(&scan.hashkey, p)?;
            } else if scan.start.len() > 2 + limits::HASHKEY_BYTES_MAX + limits::SORTKEY_BYTES_MAX + 1 {
                return Err(TernError::invalid("full scan resume token is too long"));
            }
        }
        Some(read_request::Op::Count(count)) => hashkey_in_partition(&count.hashkey, p)?,
    }
    Ok(GroupId::new(p.table_id, p.partition))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::{MultiSet, SortkeyValue};

    fn set_request(hashkey: &[u8], partition: u32, value_len: usize) -> WriteRequest {
        WriteRequest {
            partition: Some(PartitionRef { table_id: 1, partition, partition_count: 8 }),
            op: Some(write_request::Op::Set(MultiSet {
                hashkey: hashkey.to_vec().into(),
                values: vec![SortkeyValue { sortkey: "s".into(), value: vec![0; value_len].into(), ttl_seconds: 0, expire_at_ms: 0 }],
            })),
            ..Default::default()
        }
    }

    fn redis(partition: u32, transaction: bool, commands: &[&[&str]]) -> WriteRequest {
        let commands = commands
            .iter()
            .map(|c| tern_proto::RedisCommand { args: c.iter().map(|a| bytes::Bytes::copy_from_slice(a.as_bytes())).collect() })
            .collect();
        WriteRequest {
            partition: Some(PartitionRef { table_id: 1, partition, partition_count: 8 }),
            op: Some(write_request::Op::Redis(tern_proto::RedisWrite { commands, transaction })),
            ..Default::default()
        }
    }

    /// Redis commands are checked before they reach a replica: known names, a write sent as a
    /// write, keys in the addressed partition (a later key elsewhere is CROSSSLOT), one command
    /// unless it is a transaction, the size of the whole.
    #[test]
    fn rejects_bad_redis_commands() {
        let p = partition_of(b"k", 8);
        let same = (0..).map(|i| format!("s{i}")).find(|k| partition_of(k.as_bytes(), 8) == p).unwrap();
        let other = (0..).map(|i| format!("o{i}")).find(|k| partition_of(k.as_bytes(), 8) != p).unwrap();
        let message = |r: Result<GroupId, TernError>| r.unwrap_err().to_string();
        assert_eq!(write(&redis(p, false, &[&["LPUSH", "k", "a"]])).unwrap(), GroupId::new(1, p));
        assert_eq!(write(&redis(p, false, &[&["RENAME", "k", &same]])).unwrap(), GroupId::new(1, p));
        assert!(message(write(&redis(p, false, &[&["FROBNICATE", "k"]]))).contains("unknown Redis command"));
        assert!(message(write(&redis(p, false, &[&["RENAME", "k", &other]]))).contains("CROSSSLOT"));
        assert!(message(write(&redis(p, true, &[&["SET", "k", "1"], &["SET", &other, "1"]]))).contains("CROSSSLOT"));
        assert!(message(write(&redis(p, false, &[&["SET", &other, "1"]]))).contains("belongs to partition"));
        assert!(message(write(&redis(p, false, &[&["SET", "k", "1"], &["SET", "k", "2"]]))).contains("one command"));
        assert!(message(write(&redis(p, false, &[]))).contains("one command"));
        assert!(message(write(&redis(p, true, &[&["TERN.WATCHED"]]))).contains("needs a key"));
        let big = "x".repeat(limits::WRITE_REQUEST_BYTES_MAX);
        assert!(message(write(&redis(p, false, &[&["SET", "k", &big]]))).contains("limit"));
        let read = |args: &[&str]| ReadRequest {
            partition: Some(PartitionRef { table_id: 1, partition: p, partition_count: 8 }),
            op: Some(read_request::Op::Redis(tern_proto::RedisCommand {
                args: args.iter().map(|a| bytes::Bytes::copy_from_slice(a.as_bytes())).collect(),
            })),
            ..Default::default()
        };
        assert_eq!(super::read(&read(&["LRANGE", "k", "0", "-1"])).unwrap(), GroupId::new(1, p));
        assert!(message(super::read(&read(&["LPUSH", "k", "a"]))).contains("writes"));
        assert!(message(super::read(&read(&["SUNION", "k", &other]))).contains("CROSSSLOT"));
    }

    /// Writes addressed to the wrong partition, oversized values and missing fields are rejected with
    /// messages that name the problem.
    #[test]
    fn rejects_bad_writes() {
        let p = partition_of(b"hk", 8);
        assert_eq!(write(&set_request(b"hk", p, 10)).unwrap(), GroupId::new(1, p));
        let wrong = (p + 1) % 8;
        let e = write(&set_request(b"hk", wrong, 10)).unwrap_err();
        assert!(e.to_string().contains("belongs to partition"), "{e}");
        let e = write(&set_request(b"hk", p, limits::VALUE_BYTES_MAX + 1)).unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
        let mut r = set_request(b"hk", p, 1);
        r.partition = None;
        assert!(write(&r).is_err());
        let mut r = set_request(b"hk", p, 1);
        r.partition.as_mut().unwrap().partition_count = 6;
        assert!(write(&r).unwrap_err().to_string().contains("power of two"));
        let mut r = set_request(b"hk", p, 1);
        r.op = None;
        assert!(write(&r).is_err());
    }

    /// A multi_set whose total size passes 4 MiB is rejected even if each value is within 1 MiB.
    #[test]
    fn rejects_oversized_batches() {
        let p = partition_of(b"hk", 8);
        let mut r = set_request(b"hk", p, 0);
        if let Some(write_request::Op::Set(s)) = &mut r.op {
            s.values = (0..5)
                .map(|i| SortkeyValue { sortkey: vec![i].into(), value: vec![0; limits::VALUE_BYTES_MAX].into(), ttl_seconds: 0, expire_at_ms: 0 })
                .collect();
        }
        assert!(write(&r).unwrap_err().to_string().contains("write request is"));
    }

    /// check_and_mutate needs mutations, a known check, deletes without values, and stays within the
    /// record and size limits.
    #[test]
    fn rejects_bad_check_and_mutate() {
        use tern_proto::{CheckAndMutate, Mutation};
        let p = partition_of(b"hk", 8);
        let request = |mutations: Vec<Mutation>, check_type: i32| WriteRequest {
            partition: Some(PartitionRef { table_id: 1, partition: p, partition_count: 8 }),
            op: Some(write_request::Op::CheckAndMutate(CheckAndMutate {
                hashkey: "hk".into(),
                check_sortkey: "c".into(),
                check_type,
                mutations,
                ..Default::default()
            })),
            ..Default::default()
        };
        let set = |v: usize| Mutation { sortkey: "s".into(), value: vec![0; v].into(), ..Default::default() };
        assert!(write(&request(vec![set(1), Mutation { sortkey: "d".into(), delete: true, ..Default::default() }], 3)).is_ok());
        assert!(write(&request(vec![], 3)).unwrap_err().to_string().contains("at least one mutation"));
        assert!(write(&request(vec![set(1)], 9)).unwrap_err().to_string().contains("unknown check type"));
        let bad_delete = Mutation { sortkey: "d".into(), delete: true, value: "x".into(), ..Default::default() };
        assert!(write(&request(vec![bad_delete], 3)).unwrap_err().to_string().contains("must not carry"));
        assert!(write(&request(vec![set(limits::VALUE_BYTES_MAX + 1)], 3)).unwrap_err().to_string().contains("limit"));
        assert!(write(&request((0..5).map(|_| set(limits::VALUE_BYTES_MAX)).collect(), 3)).unwrap_err().to_string().contains("write request is"));
        assert!(write(&request((0..limits::MULTI_RECORDS_MAX + 1).map(|_| set(0)).collect(), 3)).unwrap_err().to_string().contains("records"));
    }

    /// Duplicated records are checked like writes (partition, sizes) plus their own rules; the
    /// bookkeeping servers propose for duplication is refused from clients.
    #[test]
    fn rejects_bad_duplicated_records() {
        use tern_proto::{DupApply, DupConfirm, DupRecord, DupSync, Split};
        let p = partition_of(b"hk", 8);
        let now_version = now_unix_ms() << tern_core::codec::VERSION_MS_SHIFT;
        let request = |origin_tag: u32, records: Vec<DupRecord>| WriteRequest {
            partition: Some(PartitionRef { table_id: 1, partition: p, partition_count: 8 }),
            op: Some(write_request::Op::DupApply(DupApply { origin_tag, origin_index: 1, records, watermark: 0, source_table: 1 })),
            ..Default::default()
        };
        let record = |hashkey: &str, version: u64| DupRecord { hashkey: hashkey.as_bytes().to_vec().into(), version, ..Default::default() };
        assert!(write(&request(5, vec![record("hk", now_version)])).is_ok());
        assert!(write(&request(5, vec![])).is_ok(), "a watermark alone");
        let e = |r: WriteRequest| write(&r).unwrap_err().to_string();
        assert!(e(request(5, vec![record("hk", 0)])).contains("needs a version"));
        let day_ahead = now_version + ((DUP_VERSION_AHEAD_MAX_MS + 60_000) << tern_core::codec::VERSION_MS_SHIFT);
        assert!(e(request(5, vec![record("hk", day_ahead)])).contains("ahead of this server's clock"));
        assert!(e(request(5, vec![record("hk", u64::MAX)])).contains("ahead"));
        assert!(e(request(4096, vec![])).contains("cluster tag"));
        let mut far_watermark = request(5, vec![]);
        if let Some(write_request::Op::DupApply(a)) = far_watermark.op.as_mut() {
            a.watermark = u64::MAX;
        }
        assert!(e(far_watermark).contains("watermark"));
        let other = (0..).map(|i| format!("k{i}")).find(|k| partition_of(k.as_bytes(), 8) != p).unwrap();
        assert!(e(request(5, vec![record(&other, now_version)])).contains("belongs to partition"));
        let mut delete_with_value = record("hk", now_version);
        delete_with_value.delete = true;
        delete_with_value.value = "v".into();
        assert!(e(request(5, vec![delete_with_value])).contains("delete"));
        for op in [
            write_request::Op::DupSync(DupSync::default()),
            write_request::Op::DupConfirm(DupConfirm::default()),
            write_request::Op::Split(Split { partition_count: 16 }),
        ] {
            let r =
                WriteRequest { partition: Some(PartitionRef { table_id: 1, partition: p, partition_count: 8 }), op: Some(op), ..Default::default() };
            assert!(e(r).contains("proposed by servers"));
        }
    }
}
