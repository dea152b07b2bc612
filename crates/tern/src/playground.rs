//! A whole cluster in one process: one meta server and N replica servers on 127.0.0.1, data under one
//! directory, and a default table created on first start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tern_client::{Client, ClientConfig};
use tern_core::TernError;
use tern_meta::{MetaConfig, MetaNode};
use tern_proto::CreateTableRequest;
use tern_proxy::{Proxy, ProxyConfig};
use tern_server::{ServerConfig, ServerNode};

#[derive(Clone, Debug)]
pub struct PlaygroundConfig {
    pub data_dir: PathBuf,
    pub meta_port: u16,
    /// Port of the first server; the others follow it. 0 = random ports.
    pub first_server_port: u16,
    pub servers: usize,
    pub default_table: String,
    pub default_partitions: u32,
    pub default_replicas: u32,
    /// Meta nodes: 1, 3 or 5, on meta_port and the ports after it.
    pub meta_replicas: usize,
    /// Port of the Redis endpoint serving the default table (None = no endpoint, 0 = random port).
    pub redis_port: Option<u16>,
}

impl Default for PlaygroundConfig {
    fn default() -> Self {
        PlaygroundConfig {
            data_dir: PathBuf::from("./tern-data"),
            meta_port: 34601,
            first_server_port: 34801,
            servers: 3,
            default_table: "demo".into(),
            default_partitions: 8,
            default_replicas: 3,
            meta_replicas: 1,
            redis_port: Some(6379),
        }
    }
}

pub struct Playground {
    pub metas: Vec<MetaNode>,
    pub servers: Vec<ServerNode>,
    pub proxy: Option<Proxy>,
    /// Each meta node's runner of periodic backups (only the leader's acts).
    backup_policies: Vec<tokio::task::JoinHandle<()>>,
}

impl Playground {
    pub async fn start(cfg: PlaygroundConfig) -> Result<Playground, TernError> {
        if cfg.servers == 0 || cfg.servers > 16 {
            return Err(TernError::invalid(format!("--servers must be between 1 and 16, not {}", cfg.servers)));
        }
        if ![1, 3, 5].contains(&cfg.meta_replicas) {
            return Err(TernError::invalid(format!("--meta-replicas must be 1, 3 or 5, not {}", cfg.meta_replicas)));
        }
        if cfg.meta_port == 0 && cfg.meta_replicas > 1 {
            return Err(TernError::invalid("several meta nodes need a fixed --meta-port"));
        }
        let localhost = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let meta_peers: Vec<(u64, String)> =
            (0..cfg.meta_replicas).map(|i| (i as u64 + 1, localhost(cfg.meta_port + i as u16).to_string())).collect();
        let mut metas = Vec::new();
        for (id, _) in &meta_peers {
            let dir = if cfg.meta_replicas == 1 { cfg.data_dir.join("meta") } else { cfg.data_dir.join(format!("meta{id}")) };
            let mut mc = MetaConfig::new(dir, localhost(cfg.meta_port + *id as u16 - 1));
            mc.id = *id;
            if cfg.meta_replicas > 1 {
                mc.peers = meta_peers.clone();
            }
            metas.push(MetaNode::start(mc).await?);
        }
        let meta_addresses: Vec<String> = metas.iter().map(|m| m.address.clone()).collect();
        let mut servers = Vec::new();
        for i in 0..cfg.servers {
            let port = if cfg.first_server_port == 0 { 0 } else { cfg.first_server_port + i as u16 };
            let sc = ServerConfig::new(cfg.data_dir.join(format!("server{}", i + 1)), localhost(port), meta_addresses.clone());
            servers.push(ServerNode::start(sc).await?);
        }
        let backup_policies = metas
            .iter()
            .map(|m| Ok(tokio::spawn(tern_client::backup::run_policies(Client::new(ClientConfig::new(meta_addresses.clone()))?, m.leadership()))))
            .collect::<Result<_, TernError>>()?;
        let mut playground = Playground { metas, servers, proxy: None, backup_policies };
        playground.ensure_table(&cfg).await?;
        if let Some(port) = cfg.redis_port {
            let client = Client::new(ClientConfig::new(meta_addresses))?;
            playground.proxy = Some(Proxy::start(client, ProxyConfig::new(localhost(port), &cfg.default_table)).await?);
        }
        Ok(playground)
    }

    async fn ensure_table(&self, cfg: &PlaygroundConfig) -> Result<(), TernError> {
        let client = Client::new(ClientConfig::new(self.metas.iter().map(|m| m.address.clone()).collect()))?;
        // Servers become "live" at their first heartbeat; wait for enough of them.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let name = cfg.default_table.clone();
            let (partition_count, replica_count) = (cfg.default_partitions, cfg.default_replicas);
            let r = client
                .meta_call(|mut m| {
                    let name = name.clone();
                    async move {
                        m.create_table(CreateTableRequest { name, partition_count, replica_count, restoring: false }).await.map(|r| r.into_inner())
                    }
                })
                .await?;
            match tern_proto::check(&r.error) {
                Ok(()) | Err(TernError::TableExists(_)) => break,
                Err(TernError::NotEnoughNodes(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
        // Wait until every partition answers, so the first command a user types works.
        let table = client.table(&cfg.default_table);
        let count = client.partition_count(&cfg.default_table).await?;
        for p in 0..count {
            let mut probe = 0u64;
            let key = loop {
                let k = format!("__probe{probe}");
                if tern_core::codec::partition_of(k.as_bytes(), count) == p {
                    break k;
                }
                probe += 1;
            };
            table.exists(key.as_bytes(), b"").await?;
        }
        Ok(())
    }

    pub async fn shutdown(self) {
        for r in &self.backup_policies {
            r.abort();
        }
        if let Some(p) = self.proxy {
            p.shutdown().await;
        }
        let stops: Vec<_> = self.servers.into_iter().map(|s| tokio::spawn(s.shutdown())).collect();
        for s in stops {
            let _ = s.await;
        }
        for m in self.metas {
            m.shutdown().await;
        }
    }
}
