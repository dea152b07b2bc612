//! Introspection: INFO, COMMAND, CONFIG GET, and the command table behind them.

use crate::resp::Reply;
use crate::Shard;
use bytes::Bytes;
use std::sync::atomic::Ordering;

/// The Redis version whose command semantics the proxy follows (clients check it for features).
pub const REDIS_VERSION: &str = "7.0.0";

/// (name, arity as in Redis COMMAND: negative = at least, flags, first key, last key, step)
type CommandSpec = (&'static str, i64, &'static [&'static str], i64, i64, i64);
const COMMANDS: &[CommandSpec] = &[
    ("append", 3, &["write"], 1, 1, 1),
    ("auth", -2, &["fast", "no-auth"], 0, 0, 0),
    ("client", -2, &["admin"], 0, 0, 0),
    ("command", -1, &["loading", "stale"], 0, 0, 0),
    ("config", -2, &["admin"], 0, 0, 0),
    ("dbsize", 1, &["readonly"], 0, 0, 0),
    ("decr", 2, &["write", "fast"], 1, 1, 1),
    ("decrby", 3, &["write", "fast"], 1, 1, 1),
    ("del", -2, &["write"], 1, -1, 1),
    ("echo", 2, &["fast"], 0, 0, 0),
    ("exists", -2, &["readonly", "fast"], 1, -1, 1),
    ("expire", -3, &["write", "fast"], 1, 1, 1),
    ("expireat", -3, &["write", "fast"], 1, 1, 1),
    ("get", 2, &["readonly", "fast"], 1, 1, 1),
    ("getdel", 2, &["write", "fast"], 1, 1, 1),
    ("getex", -2, &["write", "fast"], 1, 1, 1),
    ("getset", 3, &["write", "fast"], 1, 1, 1),
    ("hdel", -3, &["write", "fast"], 1, 1, 1),
    ("hello", -1, &["fast", "no-auth"], 0, 0, 0),
    ("hexists", 3, &["readonly", "fast"], 1, 1, 1),
    ("hget", 3, &["readonly", "fast"], 1, 1, 1),
    ("hgetall", 2, &["readonly"], 1, 1, 1),
    ("hincrby", 4, &["write", "fast"], 1, 1, 1),
    ("hincrbyfloat", 4, &["write", "fast"], 1, 1, 1),
    ("hkeys", 2, &["readonly"], 1, 1, 1),
    ("hlen", 2, &["readonly", "fast"], 1, 1, 1),
    ("hmget", -3, &["readonly", "fast"], 1, 1, 1),
    ("hmset", -4, &["write", "fast"], 1, 1, 1),
    ("hscan", -3, &["readonly"], 1, 1, 1),
    ("hset", -4, &["write", "fast"], 1, 1, 1),
    ("hsetnx", 4, &["write", "fast"], 1, 1, 1),
    ("hvals", 2, &["readonly"], 1, 1, 1),
    ("incr", 2, &["write", "fast"], 1, 1, 1),
    ("incrby", 3, &["write", "fast"], 1, 1, 1),
    ("incrbyfloat", 3, &["write", "fast"], 1, 1, 1),
    ("info", -1, &["loading", "stale"], 0, 0, 0),
    ("mget", -2, &["readonly", "fast"], 1, -1, 1),
    ("mset", -3, &["write"], 1, -1, 2),
    ("msetnx", -3, &["write"], 1, -1, 2),
    ("persist", 2, &["write", "fast"], 1, 1, 1),
    ("pexpire", -3, &["write", "fast"], 1, 1, 1),
    ("pexpireat", -3, &["write", "fast"], 1, 1, 1),
    ("ping", -1, &["fast"], 0, 0, 0),
    ("psetex", 4, &["write"], 1, 1, 1),
    ("pttl", 2, &["readonly", "fast"], 1, 1, 1),
    ("quit", -1, &["fast", "no-auth"], 0, 0, 0),
    ("scan", -2, &["readonly"], 0, 0, 0),
    ("select", 2, &["fast"], 0, 0, 0),
    ("set", -3, &["write"], 1, 1, 1),
    ("setex", 4, &["write"], 1, 1, 1),
    ("setnx", 3, &["write", "fast"], 1, 1, 1),
    ("strlen", 2, &["readonly", "fast"], 1, 1, 1),
    ("ttl", 2, &["readonly", "fast"], 1, 1, 1),
    ("type", 2, &["readonly", "fast"], 1, 1, 1),
    ("unlink", -2, &["write", "fast"], 1, -1, 1),
];

pub fn is_known(upper_name: &str) -> bool {
    COMMANDS.iter().any(|c| c.0.eq_ignore_ascii_case(upper_name))
}

fn command_info(c: &(&str, i64, &[&str], i64, i64, i64)) -> Reply {
    Reply::Array(vec![
        Reply::bulk(c.0.to_string()),
        Reply::Int(c.1),
        Reply::Array(c.2.iter().map(|f| Reply::Simple(f.to_string())).collect()),
        Reply::Int(c.3),
        Reply::Int(c.4),
        Reply::Int(c.5),
    ])
}

pub fn command(args: &[Bytes]) -> Result<Reply, Reply> {
    let sub = args.first().map(|a| String::from_utf8_lossy(a).to_ascii_uppercase());
    match sub.as_deref() {
        None => Ok(Reply::Array(COMMANDS.iter().map(command_info).collect())),
        Some("COUNT") => Ok(Reply::Int(COMMANDS.len() as i64)),
        // Documentation is optional for clients (redis-cli falls back to its own hints).
        Some("DOCS") => Ok(Reply::Map(vec![])),
        Some("INFO") => Ok(Reply::Array(
            args[1..]
                .iter()
                .map(|n| COMMANDS.iter().find(|c| c.0.as_bytes().eq_ignore_ascii_case(n)).map_or(Reply::NilArray, command_info))
                .collect(),
        )),
        Some("LIST") => Ok(Reply::Array(COMMANDS.iter().map(|c| Reply::bulk(c.0.to_string())).collect())),
        Some(other) => Err(Reply::err(format!("ERR unknown subcommand '{}'. Try COMMAND HELP.", other.to_ascii_lowercase()))),
    }
}

/// CONFIG GET answers the parameters tools ask for (redis-benchmark reads `save` and `appendonly`);
/// the proxy has no settable configuration.
pub fn config(shared: &Shard, args: &[Bytes]) -> Result<Reply, Reply> {
    let sub = args.first().map(|a| String::from_utf8_lossy(a).to_ascii_uppercase());
    match sub.as_deref() {
        Some("GET") if args.len() >= 2 => {
            let params = [
                ("save", String::new()),
                ("appendonly", "no".to_string()),
                ("databases", "1".to_string()),
                ("maxclients", shared.config.max_clients.to_string()),
                ("port", shared.address.port().to_string()),
                ("proto-max-bulk-len", crate::resp::BULK_BYTES_MAX.to_string()),
            ];
            let mut out = Vec::new();
            for (name, value) in params {
                if args[1..].iter().any(|p| crate::glob::glob_match(&p.to_ascii_lowercase(), name.as_bytes())) {
                    out.push((Reply::bulk(name.to_string()), Reply::bulk(value)));
                }
            }
            Ok(Reply::Map(out))
        }
        Some("RESETSTAT") if args.len() == 1 => Ok(Reply::Ok),
        Some("SET") => Err(Reply::err("ERR CONFIG SET is not supported by the Tern proxy; configure it with command-line flags")),
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
