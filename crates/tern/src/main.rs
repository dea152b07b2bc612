use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tern::{bench, playground, shell};
use tern_client::{Client, ClientConfig};

/// mimalloc: the system allocator took a sixth of a busy server's CPU (many small, short-lived
/// buffers per request in gRPC, raft and RocksDB paths).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The playground's meta addresses (with --meta-replicas up to 3); unused ones are skipped quickly.
const DEFAULT_META: &str = "127.0.0.1:34601,127.0.0.1:34602,127.0.0.1:34603";

#[derive(Parser)]
#[command(name = "tern", version, about = "Tern: a strongly consistent, replicated, partitioned key-value store")]
struct Cli {
    /// How the processes log (to stderr): `text` (coloured only on a terminal) or `json` (one
    /// object per line).
    #[arg(long, global = true, value_enum, default_value = "text", env = "TERN_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// A whole cluster in one process: 1 meta + N replica servers on 127.0.0.1.
    Playground {
        #[arg(long, default_value = "./tern-data")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 34601)]
        meta_port: u16,
        /// Port of the first replica server; the others use the following ports.
        #[arg(long, default_value_t = 34801)]
        server_port: u16,
        #[arg(long, default_value_t = 3)]
        servers: usize,
        /// Meta nodes (1, 3 or 5) on --meta-port and the ports after it.
        #[arg(long, default_value_t = 1)]
        meta_replicas: usize,
        /// Port of the Redis endpoint for table demo (0 = none).
        #[arg(long, default_value_t = 6379)]
        redis_port: u16,
    },
    /// A Redis endpoint (RESP2/RESP3) for one table; stateless, start as many as you need.
    Proxy {
        #[arg(long, default_value = "127.0.0.1:6379")]
        listen: SocketAddr,
        #[arg(long, default_value = DEFAULT_META, value_delimiter = ',')]
        meta: Vec<String>,
        #[arg(long, default_value = "demo")]
        table: String,
        /// Require AUTH with this password (also read from TERN_PROXY_PASSWORD).
        #[arg(long, env = "TERN_PROXY_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        #[arg(long, default_value_t = 10_000)]
        max_clients: usize,
        /// Threads serving connections (each serves its connections from start to end, with its
        /// own connections to the servers).
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// A meta node (one of 1, 3 or 5: they replicate the catalog with raft).
    Meta {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:34601")]
        listen: SocketAddr,
        /// This node's id among --peers.
        #[arg(long, default_value_t = 1)]
        id: u64,
        /// Every meta node as ID=ADDRESS, comma separated (this one included). Empty: a single meta.
        #[arg(long, value_delimiter = ',')]
        peers: Vec<String>,
        /// Seconds without a heartbeat before a server is reported down.
        #[arg(long, default_value_t = 10)]
        node_grace_seconds: u64,
        /// The cluster's raft tick in milliseconds (1-10000; default 100); every server adopts it.
        /// Recorded at the first start: later starts adopt it and refuse another value.
        #[arg(long)]
        raft_tick_ms: Option<u64>,
        /// Ticks without a leader before a follower campaigns (5-100; default 5); the read lease
        /// stays inside it. Recorded at the first start like --raft-tick-ms.
        #[arg(long)]
        election_ticks: Option<u32>,
    },
    /// A replica server.
    Server {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:34801")]
        listen: SocketAddr,
        /// Address peers and clients use to reach this server (default: the listen address).
        #[arg(long)]
        advertise: Option<String>,
        /// Meta server addresses, comma separated.
        #[arg(long, default_value = DEFAULT_META, value_delimiter = ',')]
        meta: Vec<String>,
        /// Raft tick in milliseconds the server expects; by default it adopts its cluster's (set on
        /// meta). A server whose value differs from the cluster's is refused.
        #[arg(long)]
        raft_tick_ms: Option<u64>,
        /// Compact the raft log once this many applied entries sit in it.
        #[arg(long, default_value_t = 10_000)]
        log_gc_threshold: u64,
        /// A leader keeps log entries a lagging follower still needs unless it lags by more than this
        /// many entries (then the follower gets a snapshot).
        #[arg(long, default_value_t = 50_000)]
        log_gc_lag_max: u64,
        /// Snapshot transfer rate limit in MiB/s (0 = unlimited).
        #[arg(long, default_value_t = 100)]
        snapshot_rate_mib: u64,
        /// Rate of one partition's backup or restore when the request names none, and of a
        /// duplication's full copy, in MiB/s (1-100000).
        #[arg(long, default_value_t = 16)]
        backup_rate_mib: u64,
        #[arg(long, default_value_t = 128)]
        block_cache_mib: usize,
        /// Sync the raft log on a thread of its own, overlapping with the next round (off by
        /// default: slower on 2 cores, see BENCHMARKS.md).
        #[arg(long)]
        log_writer_thread: bool,
        /// Raft ticks a partition leader waits with nothing to do before its group hibernates
        /// (stops ticking and heartbeating until a request or a peer wakes it); 0 keeps every
        /// group ticking (0-1000000).
        #[arg(long, default_value_t = tern_raft::replica::HIBERNATE_AFTER_TICKS_DEFAULT)]
        hibernate_after_ticks: u64,
        /// Replicas' engines (RocksDB instances) kept open; past it the server closes those unused
        /// longest (files and memory released) and opens each again when it is next needed, from
        /// start-up on (0-1000000). Each open engine holds about 8 files and 0.25 MiB.
        #[arg(long, alias = "idle-engines-open-max", default_value_t = tern_raft::store::ENGINES_OPEN_DEFAULT)]
        engines_open_max: usize,
        /// Failure domain (rack, room, region): replicas of a partition go to distinct zones.
        #[arg(long, default_value = "")]
        zone: String,
        /// Leader priority: partitions prefer leaders on the servers with the highest value they hold
        /// a replica on, and move leadership back there when they are healthy.
        #[arg(long, default_value_t = 0)]
        leader_priority: i32,
    },
    /// Interactive or one-shot commands against a cluster.
    Shell {
        #[arg(long, default_value = DEFAULT_META, value_delimiter = ',')]
        meta: Vec<String>,
        #[arg(long, default_value = "demo")]
        table: String,
        /// Commands separated by ';'. Exit status is non-zero if any failed.
        #[arg(short = 'e', long = "execute")]
        execute: Option<String>,
    },
    /// YCSB-style load generator: load then run phases, HDR latency percentiles per operation.
    Bench {
        /// tern (native client), redis (RESP: redis-server or a tern proxy) or etcd (v3 gRPC).
        #[arg(long, default_value = "tern")]
        backend: bench::backend::BackendKind,
        /// Addresses, comma separated: tern meta nodes, one redis address, or etcd endpoints
        /// (defaults: the playground's meta nodes, 127.0.0.1:6379, 127.0.0.1:2379).
        #[arg(long, value_delimiter = ',')]
        target: Vec<String>,
        /// Tern table (tern backend).
        #[arg(long, default_value = "demo")]
        table: String,
        /// YCSB workload a, b, c, d, e or f; or update (100% updates) or insert (100% inserts).
        #[arg(long, default_value = "a")]
        workload: bench::Workload,
        /// uniform, zipfian or latest (default: the workload's own).
        #[arg(long)]
        distribution: Option<bench::keys::Distribution>,
        /// Records written by the load phase and chosen from by the run phase.
        #[arg(long, default_value_t = 100_000)]
        records: u64,
        #[arg(long, default_value_t = 100)]
        value_size: usize,
        /// Longest scan of workload E (lengths are uniform in 1..=N).
        #[arg(long, default_value_t = 100)]
        scan_max: u32,
        /// Concurrent requests (workers, each with its own connection where the backend has them).
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Open loop at this many operations per second in total (latency counts from when each
        /// request was due). Without it: closed loop, as fast as answers come.
        #[arg(long)]
        rate: Option<f64>,
        /// Seconds of run phase before measuring starts.
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        /// Measured seconds of run phase.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Skip the load phase (records are already there).
        #[arg(long)]
        no_load: bool,
        /// Write the results as JSON to this file ("-" = stdout, instead of the table).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write a latency-percentile plot (PNG) of the run phase to this file.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Keep latency per second of the measured run and write it to this file: a PNG plot of
        /// p50/p99/p99.9/max over time if the name ends in .png, CSV otherwise. The table then
        /// names the worst second, and --json includes every second. May be given more than once.
        #[arg(long)]
        timeline: Vec<PathBuf>,
        /// Progress bar on stderr: auto (when stderr is a terminal), always or never.
        #[arg(long, default_value = "auto")]
        progress: String,
    },
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => logs.json().init(),
        // Colour codes only where a person reads them: not in a file or a pipe.
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// Ctrl-C and SIGTERM, registered before anything starts so that an early signal still stops cleanly.
struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals { interrupt: signal(SignalKind::interrupt())?, terminate: signal(SignalKind::terminate())? })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Playground { data_dir, meta_port, server_port, servers, meta_replicas, redis_port } => {
            init_logging(cli.log_format);
            let signals = StopSignals::install()?;
            let redis_port = (redis_port != 0).then_some(redis_port);
            let cfg = playground::PlaygroundConfig {
                data_dir: data_dir.clone(),
                meta_port,
                first_server_port: server_port,
                servers,
                meta_replicas,
                redis_port,
                ..Default::default()
            };
            let pg = playground::Playground::start(cfg).await.context("starting the playground")?;
            println!("Tern playground is running (data in {})", data_dir.display());
            for m in &pg.metas {
                println!("  meta:    {}", m.address);
            }
            for s in &pg.servers {
                println!("  server:  {} (node {})", s.address, s.node_id);
            }
            if let Some(p) = &pg.proxy {
                println!("  redis:   {} (table demo)", p.address);
            }
            println!("  table:   demo (8 partitions, 3 replicas)");
            println!("Try: tern shell -e 'set user:1 name Ada; get user:1 name'   or: redis-cli set k v   Ctrl-C stops.");
            signals.wait().await;
            println!("stopping...");
            pg.shutdown().await;
        }
        Command::Meta { data_dir, listen, id, peers, node_grace_seconds, raft_tick_ms, election_ticks } => {
            init_logging(cli.log_format);
            let signals = StopSignals::install()?;
            if node_grace_seconds == 0 {
                bail!("--node-grace-seconds must be positive");
            }
            let mut cfg = tern_meta::MetaConfig::new(data_dir, listen);
            cfg.node_grace = Duration::from_secs(node_grace_seconds);
            cfg.timing_given = raft_tick_ms.is_some() || election_ticks.is_some();
            if let Some(ms) = raft_tick_ms {
                cfg.raft_tick = Duration::from_millis(ms);
            }
            if let Some(ticks) = election_ticks {
                cfg.election_ticks = ticks;
            }
            cfg.id = id;
            for p in peers {
                let Some((peer_id, address)) = p.split_once('=') else { bail!("--peers wants ID=ADDRESS, not {p:?}") };
                let peer_id: u64 = peer_id.parse().with_context(|| format!("meta peer id in {p:?}"))?;
                cfg.peers.push((peer_id, address.to_string()));
            }
            let meta = tern_meta::MetaNode::start(cfg).await?;
            println!("meta listening on {}", meta.address);
            // Periodic backups, run by whichever meta node leads (through its own address: the
            // client follows the leader).
            let policies = tokio::spawn(tern_client::backup::run_policies(
                tern_client::Client::new(tern_client::ClientConfig::new(vec![meta.address.clone()]))?,
                meta.leadership(),
            ));
            tokio::select! {
                _ = signals.wait() => {
                    policies.abort();
                    meta.shutdown().await
                }
                _ = meta.failed() => {
                    policies.abort();
                    meta.shutdown().await;
                    bail!("the meta node's store stopped (see the log above); exiting so it can be restarted");
                }
            }
        }
        Command::Server {
            data_dir,
            listen,
            advertise,
            meta,
            raft_tick_ms,
            log_gc_threshold,
            log_gc_lag_max,
            snapshot_rate_mib,
            backup_rate_mib,
            block_cache_mib,
            log_writer_thread,
            hibernate_after_ticks,
            engines_open_max,
            zone,
            leader_priority,
        } => {
            init_logging(cli.log_format);
            let signals = StopSignals::install()?;
            if raft_tick_ms.is_some_and(|t| t == 0 || t > 10_000) {
                bail!("--raft-tick-ms must be between 1 and 10000");
            }
            if log_gc_threshold == 0 {
                bail!("--log-gc-threshold must be positive");
            }
            if hibernate_after_ticks > 1_000_000 {
                bail!("--hibernate-after-ticks must be between 0 (never) and 1000000");
            }
            let mut cfg = tern_server::ServerConfig::new(data_dir, listen, meta);
            cfg.store.replica.hibernate_after_ticks = hibernate_after_ticks;
            if engines_open_max > 1_000_000 {
                bail!("--engines-open-max must be between 0 and 1000000");
            }
            cfg.store.engines_open_max = engines_open_max;
            cfg.advertise = advertise;
            cfg.raft_tick = raft_tick_ms.map(Duration::from_millis);
            cfg.store.replica.log_gc_count_threshold = log_gc_threshold;
            cfg.store.replica.log_gc_lag_max = log_gc_lag_max;
            cfg.snapshot_bytes_per_second = snapshot_rate_mib * 1024 * 1024;
            cfg.backup_bytes_per_second = backup_rate_mib.saturating_mul(1024 * 1024);
            cfg.block_cache_bytes = block_cache_mib * 1024 * 1024;
            cfg.store.log_writer_thread = log_writer_thread;
            if zone.len() > 128 {
                bail!("--zone is at most 128 characters");
            }
            cfg.zone = zone;
            cfg.leader_priority = leader_priority;
            let server = tern_server::ServerNode::start(cfg).await?;
            println!("server {} listening on {}", server.node_id, server.address);
            tokio::select! {
                _ = signals.wait() => server.shutdown().await,
                _ = server.failed() => {
                    server.shutdown().await;
                    bail!("the server's store stopped (see the log above); exiting so it can be restarted");
                }
            }
        }
        Command::Proxy { listen, meta, table, password, max_clients, threads } => {
            init_logging(cli.log_format);
            let signals = StopSignals::install()?;
            let client = Client::new(ClientConfig::new(meta))?;
            let mut cfg = tern_proxy::ProxyConfig::new(listen, &table);
            cfg.password = password;
            cfg.max_clients = max_clients;
            cfg.threads = threads;
            let proxy = tern_proxy::Proxy::start(client, cfg).await?;
            println!("redis endpoint for table {table} listening on {}", proxy.address);
            signals.wait().await;
            proxy.shutdown().await;
        }
        Command::Shell { meta, table, execute } => {
            let client = Client::new(ClientConfig::new(meta.clone()))?;
            let mut sh = shell::Shell { client, table, meta };
            match execute {
                Some(script) => {
                    if !shell::run_script(&mut sh, &script).await {
                        std::process::exit(1);
                    }
                }
                None => interactive(sh).await?,
            }
        }
        Command::Bench {
            backend,
            target,
            table,
            workload,
            distribution,
            records,
            value_size,
            scan_max,
            concurrency,
            rate,
            warmup,
            duration,
            no_load,
            json,
            plot,
            timeline,
            progress,
        } => {
            use bench::backend::BackendKind;
            let targets = if !target.is_empty() {
                target
            } else {
                match backend {
                    BackendKind::Tern => DEFAULT_META.split(',').map(str::to_string).collect(),
                    BackendKind::Redis => vec!["127.0.0.1:6379".to_string()],
                    BackendKind::Etcd => vec!["127.0.0.1:2379".to_string()],
                }
            };
            let progress = match progress.as_str() {
                "auto" => bench::progress_default(),
                "always" => true,
                "never" => false,
                other => bail!("--progress must be auto, always or never, not {other:?}"),
            };
            let cfg = bench::BenchConfig {
                backend,
                targets,
                table,
                workload,
                distribution,
                records,
                value_bytes: value_size,
                scan_max,
                concurrency,
                rate,
                warmup: Duration::from_secs(warmup),
                duration: Duration::from_secs(duration),
                load: !no_load,
                progress,
                timeline: !timeline.is_empty(),
            };
            cfg.validate()?;
            let to_stdout = json.as_deref() == Some(std::path::Path::new("-"));
            if !to_stdout {
                println!(
                    "bench: {backend:?} {:?}, workload {workload:?}, {records} records of {value_size} B, concurrency {concurrency}, {}",
                    cfg.targets,
                    rate.map_or("closed loop".to_string(), |r| format!("open loop at {r} ops/s"))
                );
            }
            let reports = bench::run(&cfg).await?;
            if let Some(path) = &json {
                let doc = serde_json::json!({
                    "backend": format!("{backend:?}").to_lowercase(),
                    "targets": cfg.targets,
                    "workload": format!("{workload:?}").to_lowercase(),
                    "distribution": format!("{:?}", distribution).to_lowercase(),
                    "records": records,
                    "value_size": value_size,
                    "concurrency": concurrency,
                    "target_rate": rate,
                    "warmup_s": warmup,
                    "duration_s": duration,
                    "phases": reports.iter().map(|r| r.json()).collect::<Vec<_>>(),
                });
                let text = serde_json::to_string_pretty(&doc)?;
                if to_stdout {
                    println!("{text}");
                } else {
                    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
                }
            }
            if !to_stdout {
                for r in &reports {
                    print!("{}", r.render());
                }
            }
            if let Some(path) = &plot {
                let run = reports.last().expect("a run phase");
                bench::write_percentile_plot(path, &[(format!("{backend:?}"), run)])?;
            }
            for path in &timeline {
                let run = reports.last().expect("a run phase");
                if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
                    bench::write_timeline_plot(path, run)?;
                } else {
                    std::fs::write(path, run.timeline_csv()).with_context(|| format!("writing {}", path.display()))?;
                }
            }
            let errors: u64 = reports.iter().flat_map(|r| r.ops.values()).map(|s| s.errors).sum();
            if errors > 0 {
                eprintln!("{errors} operations failed");
                std::process::exit(2);
            }
        }
    }
    Ok(())
}

async fn interactive(mut sh: shell::Shell) -> anyhow::Result<()> {
    let mut editor = rustyline::DefaultEditor::new()?;
    let history = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".tern_history"));
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    println!("Tern shell. Type help for commands, quit to leave.");
    loop {
        let line = match editor.readline(&format!("{}> ", sh.table)) {
            Ok(l) => l,
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(rustyline::error::ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let _ = editor.add_history_entry(line.as_str());
        match shell::parse(&line) {
            Ok(None) => {}
            Ok(Some(shell::Command::Quit)) => break,
            Ok(Some(c)) => match sh.run(c).await {
                Ok(out) => println!("{out}"),
                Err(e) => println!("{e}"),
            },
            Err(e) => println!("error: {e}"),
        }
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    Ok(())
}
