//! Parsing command arguments the way Redis does, with Redis's error messages.

use crate::{fail, Res, NOT_FLOAT, NOT_INTEGER};
use bytes::Bytes;

pub fn upper(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_uppercase()
}

pub fn is(b: &[u8], word: &str) -> bool {
    b.eq_ignore_ascii_case(word.as_bytes())
}

/// A signed 64-bit integer as Redis accepts it (no leading '+', no leading zeros, no spaces).
pub fn int(b: &[u8]) -> Res<i64> {
    parse_int(b).map_or_else(|| fail(NOT_INTEGER), Ok)
}

pub fn parse_int(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b)
        .ok()
        .filter(|s| !s.starts_with('+') && (s.len() <= 1 || !s.starts_with('0')) && !s.starts_with("-0"))
        .and_then(|s| s.parse::<i64>().ok())
}

/// A non-negative integer with a named error (Redis's "value is out of range, must be positive").
pub fn count(b: &[u8]) -> Res<i64> {
    let n = int(b)?;
    if n < 0 {
        return fail("ERR value is out of range, must be positive");
    }
    Ok(n)
}

/// A float: finite or infinite, never NaN.
pub fn float(b: &[u8]) -> Res<f64> {
    parse_float(b).map_or_else(|| fail(NOT_FLOAT), Ok)
}

pub fn parse_float(b: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(b).ok()?;
    if s.is_empty() || s.starts_with(char::is_whitespace) || s.ends_with(char::is_whitespace) {
        return None;
    }
    let f = match s.to_ascii_lowercase().as_str() {
        "inf" | "+inf" | "infinity" | "+infinity" => f64::INFINITY,
        "-inf" | "-infinity" => f64::NEG_INFINITY,
        _ => s.parse::<f64>().ok()?,
    };
    (!f.is_nan()).then_some(f)
}

/// One end of a score range: `(` excludes the value.
#[derive(Clone, Copy, Debug)]
pub struct ScoreBound {
    pub value: f64,
    pub exclusive: bool,
}

pub fn score_bound(b: &[u8]) -> Res<ScoreBound> {
    let (exclusive, text) = match b.strip_prefix(b"(") {
        Some(rest) => (true, rest),
        None => (false, b),
    };
    match parse_float(text) {
        Some(value) => Ok(ScoreBound { value, exclusive }),
        None => fail("ERR min or max is not a float"),
    }
}

impl ScoreBound {
    pub fn below(&self, score: f64) -> bool {
        // score is above the lower bound
        if self.exclusive {
            score > self.value
        } else {
            score >= self.value
        }
    }

    pub fn above(&self, score: f64) -> bool {
        // score is under the upper bound
        if self.exclusive {
            score < self.value
        } else {
            score <= self.value
        }
    }
}

/// One end of a lexicographic range: `-`, `+`, `[value` or `(value`.
#[derive(Clone, Debug)]
pub enum LexBound {
    Min,
    Max,
    Inclusive(Bytes),
    Exclusive(Bytes),
}

pub fn lex_bound(b: &Bytes) -> Res<LexBound> {
    match b.first() {
        Some(b'-') if b.len() == 1 => Ok(LexBound::Min),
        Some(b'+') if b.len() == 1 => Ok(LexBound::Max),
        Some(b'[') => Ok(LexBound::Inclusive(b.slice(1..))),
        Some(b'(') => Ok(LexBound::Exclusive(b.slice(1..))),
        _ => fail("ERR min or max not valid string range item"),
    }
}

impl LexBound {
    /// Whether `m` is at or above this bound taken as a minimum.
    pub fn admits_from(&self, m: &[u8]) -> bool {
        match self {
            LexBound::Min => true,
            LexBound::Max => false,
            LexBound::Inclusive(v) => m >= &v[..],
            LexBound::Exclusive(v) => m > &v[..],
        }
    }

    /// Whether `m` is at or below this bound taken as a maximum.
    pub fn admits_to(&self, m: &[u8]) -> bool {
        match self {
            LexBound::Min => false,
            LexBound::Max => true,
            LexBound::Inclusive(v) => m <= &v[..],
            LexBound::Exclusive(v) => m < &v[..],
        }
    }
}

/// Redis's start/stop index pair over `len` elements (negative counts from the end) as a
/// half-open range of positions; None when empty.
pub fn index_range(start: i64, stop: i64, len: i64) -> Option<(i64, i64)> {
    let start = if start < 0 { (len + start).max(0) } else { start };
    let stop = if stop < 0 { len + stop } else { stop };
    let stop = stop.min(len - 1);
    (start <= stop && start < len).then_some((start, stop + 1))
}

/// LMPOP and ZMPOP's arguments: `numkeys key... WHERE [COUNT n]`, from `a[1]` on; returns the
/// keys, WHERE in upper case, and the count (1 when not given).
pub fn mpop(a: &[Bytes], wheres: [&str; 2]) -> crate::Res<(Vec<Bytes>, String, i64)> {
    let n = match parse_int(&a[1]) {
        Some(n) if n > 0 => n as usize,
        _ => return fail("ERR numkeys should be greater than 0"),
    };
    if n > a.len().saturating_sub(3) {
        return fail(crate::SYNTAX);
    }
    let keys = a[2..2 + n].to_vec();
    let side = upper(&a[2 + n]);
    if !wheres.contains(&side.as_str()) {
        return fail(crate::SYNTAX);
    }
    let mut count = None;
    let mut i = 3 + n;
    while i < a.len() {
        if !is(&a[i], "COUNT") || count.is_some() || i + 1 >= a.len() {
            return fail(crate::SYNTAX);
        }
        match parse_int(&a[i + 1]) {
            Some(c) if c > 0 => count = Some(c),
            _ => return fail("ERR count should be greater than 0"),
        }
        i += 2;
    }
    Ok((keys, side, count.unwrap_or(1)))
}
