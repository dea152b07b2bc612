//! Strings: one record at sortkey "" (see `layout`). Every command is O(1) records; GETRANGE,
//! SETRANGE, APPEND, the bit commands and LCS cost the value's length (LCS: the product of both).

use crate::args::{int, is, parse_int, upper};
use crate::layout::{check_value, delete_key, lookup, KeyType};
use crate::{fail, format_double, Records, Reply, Res, NOT_FLOAT, NOT_INTEGER, SYNTAX, WRONGTYPE};
use bytes::Bytes;

const STRING: &[u8] = b"";
/// Cells of LCS's table (the product of the two lengths) one command may use: about 10 ms of the
/// serving replica's time.
const LCS_CELLS_MAX: usize = 4 << 20;

pub fn run(name: &str, r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let key = &a[1][..];
    match name {
        "GET" => Ok(Reply::opt(get(r, key)?.map(|(_, v)| v.into()))),
        "SET" => set(r, a),
        "SETNX" => {
            if exists(r, key)? {
                return Ok(Reply::Int(0));
            }
            put(r, key, &a[2], 0)?;
            Ok(Reply::Int(1))
        }
        "SETEX" | "PSETEX" => {
            let unit = if name == "SETEX" { "EX" } else { "PX" };
            let at = expiry_arg(r, unit, &a[2], name)?;
            put(r, key, &a[3], at)?;
            Ok(Reply::Ok)
        }
        "GETSET" => {
            let old = get(r, key)?;
            put(r, key, &a[2], 0)?;
            Ok(Reply::opt(old.map(|(_, v)| v.into())))
        }
        "GETDEL" => {
            let old = get(r, key)?;
            if old.is_some() {
                r.delete(key, STRING)?;
            }
            Ok(Reply::opt(old.map(|(_, v)| v.into())))
        }
        "GETEX" => getex(r, a),
        "MGET" => {
            let mut out = Vec::with_capacity(a.len() - 1);
            for k in &a[1..] {
                out.push(Reply::opt(r.get(k, STRING)?.map(|(_, v)| v.into())));
            }
            Ok(Reply::Array(out))
        }
        "MSET" | "MSETNX" => {
            if a.len().is_multiple_of(2) {
                return Err(crate::commands::wrong_args(name).into());
            }
            // Checked whole first: a refused value must leave every key as it was.
            for kv in a[1..].chunks(2) {
                check_value(&kv[1])?;
            }
            if name == "MSETNX" {
                for kv in a[1..].chunks(2) {
                    if lookup(r, &kv[0])?.kind != KeyType::None {
                        return Ok(Reply::Int(0));
                    }
                }
            }
            for kv in a[1..].chunks(2) {
                put(r, &kv[0], &kv[1], 0)?;
            }
            Ok(if name == "MSET" { Reply::Ok } else { Reply::Int(1) })
        }
        "STRLEN" => Ok(Reply::Int(get(r, key)?.map_or(0, |(_, v)| v.len() as i64))),
        "APPEND" => {
            let (expire, mut value) = get(r, key)?.unwrap_or_default();
            value.extend_from_slice(&a[2]);
            check_size(value.len())?;
            put_keeping(r, key, &value, expire)?;
            Ok(Reply::Int(value.len() as i64))
        }
        "INCR" => incr(r, key, 1),
        "DECR" => incr(r, key, -1),
        "INCRBY" => incr(r, key, int(&a[2])?),
        "DECRBY" => match int(&a[2])?.checked_neg() {
            Some(d) => incr(r, key, d),
            None => fail("ERR decrement would overflow"),
        },
        "INCRBYFLOAT" => {
            let delta = crate::args::float(&a[2])?;
            let (expire, old) = match get(r, key)? {
                None => (0, 0.0),
                Some((expire, value)) => (expire, parse_float_value(&value).ok_or_else(|| Reply::err(NOT_FLOAT))?),
            };
            let new = old + delta;
            if !new.is_finite() {
                return fail("ERR increment would produce NaN or Infinity");
            }
            let text = format_double(new);
            put_keeping(r, key, text.as_bytes(), expire)?;
            Ok(Reply::bulk(text))
        }
        "GETRANGE" | "SUBSTR" => {
            let (start, end) = (int(&a[2])?, int(&a[3])?);
            let value = get(r, key)?.map(|(_, v)| v).unwrap_or_default();
            Ok(Reply::bulk(getrange(&value, start, end)))
        }
        "SETRANGE" => {
            let offset = int(&a[2])?;
            if offset < 0 {
                return fail("ERR offset is out of range");
            }
            let (expire, mut value) = get(r, key)?.unwrap_or_default();
            let patch = &a[3];
            if patch.is_empty() {
                return Ok(Reply::Int(value.len() as i64));
            }
            let end = (offset as usize).saturating_add(patch.len());
            check_size(end)?;
            if value.len() < end {
                value.resize(end, 0);
            }
            value[offset as usize..end].copy_from_slice(patch);
            put_keeping(r, key, &value, expire)?;
            Ok(Reply::Int(value.len() as i64))
        }
        "LCS" => lcs(r, a),
        "SETBIT" => {
            let offset = bit_offset(&a[2])?;
            let bit = match &a[3][..] {
                b"0" => 0u8,
                b"1" => 1,
                _ => return fail("ERR bit is not an integer or out of range"),
            };
            let (expire, mut value) = get(r, key)?.unwrap_or_default();
            let byte = (offset / 8) as usize;
            if value.len() <= byte {
                value.resize(byte + 1, 0);
            }
            let mask = 0x80u8 >> (offset % 8);
            let old = (value[byte] & mask != 0) as i64;
            if bit == 1 {
                value[byte] |= mask;
            } else {
                value[byte] &= !mask;
            }
            put_keeping(r, key, &value, expire)?;
            Ok(Reply::Int(old))
        }
        "GETBIT" => {
            let offset = bit_offset(&a[2])?;
            let value = get(r, key)?.map(|(_, v)| v).unwrap_or_default();
            let byte = (offset / 8) as usize;
            Ok(Reply::Int(value.get(byte).is_some_and(|b| b & (0x80 >> (offset % 8)) != 0) as i64))
        }
        "BITCOUNT" => bitcount(r, a),
        "BITPOS" => bitpos(r, a),
        _ => fail(format!("ERR unknown string command '{name}'")),
    }
}

/// The string at `key`: (expire_at_ms, value); WRONGTYPE if the key holds another type.
pub fn get(r: &mut dyn Records, key: &[u8]) -> Res<Option<(u64, Vec<u8>)>> {
    match r.get(key, STRING)? {
        Some(found) => Ok(Some(found)),
        None if lookup(r, key)?.kind != KeyType::None => fail(WRONGTYPE),
        None => Ok(None),
    }
}

fn exists(r: &mut dyn Records, key: &[u8]) -> Res<bool> {
    Ok(lookup(r, key)?.kind != KeyType::None)
}

/// Stores a string, replacing whatever the key held (any type).
pub fn put(r: &mut dyn Records, key: &[u8], value: &[u8], expire_at_ms: u64) -> Res<()> {
    check_value(value)?;
    // A key holds one type: when it holds a string (a point read, cheaper than the scan that
    // tells any other type), there is nothing else to remove.
    if r.get(key, STRING)?.is_none() && !matches!(lookup(r, key)?.kind, KeyType::String | KeyType::None) {
        delete_key(r, key)?;
    }
    r.put(key, STRING, expire_at_ms, value)?;
    Ok(())
}

/// Stores a string over a string (or nothing) the caller has read, keeping its expiry.
fn put_keeping(r: &mut dyn Records, key: &[u8], value: &[u8], expire_at_ms: u64) -> Res<()> {
    check_value(value)?;
    r.put(key, STRING, expire_at_ms, value)?;
    Ok(())
}

fn check_size(len: usize) -> Res<()> {
    let max = tern_core::limits::VALUE_BYTES_MAX;
    if len > max {
        return fail(format!("ERR string exceeds maximum allowed size ({max} bytes, the value limit)"));
    }
    Ok(())
}

/// An expiry option's value as an absolute unix-ms time.
pub fn expiry_arg(r: &dyn Records, option: &str, value: &[u8], command: &str) -> Res<u64> {
    let n = int(value)?;
    let invalid = || Reply::err(format!("ERR invalid expire time in '{}' command", command.to_ascii_lowercase()));
    if n <= 0 {
        return Err(invalid().into());
    }
    let n = n as u64;
    let now = r.now_ms();
    let at = match option {
        "EX" => n.checked_mul(1000).and_then(|ms| ms.checked_add(now)),
        "PX" => n.checked_add(now),
        "EXAT" => n.checked_mul(1000),
        "PXAT" => Some(n),
        _ => None,
    };
    Ok(at.filter(|&t| t < i64::MAX as u64).ok_or_else(invalid)?)
}

fn set(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let (key, value) = (&a[1][..], &a[2][..]);
    let (mut nx, mut xx, mut want_old, mut keepttl) = (false, false, false, false);
    let mut expire_at: Option<u64> = None;
    let mut i = 3;
    while i < a.len() {
        let option = upper(&a[i]);
        match option.as_str() {
            "NX" if !xx => nx = true,
            "XX" if !nx => xx = true,
            "GET" => want_old = true,
            "KEEPTTL" if expire_at.is_none() => keepttl = true,
            "EX" | "PX" | "EXAT" | "PXAT" if expire_at.is_none() && !keepttl && i + 1 < a.len() => {
                expire_at = Some(expiry_arg(r, &option, &a[i + 1], "set")?);
                i += 1;
            }
            _ => return fail(SYNTAX),
        }
        i += 1;
    }
    let old = if want_old { get(r, key)? } else { None };
    if nx || xx {
        let exists = old.is_some() || exists(r, key)?;
        if (nx && exists) || (xx && !exists) {
            return Ok(if want_old { Reply::opt(old.map(|(_, v)| v.into())) } else { Reply::Nil });
        }
    }
    let expire = if keepttl { lookup(r, key)?.expire_at_ms } else { expire_at.unwrap_or(0) };
    put(r, key, value, expire)?;
    Ok(if want_old { Reply::opt(old.map(|(_, v)| v.into())) } else { Reply::Ok })
}

fn getex(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let key = &a[1][..];
    let mut expire: Option<u64> = None; // Some(0): persist
    match &a[2..] {
        [] => {}
        [p] if is(p, "PERSIST") => expire = Some(0),
        [o, v] if matches!(upper(o).as_str(), "EX" | "PX" | "EXAT" | "PXAT") => expire = Some(expiry_arg(r, &upper(o), v, "getex")?),
        _ => return fail(SYNTAX),
    }
    let old = get(r, key)?;
    if let (Some(at), Some((_, value))) = (expire, &old) {
        if at != 0 && at <= r.now_ms() {
            r.delete(key, STRING)?;
        } else {
            r.put(key, STRING, at, value)?;
        }
    }
    Ok(Reply::opt(old.map(|(_, v)| v.into())))
}

fn incr(r: &mut dyn Records, key: &[u8], delta: i64) -> Res<Reply> {
    let (expire, old) = match get(r, key)? {
        None => (0, 0),
        Some((expire, value)) => (expire, parse_int_value(&value).ok_or_else(|| Reply::err(NOT_INTEGER))?),
    };
    let Some(new) = old.checked_add(delta) else { return fail("ERR increment or decrement would overflow") };
    put_keeping(r, key, new.to_string().as_bytes(), expire)?;
    Ok(Reply::Int(new))
}

/// A stored integer: decimal text of an i64, as Redis accepts it (and as Tern's own incr writes).
pub fn parse_int_value(v: &[u8]) -> Option<i64> {
    if v.len() > 20 {
        return None;
    }
    parse_int(v)
}

pub fn parse_float_value(v: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(v).ok()?;
    if s.is_empty() || s.len() > 5000 || s.starts_with(char::is_whitespace) || s.ends_with(char::is_whitespace) {
        return None;
    }
    let f: f64 = s.parse().ok()?;
    (!f.is_nan()).then_some(f)
}

fn getrange(v: &[u8], start: i64, end: i64) -> Vec<u8> {
    let len = v.len() as i64;
    if (start < 0 && end < 0 && start > end) || len == 0 {
        return Vec::new();
    }
    let start = if start < 0 { (len + start).max(0) } else { start };
    let end = if end < 0 { (len + end).max(0) } else { end }.min(len - 1);
    if start > end {
        return Vec::new();
    }
    v[start as usize..=end as usize].to_vec()
}

fn bit_offset(b: &[u8]) -> Res<u64> {
    let max_bits = (tern_core::limits::VALUE_BYTES_MAX as u64) * 8;
    match parse_int(b) {
        Some(n) if n >= 0 && (n as u64) < max_bits => Ok(n as u64),
        _ => fail(format!("ERR bit offset is not an integer or out of range (values hold at most {max_bits} bits)")),
    }
}

/// The byte or bit range of BITCOUNT/BITPOS as an inclusive bit range; None when empty.
fn bit_range(len_bytes: usize, start: i64, end: i64, bits: bool) -> Option<(u64, u64)> {
    let total = if bits { len_bytes as i64 * 8 } else { len_bytes as i64 };
    let start = if start < 0 { (total + start).max(0) } else { start };
    let end = if end < 0 { (total + end).max(0) } else { end }.min(total - 1);
    if total == 0 || start > end {
        return None;
    }
    Some(if bits { (start as u64, end as u64) } else { (start as u64 * 8, end as u64 * 8 + 7) })
}

fn bit_at(v: &[u8], bit: u64) -> bool {
    v[(bit / 8) as usize] & (0x80 >> (bit % 8)) != 0
}

fn unit(a: &[Bytes], at: usize) -> Res<bool> {
    match a.get(at) {
        None => Ok(false),
        Some(u) if is(u, "BYTE") => Ok(false),
        Some(u) if is(u, "BIT") => Ok(true),
        Some(_) => fail(SYNTAX),
    }
}

fn bitcount(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let (start, end, bits) = match a.len() {
        2 => (0, -1, false),
        4 | 5 => (int(&a[2])?, int(&a[3])?, unit(a, 4)?),
        _ => return fail(SYNTAX),
    };
    let v = get(r, &a[1])?.map(|(_, v)| v).unwrap_or_default();
    let Some((from, to)) = bit_range(v.len(), start, end, bits) else { return Ok(Reply::Int(0)) };
    Ok(Reply::Int(count_bits(&v, from, to) as i64))
}

/// Set bits in the inclusive bit range: whole bytes by popcount, the partial ends bit by bit.
fn count_bits(v: &[u8], from: u64, to: u64) -> u64 {
    let (first_whole, last_whole) = (from.div_ceil(8), (to + 1) / 8);
    if first_whole >= last_whole {
        return (from..=to).filter(|&b| bit_at(v, b)).count() as u64;
    }
    let edges = (from..first_whole * 8).chain(last_whole * 8..=to).filter(|&b| bit_at(v, b)).count() as u64;
    edges + v[first_whole as usize..last_whole as usize].iter().map(|b| b.count_ones() as u64).sum::<u64>()
}

/// The first bit equal to `want` in the inclusive bit range, skipping whole bytes that hold none.
fn find_bit(v: &[u8], from: u64, to: u64, want: bool) -> Option<u64> {
    let skip = if want { 0x00 } else { 0xff };
    let mut b = from;
    while b <= to {
        if b.is_multiple_of(8) && b + 7 <= to && v[(b / 8) as usize] == skip {
            b += 8;
            continue;
        }
        if bit_at(v, b) == want {
            return Some(b);
        }
        b += 1;
    }
    None
}

fn bitpos(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let want = match &a[2][..] {
        b"0" => false,
        b"1" => true,
        _ => return fail("ERR The bit argument must be 1 or 0."),
    };
    if a.len() > 6 {
        return fail(SYNTAX);
    }
    let end_given = a.len() >= 5;
    let start = if a.len() >= 4 { int(&a[3])? } else { 0 };
    let end = if end_given { int(&a[4])? } else { -1 };
    let bits = unit(a, 5)?;
    let v = match get(r, &a[1])? {
        None => return Ok(Reply::Int(if want { -1 } else { 0 })),
        Some((_, v)) => v,
    };
    let Some((from, to)) = bit_range(v.len(), start, end, bits) else { return Ok(Reply::Int(-1)) };
    if let Some(found) = find_bit(&v, from, to, want) {
        return Ok(Reply::Int(found as i64));
    }
    // Looking for a clear bit without an end: the string is padded with zeros on the right.
    Ok(Reply::Int(if !want && !end_given { to as i64 + 1 } else { -1 }))
}

fn lcs(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let (mut len_only, mut idx, mut with_len, mut min_len) = (false, false, false, 0i64);
    let mut i = 3;
    while i < a.len() {
        match upper(&a[i]).as_str() {
            "LEN" => len_only = true,
            "IDX" => idx = true,
            "WITHMATCHLEN" => with_len = true,
            "MINMATCHLEN" if i + 1 < a.len() => {
                min_len = int(&a[i + 1])?.max(0);
                i += 1;
            }
            _ => return fail(SYNTAX),
        }
        i += 1;
    }
    if len_only && idx {
        return fail("ERR If you want both the length and indexes, please just use IDX.");
    }
    let x = get(r, &a[1])?.map(|(_, v)| v).unwrap_or_default();
    let y = get(r, &a[2])?.map(|(_, v)| v).unwrap_or_default();
    if (x.len() + 1).saturating_mul(y.len() + 1) > LCS_CELLS_MAX {
        return fail(format!("ERR LCS of strings of {} and {} bytes needs more than {LCS_CELLS_MAX} cells", x.len(), y.len()));
    }
    let w = y.len() + 1;
    let mut t = vec![0u32; (x.len() + 1) * w];
    for i in 1..=x.len() {
        for j in 1..=y.len() {
            t[i * w + j] = if x[i - 1] == y[j - 1] { t[(i - 1) * w + j - 1] + 1 } else { t[(i - 1) * w + j].max(t[i * w + j - 1]) };
        }
    }
    let total = t[x.len() * w + y.len()] as i64;
    if len_only {
        return Ok(Reply::Int(total));
    }
    // Walk back from the end, collecting the common string and its matching ranges.
    let (mut i, mut j) = (x.len(), y.len());
    let mut common = Vec::with_capacity(total as usize);
    let mut matches = Vec::new();
    let mut range: Option<(usize, usize, usize, usize)> = None; // x start..=end, y start..=end
    while i > 0 && j > 0 {
        if x[i - 1] == y[j - 1] {
            common.push(x[i - 1]);
            range = match range {
                Some((xs, xe, ys, ye)) if xs == i && ys == j => Some((i - 1, xe, j - 1, ye)),
                other => {
                    if let Some(m) = other {
                        matches.push(m);
                    }
                    Some((i - 1, i - 1, j - 1, j - 1))
                }
            };
            i -= 1;
            j -= 1;
        } else if t[(i - 1) * w + j] > t[i * w + j - 1] {
            i -= 1;
        } else {
            j -= 1;
        }
    }
    if let Some(m) = range {
        matches.push(m);
    }
    if !idx {
        common.reverse();
        return Ok(Reply::bulk(common));
    }
    let items = matches
        .into_iter()
        .filter(|(xs, xe, _, _)| (xe - xs + 1) as i64 >= min_len)
        .map(|(xs, xe, ys, ye)| {
            let mut m = vec![
                Reply::Array(vec![Reply::Int(xs as i64), Reply::Int(xe as i64)]),
                Reply::Array(vec![Reply::Int(ys as i64), Reply::Int(ye as i64)]),
            ];
            if with_len {
                m.push(Reply::Int((xe - xs + 1) as i64));
            }
            Reply::Array(m)
        })
        .collect();
    Ok(Reply::Map(vec![(Reply::bulk("matches"), Reply::Array(items)), (Reply::bulk("len"), Reply::Int(total))]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_counts_and_searches_match_bit_by_bit() {
        let v: Vec<u8> = (0..64u32).map(|i| (i.wrapping_mul(0x9e) ^ (i >> 2)) as u8).chain([0x00, 0x00, 0xff, 0xff, 0x10]).collect();
        let bits = v.len() as u64 * 8;
        for from in (0..bits).step_by(5) {
            for to in (from..bits).step_by(7) {
                assert_eq!(count_bits(&v, from, to), (from..=to).filter(|&b| bit_at(&v, b)).count() as u64, "{from}..={to}");
                for want in [false, true] {
                    assert_eq!(find_bit(&v, from, to, want), (from..=to).find(|&b| bit_at(&v, b) == want), "{from}..={to} {want}");
                }
            }
        }
    }
}
