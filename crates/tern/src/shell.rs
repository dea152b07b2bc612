//! `tern shell`: an interactive and one-shot command line over the client. Parsing is pure
//! (`parse`), so every syntax error is a typed message and is unit-tested.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;
use tern_client::{backup, Client, FullScanCursor, ScanOptions};
use tern_proto::{CheckType, CreateTableRequest, DropTableRequest, ListTablesRequest, PartitionStatusRequest};

pub const HELP: &str = "\
commands (keys and values are words; quote them with \"...\" or '...', \\xHH escapes in double quotes):
  ls                                     list tables (with their backup policies and duplications)
  create TABLE [-p PARTITIONS] [-r REPLICAS]   create a table (defaults: 8 partitions, 3 replicas)
  drop TABLE                             drop a table and its data
  use TABLE                              switch the current table
  set HK SK VALUE [TTL_SECONDS]          write a record
  get HK SK                              read a record
  del HK SK                              delete a record
  multi_set HK SK VALUE [SK VALUE ...]   write several sortkeys of one hashkey atomically
  multi_get HK [SK ...]                  read sortkeys of a hashkey (all of them if none named)
  multi_del HK SK [SK ...]               delete sortkeys of a hashkey atomically
  scan HK [--start SK] [--stop SK] [--prefix P] [--limit N]
  count HK                               number of records under a hashkey
  incr HK SK [DELTA]                     add DELTA (default 1) to an integer record
  check_and_set HK CHECK_SK (always|not_exist|exist|equal OPERAND) SET_SK VALUE [TTL_SECONDS]
  check_and_mutate HK CHECK_SK (always|not_exist|exist|equal OPERAND) (set SK VALUE | del SK)...
                                         if the check passes, every set and del, atomically
  ttl HK SK                              remaining time to live
  exists HK SK                           whether a record exists
  full_scan [--limit N]                  records of the whole table (default limit 100)
  nodes                                  replica servers and their state
  decommission NODE_ID [--wait]          move every replica off a server (--wait: show progress)
  recommission NODE_ID                   take a decommissioned server back into use
  balance status|pause|resume|step       the balancer (replica moves and leader placement); step: one pass
  move_replica TABLE PIDX FROM_NODE TO_NODE   move one replica (learner first, then swapped in)
  transfer_leader TABLE PIDX NODE_ID     prefer a server as the partition's leader
  set_replica_count TABLE N              add or remove replicas of every partition
  split TABLE [--wait]                   double TABLE's partitions online (--wait: show progress)
  split status TABLE                     how far a split has come, and what it waits for
  split cancel TABLE                     cancel a split that is still preparing
  partitions [TABLE]                     replica set, leader and applied index of each partition
  cluster_info                           meta address, servers, tables
  backup TABLE --to DIR [--rate MIB_PER_S]   copy a consistent checkpoint of every partition into a
                                         new directory under DIR (reachable by every server); Ctrl-C cancels
  backups DIR                            the backups under DIR: table, partitions, size, age
  backup_policy TABLE --to DIR --every INTERVAL --keep N [--rate MIB_PER_S]
                                         back TABLE up periodically (INTERVAL: 90s, 30m, 6h, 1d), keeping
                                         the newest N; run by the meta leader's process
  backup_policy TABLE off                stop periodic backups of TABLE (existing backups stay)
  restore BACKUP_DIR --table NEW [--rate MIB_PER_S]   create table NEW from a backup (checked first;
                                         a failed or cancelled restore drops NEW)
  dup add TABLE --to META_ADDRS [--remote-table T] [--log-entries N]
                                         duplicate TABLE's writes to table T (default: same name,
                                         same partition count) of another cluster; both may take writes
  dup list [TABLE]                       duplications with each partition's lag
  dup pause|resume|remove ID             stop shipping for a while, ship again, or end a duplication
  help                                   this text
  quit                                   leave the shell";

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SplitCommand {
    Start { wait: bool },
    Status,
    Cancel,
}

#[derive(Debug, PartialEq)]
pub enum Command {
    Ls,
    Create { table: String, partitions: u32, replicas: u32 },
    Drop { table: String },
    Use { table: String },
    Set { hashkey: Vec<u8>, sortkey: Vec<u8>, value: Vec<u8>, ttl: u32 },
    Get { hashkey: Vec<u8>, sortkey: Vec<u8> },
    Del { hashkey: Vec<u8>, sortkey: Vec<u8> },
    MultiSet { hashkey: Vec<u8>, pairs: Vec<(Vec<u8>, Vec<u8>)> },
    MultiGet { hashkey: Vec<u8>, sortkeys: Vec<Vec<u8>> },
    MultiDel { hashkey: Vec<u8>, sortkeys: Vec<Vec<u8>> },
    Scan { hashkey: Vec<u8>, options: ScanOptions },
    Count { hashkey: Vec<u8> },
    Incr { hashkey: Vec<u8>, sortkey: Vec<u8>, delta: i64 },
    CheckAndSet { hashkey: Vec<u8>, check_sortkey: Vec<u8>, check: CheckType, operand: Vec<u8>, set_sortkey: Vec<u8>, value: Vec<u8>, ttl: u32 },
    CheckAndMutate { hashkey: Vec<u8>, check_sortkey: Vec<u8>, check: CheckType, operand: Vec<u8>, mutations: Vec<tern_proto::Mutation> },
    Ttl { hashkey: Vec<u8>, sortkey: Vec<u8> },
    Exists { hashkey: Vec<u8>, sortkey: Vec<u8> },
    FullScan { limit: u32 },
    Nodes,
    Decommission { node: u64, wait: bool },
    Recommission { node: u64 },
    Balance { action: tern_proto::BalanceAction },
    MoveReplica { table: String, partition: u32, from: u64, to: u64 },
    TransferLeader { table: String, partition: u32, node: u64 },
    SetReplicaCount { table: String, count: u32 },
    Split { table: String, action: SplitCommand },
    Partitions { table: Option<String> },
    ClusterInfo,
    Backup { table: String, to: String, rate_mb: u64 },
    Backups { root: String },
    BackupPolicy { table: String, policy: Option<tern_proto::BackupPolicy> },
    Restore { backup: String, table: String, rate_mb: u64 },
    DupAdd(tern_client::dup::AddDuplication),
    DupList { table: String },
    DupChange { id: u64, action: tern_proto::DuplicationAction },
    Help,
    Quit,
}

/// Splits a line into words, honouring quotes and escapes.
pub fn tokenize(line: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else { break };
        let mut word = Vec::new();
        if first == '"' || first == '\'' {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                if c == first {
                    closed = true;
                    break;
                }
                if c == '\\' && first == '"' {
                    match chars.next() {
                        Some('n') => word.push(b'\n'),
                        Some('t') => word.push(b'\t'),
                        Some('\\') => word.push(b'\\'),
                        Some('"') => word.push(b'"'),
                        Some('x') => {
                            let hex: String = chars.by_ref().take(2).collect();
                            let b = u8::from_str_radix(&hex, 16).map_err(|_| format!("bad escape \\x{hex}: want two hex digits"))?;
                            word.push(b);
                        }
                        Some(other) => return Err(format!("unknown escape \\{other}")),
                        None => return Err("line ends inside an escape".into()),
                    }
                } else {
                    let mut buf = [0; 4];
                    word.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
            if !closed {
                return Err(format!("unterminated {first}quote"));
            }
            if chars.peek().is_some_and(|c| !c.is_whitespace()) {
                return Err("a closing quote must be followed by a space".into());
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                let mut buf = [0; 4];
                word.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                chars.next();
            }
        }
        words.push(word);
    }
    Ok(words)
}

fn text(word: &[u8]) -> String {
    String::from_utf8_lossy(word).into_owned()
}

fn number<T: std::str::FromStr>(word: &[u8], what: &str) -> Result<T, String> {
    text(word).parse().map_err(|_| format!("{what} must be a number, not {:?}", text(word)))
}

fn arity(name: &str, args: &[Vec<u8>], min: usize, max: usize, usage: &str) -> Result<(), String> {
    if args.len() < min || args.len() > max {
        return Err(format!("usage: {name} {usage}"));
    }
    Ok(())
}

/// A parsed check: its type, its operand and the arguments after it.
type Check<'a> = (CheckType, Vec<u8>, &'a [Vec<u8>]);

/// A check (always|not_exist|exist|equal OPERAND) at the start of `args`.
fn parse_check<'a>(args: &'a [Vec<u8>], usage: &str) -> Result<Check<'a>, String> {
    match (text(&args[0]).as_str(), args.get(1)) {
        ("always", _) => Ok((CheckType::NoCheck, vec![], &args[1..])),
        ("not_exist", _) => Ok((CheckType::ValueNotExist, vec![], &args[1..])),
        ("exist", _) => Ok((CheckType::ValueExist, vec![], &args[1..])),
        ("equal", Some(operand)) => Ok((CheckType::ValueEqual, operand.clone(), &args[2..])),
        (other, _) => Err(format!("unknown check {other:?}; {usage}")),
    }
}

/// Splits words into positional ones and `--flag value` pairs (only the flags named in `known`).
fn options(args: &[Vec<u8>], known: &[&str], usage: &str) -> Result<(Vec<String>, HashMap<String, String>), String> {
    let (mut positional, mut flags) = (Vec::new(), HashMap::new());
    let mut rest = args.iter().map(|a| text(a));
    while let Some(word) = rest.next() {
        if word.starts_with("--") {
            if !known.contains(&word.as_str()) {
                return Err(format!("unknown option {word} ({usage})"));
            }
            let value = rest.next().ok_or_else(|| format!("{word} needs a value ({usage})"))?;
            if flags.insert(word.clone(), value).is_some() {
                return Err(format!("{word} given twice"));
            }
        } else {
            positional.push(word);
        }
    }
    Ok((positional, flags))
}

/// An interval such as 90s, 30m, 6h or 1d (a bare number is seconds), in seconds.
fn interval(word: &str) -> Result<u64, String> {
    let (digits, unit) = word.split_at(word.find(|c: char| !c.is_ascii_digit()).unwrap_or(word.len()));
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("interval {word:?}: want a number with s, m, h or d (90s, 30m, 6h, 1d)")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("interval {word:?}: want a number with s, m, h or d (90s, 30m, 6h, 1d)"))
}

/// Most MiB/s a backup or restore may be asked to run at.
const BACKUP_RATE_MB_MAX: u64 = 100_000;

/// `--rate MIB_PER_S` (absent: 0, each server's default).
fn rate(options: &HashMap<String, String>) -> Result<u64, String> {
    let Some(r) = options.get("--rate") else { return Ok(0) };
    match r.parse::<u64>() {
        Ok(mb) if (1..=BACKUP_RATE_MB_MAX).contains(&mb) => Ok(mb),
        _ => Err(format!("--rate is in MiB per second, 1 to {BACKUP_RATE_MB_MAX}; got {r:?}")),
    }
}

/// Parses one command line.
pub fn parse(line: &str) -> Result<Option<Command>, String> {
    let words = tokenize(line)?;
    let Some((name, args)) = words.split_first() else { return Ok(None) };
    let name = text(name).to_lowercase();
    let hk_sk = |usage: &str| -> Result<(Vec<u8>, Vec<u8>), String> {
        arity(&name, args, 2, 2, usage)?;
        Ok((args[0].clone(), args[1].clone()))
    };
    let command = match name.as_str() {
        "ls" => Command::Ls,
        "create" => {
            if args.is_empty() {
                return Err("usage: create TABLE [-p PARTITIONS] [-r REPLICAS]".into());
            }
            let (mut partitions, mut replicas) = (8, 3);
            let mut rest = args[1..].iter();
            while let Some(flag) = rest.next() {
                let value = rest.next().ok_or_else(|| format!("{} needs a value", text(flag)))?;
                match text(flag).as_str() {
                    "-p" | "--partitions" => partitions = number(value, "partition count")?,
                    "-r" | "--replicas" => replicas = number(value, "replica count")?,
                    other => return Err(format!("unknown option {other} (want -p or -r)")),
                }
            }
            Command::Create { table: text(&args[0]), partitions, replicas }
        }
        "drop" => {
            arity(&name, args, 1, 1, "TABLE")?;
            Command::Drop { table: text(&args[0]) }
        }
        "use" => {
            arity(&name, args, 1, 1, "TABLE")?;
            Command::Use { table: text(&args[0]) }
        }
        "set" => {
            arity(&name, args, 3, 4, "HK SK VALUE [TTL_SECONDS]")?;
            let ttl = args.get(3).map(|t| number(t, "TTL")).transpose()?.unwrap_or(0);
            Command::Set { hashkey: args[0].clone(), sortkey: args[1].clone(), value: args[2].clone(), ttl }
        }
        "get" => {
            let (hashkey, sortkey) = hk_sk("HK SK")?;
            Command::Get { hashkey, sortkey }
        }
        "del" => {
            let (hashkey, sortkey) = hk_sk("HK SK")?;
            Command::Del { hashkey, sortkey }
        }
        "ttl" => {
            let (hashkey, sortkey) = hk_sk("HK SK")?;
            Command::Ttl { hashkey, sortkey }
        }
        "exists" => {
            let (hashkey, sortkey) = hk_sk("HK SK")?;
            Command::Exists { hashkey, sortkey }
        }
        "multi_set" => {
            if args.len() < 3 || args.len() % 2 == 0 {
                return Err("usage: multi_set HK SK VALUE [SK VALUE ...]".into());
            }
            let pairs = args[1..].chunks(2).map(|c| (c[0].clone(), c[1].clone())).collect();
            Command::MultiSet { hashkey: args[0].clone(), pairs }
        }
        "multi_get" => {
            arity(&name, args, 1, usize::MAX, "HK [SK ...]")?;
            Command::MultiGet { hashkey: args[0].clone(), sortkeys: args[1..].to_vec() }
        }
        "multi_del" => {
            arity(&name, args, 2, usize::MAX, "HK SK [SK ...]")?;
            Command::MultiDel { hashkey: args[0].clone(), sortkeys: args[1..].to_vec() }
        }
        "scan" => {
            if args.is_empty() {
                return Err("usage: scan HK [--start SK] [--stop SK] [--prefix P] [--limit N]".into());
            }
            let mut options = ScanOptions { limit: 100, ..Default::default() };
            let mut rest = args[1..].iter();
            while let Some(flag) = rest.next() {
                let value = rest.next().ok_or_else(|| format!("{} needs a value", text(flag)))?;
                match text(flag).as_str() {
                    "--start" => options.start = value.clone(),
                    "--stop" => options.stop = value.clone(),
                    "--prefix" => options.prefix = value.clone(),
                    "--limit" => options.limit = number(value, "limit")?,
                    other => return Err(format!("unknown option {other} (want --start, --stop, --prefix or --limit)")),
                }
            }
            Command::Scan { hashkey: args[0].clone(), options }
        }
        "count" => {
            arity(&name, args, 1, 1, "HK")?;
            Command::Count { hashkey: args[0].clone() }
        }
        "incr" => {
            arity(&name, args, 2, 3, "HK SK [DELTA]")?;
            let delta = args.get(2).map(|d| number(d, "delta")).transpose()?.unwrap_or(1);
            Command::Incr { hashkey: args[0].clone(), sortkey: args[1].clone(), delta }
        }
        "check_and_set" => {
            let usage = "usage: check_and_set HK CHECK_SK (always|not_exist|exist|equal OPERAND) SET_SK VALUE [TTL_SECONDS]";
            if args.len() < 5 {
                return Err(usage.into());
            }
            let (check, operand, rest) = parse_check(&args[2..], usage)?;
            if rest.len() < 2 || rest.len() > 3 {
                return Err(usage.into());
            }
            let ttl = rest.get(2).map(|t| number(t, "TTL")).transpose()?.unwrap_or(0);
            Command::CheckAndSet {
                hashkey: args[0].clone(),
                check_sortkey: args[1].clone(),
                check,
                operand,
                set_sortkey: rest[0].clone(),
                value: rest[1].clone(),
                ttl,
            }
        }
        "check_and_mutate" => {
            let usage = "usage: check_and_mutate HK CHECK_SK (always|not_exist|exist|equal OPERAND) (set SK VALUE | del SK)...";
            if args.len() < 4 {
                return Err(usage.into());
            }
            let (check, operand, mut rest) = parse_check(&args[2..], usage)?;
            let mut mutations = Vec::new();
            while let Some(kind) = rest.first() {
                let m = match (text(kind).as_str(), rest.get(1), rest.get(2)) {
                    ("set", Some(sortkey), Some(value)) => {
                        rest = &rest[3..];
                        tern_proto::Mutation { sortkey: sortkey.clone().into(), value: value.clone().into(), ..Default::default() }
                    }
                    ("del", Some(sortkey), _) => {
                        rest = &rest[2..];
                        tern_proto::Mutation { sortkey: sortkey.clone().into(), delete: true, ..Default::default() }
                    }
                    _ => return Err(usage.into()),
                };
                mutations.push(m);
            }
            if mutations.is_empty() {
                return Err(usage.into());
            }
            Command::CheckAndMutate { hashkey: args[0].clone(), check_sortkey: args[1].clone(), check, operand, mutations }
        }
        "full_scan" => {
            let mut limit = 100;
            let mut rest = args.iter();
            while let Some(flag) = rest.next() {
                let value = rest.next().ok_or_else(|| format!("{} needs a value", text(flag)))?;
                match text(flag).as_str() {
                    "--limit" => limit = number(value, "limit")?,
                    other => return Err(format!("unknown option {other} (want --limit)")),
                }
            }
            Command::FullScan { limit }
        }
        "nodes" => Command::Nodes,
        "decommission" => {
            arity(&name, args, 1, 2, "NODE_ID [--wait]")?;
            let wait = match args.get(1).map(|a| text(a)) {
                None => false,
                Some(flag) if flag == "--wait" => true,
                Some(other) => return Err(format!("unknown option {other} (want --wait)")),
            };
            Command::Decommission { node: number(&args[0], "node id")?, wait }
        }
        "recommission" => {
            arity(&name, args, 1, 1, "NODE_ID")?;
            Command::Recommission { node: number(&args[0], "node id")? }
        }
        "balance" => {
            arity(&name, args, 1, 1, "status|pause|resume|step")?;
            let action = match text(&args[0]).as_str() {
                "status" => tern_proto::BalanceAction::BalanceStatus,
                "pause" => tern_proto::BalanceAction::BalancePause,
                "resume" => tern_proto::BalanceAction::BalanceResume,
                "step" => tern_proto::BalanceAction::BalanceStep,
                other => return Err(format!("unknown balance action {other:?} (want status, pause, resume or step)")),
            };
            Command::Balance { action }
        }
        "move_replica" => {
            arity(&name, args, 4, 4, "TABLE PIDX FROM_NODE TO_NODE")?;
            Command::MoveReplica {
                table: text(&args[0]),
                partition: number(&args[1], "partition index")?,
                from: number(&args[2], "node id")?,
                to: number(&args[3], "node id")?,
            }
        }
        "set_replica_count" => {
            arity(&name, args, 2, 2, "TABLE N")?;
            Command::SetReplicaCount { table: text(&args[0]), count: number(&args[1], "replica count")? }
        }
        "split" => {
            let usage = "usage: split TABLE [--wait] | split status TABLE | split cancel TABLE";
            let words: Vec<String> = args.iter().map(|a| text(a)).collect();
            match words.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
                ["status", table] => Command::Split { table: table.to_string(), action: SplitCommand::Status },
                ["cancel", table] => Command::Split { table: table.to_string(), action: SplitCommand::Cancel },
                [table] => Command::Split { table: table.to_string(), action: SplitCommand::Start { wait: false } },
                [table, "--wait"] => Command::Split { table: table.to_string(), action: SplitCommand::Start { wait: true } },
                _ => return Err(usage.into()),
            }
        }
        "transfer_leader" => {
            arity(&name, args, 3, 3, "TABLE PIDX NODE_ID")?;
            Command::TransferLeader { table: text(&args[0]), partition: number(&args[1], "partition index")?, node: number(&args[2], "node id")? }
        }
        "partitions" => {
            arity(&name, args, 0, 1, "[TABLE]")?;
            Command::Partitions { table: args.first().map(|t| text(t)) }
        }
        "cluster_info" => Command::ClusterInfo,
        "backup" => {
            let usage = "usage: backup TABLE --to DIR [--rate MIB_PER_S]";
            let (positional, options) = options(args, &["--to", "--rate"], usage)?;
            let [table] = positional.as_slice() else { return Err(usage.into()) };
            let to = options.get("--to").ok_or(usage)?.clone();
            Command::Backup { table: table.clone(), to, rate_mb: rate(&options)? }
        }
        "backup_policy" => {
            let usage = "usage: backup_policy TABLE --to DIR --every INTERVAL --keep N [--rate MIB_PER_S] | backup_policy TABLE off";
            let (positional, options) = options(args, &["--to", "--every", "--keep", "--rate"], usage)?;
            match positional.as_slice() {
                [table, off] if off == "off" && options.is_empty() => Command::BackupPolicy { table: table.clone(), policy: None },
                [table] => {
                    let root = options.get("--to").ok_or(usage)?.clone();
                    let interval_seconds = interval(options.get("--every").ok_or(usage)?)?;
                    let keep = options.get("--keep").ok_or(usage)?.parse().map_err(|_| format!("--keep wants a number of backups ({usage})"))?;
                    let rate_mb = rate(&options)? as u32;
                    Command::BackupPolicy { table: table.clone(), policy: Some(tern_proto::BackupPolicy { root, interval_seconds, keep, rate_mb }) }
                }
                _ => return Err(usage.into()),
            }
        }
        "backups" => {
            arity(&name, args, 1, 1, "DIR")?;
            Command::Backups { root: text(&args[0]) }
        }
        "restore" => {
            let usage = "usage: restore BACKUP_DIR --table NEW [--rate MIB_PER_S]";
            let (positional, options) = options(args, &["--table", "--rate"], usage)?;
            let [backup] = positional.as_slice() else { return Err(usage.into()) };
            let table = options.get("--table").ok_or(usage)?.clone();
            Command::Restore { backup: backup.clone(), table, rate_mb: rate(&options)? }
        }
        "dup" => {
            let usage = "usage: dup add TABLE --to META_ADDRS [--remote-table T] [--log-entries N] | dup list [TABLE] | dup pause|resume|remove ID";
            let Some(verb) = args.first().map(|a| text(a)) else { return Err(usage.into()) };
            let rest = &args[1..];
            match verb.as_str() {
                "add" => {
                    let (positional, options) = options(rest, &["--to", "--remote-table", "--log-entries"], usage)?;
                    let [table] = positional.as_slice() else { return Err(usage.into()) };
                    let remote_meta: Vec<String> =
                        options.get("--to").ok_or(usage)?.split(',').map(|a| a.trim().to_string()).filter(|a| !a.is_empty()).collect();
                    if remote_meta.is_empty() {
                        return Err(format!("--to wants the remote cluster's meta addresses, comma-separated ({usage})"));
                    }
                    let log_entries_max = match options.get("--log-entries") {
                        Some(n) => n.parse().map_err(|_| format!("--log-entries wants a number of entries ({usage})"))?,
                        None => 0,
                    };
                    Command::DupAdd(tern_client::dup::AddDuplication {
                        table: table.clone(),
                        remote_meta,
                        remote_table: options.get("--remote-table").cloned().unwrap_or_default(),
                        log_entries_max,
                    })
                }
                "list" if rest.len() <= 1 => Command::DupList { table: rest.first().map(|t| text(t)).unwrap_or_default() },
                "pause" | "resume" | "remove" if rest.len() == 1 => {
                    let action = match verb.as_str() {
                        "pause" => tern_proto::DuplicationAction::DupPause,
                        "resume" => tern_proto::DuplicationAction::DupResume,
                        _ => tern_proto::DuplicationAction::DupRemove,
                    };
                    Command::DupChange { id: number(&rest[0], "duplication id")?, action }
                }
                _ => return Err(usage.into()),
            }
        }
        "help" | "?" => Command::Help,
        "quit" | "exit" => Command::Quit,
        other => return Err(format!("unknown command {other:?}; type help")),
    };
    Ok(Some(command))
}

/// Shows bytes as text, escaping what is not printable.
pub fn show(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('"');
    for &b in bytes {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out.push('"');
    out
}

/// One line per record, then a count line with an optional remark.
fn render_records(records: &[tern_proto::Record], remark: &str) -> String {
    let mut out = String::new();
    for r in records {
        let _ = writeln!(out, "{} : {} => {}", show(&r.hashkey), show(&r.sortkey), show(&r.value));
    }
    let _ = write!(out, "({} records{remark})", records.len());
    out
}

pub struct Shell {
    pub client: Client,
    pub table: String,
    pub meta: Vec<String>,
}

fn err(e: impl std::fmt::Display) -> String {
    format!("error: {e}")
}

impl Shell {
    /// Runs one parsed command and returns its printed result.
    pub async fn run(&mut self, command: Command) -> Result<String, String> {
        let table = self.client.table(&self.table);
        let out = match command {
            Command::Help => HELP.to_string(),
            Command::Quit => String::new(),
            Command::Use { table } => {
                self.client.partition_count(&table).await.map_err(err)?;
                self.table = table.clone();
                format!("using table {table}")
            }
            Command::Ls => {
                let r = self
                    .client
                    .meta_call(|mut m| async move { m.list_tables(ListTablesRequest {}).await.map(|r| r.into_inner()) })
                    .await
                    .map_err(err)?;
                let dups = tern_client::dup::list(&self.client, "").await.map_err(err)?;
                let mut out = format!("{:<24} {:>6} {:>10} {:>8}  {:<40}  {}", "table", "id", "partitions", "replicas", "backups", "duplicated to");
                for t in r.tables {
                    let mut backups = match &t.backup_policy {
                        Some(p) => format!("every {}, keep {}, into {}", duration_words(p.interval_seconds), p.keep, p.root),
                        None => "-".into(),
                    };
                    if t.restoring {
                        backups = format!("being restored; {backups}");
                    }
                    let to: Vec<String> = dups
                        .iter()
                        .filter(|d| d.table_id == t.table_id)
                        .map(|d| format!("{} at {}{}", d.remote_table, d.remote_meta.join(","), if d.paused { " (paused)" } else { "" }))
                        .collect();
                    let to = if to.is_empty() { "-".to_string() } else { to.join("; ") };
                    let _ = write!(out, "\n{:<24} {:>6} {:>10} {:>8}  {backups:<40}  {to}", t.name, t.table_id, t.partition_count, t.replica_count);
                }
                out
            }
            Command::Create { table, partitions, replicas } => {
                let name = table.clone();
                let r = self
                    .client
                    .meta_call(|mut m| {
                        let name = name.clone();
                        async move {
                            m.create_table(CreateTableRequest { name, partition_count: partitions, replica_count: replicas, restoring: false })
                                .await
                                .map(|r| r.into_inner())
                        }
                    })
                    .await
                    .map_err(err)?;
                tern_proto::check(&r.error).map_err(err)?;
                format!("created table {table} with {partitions} partitions and {replicas} replicas")
            }
            Command::Drop { table } => {
                let name = table.clone();
                let r = self
                    .client
                    .meta_call(|mut m| {
                        let name = name.clone();
                        async move { m.drop_table(DropTableRequest { name, table_id: 0 }).await.map(|r| r.into_inner()) }
                    })
                    .await
                    .map_err(err)?;
                tern_proto::check(&r.error).map_err(err)?;
                format!("dropped table {table}")
            }
            Command::Set { hashkey, sortkey, value, ttl } => {
                table.set(&hashkey, &sortkey, &value, ttl).await.map_err(err)?;
                "OK".into()
            }
            Command::Get { hashkey, sortkey } => match table.get(&hashkey, &sortkey).await.map_err(err)? {
                Some(v) => show(&v),
                None => "(not found)".into(),
            },
            Command::Del { hashkey, sortkey } => {
                let existed = table.del(&hashkey, &sortkey).await.map_err(err)?;
                if existed { "deleted 1 record" } else { "deleted 0 records (not found)" }.into()
            }
            Command::MultiSet { hashkey, pairs } => {
                table.multi_set(&hashkey, &pairs, 0).await.map_err(err)?;
                format!("OK ({} records)", pairs.len())
            }
            Command::MultiGet { hashkey, sortkeys } => {
                let records = table.multi_get(&hashkey, &sortkeys).await.map_err(err)?;
                render_records(&records, "")
            }
            Command::MultiDel { hashkey, sortkeys } => {
                let n = table.multi_del(&hashkey, &sortkeys).await.map_err(err)?;
                format!("deleted {n} records")
            }
            Command::Scan { hashkey, options } => {
                let (records, resume) = table.scan(&hashkey, &options).await.map_err(err)?;
                let more = if resume.is_empty() { String::new() } else { format!("; more from --start {}", show(&resume)) };
                render_records(&records, &more)
            }
            Command::Count { hashkey } => format!("{}", table.count(&hashkey).await.map_err(err)?),
            Command::Incr { hashkey, sortkey, delta } => format!("{}", table.incr(&hashkey, &sortkey, delta, 0).await.map_err(err)?),
            Command::CheckAndSet { hashkey, check_sortkey, check, operand, set_sortkey, value, ttl } => {
                let r = table.check_and_set(&hashkey, &check_sortkey, check, &operand, &set_sortkey, &value, ttl).await.map_err(err)?;
                let checked = r.check_value.as_deref().map(show).unwrap_or_else(|| "(not found)".into());
                format!("{}; checked value was {checked}", if r.set_done { "set" } else { "not set (check failed)" })
            }
            Command::CheckAndMutate { hashkey, check_sortkey, check, operand, mutations } => {
                let r = table.check_and_mutate(&hashkey, &check_sortkey, check, &operand, mutations).await.map_err(err)?;
                let checked = r.check_value.as_deref().map(show).unwrap_or_else(|| "(not found)".into());
                format!("{}; checked value was {checked}", if r.set_done { "mutated" } else { "not mutated (check failed)" })
            }
            Command::Ttl { hashkey, sortkey } => match table.ttl(&hashkey, &sortkey).await.map_err(err)? {
                None => "(not found)".into(),
                Some(None) => "no TTL (never expires)".into(),
                Some(Some(d)) => format!("{} s", d.as_secs_f64().ceil() as u64),
            },
            Command::Exists { hashkey, sortkey } => (if table.exists(&hashkey, &sortkey).await.map_err(err)? { "true" } else { "false" }).into(),
            Command::FullScan { limit } => {
                let (records, cursor) = table.full_scan(&FullScanCursor::default(), limit, false).await.map_err(err)?;
                render_records(&records, if cursor.done { "" } else { "; more remain" })
            }
            Command::Nodes => {
                let nodes = self.client.refresh_nodes().await.map_err(err)?;
                let mut out = format!(
                    "{:>5} {:<22} {:<6} {:<8} {:>8} {:>8} {:>7} {:>10} {:>9} {:>12}",
                    "id", "address", "state", "zone", "replicas", "leaders", "asleep", "disk MiB", "req/s", "last seen"
                );
                for n in nodes {
                    let seen = if n.last_heartbeat_ms_ago == u64::MAX {
                        "never".to_string()
                    } else {
                        format!("{:.1}s ago", n.last_heartbeat_ms_ago as f64 / 1000.0)
                    };
                    let _ = write!(
                        out,
                        "\n{:>5} {:<22} {:<6} {:<8} {:>8} {:>8} {:>7} {:>10.1} {:>9.0} {:>12}",
                        n.node_id,
                        n.address,
                        match (n.alive, n.draining) {
                            (true, false) => "up",
                            (true, true) => "drain",
                            (false, _) => "down",
                        },
                        if n.zone.is_empty() { "-" } else { n.zone.as_str() },
                        n.replica_count,
                        n.leader_count,
                        n.hibernating_count,
                        n.disk_used_bytes as f64 / (1024.0 * 1024.0),
                        n.requests_per_second,
                        seen
                    );
                }
                out
            }
            Command::Decommission { node, wait } => {
                let r = self
                    .client
                    .meta_call(|mut m| async move { m.decommission(tern_proto::NodeRequest { node_id: node }).await.map(|r| r.into_inner()) })
                    .await
                    .map_err(err)?;
                tern_proto::check(&r.error).map_err(err)?;
                if wait {
                    println!("{}", r.message);
                    self.wait_drained(node).await?
                } else {
                    format!("{} (watch it with `nodes`)", r.message)
                }
            }
            Command::Recommission { node } => {
                let r = self
                    .client
                    .meta_call(|mut m| async move { m.recommission(tern_proto::NodeRequest { node_id: node }).await.map(|r| r.into_inner()) })
                    .await
                    .map_err(err)?;
                tern_proto::check(&r.error).map_err(err)?;
                r.message
            }
            Command::Balance { action } => {
                let r = self
                    .client
                    .meta_call(|mut m| async move { m.balance(tern_proto::BalanceRequest { action: action as i32 }).await.map(|r| r.into_inner()) })
                    .await
                    .map_err(err)?;
                tern_proto::check(&r.error).map_err(err)?;
                format!(
                    "balancer {}; {} replica moves in progress; {} partitions with a replica on a down server",
                    if r.paused { "paused" } else { "running" },
                    r.moves_in_flight,
                    r.under_replicated
                )
            }
            Command::MoveReplica { table, partition, from, to } => {
                let r = self
                    .client
                    .meta_call(|mut m| {
                        let table = table.clone();
                        async move {
                            m.move_replica(tern_proto::MoveReplicaRequest { table, partition, from_node: from, to_node: to })
                                .await
                                .map(|r| r.into_inner())
                        }
                    })
                    .await
                    .map_err(err)?;
                tern_proto::check(&r.error).map_err(err)?;
                r.message
            }
            Command::SetReplicaCount { table, count } => {
                let r = self
                    .client
                    .meta_call(|mut m| {
                        let table = table.clone();
                        async move {
                            m.set_replica_count(tern_proto::SetReplicaCountRequest { table, replica_count: count }).await.map(|r| r.into_inner())
                        }
                    })
                    .await
                    .map_err(err)?;
                tern_proto::check(&r.error).map_err(err)?;
                r.message
            }
            Command::Split { table, action: SplitCommand::Status } => split_status(&self.client.table_info(&table).await.map_err(err)?),
            Command::Split { table, action: SplitCommand::Cancel } => self.client.split_table(&table, true).await.map_err(err)?,
            Command::Split { table, action: SplitCommand::Start { wait } } => {
                let mut out = self.client.split_table(&table, false).await.map_err(err)?;
                if wait {
                    println!("{out}");
                    loop {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        let info = self.client.table_info(&table).await.map_err(err)?;
                        if info.split.is_none() {
                            out = format!("done: table {table} has {} partitions", info.partition_count);
                            break;
                        }
                        println!("{}", split_status(&info));
                    }
                }
                out
            }
            Command::TransferLeader { table, partition, node } => {
                let r = self
                    .client
                    .meta_call(|mut m| {
                        let table = table.clone();
                        async move {
                            m.transfer_leader(tern_proto::TransferLeaderRequest { table, partition, node_id: node }).await.map(|r| r.into_inner())
                        }
                    })
                    .await
                    .map_err(err)?;
                tern_proto::check(&r.error).map_err(err)?;
                r.message
            }
            Command::Partitions { table } => {
                let name = table.unwrap_or_else(|| self.table.clone());
                let n = name.clone();
                let r = self
                    .client
                    .meta_call(|mut m| {
                        let table = n.clone();
                        async move { m.get_partition_status(PartitionStatusRequest { table }).await.map(|r| r.into_inner()) }
                    })
                    .await
                    .map_err(err)?;
                tern_proto::check(&r.error).map_err(err)?;
                let mut out = format!("table {name}\n{:>4} {:>7} {:<30} {}", "pidx", "leader", "replicas (node:peer)", "applied index per replica");
                for p in r.partitions {
                    let replicas: Vec<String> = p.peers.iter().map(|x| format!("{}:{}", x.node_id, x.peer_id)).collect();
                    let applied: Vec<String> = p
                        .peers
                        .iter()
                        .map(|peer| match p.replicas.iter().find(|r| r.peer_id == peer.peer_id) {
                            Some(r) => format!("{}{}", r.applied_index, if r.is_leader { "*" } else { "" }),
                            None => "down".into(),
                        })
                        .collect();
                    let health = if p.replicas.len() < p.peers.len() { "  under-replicated" } else { "" };
                    let _ = write!(out, "\n{:>4} {:>7} {:<30} {}{}", p.index, p.leader_node, replicas.join(","), applied.join(","), health);
                }
                out
            }
            Command::Backup { table, to, rate_mb } => {
                let mut shown = std::time::Instant::now();
                let mut show = |p: &backup::Progress| {
                    if shown.elapsed() >= Duration::from_secs(1) {
                        shown = std::time::Instant::now();
                        eprintln!("backup of {table}: {p}");
                    }
                };
                let (dir, m) = backup::backup_table(&self.client, &table, &to, rate_mb << 20, &mut show, ctrl_c()).await.map_err(err)?;
                format!(
                    "backed up table {} to {}: {} partitions, {:.1} MiB in {:.1} s",
                    m.table,
                    dir,
                    m.partition_count,
                    m.bytes() as f64 / (1 << 20) as f64,
                    m.finished_unix_ms.saturating_sub(m.started_unix_ms) as f64 / 1000.0
                )
            }
            Command::BackupPolicy { table, policy } => {
                let r = self
                    .client
                    .meta_call(|mut m| {
                        let request = tern_proto::SetBackupPolicyRequest { table: table.clone(), policy: policy.clone() };
                        async move { m.set_backup_policy(request).await.map(|r| r.into_inner()) }
                    })
                    .await
                    .map_err(err)?;
                tern_proto::check(&r.error).map_err(err)?;
                r.message
            }
            Command::Backups { root } => {
                let mut out = format!("{:<40} {:<16} {:>10} {:>10}  {}", "backup", "table", "partitions", "MiB", "taken");
                for (name, m) in backup::list_backups(&root).await.map_err(err)? {
                    match m {
                        Ok(m) => {
                            let mib = m.bytes() as f64 / (1 << 20) as f64;
                            let _ = write!(out, "\n{name:<40} {:<16} {:>10} {mib:>10.1}  {} ago", m.table, m.partition_count, age(m.started_unix_ms));
                        }
                        Err(e) => {
                            let _ = write!(out, "\n{name:<40} not usable: {e}");
                        }
                    }
                }
                out
            }
            Command::Restore { backup: from, table, rate_mb } => {
                let mut shown = std::time::Instant::now();
                let mut show = |p: &backup::Progress| {
                    if shown.elapsed() >= Duration::from_secs(1) {
                        shown = std::time::Instant::now();
                        eprintln!("restore into {table}: {p}");
                    }
                };
                let r = backup::restore_table(&self.client, &from, &table, rate_mb << 20, &mut show, ctrl_c()).await.map_err(err)?;
                format!(
                    "restored table {} from {from}: {} partitions, {} records, {:.1} MiB in {:.1} s; every partition's checksum matches the backup",
                    r.table,
                    r.partitions,
                    r.records,
                    r.bytes as f64 / (1 << 20) as f64,
                    r.elapsed.as_secs_f64()
                )
            }
            Command::DupAdd(request) => {
                let id = tern_client::dup::add(&self.client, &request).await.map_err(err)?;
                format!(
                    "added duplication {id} of table {} to {}; it starts with a full copy of every partition (watch it with `dup list`)",
                    request.table,
                    request.remote_meta.join(",")
                )
            }
            Command::DupList { table } => render_duplications(&tern_client::dup::list(&self.client, &table).await.map_err(err)?),
            Command::DupChange { id, action } => tern_client::dup::change(&self.client, id, action).await.map_err(err)?,
            Command::ClusterInfo => {
                let nodes = self.client.refresh_nodes().await.map_err(err)?;
                let tables = self
                    .client
                    .meta_call(|mut m| async move { m.list_tables(ListTablesRequest {}).await.map(|r| r.into_inner()) })
                    .await
                    .map_err(err)?;
                let alive = nodes.iter().filter(|n| n.alive).count();
                let replicas: u32 = nodes.iter().map(|n| n.replica_count).sum();
                let settings = self.client.cluster_settings().await.map_err(err)?;
                format!(
                    "meta: {}\ncluster: {:016x} (tag {})\nservers: {} ({} up)\ntables: {}\nreplicas: {}\ncurrent table: {}",
                    self.meta.join(","),
                    settings.cluster_id,
                    settings.cluster_tag,
                    nodes.len(),
                    alive,
                    tables.tables.len(),
                    replicas,
                    self.table
                )
            }
        };
        Ok(out)
    }
}

/// Each duplication on a line, then one line per partition with its progress.
fn render_duplications(dups: &[tern_proto::Duplication]) -> String {
    if dups.is_empty() {
        return "(no duplications)".into();
    }
    let mut out = String::new();
    for d in dups {
        let _ = writeln!(
            out,
            "duplication {}: table {} -> {} at {} (tag {}){}",
            d.id,
            d.table,
            d.remote_table,
            d.remote_meta.join(","),
            d.remote_tag,
            if d.paused { ", paused" } else { "" }
        );
        let _ = writeln!(out, "  {:>9} {:>8} {:>12} {:>11} {:>10}  state", "partition", "leader", "confirmed", "lag entries", "lag ms");
        for p in &d.partitions {
            let state = if !p.error.is_empty() {
                format!("error: {}", p.error)
            } else if p.full_copy && d.paused {
                "paused; needs a full copy (fell behind more than its change log holds)".into()
            } else if p.full_copy {
                "full copy".into()
            } else if d.paused {
                "paused".into()
            } else {
                "shipping".into()
            };
            let _ =
                writeln!(out, "  {:>9} {:>8} {:>12} {:>11} {:>10}  {state}", p.partition, p.leader_node, p.confirmed_index, p.lag_entries, p.lag_ms);
        }
    }
    out.pop();
    out
}

/// Seconds in the largest unit that divides them: "90 s", "30 min", "6 h", "1 d".
fn duration_words(seconds: u64) -> String {
    match seconds {
        s if s >= 86_400 && s % 86_400 == 0 => format!("{} d", s / 86_400),
        s if s >= 3600 && s % 3600 == 0 => format!("{} h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// How long ago a unix time (ms) was, roughly: "40 s", "12 min", "5 h", "3 d".
fn age(unix_ms: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let s = now.saturating_sub(unix_ms) / 1000;
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

/// Resolves on Ctrl-C (never, if the signal cannot be watched).
async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Shell {
    /// Prints the draining server's remaining replicas every second until none are left.
    async fn wait_drained(&self, node: u64) -> Result<String, String> {
        let started = std::time::Instant::now();
        loop {
            let nodes = self.client.refresh_nodes().await.map_err(err)?;
            let Some(n) = nodes.iter().find(|n| n.node_id == node) else { return Err(format!("error: node {node} is gone")) };
            if n.replica_count == 0 {
                return Ok(format!("node {node} holds no replicas after {:.0} s; it can be stopped", started.elapsed().as_secs_f64()));
            }
            println!("node {node}: {} replicas left, {} leaders", n.replica_count, n.leader_count);
            if started.elapsed() > Duration::from_secs(3600) {
                return Err(format!("error: node {node} still holds {} replicas after an hour", n.replica_count));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Runs `-e` commands separated by ';': prints each result, returns whether all succeeded.
pub async fn run_script(shell: &mut Shell, script: &str) -> bool {
    let mut ok = true;
    for line in split_commands(script) {
        match parse(&line) {
            Ok(None) => {}
            Ok(Some(Command::Quit)) => break,
            Ok(Some(c)) => match shell.run(c).await {
                Ok(out) => println!("{out}"),
                Err(e) => {
                    eprintln!("{e}");
                    ok = false;
                }
            },
            Err(e) => {
                eprintln!("error: {e}");
                ok = false;
            }
        }
    }
    ok
}

/// Splits on ';' outside quotes.
pub fn split_commands(script: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in script.chars() {
        if escaped {
            escaped = false;
        } else if c == '\\' && quote == Some('"') {
            escaped = true;
        } else if let Some(q) = quote {
            if c == q {
                quote = None;
            }
        } else if c == '"' || c == '\'' {
            quote = Some(c);
        } else if c == ';' {
            out.push(std::mem::take(&mut current));
            continue;
        }
        current.push(c);
    }
    out.push(current);
    out.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

/// Waits a little for servers to answer before the first prompt (for scripts started right after
/// the cluster).
pub const STARTUP_GRACE: Duration = Duration::from_secs(2);

/// A table's split as `split status` shows it.
fn split_status(info: &tern_proto::TableInfo) -> String {
    let Some(s) = &info.split else { return format!("table {} is not splitting ({} partitions)", info.name, info.partition_count) };
    let phase = if s.switching { "switching" } else { "preparing (cancellable)" };
    let mut out = format!(
        "table {}: {} -> {} partitions, {phase}, {} of {} split, started {} ago",
        info.name,
        info.partition_count,
        s.partition_count,
        s.partitions_split,
        info.partition_count,
        age(s.started_unix_ms)
    );
    if !s.waiting_for.is_empty() {
        let _ = write!(out, "; waiting for {}", s.waiting_for);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quotes, escapes and bare words tokenize as a user expects; malformed quoting is an error.
    #[test]
    fn tokenizer() {
        assert_eq!(tokenize(r#"set a "b c" 'd e'"#).unwrap(), vec![b"set".to_vec(), b"a".to_vec(), b"b c".to_vec(), b"d e".to_vec()]);
        assert_eq!(tokenize(r#""\x00\n\"""#).unwrap(), vec![vec![0, b'\n', b'"']]);
        assert_eq!(tokenize(r#""""#).unwrap(), vec![Vec::<u8>::new()]);
        assert!(tokenize(r#""open"#).is_err());
        assert!(tokenize(r#""\xZZ""#).is_err());
        assert!(tokenize(r#""a"b"#).is_err());
    }

    /// Every command parses with its arguments; wrong arity and bad numbers give usage errors.
    #[test]
    fn parser() {
        assert_eq!(
            parse("set h s v 10").unwrap(),
            Some(Command::Set { hashkey: b"h".to_vec(), sortkey: b"s".to_vec(), value: b"v".to_vec(), ttl: 10 })
        );
        assert!(parse("set h s").unwrap_err().contains("usage"));
        assert!(parse("set h s v ten").unwrap_err().contains("number"));
        assert_eq!(parse("create t -p 16 -r 1").unwrap(), Some(Command::Create { table: "t".into(), partitions: 16, replicas: 1 }));
        assert!(parse("create t -x 1").is_err());
        assert!(parse("multi_set h s").is_err());
        assert!(matches!(parse("multi_set h s1 v1 s2 v2").unwrap(), Some(Command::MultiSet { pairs, .. }) if pairs.len() == 2));
        assert!(
            matches!(parse("scan h --prefix p --limit 5").unwrap(), Some(Command::Scan { options, .. }) if options.limit == 5 && options.prefix == b"p")
        );
        assert!(parse("scan h --limit").is_err());
        assert!(matches!(parse("incr h s").unwrap(), Some(Command::Incr { delta: 1, .. })));
        assert!(matches!(parse("incr h s -3").unwrap(), Some(Command::Incr { delta: -3, .. })));
        assert!(matches!(parse("check_and_set h c equal old s new").unwrap(), Some(Command::CheckAndSet { check: CheckType::ValueEqual, .. })));
        assert!(parse("check_and_set h c maybe s v").is_err());
        match parse("check_and_mutate h c equal old set a 1 del b").unwrap() {
            Some(Command::CheckAndMutate { check: CheckType::ValueEqual, operand, mutations, .. }) => {
                assert_eq!(operand, b"old");
                assert_eq!(mutations.len(), 2);
                assert!(!mutations[0].delete && mutations[1].delete);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse("check_and_mutate h c always").is_err());
        assert!(parse("check_and_mutate h c always set a").is_err());
        assert!(parse("check_and_mutate h c equal").is_err());
        assert_eq!(parse("   ").unwrap(), None);
        assert!(parse("frobnicate").unwrap_err().contains("unknown command"));
        assert_eq!(parse("PARTITIONS demo").unwrap(), Some(Command::Partitions { table: Some("demo".into()) }));
    }

    /// Operation commands parse, and bad node ids, actions and arities are refused with usage errors.
    #[test]
    fn operation_commands() {
        assert_eq!(parse("decommission 3 --wait").unwrap(), Some(Command::Decommission { node: 3, wait: true }));
        assert!(parse("decommission three").unwrap_err().contains("number"));
        assert!(parse("decommission 3 --now").unwrap_err().contains("--wait"));
        assert_eq!(parse("balance step").unwrap(), Some(Command::Balance { action: tern_proto::BalanceAction::BalanceStep }));
        assert!(parse("balance sideways").unwrap_err().contains("unknown balance action"));
        assert_eq!(parse("move_replica t 1 2 3").unwrap(), Some(Command::MoveReplica { table: "t".into(), partition: 1, from: 2, to: 3 }));
        assert!(parse("move_replica t 1 2").unwrap_err().contains("usage"));
        assert!(parse("transfer_leader t x 1").unwrap_err().contains("number"));
        assert_eq!(parse("set_replica_count t 5").unwrap(), Some(Command::SetReplicaCount { table: "t".into(), count: 5 }));
        assert_eq!(parse("split t --wait").unwrap(), Some(Command::Split { table: "t".into(), action: SplitCommand::Start { wait: true } }));
        assert_eq!(parse("split status t").unwrap(), Some(Command::Split { table: "t".into(), action: SplitCommand::Status }));
        assert_eq!(parse("split cancel t").unwrap(), Some(Command::Split { table: "t".into(), action: SplitCommand::Cancel }));
        assert!(parse("split").is_err());
        assert!(parse("split t --now").is_err());
        assert!(parse("set_replica_count t -1").is_err());
    }

    /// Backup commands: positional words and --flags in any order, each flag once, rates in range.
    #[test]
    fn backup_commands() {
        assert_eq!(parse("backup t --to /b").unwrap(), Some(Command::Backup { table: "t".into(), to: "/b".into(), rate_mb: 0 }));
        assert_eq!(parse("backup --rate 20 --to /b t").unwrap(), Some(Command::Backup { table: "t".into(), to: "/b".into(), rate_mb: 20 }));
        assert!(parse("backup t").unwrap_err().contains("usage"));
        assert!(parse("backup t u --to /b").unwrap_err().contains("usage"));
        assert!(parse("backup t --to").unwrap_err().contains("needs a value"));
        assert!(parse("backup t --to /a --to /b").unwrap_err().contains("twice"));
        assert!(parse("backup t --to /b --speed 3").unwrap_err().contains("unknown option --speed"));
        assert!(parse("backup t --to /b --rate 0").unwrap_err().contains("1 to"));
        assert!(parse("backup t --to /b --rate fast").unwrap_err().contains("MiB per second"));
        assert_eq!(parse("backups /b").unwrap(), Some(Command::Backups { root: "/b".into() }));
        assert_eq!(
            parse("restore /b/t-1 --table t2 --rate 5").unwrap(),
            Some(Command::Restore { backup: "/b/t-1".into(), table: "t2".into(), rate_mb: 5 })
        );
        assert!(parse("restore /b/t-1").unwrap_err().contains("usage"));
        let policy = |interval_seconds, keep, rate_mb| Some(tern_proto::BackupPolicy { root: "/b".into(), interval_seconds, keep, rate_mb });
        assert_eq!(
            parse("backup_policy t --to /b --every 6h --keep 7").unwrap(),
            Some(Command::BackupPolicy { table: "t".into(), policy: policy(6 * 3600, 7, 0) })
        );
        assert_eq!(
            parse("backup_policy t --every 90 --keep 1 --to /b --rate 3").unwrap(),
            Some(Command::BackupPolicy { table: "t".into(), policy: policy(90, 1, 3) })
        );
        assert_eq!(parse("backup_policy t off").unwrap(), Some(Command::BackupPolicy { table: "t".into(), policy: None }));
        assert!(parse("backup_policy t --to /b --every 6x --keep 7").unwrap_err().contains("interval"));
        assert!(parse("backup_policy t --to /b --every 6h").unwrap_err().contains("usage"));
        assert!(parse("backup_policy t --to /b --every 6h --keep many").unwrap_err().contains("--keep"));
        assert!(parse("backup_policy t off --keep 3").unwrap_err().contains("usage"));
        assert_eq!(duration_words(6 * 3600), "6 h");
        assert_eq!(duration_words(90), "90 s");
    }

    /// Duplication commands parse; a missing remote, a bad id or an unknown verb is a usage error.
    #[test]
    fn duplication_commands() {
        assert_eq!(
            parse("dup add t --to a:1,b:2 --remote-table u").unwrap(),
            Some(Command::DupAdd(tern_client::dup::AddDuplication {
                table: "t".into(),
                remote_meta: vec!["a:1".into(), "b:2".into()],
                remote_table: "u".into(),
                log_entries_max: 0
            }))
        );
        assert!(matches!(parse("dup add t --to a:1 --log-entries 5000").unwrap(), Some(Command::DupAdd(a)) if a.log_entries_max == 5000));
        assert!(parse("dup add t").unwrap_err().contains("usage"));
        assert!(parse("dup add t --to ,").unwrap_err().contains("--to"));
        assert!(parse("dup add t --to a:1 --log-entries lots").unwrap_err().contains("--log-entries"));
        assert_eq!(parse("dup list").unwrap(), Some(Command::DupList { table: String::new() }));
        assert_eq!(parse("dup list t").unwrap(), Some(Command::DupList { table: "t".into() }));
        assert_eq!(parse("dup remove 42").unwrap(), Some(Command::DupChange { id: 42, action: tern_proto::DuplicationAction::DupRemove }));
        assert!(parse("dup pause x").unwrap_err().contains("number"));
        assert!(parse("dup frobnicate 1").unwrap_err().contains("usage"));
        assert!(parse("dup").unwrap_err().contains("usage"));
    }

    /// Scripts split on semicolons outside quotes.
    #[test]
    fn script_splitting() {
        assert_eq!(split_commands("set a b c; get a b"), vec!["set a b c", "get a b"]);
        assert_eq!(split_commands(r#"set a b "x;y"; get a b;"#), vec![r#"set a b "x;y""#, "get a b"]);
    }

    /// Non-printable bytes are shown escaped.
    #[test]
    fn showing_values() {
        assert_eq!(show(b"ab"), "\"ab\"");
        assert_eq!(show(&[0, b'"']), "\"\\x00\\\"\"");
    }
}
