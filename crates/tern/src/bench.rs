//! `tern bench`: a closed-loop load generator over the native client. Reports throughput and latency
//! percentiles from an HDR histogram per operation type.

use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_client::Client;
use tern_core::TernError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Only sets.
    Write,
    /// Only gets (after a load phase that writes every key once).
    Read,
    /// 50% gets, 50% sets.
    Mixed,
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Workload, String> {
        match s {
            "write" => Ok(Workload::Write),
            "read" => Ok(Workload::Read),
            "mixed" => Ok(Workload::Mixed),
            other => Err(format!("unknown workload {other:?} (want write, read or mixed)")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub table: String,
    pub workload: Workload,
    pub concurrency: usize,
    pub value_bytes: usize,
    pub keys: u64,
    pub duration: Duration,
}

impl BenchConfig {
    pub fn validate(&self) -> Result<(), TernError> {
        if self.concurrency == 0 || self.concurrency > 10_000 {
            return Err(TernError::invalid("concurrency must be between 1 and 10000"));
        }
        if self.keys == 0 {
            return Err(TernError::invalid("key count must be positive"));
        }
        tern_core::limits::check_value(&vec![0; self.value_bytes.min(tern_core::limits::VALUE_BYTES_MAX + 1)])?;
        if self.duration.is_zero() {
            return Err(TernError::invalid("duration must be positive"));
        }
        Ok(())
    }
}

pub struct OpStats {
    pub name: &'static str,
    pub histogram: Histogram<u64>,
    pub errors: u64,
}

pub struct BenchReport {
    pub elapsed: Duration,
    pub ops: Vec<OpStats>,
}

impl BenchReport {
    pub fn render(&self) -> String {
        let mut out = format!(
            "{:<6} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>8}\n",
            "op", "count", "ops/s", "p50 ms", "p99 ms", "p999 ms", "max ms", "errors"
        );
        for s in &self.ops {
            let h = &s.histogram;
            let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            out.push_str(&format!(
                "{:<6} {:>10} {:>12.0} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>8}\n",
                s.name,
                h.len(),
                h.len() as f64 / self.elapsed.as_secs_f64(),
                ms(0.5),
                ms(0.99),
                ms(0.999),
                h.max() as f64 / 1000.0,
                s.errors
            ));
        }
        out
    }
}

fn key(i: u64) -> Vec<u8> {
    format!("key{i:012}").into_bytes()
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Writes every key once (for read workloads), with the same concurrency.
pub async fn load(client: &Client, cfg: &BenchConfig) -> Result<(), TernError> {
    let value = vec![b'v'; cfg.value_bytes];
    let table = client.table(&cfg.table);
    let mut tasks = Vec::new();
    for w in 0..cfg.concurrency as u64 {
        let (table, value, keys, step) = (table.clone(), value.clone(), cfg.keys, cfg.concurrency as u64);
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < keys {
                table.set(&key(i), b"", &value, 0).await?;
                i += step;
            }
            Ok::<_, TernError>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| TernError::Internal(e.to_string()))??;
    }
    Ok(())
}

pub async fn run(client: &Client, cfg: &BenchConfig) -> Result<BenchReport, TernError> {
    cfg.validate()?;
    if cfg.workload != Workload::Write {
        load(client, cfg).await?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let value = vec![b'v'; cfg.value_bytes];
    let table = client.table(&cfg.table);
    let mut tasks = Vec::new();
    for w in 0..cfg.concurrency {
        let (table, value, stop, cfg) = (table.clone(), value.clone(), stop.clone(), cfg.clone());
        tasks.push(tokio::spawn(async move {
            let mut reads = (new_histogram(), 0u64);
            let mut writes = (new_histogram(), 0u64);
            let mut rng = tern_core::time::SeededRandom::new(w as u64 * 7919 + 1);
            use tern_core::time::RandomSource;
            while !stop.load(Ordering::Relaxed) {
                let k = key(rng.range(0, cfg.keys));
                let read = match cfg.workload {
                    Workload::Write => false,
                    Workload::Read => true,
                    Workload::Mixed => rng.range(0, 2) == 0,
                };
                let started = Instant::now();
                let ok = if read { table.get(&k, b"").await.is_ok() } else { table.set(&k, b"", &value, 0).await.is_ok() };
                let micros = started.elapsed().as_micros().max(1) as u64;
                let (h, errors) = if read { &mut reads } else { &mut writes };
                if ok {
                    let _ = h.record(micros.min(60_000_000));
                } else {
                    *errors += 1;
                }
            }
            (reads, writes)
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(cfg.duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut reads = OpStats { name: "get", histogram: new_histogram(), errors: 0 };
    let mut writes = OpStats { name: "set", histogram: new_histogram(), errors: 0 };
    for t in tasks {
        let ((rh, re), (wh, we)) = t.await.map_err(|e| TernError::Internal(e.to_string()))?;
        reads.histogram.add(rh).expect("same bounds");
        reads.errors += re;
        writes.histogram.add(wh).expect("same bounds");
        writes.errors += we;
    }
    let elapsed = started.elapsed();
    let ops = [writes, reads].into_iter().filter(|s| !s.histogram.is_empty() || s.errors > 0).collect();
    Ok(BenchReport { elapsed, ops })
}
