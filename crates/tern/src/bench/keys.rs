//! YCSB key choosers: uniform, (scrambled) zipfian and latest, over a record count that grows as
//! inserts happen. Keys are `user` + a zero-padded number, as in YCSB.

use tern_core::time::{RandomSource, SeededRandom};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distribution {
    Uniform,
    /// Zipfian (theta 0.99) over record numbers, scrambled by a hash so hot keys spread out.
    Zipfian,
    /// Recently inserted records are the hottest (zipfian over age).
    Latest,
}

impl std::str::FromStr for Distribution {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uniform" => Ok(Distribution::Uniform),
            "zipfian" => Ok(Distribution::Zipfian),
            "latest" => Ok(Distribution::Latest),
            other => Err(format!("unknown distribution {other:?} (want uniform, zipfian or latest)")),
        }
    }
}

pub fn key(i: u64) -> Vec<u8> {
    format!("user{i:012}").into_bytes()
}

/// Gray et al.'s zipfian generator (as in YCSB), over 0..n with constant theta.
pub struct Zipfian {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

const THETA: f64 = 0.99;

fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

impl Zipfian {
    pub fn new(n: u64) -> Zipfian {
        let n = n.max(2);
        let theta = THETA;
        let zetan = zeta(n, theta);
        let zeta2 = zeta(2, theta);
        let eta = (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        Zipfian { n, theta, alpha: 1.0 / (1.0 - theta), zetan, eta }
    }

    pub fn next(&self, rng: &mut SeededRandom) -> u64 {
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1;
        }
        ((self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64).min(self.n - 1)
    }
}

fn fnv1a(x: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in x.to_le_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Chooses existing record numbers.
pub struct KeyChooser {
    distribution: Distribution,
    zipf: Option<Zipfian>,
}

impl KeyChooser {
    /// `records`: how many records the load phase writes (zipfian's item count).
    pub fn new(distribution: Distribution, records: u64) -> KeyChooser {
        let zipf = (distribution != Distribution::Uniform).then(|| Zipfian::new(records));
        KeyChooser { distribution, zipf }
    }

    /// A record number below `existing` (the records inserted so far).
    pub fn next(&self, rng: &mut SeededRandom, existing: u64) -> u64 {
        let existing = existing.max(1);
        match (self.distribution, &self.zipf) {
            (Distribution::Uniform, _) | (_, None) => rng.range(0, existing),
            (Distribution::Zipfian, Some(z)) => fnv1a(z.next(rng)) % existing,
            (Distribution::Latest, Some(z)) => existing - 1 - z.next(rng) % existing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Zipfian is skewed (the hottest item takes a large share) and stays in range; latest favours the
    /// newest records; uniform covers the range.
    #[test]
    fn distributions() {
        let mut rng = SeededRandom::new(7);
        let z = Zipfian::new(1000);
        let mut hits = vec![0u32; 1000];
        for _ in 0..100_000 {
            hits[z.next(&mut rng) as usize] += 1;
        }
        assert!(hits[0] > 10_000 && hits[0] > hits[10] * 5, "item 0 is hottest: {} vs {}", hits[0], hits[10]);
        let latest = KeyChooser::new(Distribution::Latest, 1000);
        let newest = (0..10_000).filter(|_| latest.next(&mut rng, 1000) >= 990).count();
        assert!(newest > 3000, "{newest}");
        let uniform = KeyChooser::new(Distribution::Uniform, 1000);
        assert!((0..10_000).all(|_| uniform.next(&mut rng, 1000) < 1000));
        let scrambled = KeyChooser::new(Distribution::Zipfian, 1000);
        assert!((0..10_000).all(|_| scrambled.next(&mut rng, 500) < 500));
    }
}
