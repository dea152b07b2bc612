//! Set commands on the set layout (`layout`): a metadata record (type, exact member count, the
//! key's expiry) and one record per member at `[0, 2] ++ member`, empty value, carrying the key's
//! expiry. Replies list members in member byte order (Redis's order is unspecified).
//!
//! Costs, with n the set's cardinality, k the members given or asked for, and a member test a
//! point read:
//! - SADD, SREM, SMISMEMBER: O(k) member tests and writes; SISMEMBER, SCARD: O(1); SMOVE: O(1).
//! - SMEMBERS: O(n).
//! - SRANDMEMBER: O(k) draws, then one scan that stops at the last drawn position: O(n) at worst.
//! - SPOP: like SRANDMEMBER, plus O(k) deletes (count >= n: O(n), the key is deleted).
//! - SINTER, SINTERCARD: O(smallest set × number of sets) member tests (LIMIT stops early).
//! - SUNION: O(sum of the sets). SDIFF: O(first set) plus, for each other set, the cheaper of
//!   scanning it or testing the remaining result against it.
//! - SINTERSTORE, SUNIONSTORE, SDIFFSTORE: the read form, plus deleting the destination's old
//!   records and writing the result.
//!
//! Randomness comes only from `Records::random`, so every replica draws the same members.

use crate::args::{count as nonnegative, int, is, parse_int};
use crate::layout::{check_member, collection, delete_key, member_of, member_sortkey, store_meta, KeyType, Meta, ELEMENTS, MEMBER_BYTES_MAX, SCORES};
use crate::{fail, Records, Reply, Res, SYNTAX};
use bytes::Bytes;
use std::collections::BTreeSet;

pub fn run(name: &str, r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    match name {
        "SADD" => sadd(r, a),
        "SREM" => srem(r, a),
        "SISMEMBER" => {
            let found = set_meta(r, &a[1])?.is_some() && has(r, &a[1], &a[2])?;
            Ok(Reply::Int(found as i64))
        }
        "SMISMEMBER" => {
            let exists = set_meta(r, &a[1])?.is_some();
            let mut out = Vec::with_capacity(a.len() - 2);
            for m in &a[2..] {
                out.push(Reply::Int((exists && has(r, &a[1], m)?) as i64));
            }
            Ok(Reply::Array(out))
        }
        "SCARD" => Ok(Reply::Int(set_meta(r, &a[1])?.map_or(0, |m| m.count as i64))),
        "SMEMBERS" => {
            let all = match set_meta(r, &a[1])? {
                Some(_) => members(r, &a[1])?,
                None => Vec::new(),
            };
            Ok(set_reply(all))
        }
        "SRANDMEMBER" => srandmember(r, a),
        "SPOP" => spop(r, a),
        "SMOVE" => smove(r, a),
        "SINTER" => Ok(set_reply(inter(r, &a[1..], 0)?)),
        "SUNION" => Ok(set_reply(union(r, &a[1..])?)),
        "SDIFF" => Ok(set_reply(diff(r, &a[1..])?)),
        "SINTERSTORE" | "SUNIONSTORE" | "SDIFFSTORE" => store(name, r, a),
        "SINTERCARD" => sintercard(r, a),
        _ => fail(format!("ERR unknown command '{name}'")),
    }
}

fn bulk(m: Vec<u8>) -> Reply {
    Reply::Bulk(Bytes::from(m))
}

fn set_reply(members: Vec<Vec<u8>>) -> Reply {
    Reply::Set(members.into_iter().map(bulk).collect())
}

/// The set's metadata, None when the key does not exist, WRONGTYPE when it holds another type.
fn set_meta(r: &mut dyn Records, key: &[u8]) -> Res<Option<Meta>> {
    collection(r, key, KeyType::Set)
}

/// Whether the set at `key` holds `m` (a member too large to be stored is never held).
fn has(r: &mut dyn Records, key: &[u8], m: &[u8]) -> Res<bool> {
    if m.len() > MEMBER_BYTES_MAX {
        return Ok(false);
    }
    Ok(r.get(key, &member_sortkey(m))?.is_some())
}

/// Every member, in byte order.
/// Every member, in byte order; refused past `crate::LOAD_BYTES_MAX`.
fn members(r: &mut dyn Records, key: &[u8]) -> Res<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut size = 0;
    r.scan(key, ELEMENTS, Some(SCORES), false, &mut |sk, _, _| {
        size += sk.len() + 16;
        out.push(member_of(sk).to_vec());
        size <= crate::LOAD_BYTES_MAX
    })?;
    if size > crate::LOAD_BYTES_MAX {
        return crate::too_large_to_load();
    }
    Ok(out)
}

/// The members at `positions` (ascending, distinct) in byte order, in one scan that stops at the
/// last of them.
fn members_at(r: &mut dyn Records, key: &[u8], positions: &[u64]) -> Res<Vec<Vec<u8>>> {
    let mut out: Vec<Vec<u8>> = Vec::with_capacity(positions.len());
    if positions.is_empty() {
        return Ok(out);
    }
    let mut i = 0u64;
    let mut size = 0;
    r.scan(key, ELEMENTS, Some(SCORES), false, &mut |sk, _, _| {
        if positions[out.len()] == i {
            size += sk.len() + 16;
            out.push(member_of(sk).to_vec());
        }
        i += 1;
        out.len() < positions.len() && size <= crate::LOAD_BYTES_MAX
    })?;
    if size > crate::LOAD_BYTES_MAX {
        return crate::too_large_to_load();
    }
    if out.len() != positions.len() {
        return crate::malformed(format!("set metadata counts more members than the {i} stored"));
    }
    Ok(out)
}

/// `k` distinct positions out of `0..n` (k < n), uniformly, ascending: Floyd's sampling of the
/// positions taken, or of the ones left out when k is more than half of n.
fn pick(r: &mut dyn Records, n: u64, k: u64) -> Vec<u64> {
    let complement = k * 2 > n;
    let draws = if complement { n - k } else { k };
    let mut chosen: BTreeSet<u64> = BTreeSet::new();
    for j in n - draws..n {
        let t = r.random() % (j + 1);
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    if complement {
        (0..n).filter(|p| !chosen.contains(p)).collect()
    } else {
        chosen.into_iter().collect()
    }
}

fn sadd(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let key = &a[1];
    let mut meta = set_meta(r, key)?.unwrap_or(Meta::new(KeyType::Set));
    for m in &a[2..] {
        check_member(m)?;
    }
    let before = meta.count;
    for m in &a[2..] {
        let sk = member_sortkey(m);
        if r.get(key, &sk)?.is_none() {
            r.put(key, &sk, meta.expire_at_ms, b"")?;
            meta.count += 1;
        }
    }
    if meta.count != before {
        store_meta(r, key, &meta)?;
    }
    Ok(Reply::Int((meta.count - before) as i64))
}

fn srem(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let key = &a[1];
    let Some(mut meta) = set_meta(r, key)? else { return Ok(Reply::Int(0)) };
    let mut removed = 0i64;
    for m in &a[2..] {
        if has(r, key, m)? {
            r.delete(key, &member_sortkey(m))?;
            meta.count = meta.count.saturating_sub(1);
            removed += 1;
        }
    }
    if removed > 0 {
        store_meta(r, key, &meta)?;
    }
    Ok(Reply::Int(removed))
}

fn srandmember(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let key = &a[1];
    if a.len() > 3 {
        return fail(SYNTAX);
    }
    if a.len() == 2 {
        let Some(meta) = set_meta(r, key)? else { return Ok(Reply::Nil) };
        let pos = r.random() % meta.count.max(1);
        return Ok(bulk(members_at(r, key, &[pos])?.remove(0)));
    }
    let l = int(&a[2])?;
    if l == i64::MIN {
        return fail("ERR value is out of range, value must between -9223372036854775807 and 9223372036854775807");
    }
    let Some(meta) = set_meta(r, key)? else { return Ok(Reply::Array(Vec::new())) };
    let n = meta.count;
    if l == 0 || n == 0 {
        return Ok(Reply::Array(Vec::new()));
    }
    if l < 0 {
        // |l| independent draws, repeats allowed, in draw order.
        let k = l.unsigned_abs();
        if k > crate::PICKS_MAX {
            return fail(format!("ERR count {l} is too large; at most {} members are returned with repeats", crate::PICKS_MAX));
        }
        let mut draws = Vec::with_capacity(k as usize);
        for _ in 0..k {
            draws.push(r.random() % n);
        }
        let distinct: Vec<u64> = draws.iter().copied().collect::<BTreeSet<u64>>().into_iter().collect();
        let found: Vec<Bytes> = members_at(r, key, &distinct)?.into_iter().map(Bytes::from).collect();
        // Checked before the reply is built: repeats can make it far larger than the set.
        let size: usize = draws.iter().map(|p| found[distinct.binary_search(p).unwrap_or(0)].len() + 16).sum();
        if size > crate::REPLY_BYTES_MAX {
            return fail(format!("ERR the reply would be {size} bytes; the limit is {} (ask for fewer)", crate::REPLY_BYTES_MAX));
        }
        let out = draws.iter().map(|p| Reply::Bulk(found[distinct.binary_search(p).unwrap_or(0)].clone())).collect();
        return Ok(Reply::Array(out));
    }
    let k = l as u64;
    let chosen = if k >= n {
        members(r, key)?
    } else {
        let positions = pick(r, n, k);
        members_at(r, key, &positions)?
    };
    Ok(Reply::Array(chosen.into_iter().map(bulk).collect()))
}

fn spop(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let key = &a[1];
    if a.len() > 3 {
        return fail(SYNTAX);
    }
    if a.len() == 2 {
        let Some(mut meta) = set_meta(r, key)? else { return Ok(Reply::Nil) };
        let pos = r.random() % meta.count.max(1);
        let m = members_at(r, key, &[pos])?.remove(0);
        r.delete(key, &member_sortkey(&m))?;
        meta.count = meta.count.saturating_sub(1);
        store_meta(r, key, &meta)?;
        return Ok(bulk(m));
    }
    let k = nonnegative(&a[2])? as u64;
    let Some(mut meta) = set_meta(r, key)? else { return Ok(Reply::Set(Vec::new())) };
    if k == 0 {
        return Ok(Reply::Set(Vec::new()));
    }
    let n = meta.count;
    let mut chosen = if k >= n {
        members(r, key)?
    } else {
        let positions = pick(r, n, k);
        members_at(r, key, &positions)?
    };
    // In random order (drawn from the entry), so that a pop cut short below keeps no bias.
    for i in (1..chosen.len()).rev() {
        let j = (r.random() % (i as u64 + 1)) as usize;
        chosen.swap(i, j);
    }
    // As the list pops: a count larger than a reply may carry pops what fits.
    let mut size = 0;
    let keep = chosen
        .iter()
        .take_while(|m| {
            let fits = size < crate::POP_BYTES_MAX;
            size += m.len() + 16;
            fits
        })
        .count();
    chosen.truncate(keep);
    for m in &chosen {
        r.delete(key, &member_sortkey(m))?;
    }
    // Saturating: records written around the layout (Tern's own API) may outnumber the count.
    meta.count = meta.count.saturating_sub(chosen.len() as u64);
    store_meta(r, key, &meta)?;
    Ok(set_reply(chosen))
}

fn smove(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let (src, dst, m) = (&a[1], &a[2], &a[3]);
    // As Redis: a missing source answers 0 before the destination's type is looked at.
    let Some(mut src_meta) = set_meta(r, src)? else { return Ok(Reply::Int(0)) };
    let dst_meta = set_meta(r, dst)?;
    if src == dst {
        return Ok(Reply::Int(has(r, src, m)? as i64));
    }
    if !has(r, src, m)? {
        return Ok(Reply::Int(0));
    }
    let sk = member_sortkey(m);
    r.delete(src, &sk)?;
    src_meta.count = src_meta.count.saturating_sub(1);
    store_meta(r, src, &src_meta)?;
    let mut dst_meta = dst_meta.unwrap_or(Meta::new(KeyType::Set));
    if r.get(dst, &sk)?.is_none() {
        r.put(dst, &sk, dst_meta.expire_at_ms, b"")?;
        dst_meta.count += 1;
        store_meta(r, dst, &dst_meta)?;
    }
    Ok(Reply::Int(1))
}

/// Each key's metadata (None: missing), after checking that every key holds a set or nothing.
fn metas(r: &mut dyn Records, keys: &[Bytes]) -> Res<Vec<Option<Meta>>> {
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        out.push(set_meta(r, k)?);
    }
    Ok(out)
}

/// The intersection, walking the smallest set; at most `limit` members (0: all).
fn inter(r: &mut dyn Records, keys: &[Bytes], limit: u64) -> Res<Vec<Vec<u8>>> {
    let ms = metas(r, keys)?;
    if ms.iter().any(Option::is_none) {
        return Ok(Vec::new());
    }
    let mut order: Vec<(u64, &[u8])> = keys.iter().zip(&ms).map(|(k, m)| (m.map_or(0, |m| m.count), &k[..])).collect();
    order.sort_by_key(|&(c, _)| c);
    let first = order[0].1;
    let mut out = Vec::new();
    for m in members(r, first)? {
        let mut everywhere = true;
        for &(_, k) in &order[1..] {
            if k != first && !has(r, k, &m)? {
                everywhere = false;
                break;
            }
        }
        if everywhere {
            out.push(m);
            if limit > 0 && out.len() as u64 >= limit {
                break;
            }
        }
    }
    Ok(out)
}

fn union(r: &mut dyn Records, keys: &[Bytes]) -> Res<Vec<Vec<u8>>> {
    let ms = metas(r, keys)?;
    let mut out: BTreeSet<Vec<u8>> = BTreeSet::new();
    for (k, m) in keys.iter().zip(&ms) {
        if m.is_some() {
            out.extend(members(r, k)?);
        }
    }
    Ok(out.into_iter().collect())
}

fn diff(r: &mut dyn Records, keys: &[Bytes]) -> Res<Vec<Vec<u8>>> {
    let ms = metas(r, keys)?;
    if ms[0].is_none() || keys[1..].iter().any(|k| k == &keys[0]) {
        return Ok(Vec::new());
    }
    let mut out: BTreeSet<Vec<u8>> = members(r, &keys[0])?.into_iter().collect();
    for (k, m) in keys[1..].iter().zip(&ms[1..]) {
        let Some(m) = m else { continue };
        if out.is_empty() {
            break;
        }
        if m.count <= out.len() as u64 {
            for x in members(r, k)? {
                out.remove(&x);
            }
        } else {
            let mut gone = Vec::new();
            for x in &out {
                if has(r, k, x)? {
                    gone.push(x.clone());
                }
            }
            for x in &gone {
                out.remove(x);
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// SINTERSTORE, SUNIONSTORE, SDIFFSTORE: the sources are read (and type-checked) before the
/// destination, whatever it held, is replaced; an empty result leaves no destination.
fn store(name: &str, r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let (dst, keys) = (&a[1], &a[2..]);
    let result = match name {
        "SINTERSTORE" => inter(r, keys, 0)?,
        "SUNIONSTORE" => union(r, keys)?,
        _ => diff(r, keys)?,
    };
    delete_key(r, dst)?;
    for m in &result {
        r.put(dst, &member_sortkey(m), 0, b"")?;
    }
    let mut meta = Meta::new(KeyType::Set);
    meta.count = result.len() as u64;
    if meta.count > 0 {
        store_meta(r, dst, &meta)?;
    }
    Ok(Reply::Int(result.len() as i64))
}

fn sintercard(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let n = match parse_int(&a[1]) {
        Some(n) if n > 0 => n as u64,
        _ => return fail("ERR numkeys should be greater than 0"),
    };
    if n > a.len().saturating_sub(2) as u64 {
        return fail("ERR Number of keys can't be greater than number of args");
    }
    let n = n as usize;
    let mut limit = 0u64;
    let mut i = 2 + n;
    while i < a.len() {
        if !(is(&a[i], "LIMIT") && i + 1 < a.len()) {
            return fail(SYNTAX);
        }
        match parse_int(&a[i + 1]) {
            Some(l) if l >= 0 => limit = l as u64,
            _ => return fail("ERR LIMIT can't be negative"),
        }
        i += 2;
    }
    Ok(Reply::Int(inter(r, &a[2..2 + n], limit)?.len() as i64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{cmd, Mem};

    fn mem() -> Mem {
        Mem::default()
    }

    fn b(s: &str) -> Reply {
        Reply::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn set_of(v: &[&str]) -> Reply {
        Reply::Set(v.iter().map(|s| b(s)).collect())
    }

    fn items(x: Reply) -> Vec<Vec<u8>> {
        match x {
            Reply::Array(v) | Reply::Set(v) => v
                .into_iter()
                .map(|i| match i {
                    Reply::Bulk(m) => m.to_vec(),
                    other => panic!("not a member: {other:?}"),
                })
                .collect(),
            other => panic!("not a list of members: {other:?}"),
        }
    }

    fn exists(r: &Mem, key: &str) -> bool {
        r.map.keys().any(|(h, _)| h.as_slice() == key.as_bytes())
    }

    fn distinct(v: &[Vec<u8>]) -> usize {
        v.iter().collect::<BTreeSet<_>>().len()
    }

    #[test]
    fn add_remove_and_key_deletion() {
        let r = &mut mem();
        assert_eq!(cmd(r, "SADD s a b c"), Reply::Int(3));
        assert_eq!(cmd(r, "SADD s a d d"), Reply::Int(1));
        assert_eq!(cmd(r, "SCARD s"), Reply::Int(4));
        assert_eq!(cmd(r, "SISMEMBER s a"), Reply::Int(1));
        assert_eq!(cmd(r, "SISMEMBER s x"), Reply::Int(0));
        assert_eq!(cmd(r, "SMISMEMBER s a x"), Reply::Array(vec![Reply::Int(1), Reply::Int(0)]));
        assert_eq!(cmd(r, "SMISMEMBER nokey a"), Reply::Array(vec![Reply::Int(0)]));
        assert_eq!(cmd(r, "SREM s a x"), Reply::Int(1));
        assert_eq!(cmd(r, "SMEMBERS s"), set_of(&["b", "c", "d"]));
        assert_eq!(cmd(r, "SREM s b c d e"), Reply::Int(3));
        assert!(!exists(r, "s"));
        assert_eq!(cmd(r, "SCARD s"), Reply::Int(0));
        assert_eq!(cmd(r, "SMEMBERS s"), Reply::Set(vec![]));
        assert_eq!(cmd(r, "SREM s a"), Reply::Int(0));
        // New members take the key's TTL.
        cmd(r, "SADD t a");
        assert!(matches!(crate::layout::set_expiry(r, b"t", 5_000), Ok(true)));
        cmd(r, "SADD t b");
        assert_eq!(r.map.get(&(b"t".to_vec(), member_sortkey(b"b"))).map(|x| x.0), Some(5_000));
    }

    #[test]
    fn wrong_type() {
        let r = &mut mem();
        r.put(b"str", b"", 0, b"x").unwrap();
        cmd(r, "SADD s a");
        let wrong = Reply::Error(crate::WRONGTYPE.into());
        for c in ["SADD str a", "SREM str a", "SCARD str", "SMEMBERS str", "SPOP str", "SRANDMEMBER str 2", "SMOVE s str a"] {
            assert_eq!(cmd(r, c), wrong, "{c}");
        }
        assert_eq!(cmd(r, "SMOVE s str nope"), wrong);
        assert_eq!(cmd(r, "SMOVE nokey str a"), Reply::Int(0));
        assert_eq!(cmd(r, "SINTER nokey str"), wrong);
        assert_eq!(cmd(r, "SDIFF s str"), wrong);
        cmd(r, "SADD d e");
        assert_eq!(cmd(r, "SUNIONSTORE d s str"), wrong);
        assert_eq!(cmd(r, "SMEMBERS d"), set_of(&["e"]));
        assert_eq!(cmd(r, "SINTERCARD 2 s str"), wrong);
    }

    #[test]
    fn pop_and_random_members() {
        let r = &mut mem();
        let all: Vec<String> = (0..20).map(|i| format!("m{i:02}")).collect();
        cmd(r, &format!("SADD s {}", all.join(" ")));
        for k in [1usize, 5, 15, 19] {
            let got = items(cmd(r, &format!("SRANDMEMBER s {k}")));
            assert_eq!((got.len(), distinct(&got)), (k, k));
            assert!(got.iter().all(|m| all.iter().any(|x| x.as_bytes() == m.as_slice())));
        }
        assert_eq!(items(cmd(r, "SRANDMEMBER s 30")).len(), 20);
        let repeats = items(cmd(r, "SRANDMEMBER s -30"));
        assert_eq!(repeats.len(), 30);
        assert!(distinct(&repeats) < 30);
        assert_eq!(cmd(r, "SRANDMEMBER s 0"), Reply::Array(vec![]));
        assert_eq!(cmd(r, "SRANDMEMBER nokey 3"), Reply::Array(vec![]));
        assert_eq!(cmd(r, "SRANDMEMBER nokey"), Reply::Nil);
        assert!(matches!(cmd(r, "SRANDMEMBER s"), Reply::Bulk(_)));
        assert!(matches!(cmd(r, "SRANDMEMBER s -9223372036854775808"), Reply::Error(e) if e.contains("value is out of range")));
        assert_eq!(cmd(r, "SRANDMEMBER s 1 2"), Reply::Error(SYNTAX.into()));
        let mut seen: BTreeSet<Vec<u8>> = BTreeSet::new();
        for _ in 0..400 {
            seen.extend(items(cmd(r, "SRANDMEMBER s -1")));
        }
        assert_eq!(seen.len(), 20);

        assert_eq!(cmd(r, "SPOP s -1"), Reply::Error("ERR value is out of range, must be positive".into()));
        assert_eq!(cmd(r, "SPOP s 0"), Reply::Set(vec![]));
        let mut popped = items(cmd(r, "SPOP s 3"));
        assert_eq!(distinct(&popped), 3);
        assert_eq!(cmd(r, "SCARD s"), Reply::Int(17));
        popped.extend(items(cmd(r, "SPOP s 14")));
        assert_eq!(cmd(r, "SCARD s"), Reply::Int(3));
        match cmd(r, "SPOP s") {
            Reply::Bulk(m) => popped.push(m.to_vec()),
            other => panic!("{other:?}"),
        }
        popped.extend(items(cmd(r, "SPOP s 100")));
        assert_eq!(distinct(&popped), 20);
        assert_eq!(popped.len(), 20);
        assert!(!exists(r, "s"));
        assert_eq!(cmd(r, "SPOP s"), Reply::Nil);
        assert_eq!(cmd(r, "SPOP s 2"), Reply::Set(vec![]));
    }

    #[test]
    fn move_members() {
        let r = &mut mem();
        cmd(r, "SADD a x y");
        cmd(r, "SADD b z x");
        assert_eq!(cmd(r, "SMOVE a b x"), Reply::Int(1));
        assert_eq!(cmd(r, "SMEMBERS a"), set_of(&["y"]));
        assert_eq!(cmd(r, "SCARD b"), Reply::Int(2));
        assert_eq!(cmd(r, "SMOVE a b nope"), Reply::Int(0));
        assert_eq!(cmd(r, "SMOVE a a y"), Reply::Int(1));
        assert_eq!(cmd(r, "SMOVE a a q"), Reply::Int(0));
        assert_eq!(cmd(r, "SMOVE a c y"), Reply::Int(1));
        assert!(!exists(r, "a"));
        assert_eq!(cmd(r, "SMEMBERS c"), set_of(&["y"]));
        assert_eq!(cmd(r, "SMOVE a b y"), Reply::Int(0));
    }

    #[test]
    fn algebra_and_store() {
        let r = &mut mem();
        cmd(r, "SADD s1 a b c");
        cmd(r, "SADD s2 b c d");
        assert_eq!(cmd(r, "SINTER s1 s2"), set_of(&["b", "c"]));
        assert_eq!(cmd(r, "SINTER s1 s2 nokey"), Reply::Set(vec![]));
        assert_eq!(cmd(r, "SUNION s1 nokey s2"), set_of(&["a", "b", "c", "d"]));
        assert_eq!(cmd(r, "SDIFF s1 s2 nokey"), set_of(&["a"]));
        assert_eq!(cmd(r, "SDIFF s1 s1"), Reply::Set(vec![]));
        assert_eq!(cmd(r, "SDIFF nokey s1"), Reply::Set(vec![]));
        r.put(b"dst", b"", 9_000, b"string").unwrap();
        assert_eq!(cmd(r, "SINTERSTORE dst s1 s2"), Reply::Int(2));
        assert_eq!(cmd(r, "SMEMBERS dst"), set_of(&["b", "c"]));
        assert!(r.map.iter().filter(|((h, _), _)| h.as_slice() == &b"dst"[..]).all(|(_, (e, _))| *e == 0));
        assert_eq!(cmd(r, "SUNIONSTORE dst s1 s2"), Reply::Int(4));
        assert_eq!(cmd(r, "SDIFFSTORE dst s1 s2"), Reply::Int(1));
        assert_eq!(cmd(r, "SMEMBERS dst"), set_of(&["a"]));
        assert_eq!(cmd(r, "SDIFFSTORE dst s1 s1"), Reply::Int(0));
        assert!(!exists(r, "dst"));
        cmd(r, "SADD dst q");
        assert_eq!(cmd(r, "SINTERSTORE dst s1 nokey"), Reply::Int(0));
        assert!(!exists(r, "dst"));
        assert_eq!(cmd(r, "SUNIONSTORE s1 s1 s2"), Reply::Int(4));
        assert_eq!(cmd(r, "SCARD s1"), Reply::Int(4));
        assert_eq!(cmd(r, "SINTERCARD 2 s1 s2"), Reply::Int(3));
        assert_eq!(cmd(r, "SINTERCARD 2 s1 s2 LIMIT 2"), Reply::Int(2));
        assert_eq!(cmd(r, "SINTERCARD 2 s1 s2 limit 0"), Reply::Int(3));
        assert_eq!(cmd(r, "SINTERCARD 1 nokey"), Reply::Int(0));
        assert_eq!(cmd(r, "SINTERCARD 1 s1 LIMIT -1"), Reply::Error("ERR LIMIT can't be negative".into()));
        assert_eq!(cmd(r, "SINTERCARD 1 s1 LIMIT a"), Reply::Error("ERR LIMIT can't be negative".into()));
        assert_eq!(cmd(r, "SINTERCARD 1 s1 LIMIT"), Reply::Error(SYNTAX.into()));
        assert_eq!(cmd(r, "SINTERCARD 1 s1 s2"), Reply::Error(SYNTAX.into()));
    }
}
