//! Introspection: INFO, COMMAND, CONFIG GET, and the command table behind them.

use crate::Shard;
use bytes::Bytes;
use std::sync::atomic::Ordering;
use tern_redis::Reply;

/// The Redis version whose command semantics the proxy follows (clients check it for features).
pub const REDIS_VERSION: &str = "7.0.0";

/// Commands the proxy answers itself: (name, arity, flags, first key, last key, step).
const PROXY_COMMANDS: &[Row] = &[
    ("auth", -2, &["fast", "no-auth"], 0, 0, 0),
    ("client", -2, &["admin"], 0, 0, 0),
    ("command", -1, &["loading", "stale"], 0, 0, 0),
    ("config", -2, &["admin"], 0, 0, 0),
    ("dbsize", 1, &["readonly"], 0, 0, 0),
    ("discard", 1, &["fast"], 0, 0, 0),
    ("echo", 2, &["fast"], 0, 0, 0),
    ("exec", 1, &["noscript"], 0, 0, 0),
    ("flushall", -1, &["write"], 0, 0, 0),
    ("flushdb", -1, &["write"], 0, 0, 0),
    ("hello", -1, &["fast", "no-auth"], 0, 0, 0),
    ("hscan", -3, &["readonly"], 1, 1, 1),
    ("info", -1, &["loading", "stale"], 0, 0, 0),
    ("keys", 2, &["readonly"], 0, 0, 0),
    ("multi", 1, &["fast"], 0, 0, 0),
    ("ping", -1, &["fast"], 0, 0, 0),
    ("quit", -1, &["fast", "no-auth"], 0, 0, 0),
    ("randomkey", 1, &["readonly"], 0, 0, 0),
    ("reset", 1, &["fast", "no-auth"], 0, 0, 0),
    ("scan", -2, &["readonly"], 0, 0, 0),
    ("select", 2, &["fast"], 0, 0, 0),
    ("sscan", -3, &["readonly"], 1, 1, 1),
    ("time", 1, &["fast"], 0, 0, 0),
    ("unwatch", 1, &["fast"], 0, 0, 0),
    ("wait", 3, &["noscript"], 0, 0, 0),
    ("watch", -2, &["fast"], 1, -1, 1),
    ("zscan", -3, &["readonly"], 1, 1, 1),
];

/// COMMAND's description of one command: name, arity, flags, first key, last key, key step.
type Row = (&'static str, i64, &'static [&'static str], i64, i64, i64);

/// Every command: the proxy's own and tern-redis's, by name.
fn commands() -> Vec<Row> {
    let mut all: Vec<Row> = PROXY_COMMANDS.to_vec();
    for spec in tern_redis::commands::all().iter().filter(|s| !s.name.starts_with("TERN.")) {
        let flags: &'static [&'static str] = if spec.write { &["write"] } else { &["readonly"] };
        let (first, last, step) = match spec.keys {
            tern_redis::commands::Keys::None | tern_redis::commands::Keys::NumKeys { .. } => (0, 0, 0),
            tern_redis::commands::Keys::Range { first, last, step } => (first as i64, last as i64, step as i64),
        };
        all.push((spec.name, spec.arity as i64, flags, first, last, step));
    }
    all.sort_by_key(|c| c.0.to_ascii_lowercase());
    all
}

fn command_info(c: &Row) -> Reply {
    Reply::Array(vec![
        Reply::bulk(c.0.to_ascii_lowercase()),
        Reply::Int(c.1),
        Reply::Array(c.2.iter().map(|f| Reply::Simple(f.to_string())).collect()),
        Reply::Int(c.3),
        Reply::Int(c.4),
        Reply::Int(c.5),
    ])
}

pub fn command(args: &[Bytes]) -> Result<Reply, Reply> {
    let sub = args.first().map(|a| String::from_utf8_lossy(a).to_ascii_uppercase());
    let all = commands();
    match sub.as_deref() {
        None => Ok(Reply::Array(all.iter().map(command_info).collect())),
        Some("COUNT") => Ok(Reply::Int(all.len() as i64)),
        // Documentation is optional for clients (redis-cli falls back to its own hints).
        Some("DOCS") => Ok(Reply::Map(vec![])),
        Some("INFO") => Ok(Reply::Array(
            args[1..].iter().map(|n| all.iter().find(|c| c.0.as_bytes().eq_ignore_ascii_case(n)).map_or(Reply::NilArray, command_info)).collect(),
        )),
        Some("LIST") => Ok(Reply::Array(all.iter().map(|c| Reply::bulk(c.0.to_ascii_lowercase())).collect())),
        Some(other) => Err(Reply::err(format!("ERR unknown subcommand '{}'. Try COMMAND HELP.", other.to_ascii_lowercase()))),
    }
}

/// Redis settings CONFIG SET accepts and CONFIG GET reports without their changing anything:
/// they tune Redis's in-memory encodings (Tern stores every type one way), or its snapshots
/// (`save`: Tern's durability is its raft log).
const ENCODING_SETTINGS: &[&str] = &[
    "save",
    "hash-max-listpack-entries",
    "hash-max-listpack-value",
    "hash-max-ziplist-entries",
    "hash-max-ziplist-value",
    "list-max-listpack-size",
    "list-max-ziplist-size",
    "list-compress-depth",
    "set-max-intset-entries",
    "set-max-listpack-entries",
    "zset-max-listpack-entries",
    "zset-max-listpack-value",
    "zset-max-ziplist-entries",
    "zset-max-ziplist-value",
    "lazyfree-lazy-user-del",
    "lazyfree-lazy-user-flush",
];

/// CONFIG GET answers the parameters tools ask for (redis-benchmark reads `save` and
/// `appendonly`); CONFIG SET takes only the encoding settings (`ENCODING_SETTINGS`), which this
/// proxy remembers and nothing reads: the proxy's own settings are command-line flags.
pub fn config(shared: &Shard, args: &[Bytes]) -> Result<Reply, Reply> {
    let sub = args.first().map(|a| String::from_utf8_lossy(a).to_ascii_uppercase());
    match sub.as_deref() {
        Some("GET") if args.len() >= 2 => {
            let mut params = vec![
                ("save".to_string(), String::new()),
                ("appendonly".to_string(), "no".to_string()),
                ("databases".to_string(), "1".to_string()),
                ("maxclients".to_string(), shared.config.max_clients.to_string()),
                ("port".to_string(), shared.address.port().to_string()),
                ("proto-max-bulk-len".to_string(), crate::resp::BULK_BYTES_MAX.to_string()),
            ];
            let set = shared.settings.lock();
            params.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
            let mut out = Vec::new();
            for (name, value) in params {
                if args[1..].iter().any(|p| tern_redis::glob::glob_match(&p.to_ascii_lowercase(), name.as_bytes())) {
                    out.push((Reply::bulk(name), Reply::bulk(value)));
                }
            }
            Ok(Reply::Map(out))
        }
        Some("SET") if args.len() >= 3 && args.len() % 2 == 1 => {
            let mut set = shared.settings.lock();
            for kv in args[1..].chunks(2) {
                let name = String::from_utf8_lossy(&kv[0]).to_ascii_lowercase();
                if !ENCODING_SETTINGS.contains(&name.as_str()) {
                    return Err(Reply::err(format!(
                        "ERR Unknown option or number of arguments for CONFIG SET - '{name}' (the Tern proxy takes its settings as command-line flags)"
                    )));
                }
            }
            for kv in args[1..].chunks(2) {
                set.insert(String::from_utf8_lossy(&kv[0]).to_ascii_lowercase(), String::from_utf8_lossy(&kv[1]).into_owned());
            }
            Ok(Reply::Ok)
        }
        Some("RESETSTAT") if args.len() == 1 => Ok(Reply::Ok),
        _ => Err(Reply::err("ERR unknown subcommand or wrong number of arguments for 'CONFIG'")),
    }
}

pub async fn info(shared: &Shard, args: &[Bytes]) -> Result<Reply, Reply> {
    let wanted: Vec<String> = args.iter().map(|a| String::from_utf8_lossy(a).to_ascii_lowercase()).collect();
    let all = wanted.is_empty() || wanted.iter().any(|w| w == "all" || w == "everything" || w == "default");
    let want = |s: &str| all || wanted.iter().any(|w| w == s);
    let st = &shared.stats;
    let mut text = String::new();
    if want("server") {
        let uptime = shared.started.elapsed().as_secs();
        text.push_str(&format!(
            "# Server\r\nredis_version:{REDIS_VERSION}\r\ntern_version:{}\r\nredis_mode:standalone\r\nos:{} {}\r\narch_bits:64\r\nprocess_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{uptime}\r\nuptime_in_days:{}\r\ntern_table:{}\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::OS,
            std::env::consts::ARCH,
            std::process::id(),
            shared.address.port(),
            uptime / 86400,
            shared.config.table,
        ));
    }
    if want("clients") {
        text.push_str(&format!(
            "# Clients\r\nconnected_clients:{}\r\nmaxclients:{}\r\n\r\n",
            st.connected.load(Ordering::Relaxed),
            shared.config.max_clients
        ));
    }
    if want("stats") {
        text.push_str(&format!(
            "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\nrejected_connections:{}\r\ntotal_error_replies:{}\r\nkeyspace_hits:{}\r\nkeyspace_misses:{}\r\n\r\n",
            st.connections_received.load(Ordering::Relaxed),
            st.commands.load(Ordering::Relaxed),
            st.rejected.load(Ordering::Relaxed),
            st.errors.load(Ordering::Relaxed),
            st.keyspace_hits.load(Ordering::Relaxed),
            st.keyspace_misses.load(Ordering::Relaxed),
        ));
    }
    if want("keyspace") {
        let (keys, expires) = shared.key_count(false).await?;
        text.push_str("# Keyspace\r\n");
        if keys > 0 {
            text.push_str(&format!("db0:keys={keys},expires={expires},avg_ttl=0\r\n"));
        }
    }
    Ok(Reply::Text(text))
}
