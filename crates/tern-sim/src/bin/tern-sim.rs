//! `tern-sim`: runs simulation seeds from the command line (a sweep, a soak, or one seed replayed
//! with its full report). A binary of its own, so the `tern` binary that runs servers does not link
//! the simulator.

use clap::Parser;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Parser)]
#[command(name = "tern-sim", about = "Deterministic simulation of a Tern cluster under faults, checked for linearizability and invariants")]
struct Cli {
    /// Run only this seed and print its full report.
    #[arg(long)]
    seed: Option<u64>,
    /// How many seeds to run (from --first-seed on).
    #[arg(long, default_value_t = 200)]
    seeds: u64,
    #[arg(long, default_value_t = 1000)]
    first_seed: u64,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Client operations per seed (default 500, 1000 with --split).
    #[arg(long)]
    operations: Option<usize>,
    /// Run without injected faults.
    #[arg(long)]
    no_faults: bool,
    /// Four nodes and three meta nodes: meta's keeper and scheduler replacing lost replicas,
    /// balancing and moving leaders, meta leaders crashing.
    #[arg(long)]
    scheduler: bool,
    /// With the scheduler: table "t" doubles its partitions during the fault phase (at a time each
    /// seed draws) and must have finished by the end.
    #[arg(long)]
    split: bool,
    /// Nodes in the cluster (3 to 7; default 3, or 4 with --scheduler).
    #[arg(long)]
    nodes: Option<usize>,
    /// 2: two clusters duplicating into each other (without --scheduler), their link cut now and
    /// then; at the end both must hold the same records.
    #[arg(long, default_value_t = 1)]
    clusters: usize,
    /// A tenth of the clients' operations are Redis list commands (RPUSH, LPOP, LRANGE).
    #[arg(long)]
    redis: bool,
    /// Meta at scale instead of seeds: meta's scheduler over this many simulated servers (10
    /// zones) and --scale-partitions partitions; a server dies, a zone dies, ten servers join.
    #[arg(long)]
    meta_scale: Option<usize>,
    #[arg(long, default_value_t = 100_000)]
    scale_partitions: u32,
    /// Scheduling passes a --meta-scale phase may take (one a second in production).
    #[arg(long, default_value_t = 5_000)]
    scale_passes_max: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(servers) = cli.meta_scale {
        if !(13..=1000).contains(&servers) || !(1..=1_000_000).contains(&cli.scale_partitions) || !(1..=1_000_000).contains(&cli.scale_passes_max) {
            eprintln!("--meta-scale takes 13 to 1000 servers, --scale-partitions and --scale-passes-max 1 to 1000000");
            return ExitCode::from(2);
        }
        let cfg = tern_sim::scale::ScaleConfig { servers, partitions: cli.scale_partitions, passes_max: cli.scale_passes_max, ..Default::default() };
        println!("{servers} servers in {} zones, {} partitions x 3 replicas, learners fill in {} passes", cfg.zones, cfg.partitions, cfg.fill_passes);
        println!("{}", tern_sim::scale::PhaseReport::header());
        let reports = tern_sim::scale::run_reporting(cfg, |r| println!("{}", r.describe()));
        return if reports.iter().all(|r| r.converged) { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    if cli.jobs == 0 || cli.jobs > 256 {
        eprintln!("--jobs must be between 1 and 256");
        return ExitCode::from(2);
    }
    if cli.operations == Some(0) {
        eprintln!("--operations must be positive");
        return ExitCode::from(2);
    }
    if cli.nodes.is_some_and(|n| !(3..=7).contains(&n)) {
        eprintln!("--nodes must be between 3 and 7 (partitions have three replicas)");
        return ExitCode::from(2);
    }
    if !(1..=2).contains(&cli.clusters) || (cli.clusters == 2 && cli.scheduler) {
        eprintln!("--clusters is 1 or 2, and 2 runs without --scheduler");
        return ExitCode::from(2);
    }
    if cli.split && cli.clusters != 1 {
        eprintln!("--split runs with one cluster");
        return ExitCode::from(2);
    }
    let (scheduler, split) = (cli.scheduler || cli.split, cli.split);
    let (operations, faults, nodes, clusters, redis) = (cli.operations, !cli.no_faults, cli.nodes, cli.clusters, cli.redis);
    let config = move |seed: u64| {
        let mut cfg = match (split, scheduler) {
            (true, _) => tern_sim::SimConfig::with_split(seed),
            (false, true) => tern_sim::SimConfig::with_scheduler(seed),
            (false, false) => tern_sim::SimConfig::new(seed),
        };
        cfg.clusters = clusters;
        cfg.redis = redis;
        cfg.nodes = nodes.unwrap_or(cfg.nodes);
        cfg.operations = operations.unwrap_or(cfg.operations);
        cfg.faults = faults;
        // Keep faults coming for as long as the workload runs.
        cfg.fault_phase_ms = cfg.fault_phase_ms.max(cfg.operations as u64 * 20);
        cfg
    };
    if let Some(seed) = cli.seed {
        let report = tern_sim::run(config(seed));
        print!("{}", report.describe());
        if report.ok() {
            // A passing seed's schedule too: what was injected and what meta did.
            println!("  fault schedule:");
            for f in &report.faults {
                println!("    {f}");
            }
        }
        return if report.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    if sweep(cli.first_seed, cli.seeds, cli.jobs, config) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs seeds on worker threads and prints a summary; returns whether every seed passed and the
/// checker decided enough histories.
fn sweep(first: u64, count: u64, jobs: usize, config: impl Fn(u64) -> tern_sim::SimConfig + Sync) -> bool {
    struct Outcome {
        seed: u64,
        ok: bool,
        operations: usize,
        virtual_ms: u64,
        unknown: usize,
        undecided: bool,
        asleep: u64,
    }
    let next = AtomicU64::new(first);
    let outcomes = Mutex::new(Vec::new());
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::SeqCst);
                if seed >= first + count {
                    return;
                }
                let report = tern_sim::run(config(seed));
                if !report.ok() {
                    eprint!("{}", report.describe());
                }
                let undecided = matches!(report.verdict, tern_sim::checker::Verdict::Unknown { .. });
                let outcome = Outcome {
                    seed,
                    ok: report.ok(),
                    operations: report.operations,
                    virtual_ms: report.virtual_ms,
                    unknown: report.unknown_outcomes,
                    undecided,
                    asleep: report.hibernating_ticks,
                };
                outcomes.lock().expect("outcomes lock").push(outcome);
            });
        }
    });
    let outcomes = outcomes.into_inner().expect("outcomes lock");
    let failed: Vec<u64> = outcomes.iter().filter(|o| !o.ok).map(|o| o.seed).collect();
    let operations: usize = outcomes.iter().map(|o| o.operations).sum();
    let unknown: usize = outcomes.iter().map(|o| o.unknown).sum();
    let simulated_hours = outcomes.iter().map(|o| o.virtual_ms).sum::<u64>() as f64 / 3_600_000.0;
    let undecided = outcomes.iter().filter(|o| o.undecided).count();
    let asleep_seeds = outcomes.iter().filter(|o| o.asleep > 0).count();
    let asleep: u64 = outcomes.iter().map(|o| o.asleep).sum();
    let decided_enough = tern_sim::undecided_within_limit(undecided, outcomes.len());
    println!(
        "seeds run: {}\nsimulated hours: {simulated_hours:.2}\noperations checked: {operations} ({unknown} with unknown outcome)\nhistories the checker could not decide: {undecided}{}\nseeds where groups hibernated: {asleep_seeds} ({asleep} replica-ticks asleep)\nfailures: {}{}\nwall time: {:.1} s",
        outcomes.len(),
        if decided_enough { String::new() } else { format!(" (more than {:.0}%: the sweep fails)", tern_sim::UNDECIDED_SHARE_MAX * 100.0) },
        failed.len(),
        if failed.is_empty() { String::new() } else { format!(" (seeds {failed:?})") },
        started.elapsed().as_secs_f64()
    );
    failed.is_empty() && decided_enough
}
