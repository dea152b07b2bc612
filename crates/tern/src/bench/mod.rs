//! `tern bench`: a YCSB-style load generator. Core workloads A-F (plus pure update and insert
//! mixes) over uniform, zipfian or latest key choice; a load phase, then a run phase with warm-up,
//! closed loop (each worker waits for its answer) or open loop at a target rate (latency counted from
//! when each request was due, so a stalled server cannot hide its queue: no coordinated omission).
//! Latencies go into HDR histograms per operation type; results print as a table and optionally as
//! JSON and a PNG percentile plot. Backends: Tern's native client, RESP (redis-server or a Tern
//! proxy), etcd v3.

pub mod backend;
pub mod keys;
mod plot;

use anyhow::bail;
use backend::{BackendKind, Conn};
use hdrhistogram::Histogram;
use keys::{key, Distribution, KeyChooser};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tern_core::time::{RandomSource, SeededRandom};
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// 50% read, 50% update (zipfian): a session store.
    A,
    /// 95% read, 5% update (zipfian): photo tagging.
    B,
    /// 100% read (zipfian): a profile cache.
    C,
    /// 95% read, 5% insert (latest): status updates.
    D,
    /// 95% short scans, 5% insert (zipfian): threaded conversations.
    E,
    /// 50% read, 50% read-modify-write (zipfian): a user database.
    F,
    /// 100% update (uniform): write throughput.
    Update,
    /// 100% insert of new records.
    Insert,
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "a" => Workload::A,
            "b" => Workload::B,
            "c" | "read" => Workload::C,
            "d" => Workload::D,
            "e" => Workload::E,
            "f" => Workload::F,
            "update" | "write" => Workload::Update,
            "insert" => Workload::Insert,
            other => return Err(format!("unknown workload {other:?} (want a, b, c, d, e, f, update or insert)")),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    Read,
    Update,
    Insert,
    Scan,
    ReadModifyWrite,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "READ",
            Op::Update => "UPDATE",
            Op::Insert => "INSERT",
            Op::Scan => "SCAN",
            Op::ReadModifyWrite => "READ-MODIFY-WRITE",
        }
    }
}

impl Workload {
    /// Operation proportions in percent: (op, share).
    fn mix(self) -> &'static [(Op, u64)] {
        match self {
            Workload::A => &[(Op::Read, 50), (Op::Update, 50)],
            Workload::B => &[(Op::Read, 95), (Op::Update, 5)],
            Workload::C => &[(Op::Read, 100)],
            Workload::D => &[(Op::Read, 95), (Op::Insert, 5)],
            Workload::E => &[(Op::Scan, 95), (Op::Insert, 5)],
            Workload::F => &[(Op::Read, 50), (Op::ReadModifyWrite, 50)],
            Workload::Update => &[(Op::Update, 100)],
            Workload::Insert => &[(Op::Insert, 100)],
        }
    }

    fn default_distribution(self) -> Distribution {
        match self {
            Workload::D => Distribution::Latest,
            Workload::Update | Workload::Insert => Distribution::Uniform,
            _ => Distribution::Zipfian,
        }
    }

    fn choose(self, rng: &mut SeededRandom) -> Op {
        let mut roll = rng.range(0, 100);
        for &(op, share) in self.mix() {
            if roll < share {
                return op;
            }
            roll -= share;
        }
        self.mix()[0].0
    }
}

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub backend: BackendKind,
    /// Tern meta addresses, one RESP address, or etcd endpoints.
    pub targets: Vec<String>,
    pub table: String,
    pub workload: Workload,
    pub distribution: Option<Distribution>,
    pub records: u64,
    pub value_bytes: usize,
    /// Workload E scans 1..=scan_max records (uniform).
    pub scan_max: u32,
    pub concurrency: usize,
    /// Open loop at this many operations per second (all workers together); None = closed loop.
    pub rate: Option<f64>,
    pub warmup: Duration,
    pub duration: Duration,
    /// Run the load phase (insert every record) before the run phase.
    pub load: bool,
    pub progress: bool,
    /// Keep latency per second of the run phase (`PhaseReport::timeline`).
    pub timeline: bool,
}

/// Longest run phase a timeline is kept for (a window costs ~20 KiB).
pub const TIMELINE_SECONDS_MAX: u64 = 3600;

impl BenchConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.concurrency == 0 || self.concurrency > 10_000 {
            bail!("--concurrency must be between 1 and 10000, not {}", self.concurrency);
        }
        if self.records == 0 || self.records > 1_000_000_000 {
            bail!("--records must be between 1 and 1000000000, not {}", self.records);
        }
        if self.value_bytes == 0 || self.value_bytes > tern_core::limits::VALUE_BYTES_MAX {
            bail!("--value-size must be between 1 and {} bytes, not {}", tern_core::limits::VALUE_BYTES_MAX, self.value_bytes);
        }
        if self.scan_max == 0 || self.scan_max > tern_core::limits::READ_RECORDS_MAX {
            bail!("--scan-max must be between 1 and {}", tern_core::limits::READ_RECORDS_MAX);
        }
        if let Some(r) = self.rate {
            if !(r.is_finite() && r > 0.0 && r <= 10_000_000.0) {
                bail!("--rate must be a positive number of operations per second up to 10000000, not {r}");
            }
        }
        if self.duration.is_zero() || self.duration > Duration::from_secs(86_400) {
            bail!("--duration must be between 1 second and a day");
        }
        if self.warmup > Duration::from_secs(3600) {
            bail!("--warmup is at most an hour");
        }
        if self.timeline && self.duration > Duration::from_secs(TIMELINE_SECONDS_MAX) {
            bail!("--timeline keeps one window per second: --duration is at most {TIMELINE_SECONDS_MAX} s with it");
        }
        if self.workload == Workload::E && self.backend == BackendKind::Redis {
            bail!("workload E needs range scans, which redis strings do not have (run it on tern or etcd)");
        }
        if self.targets.is_empty() {
            bail!("give at least one target address");
        }
        Ok(())
    }
}

pub struct OpStats {
    pub histogram: Histogram<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl OpStats {
    fn new() -> OpStats {
        OpStats { histogram: Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds"), errors: 0, first_error: None }
    }

    fn merge(&mut self, other: OpStats) {
        let _ = self.histogram.add(&other.histogram);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn record(&mut self, micros: u64, result: anyhow::Result<()>) {
        match result {
            Ok(()) => {
                let _ = self.histogram.record(micros.clamp(1, 120_000_000));
            }
            Err(e) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(format!("{e:#}"));
                }
            }
        }
    }
}

/// One phase's results.
pub struct PhaseReport {
    pub phase: &'static str,
    pub elapsed: Duration,
    pub ops: BTreeMap<Op, OpStats>,
    /// Every operation of each measured second, by when it was due (empty unless asked for).
    pub timeline: Vec<Window>,
}

/// One second of a run: its operations' latencies (all types together) and failures.
pub struct Window {
    pub histogram: Histogram<u64>,
    pub errors: u64,
}

impl Window {
    fn new() -> Window {
        // Two significant digits: a tenth of the per-operation histograms' size.
        Window { histogram: Histogram::new_with_bounds(1, 120_000_000, 2).expect("histogram bounds"), errors: 0 }
    }
}

const QUANTILES: [(&str, f64); 4] = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)];

impl PhaseReport {
    pub fn throughput(&self) -> f64 {
        let n: u64 = self.ops.values().map(|s| s.histogram.len()).sum();
        n as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The second with the highest p99 (index, window), if a timeline was kept.
    pub fn worst_window(&self) -> Option<(usize, &Window)> {
        self.timeline.iter().enumerate().filter(|(_, w)| !w.histogram.is_empty()).max_by_key(|(_, w)| w.histogram.value_at_quantile(0.99))
    }

    /// The timeline as CSV: one line per second.
    pub fn timeline_csv(&self) -> String {
        let mut out = String::from("second,ops,errors,p50_ms,p99_ms,p99.9_ms,max_ms\n");
        let ms = |v: u64| v as f64 / 1000.0;
        for (i, w) in self.timeline.iter().enumerate() {
            let h = &w.histogram;
            out.push_str(&format!(
                "{i},{},{},{:.3},{:.3},{:.3},{:.3}\n",
                h.len(),
                w.errors,
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99)),
                ms(h.value_at_quantile(0.999)),
                ms(h.max())
            ));
        }
        out
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "[{}] {:.1} s, {:.0} ops/s\n{:<18} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}\n",
            self.phase,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            "op",
            "count",
            "ops/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "errors"
        );
        for (op, s) in &self.ops {
            let h = &s.histogram;
            let ms = |v: u64| v as f64 / 1000.0;
            out.push_str(&format!(
                "{:<18} {:>10} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7}\n",
                op.name(),
                h.len(),
                h.len() as f64 / self.elapsed.as_secs_f64().max(1e-9),
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.9)),
                ms(h.value_at_quantile(0.99)),
                ms(h.value_at_quantile(0.999)),
                ms(h.max()),
                s.errors
            ));
            if let Some(e) = &s.first_error {
                out.push_str(&format!("  first {} error: {e}\n", op.name()));
            }
        }
        if let Some((i, w)) = self.worst_window() {
            let h = &w.histogram;
            out.push_str(&format!(
                "worst second: {i} (p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms, {} ops, {} errors)\n",
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
                h.value_at_quantile(0.999) as f64 / 1000.0,
                h.max() as f64 / 1000.0,
                h.len(),
                w.errors
            ));
        }
        out
    }

    pub fn json(&self) -> serde_json::Value {
        let ops: serde_json::Map<String, serde_json::Value> = self
            .ops
            .iter()
            .map(|(op, s)| {
                let h = &s.histogram;
                let mut v = serde_json::json!({
                    "count": h.len(),
                    "ops_per_sec": h.len() as f64 / self.elapsed.as_secs_f64().max(1e-9),
                    "errors": s.errors,
                    "mean_us": h.mean(),
                    "max_us": h.max(),
                });
                for (name, q) in QUANTILES {
                    v[format!("{name}_us")] = h.value_at_quantile(q).into();
                }
                (op.name().to_string(), v)
            })
            .collect();
        let mut doc = serde_json::json!({ "phase": self.phase, "seconds": self.elapsed.as_secs_f64(), "ops_per_sec": self.throughput(), "ops": ops });
        if !self.timeline.is_empty() {
            let window = |h: &Histogram<u64>, errors: u64| {
                serde_json::json!({ "ops": h.len(), "errors": errors, "p50_us": h.value_at_quantile(0.5), "p99_us": h.value_at_quantile(0.99),
                    "p99.9_us": h.value_at_quantile(0.999), "max_us": h.max() })
            };
            doc["timeline"] = self.timeline.iter().map(|w| window(&w.histogram, w.errors)).collect();
            if let Some((i, w)) = self.worst_window() {
                doc["worst_second"] = serde_json::json!({ "second": i, "window": window(&w.histogram, w.errors) });
            }
        }
        doc
    }
}

/// Everything one worker needs.
struct Worker {
    conn: Conn,
    rng: SeededRandom,
    value: Vec<u8>,
}

impl Worker {
    async fn execute(&mut self, op: Op, cfg: &BenchConfig, chooser: &KeyChooser, inserted: &AtomicU64) -> anyhow::Result<()> {
        // Vary the value a little per write so no layer can deduplicate it.
        let n = self.rng.next_u64();
        let stamp = 8.min(self.value.len());
        self.value[..stamp].copy_from_slice(&n.to_le_bytes()[..stamp]);
        match op {
            Op::Read => self.conn.read(&key(chooser.next(&mut self.rng, inserted.load(Ordering::Relaxed)))).await.map(|_| ()),
            Op::Update => self.conn.write(&key(chooser.next(&mut self.rng, inserted.load(Ordering::Relaxed))), &self.value).await,
            Op::Insert => self.conn.write(&key(inserted.fetch_add(1, Ordering::Relaxed)), &self.value).await,
            Op::Scan => {
                let start = key(chooser.next(&mut self.rng, inserted.load(Ordering::Relaxed)));
                let len = self.rng.range(1, cfg.scan_max as u64 + 1) as u32;
                self.conn.scan(&start, len).await.map(|_| ())
            }
            Op::ReadModifyWrite => {
                let k = key(chooser.next(&mut self.rng, inserted.load(Ordering::Relaxed)));
                self.conn.read(&k).await?;
                self.conn.write(&k, &self.value).await
            }
        }
    }
}

fn progress_line(label: &str, done: u64, elapsed: Duration, total: Duration, last_rate: f64) {
    let fraction = (elapsed.as_secs_f64() / total.as_secs_f64().max(1e-9)).min(1.0);
    let filled = (fraction * 30.0) as usize;
    eprint!(
        "\r{label:<6} [{}{}] {:>5.1}/{:.0} s  {:>9} ops  {:>9.0} ops/s ",
        "#".repeat(filled),
        " ".repeat(30 - filled),
        elapsed.as_secs_f64(),
        total.as_secs_f64(),
        done,
        last_rate
    );
}

/// Prints a progress bar on stderr until `done` is set.
fn spawn_progress(label: &'static str, counter: Arc<AtomicU64>, total: Duration, stop: Arc<tokio::sync::Notify>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut last = (0u64, Instant::now());
        loop {
            tokio::select! {
                _ = stop.notified() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let done = counter.load(Ordering::Relaxed);
            let rate = (done - last.0) as f64 / last.1.elapsed().as_secs_f64().max(1e-9);
            last = (done, Instant::now());
            progress_line(label, done, started.elapsed(), total, rate);
        }
        eprintln!();
    })
}

/// Inserts records 0..records with every worker (closed loop).
async fn load_phase(cfg: &BenchConfig, workers: Vec<Worker>) -> (Vec<Worker>, PhaseReport) {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let stop = Arc::new(tokio::sync::Notify::new());
    let progress = cfg.progress.then(|| spawn_progress("load", next.clone(), Duration::from_secs(0), stop.clone()));
    let mut tasks = Vec::new();
    for mut w in workers {
        let (next, records) = (next.clone(), cfg.records);
        tasks.push(tokio::spawn(async move {
            let mut stats = OpStats::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= records {
                    break;
                }
                let t = Instant::now();
                let r = w.conn.write(&key(i), &w.value).await;
                stats.record(t.elapsed().as_micros() as u64, r);
            }
            (w, stats)
        }));
    }
    let mut stats = OpStats::new();
    let mut workers = Vec::new();
    for t in tasks {
        let (w, s) = t.await.expect("load worker");
        workers.push(w);
        stats.merge(s);
    }
    stop.notify_one();
    if let Some(p) = progress {
        let _ = p.await;
    }
    let report = PhaseReport { phase: "load", elapsed: started.elapsed(), ops: BTreeMap::from([(Op::Insert, stats)]), timeline: Vec::new() };
    (workers, report)
}

async fn run_phase(cfg: &BenchConfig, workers: Vec<Worker>) -> PhaseReport {
    let chooser = Arc::new(KeyChooser::new(cfg.distribution.unwrap_or(cfg.workload.default_distribution()), cfg.records));
    let inserted = Arc::new(AtomicU64::new(cfg.records));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let measure_from = started + cfg.warmup;
    let end = measure_from + cfg.duration;
    let stop = Arc::new(tokio::sync::Notify::new());
    let progress = cfg.progress.then(|| spawn_progress("run", done.clone(), cfg.warmup + cfg.duration, stop.clone()));
    let concurrency = cfg.concurrency as f64;
    let seconds = if cfg.timeline { cfg.duration.as_secs_f64().ceil() as usize } else { 0 };
    let timeline: Arc<parking_lot::Mutex<Vec<Window>>> = Arc::new(parking_lot::Mutex::new((0..seconds).map(|_| Window::new()).collect()));
    let mut tasks = Vec::new();
    for (index, mut w) in workers.into_iter().enumerate() {
        let (cfg, chooser, inserted, done, timeline) = (cfg.clone(), chooser.clone(), inserted.clone(), done.clone(), timeline.clone());
        tasks.push(tokio::spawn(async move {
            let mut stats: BTreeMap<Op, OpStats> = BTreeMap::new();
            // Open loop: this worker's requests are due every `interval`, offset so workers interleave.
            let interval = cfg.rate.map(|r| Duration::from_secs_f64(concurrency / r));
            let mut due = started + cfg.rate.map_or(Duration::ZERO, |r| Duration::from_secs_f64(index as f64 / r));
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let began = match interval {
                    Some(i) => {
                        if due > now {
                            tokio::time::sleep_until(due).await;
                        }
                        let d = due;
                        due += i;
                        d
                    }
                    None => now,
                };
                if began >= end {
                    break;
                }
                let op = cfg.workload.choose(&mut w.rng);
                let result = w.execute(op, &cfg, &chooser, &inserted).await;
                let micros = began.elapsed().as_micros() as u64;
                done.fetch_add(1, Ordering::Relaxed);
                if began >= measure_from {
                    if let Some(w) = timeline.lock().get_mut((began - measure_from).as_secs() as usize) {
                        match &result {
                            Ok(()) => drop(w.histogram.record(micros.clamp(1, 120_000_000))),
                            Err(_) => w.errors += 1,
                        }
                    }
                    stats.entry(op).or_insert_with(OpStats::new).record(micros, result);
                }
            }
            stats
        }));
    }
    let mut ops: BTreeMap<Op, OpStats> = BTreeMap::new();
    for t in tasks {
        for (op, s) in t.await.expect("run worker") {
            ops.entry(op).or_insert_with(OpStats::new).merge(s);
        }
    }
    stop.notify_one();
    if let Some(p) = progress {
        let _ = p.await;
    }
    let timeline = std::mem::take(&mut *timeline.lock());
    PhaseReport { phase: "run", elapsed: cfg.duration, ops, timeline }
}

/// Connects, runs the load phase (if asked) and the run phase.
pub async fn run(cfg: &BenchConfig) -> anyhow::Result<Vec<PhaseReport>> {
    cfg.validate()?;
    let conns = backend::connect(cfg.backend, &cfg.targets, &cfg.table, cfg.concurrency).await?;
    let mut seed_rng = SeededRandom::from_entropy();
    let mut workers: Vec<Worker> = conns
        .into_iter()
        .map(|conn| {
            let mut rng = SeededRandom::new(seed_rng.next_u64());
            let value = (0..cfg.value_bytes).map(|_| b'a' + rng.range(0, 26) as u8).collect();
            Worker { conn, rng, value }
        })
        .collect();
    let mut reports = Vec::new();
    if cfg.load {
        let (w, report) = load_phase(cfg, workers).await;
        workers = w;
        reports.push(report);
    }
    reports.push(run_phase(cfg, workers).await);
    Ok(reports)
}

/// Whether to draw a progress bar by default (stderr is a terminal).
pub fn progress_default() -> bool {
    std::io::stderr().is_terminal()
}

pub use plot::{write_percentile_plot, write_timeline_plot};

#[cfg(test)]
mod tests {
    use super::*;

    /// Workload mixes add up to 100% and choose their operations in proportion.
    #[test]
    fn mixes() {
        for w in [Workload::A, Workload::B, Workload::C, Workload::D, Workload::E, Workload::F, Workload::Update, Workload::Insert] {
            assert_eq!(w.mix().iter().map(|m| m.1).sum::<u64>(), 100, "{w:?}");
        }
        let mut rng = SeededRandom::new(3);
        let reads = (0..10_000).filter(|_| Workload::B.choose(&mut rng) == Op::Read).count();
        assert!((9300..9700).contains(&reads), "{reads}");
        assert!("g".parse::<Workload>().is_err());
    }

    /// Bad settings are refused with a message that names the setting and its limit.
    #[test]
    fn config_validation() {
        let good = BenchConfig {
            backend: BackendKind::Tern,
            targets: vec!["127.0.0.1:1".into()],
            table: "demo".into(),
            workload: Workload::A,
            distribution: None,
            records: 1000,
            value_bytes: 100,
            scan_max: 100,
            concurrency: 8,
            rate: None,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(1),
            load: true,
            progress: false,
            timeline: false,
        };
        assert!(good.validate().is_ok());
        let bad = |f: &dyn Fn(&mut BenchConfig), what: &str| {
            let mut c = good.clone();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        };
        bad(&|c| c.concurrency = 0, "--concurrency");
        bad(&|c| c.records = 0, "--records");
        bad(&|c| c.value_bytes = 2 << 20, "--value-size");
        bad(&|c| c.rate = Some(-1.0), "--rate");
        bad(&|c| c.duration = Duration::ZERO, "--duration");
        bad(&|c| (c.timeline, c.duration) = (true, Duration::from_secs(TIMELINE_SECONDS_MAX + 1)), "--timeline");
        bad(&|c| c.targets.clear(), "target");
        bad(&|c| (c.backend, c.workload) = (BackendKind::Redis, Workload::E), "range scans");
        assert!("nope".parse::<Distribution>().is_err() && "nope".parse::<BackendKind>().is_err());
    }
}
