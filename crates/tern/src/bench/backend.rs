//! The systems `tern bench` drives: Tern through its native client, anything that speaks RESP (a
//! redis-server or a Tern proxy), and etcd through its v3 gRPC API. Each worker owns one connection
//! handle; all backends store a record as one key with one value.

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use std::time::Duration;
use tern_client::{Client, ClientConfig, Table};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}
use etcdserverpb::kv_client::KvClient as EtcdKv;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Tern,
    Redis,
    Etcd,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tern" => Ok(BackendKind::Tern),
            "redis" => Ok(BackendKind::Redis),
            "etcd" => Ok(BackendKind::Etcd),
            other => Err(format!("unknown backend {other:?} (want tern, redis or etcd)")),
        }
    }
}

pub enum Conn {
    Tern(Table),
    Redis(RedisConn),
    Etcd(EtcdKv<tonic::transport::Channel>),
}

/// Opens `n` worker connections. `targets`: tern meta addresses, one redis address, or etcd
/// endpoints (workers are spread over them, as etcd's client balancer does).
pub async fn connect(kind: BackendKind, targets: &[String], table: &str, n: usize) -> anyhow::Result<Vec<Conn>> {
    if targets.is_empty() {
        bail!("no target address");
    }
    match kind {
        BackendKind::Tern => {
            let client = Client::new(ClientConfig::new(targets.to_vec()))?;
            client.partition_count(table).await.with_context(|| format!("table {table}"))?;
            Ok((0..n).map(|_| Conn::Tern(client.table(table))).collect())
        }
        BackendKind::Redis => {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                out.push(Conn::Redis(RedisConn::connect(&targets[0]).await?));
            }
            Ok(out)
        }
        BackendKind::Etcd => {
            let mut channels = Vec::new();
            for t in targets {
                let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{t}"))
                    .map_err(|e| anyhow!("etcd endpoint {t:?}: {e}"))?
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true);
                channels.push(endpoint.connect().await.with_context(|| format!("connecting to etcd at {t}"))?);
            }
            Ok((0..n).map(|i| Conn::Etcd(EtcdKv::new(channels[i % channels.len()].clone()))).collect())
        }
    }
}

/// The first key after every key starting with `prefix` (etcd range ends).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Conn {
    /// Reads one record (linearizable on every backend that offers it); true if it exists.
    pub async fn read(&mut self, key: &[u8]) -> anyhow::Result<bool> {
        match self {
            Conn::Tern(t) => Ok(t.get(key, b"").await?.is_some()),
            Conn::Redis(r) => Ok(!matches!(r.call(&[b"GET", key]).await?, Resp::Nil)),
            Conn::Etcd(kv) => {
                let req = etcdserverpb::RangeRequest { key: Bytes::copy_from_slice(key), ..Default::default() };
                Ok(!kv.range(req).await?.into_inner().kvs.is_empty())
            }
        }
    }

    pub async fn write(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        match self {
            Conn::Tern(t) => Ok(t.set(key, b"", value, 0).await?),
            Conn::Redis(r) => r.call(&[b"SET", key, value]).await.map(|_| ()),
            Conn::Etcd(kv) => {
                let req = etcdserverpb::PutRequest { key: Bytes::copy_from_slice(key), value: Bytes::copy_from_slice(value), ..Default::default() };
                kv.put(req).await?;
                Ok(())
            }
        }
    }

    /// Reads up to `len` records in key order from `key` on (Tern: within the key's partition, in
    /// storage order, which is how a hash-partitioned store scans). Returns how many it read.
    pub async fn scan(&mut self, key: &[u8], len: u32) -> anyhow::Result<usize> {
        match self {
            Conn::Tern(t) => Ok(t.scan_partition_from(key, len, false).await?.len()),
            Conn::Redis(_) => bail!("redis strings have no range scan: workload E runs on tern and etcd"),
            Conn::Etcd(kv) => {
                let req = etcdserverpb::RangeRequest {
                    key: Bytes::copy_from_slice(key),
                    range_end: prefix_end(b"user").into(),
                    limit: len as i64,
                    ..Default::default()
                };
                Ok(kv.range(req).await?.into_inner().kvs.len())
            }
        }
    }
}

pub enum Resp {
    Ok,
    Nil,
    Int(i64),
    Bulk(Vec<u8>),
}

/// A minimal RESP2 client connection: one request at a time, replies of the types GET/SET return.
pub struct RedisConn {
    stream: BufReader<TcpStream>,
    out: Vec<u8>,
}

impl RedisConn {
    pub async fn connect(address: &str) -> anyhow::Result<RedisConn> {
        let stream = TcpStream::connect(address).await.with_context(|| format!("connecting to redis at {address}"))?;
        stream.set_nodelay(true)?;
        Ok(RedisConn { stream: BufReader::new(stream), out: Vec::with_capacity(256) })
    }

    pub async fn call(&mut self, args: &[&[u8]]) -> anyhow::Result<Resp> {
        use std::io::Write;
        self.out.clear();
        write!(self.out, "*{}\r\n", args.len())?;
        for a in args {
            write!(self.out, "${}\r\n", a.len())?;
            self.out.extend_from_slice(a);
            self.out.extend_from_slice(b"\r\n");
        }
        self.stream.get_mut().write_all(&self.out).await?;
        let mut line = Vec::new();
        self.stream.read_until(b'\n', &mut line).await?;
        let text = std::str::from_utf8(line.get(1..line.len().saturating_sub(2)).unwrap_or_default()).unwrap_or("");
        match line.first() {
            Some(b'+') => Ok(Resp::Ok),
            Some(b'-') => bail!("redis error: {text}"),
            Some(b':') => Ok(Resp::Int(text.parse()?)),
            Some(b'$') if text == "-1" => Ok(Resp::Nil),
            Some(b'_') => Ok(Resp::Nil),
            Some(b'$') => {
                let len: usize = text.parse()?;
                let mut value = vec![0; len + 2];
                self.stream.read_exact(&mut value).await?;
                value.truncate(len);
                Ok(Resp::Bulk(value))
            }
            None => bail!("redis closed the connection"),
            Some(other) => bail!("unexpected redis reply type {:?}", *other as char),
        }
    }
}
