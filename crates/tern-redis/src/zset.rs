//! Sorted-set commands, with Redis 7.0's semantics and error messages (ZRANK/ZREVRANK also take
//! 7.2's WITHSCORE).
//!
//! A sorted set is a metadata record (type and count), one record per member (`member_sortkey`,
//! the score's f64 bits as value) and a score index (`score_sortkey(score, member)`, empty value)
//! whose order is the rank order: score, then member bytes, as Redis orders. Lex ranges walk the
//! member records, which are in member order (BYLEX is defined for equal scores only).
//!
//! Costs, n the set's size, m the number of members named or returned:
//! - ZADD, ZINCRBY, ZREM, ZSCORE, ZMSCORE: O(m) point reads and writes; ZCARD O(1);
//! - ZRANK, ZREVRANK: O(rank) (counts index records before, or after, the member);
//! - ZRANGE/ZREVRANGE by rank, ZREMRANGEBYRANK, ZPOPMIN/ZPOPMAX: O(stop) (the walk starts at
//!   an end of the index);
//! - ZRANGEBYSCORE and BYSCORE, ZCOUNT, ZREMRANGEBYSCORE: O(offset + m) from a seek to the bound;
//! - ZRANGEBYLEX and BYLEX, ZLEXCOUNT, ZREMRANGEBYLEX: O(offset + m) from a seek to the bound;
//! - ZRANGESTORE: the range's cost plus O(destination's old size + m) to replace it;
//! - ZRANDMEMBER: O(n) (reads the set once), O(rank) without a count;
//! - ZUNION, ZINTER, ZDIFF, ZINTERCARD and their STORE forms: O(total size of the inputs), all
//!   held in memory, plus O(destination's old size + result) to store.

use crate::args::{self, is, LexBound, ScoreBound};
use crate::layout::{self, check_member, member_of, member_sortkey, parse_score_sortkey, score_bytes, score_sortkey, KeyType, Meta};
use crate::layout::{ELEMENTS, SCORES, SCORES_END};
use crate::{fail, Fail, Records, Reply, Res, SYNTAX, WRONGTYPE};
use bytes::Bytes;
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};

/// A member and its score.
type Item = (Vec<u8>, f64);

const NAN_SCORE: &str = "ERR resulting score is not a number (NaN)";
const POSITIVE: &str = "ERR value is out of range, must be positive";
/// The most elements ZRANDMEMBER with a negative count returns (each may repeat, so the set's
/// size does not bound the reply), as SRANDMEMBER.
/// What a member adds to a reply besides its bytes, at most (`Reply::size` of a member and its
/// score in ZMPOP's nested form, the largest).
const ITEM_OVERHEAD: usize = 56;

pub fn run(name: &str, r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let key = &a[1][..];
    match name {
        "ZADD" => zadd(r, a),
        "ZINCRBY" => {
            let by = args::float(&a[2])?;
            add(r, key, AddFlags { incr: true, ..AddFlags::default() }, &[(by, a[3].clone())])
        }
        "ZSCORE" => Ok(match zset(r, key)? {
            None => Reply::Nil,
            Some(_) => score(r, key, &a[2])?.map_or(Reply::Nil, Reply::Double),
        }),
        "ZMSCORE" => {
            let exists = zset(r, key)?.is_some();
            let mut out = Vec::with_capacity(a.len() - 2);
            for m in &a[2..] {
                let s = if exists { score(r, key, m)? } else { None };
                out.push(s.map_or(Reply::Nil, Reply::Double));
            }
            Ok(Reply::Array(out))
        }
        "ZCARD" => Ok(Reply::Int(zset(r, key)?.map_or(0, |m| m.count as i64))),
        "ZCOUNT" => count(r, key, &Range::Score(args::score_bound(&a[2])?, args::score_bound(&a[3])?)),
        "ZLEXCOUNT" => count(r, key, &Range::Lex(args::lex_bound(&a[2])?, args::lex_bound(&a[3])?)),
        "ZRANK" | "ZREVRANK" => rank(name, r, a, name == "ZREVRANK"),
        "ZRANGE" => range_command(r, a, 1, false, None, None),
        "ZREVRANGE" => range_command(r, a, 1, false, Some(By::Rank), Some(true)),
        "ZRANGEBYSCORE" => range_command(r, a, 1, false, Some(By::Score), Some(false)),
        "ZREVRANGEBYSCORE" => range_command(r, a, 1, false, Some(By::Score), Some(true)),
        "ZRANGEBYLEX" => range_command(r, a, 1, false, Some(By::Lex), Some(false)),
        "ZREVRANGEBYLEX" => range_command(r, a, 1, false, Some(By::Lex), Some(true)),
        "ZRANGESTORE" => range_command(r, a, 2, true, None, None),
        "ZREM" => zrem(r, a),
        "ZREMRANGEBYRANK" => remove_range(r, key, Range::Rank(args::int(&a[2])?, args::int(&a[3])?)),
        "ZREMRANGEBYSCORE" => remove_range(r, key, Range::Score(args::score_bound(&a[2])?, args::score_bound(&a[3])?)),
        "ZREMRANGEBYLEX" => remove_range(r, key, Range::Lex(args::lex_bound(&a[2])?, args::lex_bound(&a[3])?)),
        "ZPOPMIN" | "ZPOPMAX" => pop(r, a, name == "ZPOPMAX"),
        "ZMPOP" => {
            let (keys, side, wanted) = args::mpop(a, ["MIN", "MAX"])?;
            for key in keys {
                let Some(mut meta) = zset(r, &key)? else { continue };
                let items = select(r, &key, meta.count, &Range::Rank(0, wanted - 1), side == "MAX", (0, -1), Cap::Stop)?;
                for (m, s) in &items {
                    remove(r, &key, &mut meta, m, *s)?;
                }
                layout::store_meta(r, &key, &meta)?;
                let pairs = items.into_iter().map(|(m, s)| Reply::Array(vec![Reply::bulk(m), Reply::Double(s)])).collect();
                return Ok(Reply::Array(vec![Reply::Bulk(key), Reply::Array(pairs)]));
            }
            Ok(Reply::NilArray)
        }
        "ZRANDMEMBER" => random_members(r, a),
        "ZUNIONSTORE" => combine(name, r, a, Op::Union, true, false),
        "ZINTERSTORE" => combine(name, r, a, Op::Inter, true, false),
        "ZDIFFSTORE" => combine(name, r, a, Op::Diff, true, false),
        "ZUNION" => combine(name, r, a, Op::Union, false, false),
        "ZINTER" => combine(name, r, a, Op::Inter, false, false),
        "ZDIFF" => combine(name, r, a, Op::Diff, false, false),
        "ZINTERCARD" => combine(name, r, a, Op::Inter, false, true),
        _ => fail(format!("ERR unknown command '{}'", name.to_ascii_lowercase())),
    }
}

// ---- records ----

/// The sorted set's metadata, None when the key is absent; WRONGTYPE for another type.
fn zset(r: &mut dyn Records, key: &[u8]) -> Res<Option<Meta>> {
    layout::collection(r, key, KeyType::ZSet)
}

fn decode(v: &[u8]) -> Option<f64> {
    Some(f64::from_bits(u64::from_be_bytes(v.try_into().ok()?)))
}

fn corrupt() -> Fail {
    crate::malformed_key("a sorted-set member without an 8-byte score")
}

/// A member's score.
fn score(r: &mut dyn Records, key: &[u8], m: &[u8]) -> Res<Option<f64>> {
    match r.get(key, &member_sortkey(m))? {
        None => Ok(None),
        Some((_, v)) => decode(&v).map(Some).ok_or_else(corrupt),
    }
}

/// Sets a member's score (`old`: its current one, None for a new member); the caller stores `meta`.
fn write(r: &mut dyn Records, key: &[u8], meta: &mut Meta, m: &[u8], old: Option<f64>, new: f64) -> Res<()> {
    match old {
        Some(old) => r.delete(key, &score_sortkey(old, m))?,
        None => meta.count += 1,
    }
    r.put(key, &member_sortkey(m), meta.expire_at_ms, &new.to_bits().to_be_bytes())?;
    r.put(key, &score_sortkey(new, m), meta.expire_at_ms, &[])?;
    Ok(())
}

/// Removes a member; the caller stores `meta`.
fn remove(r: &mut dyn Records, key: &[u8], meta: &mut Meta, m: &[u8], s: f64) -> Res<()> {
    r.delete(key, &member_sortkey(m))?;
    r.delete(key, &score_sortkey(s, m))?;
    meta.count = meta.count.saturating_sub(1);
    Ok(())
}

/// Replaces whatever `dst` holds (any type, and its TTL) with a sorted set of `items` (distinct
/// members); an empty result leaves `dst` absent. Returns the new cardinality.
fn store_items(r: &mut dyn Records, dst: &[u8], items: &[Item]) -> Res<usize> {
    layout::delete_key(r, dst)?;
    let mut meta = Meta::new(KeyType::ZSet);
    for (m, s) in items {
        write(r, dst, &mut meta, m, None, *s)?;
    }
    layout::store_meta(r, dst, &meta)?;
    Ok(items.len())
}

// ---- ranges ----

#[derive(Clone, Copy, PartialEq)]
enum By {
    Rank,
    Score,
    Lex,
}

/// A range of a sorted set: ranks as Redis's start/stop, or (min, max) bounds.
enum Range {
    Rank(i64, i64),
    Score(ScoreBound, ScoreBound),
    Lex(LexBound, LexBound),
}

const ALL_MIN: ScoreBound = ScoreBound { value: f64::NEG_INFINITY, exclusive: false };
const ALL_MAX: ScoreBound = ScoreBound { value: f64::INFINITY, exclusive: false };

/// Visits (member, score) of the index entries with scores within the bounds, in rank order
/// (descending when `rev`), until `visit` returns false.
fn scan_scores(r: &mut dyn Records, key: &[u8], min: ScoreBound, max: ScoreBound, rev: bool, visit: &mut dyn FnMut(&[u8], f64) -> bool) -> Res<()> {
    if min.value > max.value {
        return Ok(());
    }
    let from = [SCORES, &score_bytes(min.value)[..]].concat();
    // Just past every entry scored `max`: the next score prefix (+inf's encoding cannot overflow).
    let past = u64::from_be_bytes(score_bytes(max.value)) + 1;
    let to = [SCORES, &past.to_be_bytes()[..]].concat();
    r.scan(key, &from, Some(&to[..]), rev, &mut |sk, _, _| match parse_score_sortkey(sk) {
        Some((s, m)) if min.below(s) && max.above(s) => visit(m, s),
        _ => true,
    })?;
    Ok(())
}

/// Visits (member, score) of the members within lex bounds, in member order (descending when
/// `rev`), until `visit` returns false.
fn scan_lex(r: &mut dyn Records, key: &[u8], min: &LexBound, max: &LexBound, rev: bool, visit: &mut dyn FnMut(&[u8], f64) -> bool) -> Res<()> {
    let from = match min {
        LexBound::Min => ELEMENTS.to_vec(),
        LexBound::Max => return Ok(()),
        LexBound::Inclusive(v) | LexBound::Exclusive(v) => member_sortkey(v),
    };
    let to = match max {
        LexBound::Max => SCORES.to_vec(),
        LexBound::Min => return Ok(()),
        LexBound::Inclusive(v) => {
            let mut k = member_sortkey(v);
            k.push(0);
            k
        }
        LexBound::Exclusive(v) => member_sortkey(v),
    };
    if from >= to {
        return Ok(());
    }
    let mut bad = false;
    r.scan(key, &from, Some(&to[..]), rev, &mut |sk, _, v| {
        let m = member_of(sk);
        if !(min.admits_from(m) && max.admits_to(m)) {
            return true;
        }
        match decode(v) {
            Some(s) => visit(m, s),
            None => {
                bad = true;
                false
            }
        }
    })?;
    if bad {
        return Err(corrupt());
    }
    Ok(())
}

/// Visits a range's members in order (ranks: the whole set; `select` picks the positions).
fn visit_range(r: &mut dyn Records, key: &[u8], range: &Range, rev: bool, visit: &mut dyn FnMut(&[u8], f64) -> bool) -> Res<()> {
    match range {
        Range::Rank(..) => scan_scores(r, key, ALL_MIN, ALL_MAX, rev, visit),
        Range::Score(min, max) => scan_scores(r, key, *min, *max, rev, visit),
        Range::Lex(min, max) => scan_lex(r, key, min, max, rev, visit),
    }
}

/// How `select` treats a selection larger than a reply may be (`crate::REPLY_BYTES_MAX`).
#[derive(Clone, Copy, PartialEq)]
enum Cap {
    /// Not a reply (removals, sources of a store): refused past `crate::LOAD_BYTES_MAX`.
    Load,
    /// Refuse it.
    Refuse,
    /// Stop before the member that would pass the limit (pops with a count).
    Stop,
}

fn too_large<T>() -> Res<T> {
    fail(format!("ERR the range is larger than a reply may be ({} bytes); ask for a smaller range", crate::REPLY_BYTES_MAX))
}

/// Refuses to answer with `items` when they are larger than a reply may be.
fn fits(items: &[Item]) -> Res<()> {
    let size: usize = items.iter().map(|(m, _)| m.len() + ITEM_OVERHEAD).sum();
    if size > crate::REPLY_BYTES_MAX {
        return too_large();
    }
    Ok(())
}

/// The members of a range of a set of `len` members, in order (descending when `rev`), after
/// skipping `window.0` and at most `window.1` of them (negative: no limit) as Redis's LIMIT does:
/// a negative offset selects nothing. Rank ranges ignore the window.
fn select(r: &mut dyn Records, key: &[u8], len: u64, range: &Range, rev: bool, window: (i64, i64), cap: Cap) -> Res<Vec<Item>> {
    let (offset, limit) = window;
    let (mut skip, limit) = match *range {
        Range::Rank(start, stop) => match args::index_range(start, stop, len as i64) {
            Some((s, e)) => (s, e - s),
            None => return Ok(Vec::new()),
        },
        _ => (offset, limit),
    };
    let mut out = Vec::new();
    if skip < 0 || limit == 0 {
        return Ok(out);
    }
    let (mut size, mut over) = (0usize, false);
    visit_range(r, key, range, rev, &mut |m, s| {
        if skip > 0 {
            skip -= 1;
            return true;
        }
        size += m.len() + ITEM_OVERHEAD;
        let max = match cap {
            Cap::Load => crate::LOAD_BYTES_MAX,
            Cap::Refuse => crate::REPLY_BYTES_MAX,
            // A pop stops before it passes what its reply can carry.
            Cap::Stop => crate::POP_BYTES_MAX,
        };
        if size > max {
            over = true;
            return false;
        }
        out.push((m.to_vec(), s));
        limit < 0 || (out.len() as i64) < limit
    })?;
    if over && cap == Cap::Refuse {
        return too_large();
    }
    if over && cap == Cap::Load {
        return crate::too_large_to_load();
    }
    Ok(out)
}

fn count(r: &mut dyn Records, key: &[u8], range: &Range) -> Res<Reply> {
    if zset(r, key)?.is_none() {
        return Ok(Reply::Int(0));
    }
    let mut n = 0i64;
    visit_range(r, key, range, false, &mut |_, _| {
        n += 1;
        true
    })?;
    Ok(Reply::Int(n))
}

fn items_reply(items: Vec<Item>, withscores: bool) -> Reply {
    if withscores {
        Reply::Pairs(items.into_iter().map(|(m, s)| (Reply::bulk(m), Reply::Double(s))).collect())
    } else {
        Reply::Array(items.into_iter().map(|(m, _)| Reply::bulk(m)).collect())
    }
}

/// ZRANGE and its older forms, and ZRANGESTORE (`src`: the source key's position; `by` and
/// `rev` fixed by the older forms, else chosen by the options), as zrangeGenericCommand.
fn range_command(r: &mut dyn Records, a: &[Bytes], src: usize, store: bool, by: Option<By>, rev: Option<bool>) -> Res<Reply> {
    let (mut by, mut rev) = (by, rev);
    let (mut withscores, mut offset, mut limit) = (false, 0i64, -1i64);
    let mut j = src + 3;
    while j < a.len() {
        let left = a.len() - j - 1;
        let w = &a[j];
        if !store && is(w, "WITHSCORES") {
            withscores = true;
        } else if is(w, "LIMIT") && left >= 2 {
            offset = args::int(&a[j + 1])?;
            limit = args::int(&a[j + 2])?;
            j += 2;
        } else if rev.is_none() && is(w, "REV") {
            rev = Some(true);
        } else if by.is_none() && is(w, "BYLEX") {
            by = Some(By::Lex);
        } else if by.is_none() && is(w, "BYSCORE") {
            by = Some(By::Score);
        } else {
            return fail(SYNTAX);
        }
        j += 1;
    }
    let (by, rev) = (by.unwrap_or(By::Rank), rev.unwrap_or(false));
    // As Redis: "LIMIT given" is a limit other than -1.
    if limit != -1 && by == By::Rank {
        return fail("ERR syntax error, LIMIT is only supported in combination with either BYSCORE or BYLEX");
    }
    if withscores && by == By::Lex {
        return fail("ERR syntax error, WITHSCORES not supported in combination with BYLEX");
    }
    // Reversed score and lex ranges are given as max, min.
    let (lo, hi) = if rev && by != By::Rank { (&a[src + 2], &a[src + 1]) } else { (&a[src + 1], &a[src + 2]) };
    let range = match by {
        By::Rank => Range::Rank(args::int(lo)?, args::int(hi)?),
        By::Score => Range::Score(args::score_bound(lo)?, args::score_bound(hi)?),
        By::Lex => Range::Lex(args::lex_bound(lo)?, args::lex_bound(hi)?),
    };
    let key = &a[src][..];
    let items = match zset(r, key)? {
        Some(meta) => select(r, key, meta.count, &range, rev, (offset, limit), if store { Cap::Load } else { Cap::Refuse })?,
        None => Vec::new(),
    };
    if store {
        return Ok(Reply::Int(store_items(r, &a[1], &items)? as i64));
    }
    Ok(items_reply(items, withscores))
}

fn rank(name: &str, r: &mut dyn Records, a: &[Bytes], rev: bool) -> Res<Reply> {
    if a.len() > 4 {
        return Err(crate::commands::wrong_args(name).into());
    }
    let withscore = a.len() == 4;
    if withscore && !is(&a[3], "WITHSCORE") {
        return fail(SYNTAX);
    }
    let key = &a[1][..];
    let nil = if withscore { Reply::NilArray } else { Reply::Nil };
    if zset(r, key)?.is_none() {
        return Ok(nil);
    }
    let Some(s) = score(r, key, &a[2])? else { return Ok(nil) };
    // The rank is the number of index entries before the member's (after it, reversed).
    let at = score_sortkey(s, &a[2]);
    let (from, to) = if rev {
        let mut after = at;
        after.push(0);
        (after, SCORES_END.to_vec())
    } else {
        (SCORES.to_vec(), at)
    };
    let mut n = 0i64;
    r.scan(key, &from, Some(&to[..]), false, &mut |_, _, _| {
        n += 1;
        true
    })?;
    Ok(if withscore { Reply::Array(vec![Reply::Int(n), Reply::Double(s)]) } else { Reply::Int(n) })
}

// ---- writes ----

#[derive(Clone, Copy, Default)]
struct AddFlags {
    nx: bool,
    xx: bool,
    gt: bool,
    lt: bool,
    ch: bool,
    incr: bool,
}

fn zadd(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let mut f = AddFlags::default();
    let mut i = 2;
    while i < a.len() {
        let w = &a[i];
        if is(w, "NX") {
            f.nx = true;
        } else if is(w, "XX") {
            f.xx = true;
        } else if is(w, "CH") {
            f.ch = true;
        } else if is(w, "INCR") {
            f.incr = true;
        } else if is(w, "GT") {
            f.gt = true;
        } else if is(w, "LT") {
            f.lt = true;
        } else {
            break;
        }
        i += 1;
    }
    let rest = &a[i..];
    if rest.is_empty() || rest.len() % 2 == 1 {
        return fail(SYNTAX);
    }
    if f.nx && f.xx {
        return fail("ERR XX and NX options at the same time are not compatible");
    }
    if (f.nx && (f.gt || f.lt)) || (f.gt && f.lt) {
        return fail("ERR GT, LT, and/or NX options at the same time are not compatible");
    }
    if f.incr && rest.len() > 2 {
        return fail("ERR INCR option supports a single increment-element pair");
    }
    // Every score parses before anything is written: the command runs fully or not at all.
    let mut pairs = Vec::with_capacity(rest.len() / 2);
    for p in rest.chunks(2) {
        pairs.push((args::float(&p[0])?, p[1].clone()));
    }
    add(r, &a[1], f, &pairs)
}

/// ZADD's (and ZINCRBY's) work, as zsetAdd for each (score or increment, member) pair.
fn add(r: &mut dyn Records, key: &[u8], f: AddFlags, pairs: &[(f64, Bytes)]) -> Res<Reply> {
    let existing = zset(r, key)?;
    if existing.is_none() && f.xx {
        return Ok(if f.incr { Reply::Nil } else { Reply::Int(0) });
    }
    for (_, m) in pairs {
        check_member(m)?;
    }
    let mut meta = existing.unwrap_or_else(|| Meta::new(KeyType::ZSet));
    let (mut added, mut updated, mut processed, mut last) = (0i64, 0i64, false, 0.0);
    for (by, m) in pairs {
        match score(r, key, m)? {
            Some(cur) => {
                if f.nx {
                    continue;
                }
                let new = if f.incr { cur + by } else { *by };
                if new.is_nan() {
                    // Only INCR gets here, with its single pair: nothing is written yet.
                    return fail(NAN_SCORE);
                }
                if (f.lt && new >= cur) || (f.gt && new <= cur) {
                    continue;
                }
                processed = true;
                last = new;
                if new != cur {
                    write(r, key, &mut meta, m, Some(cur), new)?;
                    updated += 1;
                }
            }
            None => {
                if f.xx {
                    continue;
                }
                write(r, key, &mut meta, m, None, *by)?;
                added += 1;
                processed = true;
                last = *by;
            }
        }
    }
    if added + updated > 0 {
        layout::store_meta(r, key, &meta)?;
    }
    Ok(match (f.incr, processed) {
        (true, true) => Reply::Double(last),
        (true, false) => Reply::Nil,
        (false, _) => Reply::Int(if f.ch { added + updated } else { added }),
    })
}

fn zrem(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let key = &a[1][..];
    let Some(mut meta) = zset(r, key)? else { return Ok(Reply::Int(0)) };
    let mut n = 0i64;
    for m in &a[2..] {
        if let Some(s) = score(r, key, m)? {
            remove(r, key, &mut meta, m, s)?;
            n += 1;
        }
    }
    if n > 0 {
        layout::store_meta(r, key, &meta)?;
    }
    Ok(Reply::Int(n))
}

fn remove_range(r: &mut dyn Records, key: &[u8], range: Range) -> Res<Reply> {
    let Some(mut meta) = zset(r, key)? else { return Ok(Reply::Int(0)) };
    let items = select(r, key, meta.count, &range, false, (0, -1), Cap::Load)?;
    for (m, s) in &items {
        remove(r, key, &mut meta, m, *s)?;
    }
    if !items.is_empty() {
        layout::store_meta(r, key, &meta)?;
    }
    Ok(Reply::Int(items.len() as i64))
}

fn pop(r: &mut dyn Records, a: &[Bytes], max: bool) -> Res<Reply> {
    if a.len() > 3 {
        return fail(SYNTAX);
    }
    let count = match a.get(2) {
        None => None,
        Some(c) => match args::parse_int(c) {
            Some(n) if n >= 0 => Some(n),
            _ => return fail(POSITIVE),
        },
    };
    let key = &a[1][..];
    let Some(mut meta) = zset(r, key)? else { return Ok(Reply::Array(Vec::new())) };
    // A count larger than a reply may hold pops what fits.
    let n = count.unwrap_or(1);
    if n == 0 {
        return Ok(Reply::Array(Vec::new()));
    }
    let items = select(r, key, meta.count, &Range::Rank(0, n - 1), max, (0, -1), Cap::Stop)?;
    for (m, s) in &items {
        remove(r, key, &mut meta, m, *s)?;
    }
    layout::store_meta(r, key, &meta)?;
    Ok(match count {
        None => Reply::Array(items.into_iter().flat_map(|(m, s)| [Reply::bulk(m), Reply::Double(s)]).collect()),
        Some(_) => items_reply(items, true),
    })
}

// ---- reads of many ----

fn random_members(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let key = &a[1][..];
    if a.len() == 2 {
        let Some(meta) = zset(r, key)? else { return Ok(Reply::Nil) };
        let i = (r.random() % meta.count.max(1)) as i64;
        let items = select(r, key, meta.count, &Range::Rank(i, i), false, (0, -1), Cap::Load)?;
        return Ok(items.into_iter().next().map_or(Reply::Nil, |(m, _)| Reply::bulk(m)));
    }
    let n = args::int(&a[2])?;
    if n == i64::MIN {
        return fail("ERR value is out of range, value must between -9223372036854775807 and 9223372036854775807");
    }
    let withscores = match a.len() {
        3 => false,
        4 if is(&a[3], "WITHSCORES") => true,
        _ => return fail(SYNTAX),
    };
    if withscores && !(-i64::MAX / 2..=i64::MAX / 2).contains(&n) {
        return fail("ERR value is out of range");
    }
    let Some(meta) = zset(r, key)? else { return Ok(Reply::Array(Vec::new())) };
    if n == 0 {
        return Ok(Reply::Array(Vec::new()));
    }
    if n < 0 && n.unsigned_abs() > crate::PICKS_MAX {
        return fail(format!("ERR count {n} is too large; at most {} members are returned with repeats", crate::PICKS_MAX));
    }
    let all = select(r, key, meta.count, &Range::Rank(0, -1), false, (0, -1), Cap::Load)?;
    // A count reaching the size answers the whole set, in order, as Redis; otherwise distinct
    // random picks, or independent ones (repeats allowed) for a negative count.
    let picks: Vec<usize> = if n > 0 && n as u64 >= all.len() as u64 { (0..all.len()).collect() } else { crate::random_picks(r, all.len(), n)? };
    // Checked before the picks are copied: repeats could make it far larger than the set.
    let size: usize = picks.iter().map(|&i| all[i].0.len() + ITEM_OVERHEAD).sum();
    if size > crate::REPLY_BYTES_MAX {
        return too_large();
    }
    let picked: Vec<Item> = picks.into_iter().map(|i| all[i].clone()).collect();
    Ok(items_reply(picked, withscores))
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Union,
    Inter,
    Diff,
}

#[derive(Clone, Copy)]
enum Aggregate {
    Sum,
    Min,
    Max,
}

/// zunionInterAggregate: a sum of +inf and -inf is 0.
fn aggregate(target: &mut f64, v: f64, agg: Aggregate) {
    match agg {
        Aggregate::Sum => {
            *target += v;
            if target.is_nan() {
                *target = 0.0;
            }
        }
        Aggregate::Min => {
            if v < *target {
                *target = v;
            }
        }
        Aggregate::Max => {
            if v > *target {
                *target = v;
            }
        }
    }
}

/// A weighted score, NaN (inf * 0) as 0.
fn weighted(s: f64, w: f64) -> f64 {
    let v = s * w;
    if v.is_nan() {
        0.0
    } else {
        v
    }
}

/// A source of ZUNION and the like, all in memory: a sorted set's members in rank order, a set's
/// with score 1, nothing for a missing key.
fn load(r: &mut dyn Records, key: &[u8], kind: KeyType) -> Res<Vec<Item>> {
    let mut out = Vec::new();
    let mut size = 0;
    match kind {
        KeyType::ZSet => visit_range(r, key, &Range::Rank(0, -1), false, &mut |m, s| {
            size += m.len() + ITEM_OVERHEAD;
            out.push((m.to_vec(), s));
            size <= crate::LOAD_BYTES_MAX
        })?,
        KeyType::Set => r.scan(key, ELEMENTS, Some(SCORES), false, &mut |sk, _, _| {
            size += sk.len() + ITEM_OVERHEAD;
            out.push((member_of(sk).to_vec(), 1.0));
            size <= crate::LOAD_BYTES_MAX
        })?,
        _ => {}
    }
    if size > crate::LOAD_BYTES_MAX {
        return crate::too_large_to_load();
    }
    Ok(out)
}

/// ZUNION, ZINTER, ZDIFF, their STORE forms and ZINTERCARD, as zunionInterDiffGenericCommand.
fn combine(name: &str, r: &mut dyn Records, a: &[Bytes], op: Op, store: bool, card_only: bool) -> Res<Reply> {
    let at = if store { 2 } else { 1 };
    let n = args::int(&a[at])?;
    if n < 1 {
        return fail(format!("ERR at least 1 input key is needed for '{}' command", name.to_ascii_lowercase()));
    }
    if n as u64 > (a.len() - at - 1) as u64 {
        return fail(SYNTAX);
    }
    let n = n as usize;
    let keys = &a[at + 1..at + 1 + n];
    let mut kinds = Vec::with_capacity(n);
    for k in keys {
        let kind = layout::lookup(r, k)?.kind;
        if !matches!(kind, KeyType::None | KeyType::Set | KeyType::ZSet) {
            return fail(WRONGTYPE);
        }
        kinds.push(kind);
    }
    let mut weights = vec![1.0; n];
    let (mut agg, mut withscores, mut limit) = (Aggregate::Sum, false, 0i64);
    let mut j = at + 1 + n;
    while j < a.len() {
        let left = a.len() - j;
        let w = &a[j];
        if op != Op::Diff && !card_only && left > n && is(w, "WEIGHTS") {
            for (i, weight) in weights.iter_mut().enumerate() {
                *weight = match args::parse_float(&a[j + 1 + i]) {
                    Some(v) => v,
                    None => return fail("ERR weight value is not a float"),
                };
            }
            j += n + 1;
        } else if op != Op::Diff && !card_only && left >= 2 && is(w, "AGGREGATE") {
            agg = match args::upper(&a[j + 1]).as_str() {
                "SUM" => Aggregate::Sum,
                "MIN" => Aggregate::Min,
                "MAX" => Aggregate::Max,
                _ => return fail(SYNTAX),
            };
            j += 2;
        } else if !store && !card_only && is(w, "WITHSCORES") {
            withscores = true;
            j += 1;
        } else if card_only && left >= 2 && is(w, "LIMIT") {
            limit = match args::parse_int(&a[j + 1]) {
                Some(l) if l >= 0 => l,
                _ => return fail("ERR LIMIT can't be negative"),
            };
            j += 2;
        } else {
            return fail(SYNTAX);
        }
    }

    let mut srcs = Vec::with_capacity(n);
    for (k, kind) in keys.iter().zip(&kinds) {
        srcs.push(load(r, k, *kind)?);
    }
    // Union and intersection visit the sources smallest first, as Redis (this orders the sums).
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| srcs[i].len());
    let mut result: Vec<Item> = Vec::new();
    let mut card = 0i64;
    match op {
        Op::Union => {
            let mut acc: BTreeMap<Vec<u8>, f64> = BTreeMap::new();
            for &i in &order {
                for (m, s) in &srcs[i] {
                    let v = weighted(*s, weights[i]);
                    match acc.get_mut(m.as_slice()) {
                        Some(t) => aggregate(t, v, agg),
                        None => {
                            acc.insert(m.clone(), v);
                        }
                    }
                }
            }
            result = acc.into_iter().collect();
        }
        Op::Inter => {
            let maps: Vec<HashMap<&[u8], f64>> = srcs.iter().map(|src| src.iter().map(|(m, s)| (m.as_slice(), *s)).collect()).collect();
            let first = order[0];
            'members: for (m, s) in &srcs[first] {
                let mut total = weighted(*s, weights[first]);
                for &i in &order[1..] {
                    match maps[i].get(m.as_slice()) {
                        // As Redis, only the first source's product is NaN-checked here.
                        Some(v) => aggregate(&mut total, v * weights[i], agg),
                        None => continue 'members,
                    }
                }
                if card_only {
                    card += 1;
                    if limit > 0 && card >= limit {
                        break;
                    }
                } else {
                    result.push((m.clone(), total));
                }
            }
        }
        Op::Diff => {
            let rest: HashSet<&[u8]> = srcs[1..].iter().flatten().map(|(m, _)| m.as_slice()).collect();
            result = srcs[0].iter().filter(|(m, _)| !rest.contains(m.as_slice())).cloned().collect();
        }
    }
    if card_only {
        return Ok(Reply::Int(card));
    }
    result.sort_by(|x, y| x.1.partial_cmp(&y.1).unwrap_or(Ordering::Equal).then_with(|| x.0.cmp(&y.0)));
    if store {
        return Ok(Reply::Int(store_items(r, &a[1], &result)? as i64));
    }
    fits(&result)?;
    Ok(items_reply(result, withscores))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{cmd, Mem};

    /// ZCARD must equal the member records and the index entries.
    fn check(r: &mut Mem, key: &str) {
        let card = match cmd(r, &format!("ZCARD {key}")) {
            Reply::Int(n) => n as usize,
            other => panic!("{other:?}"),
        };
        let meta = usize::from(card > 0);
        assert_eq!(r.records_of(key), meta + 2 * card, "records of {key}");
    }

    fn b(s: &str) -> Reply {
        Reply::bulk(s.as_bytes().to_vec())
    }

    fn arr(ms: &[&str]) -> Reply {
        Reply::Array(ms.iter().map(|&m| b(m)).collect())
    }

    fn pairs(ps: &[(&str, f64)]) -> Reply {
        Reply::Pairs(ps.iter().map(|&(m, s)| (b(m), Reply::Double(s))).collect())
    }

    fn err(r: Reply) -> String {
        match r {
            Reply::Error(e) => e,
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn zadd_options() {
        let r = &mut Mem::default();
        assert_eq!(cmd(r, "ZADD z 10 x 20 y 30 z"), Reply::Int(3));
        assert_eq!(cmd(r, "ZADD z XX 5 foo 11 x"), Reply::Int(0));
        assert_eq!(cmd(r, "ZSCORE z x"), Reply::Double(11.0));
        assert_eq!(cmd(r, "ZSCORE z foo"), Reply::Nil);
        assert_eq!(cmd(r, "ZADD z NX 1 x 100 a"), Reply::Int(1));
        assert_eq!(cmd(r, "ZSCORE z x"), Reply::Double(11.0));
        assert_eq!(cmd(r, "ZADD z GT CH 5 x 21 y 40 zz"), Reply::Int(2));
        assert_eq!(cmd(r, "ZMSCORE z x y zz nope"), Reply::Array(vec![Reply::Double(11.0), Reply::Double(21.0), Reply::Double(40.0), Reply::Nil]));
        assert_eq!(cmd(r, "ZADD z LT INCR 1 x"), Reply::Nil);
        assert_eq!(cmd(r, "ZADD z INCR 4 x"), Reply::Double(15.0));
        assert_eq!(cmd(r, "ZADD z CH 15 x 22 y"), Reply::Int(1));
        assert_eq!(cmd(r, "ZRANGE z 0 -1"), arr(&["x", "y", "z", "zz", "a"]));
        check(r, "z");

        assert_eq!(err(cmd(r, "ZADD z XX NX 1 x")), "ERR XX and NX options at the same time are not compatible");
        assert_eq!(err(cmd(r, "ZADD z GT LT 1 x")), "ERR GT, LT, and/or NX options at the same time are not compatible");
        assert_eq!(err(cmd(r, "ZADD z INCR 1 a 2 b")), "ERR INCR option supports a single increment-element pair");
        assert_eq!(err(cmd(r, "ZADD z 1 a 2")), SYNTAX);
        assert_eq!(err(cmd(r, "ZADD z 1 new nan b")), crate::NOT_FLOAT);
        assert_eq!(cmd(r, "ZSCORE z new"), Reply::Nil);

        assert_eq!(cmd(r, "ZADD nokey XX 1 a"), Reply::Int(0));
        assert_eq!(cmd(r, "ZADD nokey XX INCR 1 a"), Reply::Nil);
        assert_eq!(r.records_of("nokey"), 0);

        assert_eq!(cmd(r, "ZINCRBY w 1.5 m"), Reply::Double(1.5));
        assert_eq!(cmd(r, "ZINCRBY w +inf m"), Reply::Double(f64::INFINITY));
        assert!(err(cmd(r, "ZINCRBY w -inf m")).contains("NaN"));
        assert_eq!(cmd(r, "ZSCORE w m"), Reply::Double(f64::INFINITY));
        check(r, "w");

        r.put(b"str", b"", 0, b"v").unwrap();
        assert_eq!(err(cmd(r, "ZADD str 1 a")), crate::WRONGTYPE);
        assert_eq!(err(cmd(r, "ZSCORE str a")), crate::WRONGTYPE);

        // New members take the key's TTL; a new key has none.
        assert!(layout::set_expiry(r, b"z", 5_000_000).is_ok());
        cmd(r, "ZADD z 7 late");
        assert_eq!(r.map[&(b"z".to_vec(), member_sortkey(b"late"))].0, 5_000_000);
        assert_eq!(r.map[&(b"z".to_vec(), score_sortkey(7.0, b"late"))].0, 5_000_000);
        assert_eq!(r.map[&(b"w".to_vec(), member_sortkey(b"m"))].0, 0);
    }

    #[test]
    fn ranges() {
        let r = &mut Mem::default();
        cmd(r, "ZADD s -inf a 1 b 2 c 3 d 4 e 5 f +inf g");
        assert_eq!(cmd(r, "ZRANGE s 0 -1"), arr(&["a", "b", "c", "d", "e", "f", "g"]));
        assert_eq!(cmd(r, "ZRANGE s -2 -1"), arr(&["f", "g"]));
        assert_eq!(cmd(r, "ZRANGE s 5 2"), arr(&[]));
        assert_eq!(cmd(r, "ZREVRANGE s 0 1"), arr(&["g", "f"]));
        assert_eq!(cmd(r, "ZRANGE s 0 1 WITHSCORES"), pairs(&[("a", f64::NEG_INFINITY), ("b", 1.0)]));
        assert_eq!(cmd(r, "ZRANGE s 1 2 REV"), arr(&["f", "e"]));
        assert_eq!(cmd(r, "ZRANGEBYSCORE s (1 3"), arr(&["c", "d"]));
        assert_eq!(cmd(r, "ZREVRANGEBYSCORE s 3 (1"), arr(&["d", "c"]));
        assert_eq!(cmd(r, "ZRANGEBYSCORE s 0 10 LIMIT 2 3"), arr(&["d", "e", "f"]));
        assert_eq!(cmd(r, "ZRANGEBYSCORE s 0 10 LIMIT 2 -1"), arr(&["d", "e", "f"]));
        assert_eq!(cmd(r, "ZRANGEBYSCORE s -inf +inf LIMIT -1 2"), arr(&[]));
        assert_eq!(cmd(r, "ZRANGEBYSCORE s 4 2"), arr(&[]));
        assert_eq!(cmd(r, "ZRANGEBYSCORE s 2 (2"), arr(&[]));
        assert_eq!(cmd(r, "ZRANGE s 10 0 BYSCORE REV LIMIT 0 2 WITHSCORES"), pairs(&[("f", 5.0), ("e", 4.0)]));
        assert_eq!(cmd(r, "ZRANGEBYSCORE s (5 +inf WITHSCORES"), pairs(&[("g", f64::INFINITY)]));
        assert_eq!(cmd(r, "ZCOUNT s (0 3"), Reply::Int(3));
        assert_eq!(cmd(r, "ZCOUNT s -inf +inf"), Reply::Int(7));
        assert_eq!(cmd(r, "ZCOUNT missing 0 1"), Reply::Int(0));
        assert_eq!(cmd(r, "ZRANK s d"), Reply::Int(3));
        assert_eq!(cmd(r, "ZREVRANK s d"), Reply::Int(3));
        assert_eq!(cmd(r, "ZREVRANK s g"), Reply::Int(0));
        assert_eq!(cmd(r, "ZRANK s nope"), Reply::Nil);
        assert_eq!(cmd(r, "ZRANK s e WITHSCORE"), Reply::Array(vec![Reply::Int(4), Reply::Double(4.0)]));
        assert_eq!(cmd(r, "ZRANK s nope WITHSCORE"), Reply::NilArray);
        assert!(err(cmd(r, "ZRANGE s 0 -1 LIMIT 0 1")).starts_with("ERR syntax error, LIMIT"));
        assert!(err(cmd(r, "ZRANGE s - + BYLEX WITHSCORES")).starts_with("ERR syntax error, WITHSCORES"));
        assert_eq!(err(cmd(r, "ZREVRANGE s 0 -1 BYSCORE")), SYNTAX);
        assert_eq!(err(cmd(r, "ZRANGEBYSCORE s 0 1 REV")), SYNTAX);
        assert_eq!(err(cmd(r, "ZRANGEBYSCORE s x 1")), "ERR min or max is not a float");
        assert_eq!(err(cmd(r, "ZRANGE s a 1")), crate::NOT_INTEGER);

        cmd(r, "ZADD l 0 alpha 0 bar 0 cool 0 down 0 elephant");
        assert_eq!(cmd(r, "ZRANGEBYLEX l - [cool"), arr(&["alpha", "bar", "cool"]));
        assert_eq!(cmd(r, "ZRANGEBYLEX l (bar (down"), arr(&["cool"]));
        assert_eq!(cmd(r, "ZREVRANGEBYLEX l + [bar LIMIT 1 2"), arr(&["down", "cool"]));
        assert_eq!(cmd(r, "ZRANGE l [b (d BYLEX"), arr(&["bar", "cool"]));
        assert_eq!(cmd(r, "ZRANGE l (d - BYLEX REV"), arr(&["cool", "bar", "alpha"]));
        assert_eq!(cmd(r, "ZLEXCOUNT l - +"), Reply::Int(5));
        assert_eq!(cmd(r, "ZLEXCOUNT l + -"), Reply::Int(0));
        assert_eq!(cmd(r, "ZLEXCOUNT l (bar [down"), Reply::Int(2));
        assert_eq!(err(cmd(r, "ZRANGEBYLEX l foo bar")), "ERR min or max not valid string range item");

        assert_eq!(cmd(r, "ZRANGESTORE dst s 1 2 BYSCORE"), Reply::Int(2));
        assert_eq!(cmd(r, "ZRANGE dst 0 -1 WITHSCORES"), pairs(&[("b", 1.0), ("c", 2.0)]));
        assert_eq!(cmd(r, "ZRANGESTORE dst s 7 9"), Reply::Int(0));
        assert_eq!(r.records_of("dst"), 0);
        assert_eq!(err(cmd(r, "ZRANGESTORE dst s 0 -1 WITHSCORES")), SYNTAX);
    }

    #[test]
    fn removal_keeps_count_and_deletes_empty_keys() {
        let r = &mut Mem::default();
        cmd(r, "ZADD k 1 a 2 b");
        assert_eq!(cmd(r, "ZREM k a x a"), Reply::Int(1));
        assert_eq!(cmd(r, "ZCARD k"), Reply::Int(1));
        check(r, "k");
        assert_eq!(cmd(r, "ZREM k b"), Reply::Int(1));
        assert_eq!(r.records_of("k"), 0);
        assert_eq!(cmd(r, "ZREM k b"), Reply::Int(0));

        cmd(r, "ZADD q 1 a 2 b 3 c 4 d 5 e");
        assert_eq!(cmd(r, "ZREMRANGEBYRANK q 1 3"), Reply::Int(3));
        assert_eq!(cmd(r, "ZRANGE q 0 -1"), arr(&["a", "e"]));
        check(r, "q");
        assert_eq!(cmd(r, "ZREMRANGEBYSCORE q -inf (5"), Reply::Int(1));
        assert_eq!(cmd(r, "ZREMRANGEBYLEX q - +"), Reply::Int(1));
        assert_eq!(r.records_of("q"), 0);
        assert_eq!(cmd(r, "ZREMRANGEBYRANK q 0 -1"), Reply::Int(0));
    }

    #[test]
    fn union_inter_diff() {
        let r = &mut Mem::default();
        cmd(r, "ZADD za 1 a 2 b 3 c");
        cmd(r, "ZADD zb 1 b 2 c 3 d");
        assert_eq!(cmd(r, "ZUNIONSTORE zc 2 za zb"), Reply::Int(4));
        assert_eq!(cmd(r, "ZRANGE zc 0 -1 WITHSCORES"), pairs(&[("a", 1.0), ("b", 3.0), ("d", 3.0), ("c", 5.0)]));
        check(r, "zc");
        assert_eq!(cmd(r, "ZUNIONSTORE zc 2 za zb WEIGHTS 2 3"), Reply::Int(4));
        assert_eq!(cmd(r, "ZRANGE zc 0 -1 WITHSCORES"), pairs(&[("a", 2.0), ("b", 7.0), ("d", 9.0), ("c", 12.0)]));
        assert_eq!(cmd(r, "ZUNIONSTORE zc 2 za zb AGGREGATE MIN"), Reply::Int(4));
        assert_eq!(cmd(r, "ZRANGE zc 0 -1 WITHSCORES"), pairs(&[("a", 1.0), ("b", 1.0), ("c", 2.0), ("d", 3.0)]));
        assert_eq!(cmd(r, "ZINTERSTORE zc 2 za zb AGGREGATE MAX"), Reply::Int(2));
        assert_eq!(cmd(r, "ZRANGE zc 0 -1 WITHSCORES"), pairs(&[("b", 2.0), ("c", 3.0)]));
        check(r, "zc");
        assert_eq!(cmd(r, "ZINTER 2 za zb WEIGHTS 2 3 WITHSCORES"), pairs(&[("b", 7.0), ("c", 12.0)]));
        assert_eq!(cmd(r, "ZDIFFSTORE zc 2 za zb"), Reply::Int(1));
        assert_eq!(cmd(r, "ZRANGE zc 0 -1 WITHSCORES"), pairs(&[("a", 1.0)]));
        assert_eq!(cmd(r, "ZDIFF 2 za za"), arr(&[]));
        assert_eq!(cmd(r, "ZUNION 2 za zb"), arr(&["a", "b", "d", "c"]));
        assert_eq!(cmd(r, "ZINTERCARD 2 za zb"), Reply::Int(2));
        assert_eq!(cmd(r, "ZINTERCARD 2 za zb LIMIT 1"), Reply::Int(1));
        assert_eq!(err(cmd(r, "ZINTERCARD 1 za LIMIT -1")), "ERR LIMIT can't be negative");
        assert_eq!(err(cmd(r, "ZINTERCARD 1 za za")), SYNTAX);
        assert_eq!(err(cmd(r, "ZUNIONSTORE zc 2 za zb WEIGHTS 1 nan")), "ERR weight value is not a float");
        assert_eq!(err(cmd(r, "ZUNIONSTORE zc 2 za zb WITHSCORES")), SYNTAX);
        assert_eq!(err(cmd(r, "ZDIFFSTORE zc 2 za zb WEIGHTS 1 2")), SYNTAX);
        assert_eq!(err(cmd(r, "ZUNION 2 za zb AGGREGATE AVG")), SYNTAX);

        // The destination may be a source, and loses its TTL.
        assert!(layout::set_expiry(r, b"za", 9_000_000).is_ok());
        assert_eq!(cmd(r, "ZUNIONSTORE za 2 za zb"), Reply::Int(4));
        assert_eq!(r.map[&(b"za".to_vec(), layout::META.to_vec())].0, 0);
        check(r, "za");

        // inf + -inf is 0, and so is -inf * 0.
        cmd(r, "ZADD i1 +inf k");
        cmd(r, "ZADD i2 -inf k");
        cmd(r, "ZUNIONSTORE i3 2 i1 i2");
        assert_eq!(cmd(r, "ZSCORE i3 k"), Reply::Double(0.0));
        cmd(r, "ZINTERSTORE i3 2 i1 i2");
        assert_eq!(cmd(r, "ZSCORE i3 k"), Reply::Double(0.0));
        cmd(r, "ZUNIONSTORE i3 1 i2 WEIGHTS 0");
        assert_eq!(cmd(r, "ZSCORE i3 k"), Reply::Double(0.0));

        // A missing source is empty; an empty result deletes the destination.
        assert_eq!(cmd(r, "ZUNIONSTORE i3 1 missing"), Reply::Int(0));
        assert_eq!(r.records_of("i3"), 0);

        // Sets count as sorted sets with scores 1; other types are refused.
        assert!(layout::store_meta(r, b"st", &Meta { count: 2, ..Meta::new(KeyType::Set) }).is_ok());
        r.put(b"st", &member_sortkey(b"a"), 0, &[]).unwrap();
        r.put(b"st", &member_sortkey(b"b"), 0, &[]).unwrap();
        assert_eq!(cmd(r, "ZUNIONSTORE zc 2 st zb WEIGHTS 2 3"), Reply::Int(4));
        assert_eq!(cmd(r, "ZRANGE zc 0 -1 WITHSCORES"), pairs(&[("a", 2.0), ("b", 5.0), ("c", 6.0), ("d", 9.0)]));
        r.put(b"str", b"", 0, b"v").unwrap();
        assert_eq!(err(cmd(r, "ZUNION 2 za str")), crate::WRONGTYPE);
    }

    #[test]
    fn pops_and_random_members() {
        let r = &mut Mem::default();
        cmd(r, "ZADD p 0 a 1 b 2 c 3 d");
        assert_eq!(cmd(r, "ZPOPMIN p"), Reply::Array(vec![b("a"), Reply::Double(0.0)]));
        assert_eq!(cmd(r, "ZPOPMAX p 2"), pairs(&[("d", 3.0), ("c", 2.0)]));
        assert_eq!(cmd(r, "ZPOPMIN p 0"), Reply::Array(vec![]));
        assert_eq!(err(cmd(r, "ZPOPMIN p -1")), POSITIVE);
        assert_eq!(err(cmd(r, "ZPOPMIN p 1 2")), SYNTAX);
        check(r, "p");
        assert_eq!(cmd(r, "ZPOPMIN p 5"), pairs(&[("b", 1.0)]));
        assert_eq!(r.records_of("p"), 0);
        assert_eq!(cmd(r, "ZPOPMIN p"), Reply::Array(vec![]));

        cmd(r, "ZADD m 1 a 2 b 3 c");
        assert!([b("a"), b("b"), b("c")].contains(&cmd(r, "ZRANDMEMBER m")));
        assert_eq!(cmd(r, "ZRANDMEMBER m 5"), arr(&["a", "b", "c"]));
        match cmd(r, "ZRANDMEMBER m 2") {
            Reply::Array(v) => assert!(v.len() == 2 && v[0] != v[1]),
            other => panic!("{other:?}"),
        }
        match cmd(r, "ZRANDMEMBER m -10 WITHSCORES") {
            Reply::Pairs(v) => assert_eq!(v.len(), 10),
            other => panic!("{other:?}"),
        }
        assert_eq!(cmd(r, "ZRANDMEMBER m 0"), Reply::Array(vec![]));
        assert_eq!(cmd(r, "ZRANDMEMBER missing 3"), Reply::Array(vec![]));
        assert_eq!(cmd(r, "ZRANDMEMBER missing"), Reply::Nil);
        assert!(err(cmd(r, "ZRANDMEMBER m -9223372036854775808")).contains("value is out of range"));
        assert!(err(cmd(r, "ZRANDMEMBER m -9223372036854770000 WITHSCORES")).contains("value is out of range"));
        assert_eq!(err(cmd(r, "ZRANDMEMBER m 1 WITHSCORE")), SYNTAX);
    }
}
