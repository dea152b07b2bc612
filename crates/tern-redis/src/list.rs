//! Lists: metadata (head and tail positions) and one record per element at its position (see
//! `layout`). Pushes and pops cost one record per element; LINDEX and LSET one record; LRANGE the
//! range; LTRIM the elements removed; LREM, LINSERT and LPOS the whole list (LINSERT moves the
//! shorter side of the insertion point).

use crate::args::{count, index_range, int, is, upper};
use crate::layout::{check_value, collection, list_sortkey, store_meta, KeyType, Meta};
use crate::{fail, Records, Reply, Res, SYNTAX};
use bytes::Bytes;

pub fn run(name: &str, r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let key = &a[1][..];
    match name {
        "LPUSH" | "RPUSH" | "LPUSHX" | "RPUSHX" => {
            for v in &a[2..] {
                check_value(v)?;
            }
            let meta = collection(r, key, KeyType::List)?;
            if meta.is_none() && name.ends_with('X') {
                return Ok(Reply::Int(0));
            }
            let mut meta = meta.unwrap_or_else(|| Meta::new(KeyType::List));
            for v in &a[2..] {
                push(r, key, &mut meta, name.starts_with('L'), v)?;
            }
            store_meta(r, key, &meta)?;
            Ok(Reply::Int(meta.count as i64))
        }
        "LPOP" | "RPOP" => {
            let left = name == "LPOP";
            if a.len() > 3 {
                return Err(crate::commands::wrong_args(name).into());
            }
            let wanted = a.get(2).map(|c| count(c)).transpose()?;
            let Some(mut meta) = collection(r, key, KeyType::List)? else {
                return Ok(if wanted.is_some() { Reply::NilArray } else { Reply::Nil });
            };
            let Some(wanted) = wanted else {
                let v = pop(r, key, &mut meta, left)?;
                store_meta(r, key, &meta)?;
                return Ok(Reply::opt(v.map(Bytes::from)));
            };
            let mut out = Vec::new();
            let mut size = 0;
            while (out.len() as i64) < wanted && size < crate::POP_BYTES_MAX {
                let Some(v) = pop(r, key, &mut meta, left)? else { break };
                size += v.len() + 16;
                out.push(Reply::bulk(v));
            }
            store_meta(r, key, &meta)?;
            Ok(Reply::Array(out))
        }
        "LLEN" => Ok(Reply::Int(collection(r, key, KeyType::List)?.map_or(0, |m| m.count as i64))),
        "LRANGE" => {
            let (start, stop) = (int(&a[2])?, int(&a[3])?);
            let Some(meta) = collection(r, key, KeyType::List)? else { return Ok(Reply::Array(Vec::new())) };
            let Some((from, to)) = index_range(start, stop, meta.count as i64) else { return Ok(Reply::Array(Vec::new())) };
            let items = range(r, key, &meta, from, to)?;
            Ok(Reply::Array(items.into_iter().map(|(_, v)| Reply::bulk(v)).collect()))
        }
        "LINDEX" => {
            let i = int(&a[2])?;
            let Some(meta) = collection(r, key, KeyType::List)? else { return Ok(Reply::Nil) };
            Ok(match position(&meta, i) {
                Some(p) => Reply::opt(r.get(key, &list_sortkey(p))?.map(|(_, v)| v.into())),
                None => Reply::Nil,
            })
        }
        "LSET" => {
            let i = int(&a[2])?;
            check_value(&a[3])?;
            let Some(meta) = collection(r, key, KeyType::List)? else { return fail("ERR no such key") };
            let Some(p) = position(&meta, i) else { return fail("ERR index out of range") };
            r.put(key, &list_sortkey(p), meta.expire_at_ms, &a[3])?;
            Ok(Reply::Ok)
        }
        "LREM" => lrem(r, key, int(&a[2])?, &a[3]),
        "LTRIM" => {
            let (start, stop) = (int(&a[2])?, int(&a[3])?);
            let Some(mut meta) = collection(r, key, KeyType::List)? else { return Ok(Reply::Ok) };
            let (keep_from, keep_to) = index_range(start, stop, meta.count as i64).unwrap_or((0, 0));
            let (head, tail) = (meta.head, meta.tail);
            for p in (head..head + keep_from).chain(head + keep_to.max(keep_from)..tail) {
                r.delete(key, &list_sortkey(p))?;
            }
            meta.head = head + keep_from;
            meta.tail = (head + keep_to).max(meta.head);
            meta.count = (meta.tail - meta.head) as u64;
            store_meta(r, key, &meta)?;
            Ok(Reply::Ok)
        }
        "LINSERT" => {
            let before = if is(&a[2], "BEFORE") {
                true
            } else if is(&a[2], "AFTER") {
                false
            } else {
                return fail(SYNTAX);
            };
            check_value(&a[4])?;
            let Some(mut meta) = collection(r, key, KeyType::List)? else { return Ok(Reply::Int(0)) };
            let all = range(r, key, &meta, 0, meta.count as i64)?;
            let Some(i) = all.iter().position(|(_, v)| v[..] == a[3][..]) else { return Ok(Reply::Int(-1)) };
            let at = if before { i } else { i + 1 } as i64;
            if at >= meta.count as i64 - at {
                // Move the right side one position right.
                for (p, v) in all[at as usize..].iter().rev() {
                    r.put(key, &list_sortkey(p + 1), meta.expire_at_ms, v)?;
                }
                r.put(key, &list_sortkey(meta.head + at), meta.expire_at_ms, &a[4])?;
                meta.tail += 1;
            } else {
                // Move the left side one position left.
                for (p, v) in all[..at as usize].iter() {
                    r.put(key, &list_sortkey(p - 1), meta.expire_at_ms, v)?;
                }
                r.put(key, &list_sortkey(meta.head + at - 1), meta.expire_at_ms, &a[4])?;
                meta.head -= 1;
            }
            meta.count += 1;
            store_meta(r, key, &meta)?;
            Ok(Reply::Int(meta.count as i64))
        }
        "LPOS" => lpos(r, a),
        "LMPOP" => {
            let (keys, side, wanted) = crate::args::mpop(a, ["LEFT", "RIGHT"])?;
            for key in keys {
                let Some(mut meta) = collection(r, &key, KeyType::List)? else { continue };
                let mut out = Vec::new();
                let mut size = 0;
                while (out.len() as i64) < wanted && size < crate::POP_BYTES_MAX {
                    let Some(v) = pop(r, &key, &mut meta, side == "LEFT")? else { break };
                    size += v.len() + 16;
                    out.push(Reply::bulk(v));
                }
                store_meta(r, &key, &meta)?;
                return Ok(Reply::Array(vec![Reply::Bulk(key), Reply::Array(out)]));
            }
            Ok(Reply::NilArray)
        }
        "LMOVE" | "RPOPLPUSH" => {
            let (from_left, to_left) = if name == "RPOPLPUSH" { (false, true) } else { (side(&a[3])?, side(&a[4])?) };
            let (src, dst) = (&a[1][..], &a[2][..]);
            let Some(mut meta) = collection(r, src, KeyType::List)? else { return Ok(Reply::Nil) };
            collection(r, dst, KeyType::List)?; // WRONGTYPE before anything moves
            let Some(v) = pop(r, src, &mut meta, from_left)? else { return Ok(Reply::Nil) };
            if src == dst {
                // A rotation: the same list (and its expiry), never emptied in between.
                push(r, dst, &mut meta, to_left, &v)?;
                store_meta(r, dst, &meta)?;
                return Ok(Reply::bulk(v));
            }
            store_meta(r, src, &meta)?;
            let mut to = collection(r, dst, KeyType::List)?.unwrap_or_else(|| Meta::new(KeyType::List));
            push(r, dst, &mut to, to_left, &v)?;
            store_meta(r, dst, &to)?;
            Ok(Reply::bulk(v))
        }
        _ => fail(format!("ERR unknown list command '{name}'")),
    }
}

fn side(b: &[u8]) -> Res<bool> {
    match upper(b).as_str() {
        "LEFT" => Ok(true),
        "RIGHT" => Ok(false),
        _ => fail(SYNTAX),
    }
}

/// The position of index `i` (negative from the end), if it is in the list.
fn position(meta: &Meta, i: i64) -> Option<i64> {
    let n = meta.count as i64;
    let i = if i < 0 { n + i } else { i };
    (0..n).contains(&i).then(|| meta.head + i)
}

fn push(r: &mut dyn Records, key: &[u8], meta: &mut Meta, left: bool, v: &[u8]) -> Res<()> {
    let p = if left {
        meta.head -= 1;
        meta.head
    } else {
        meta.tail += 1;
        meta.tail - 1
    };
    r.put(key, &list_sortkey(p), meta.expire_at_ms, v)?;
    meta.count += 1;
    Ok(())
}

fn pop(r: &mut dyn Records, key: &[u8], meta: &mut Meta, left: bool) -> Res<Option<Vec<u8>>> {
    if meta.count == 0 {
        return Ok(None);
    }
    let p = if left { meta.head } else { meta.tail - 1 };
    let sk = list_sortkey(p);
    let Some((_, v)) = r.get(key, &sk)? else { return crate::malformed(format!("list element at position {p} is missing")) };
    r.delete(key, &sk)?;
    if left {
        meta.head += 1;
    } else {
        meta.tail -= 1;
    }
    meta.count -= 1;
    Ok(Some(v))
}

/// The elements at indexes [from, to): (position, value).
fn range(r: &mut dyn Records, key: &[u8], meta: &Meta, from: i64, to: i64) -> Res<Vec<(i64, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut size = 0;
    let mut p = meta.head + from;
    r.scan(key, &list_sortkey(meta.head + from), Some(&list_sortkey(meta.head + to)), false, &mut |_, _, v| {
        size += v.len() + 16;
        out.push((p, v.to_vec()));
        p += 1;
        size <= crate::REPLY_BYTES_MAX
    })?;
    if size > crate::REPLY_BYTES_MAX {
        return fail(format!("ERR the range is larger than a reply may be ({} bytes); ask for a smaller range", crate::REPLY_BYTES_MAX));
    }
    Ok(out)
}

fn lrem(r: &mut dyn Records, key: &[u8], n: i64, element: &[u8]) -> Res<Reply> {
    let Some(mut meta) = collection(r, key, KeyType::List)? else { return Ok(Reply::Int(0)) };
    let all = range(r, key, &meta, 0, meta.count as i64)?;
    let limit = if n == 0 { usize::MAX } else { n.unsigned_abs() as usize };
    let mut remove = vec![false; all.len()];
    let mut removed = 0;
    let order: Box<dyn Iterator<Item = usize>> = if n < 0 { Box::new((0..all.len()).rev()) } else { Box::new(0..all.len()) };
    for i in order {
        if removed == limit {
            break;
        }
        if all[i].1[..] == *element {
            remove[i] = true;
            removed += 1;
        }
    }
    if removed == 0 {
        return Ok(Reply::Int(0));
    }
    // Survivors close ranks from the first removed element on.
    let first = remove.iter().position(|&x| x).expect("one removed");
    let mut p = meta.head + first as i64;
    for (i, (_, v)) in all.iter().enumerate().skip(first) {
        if !remove[i] {
            r.put(key, &list_sortkey(p), meta.expire_at_ms, v)?;
            p += 1;
        }
    }
    for q in p..meta.tail {
        r.delete(key, &list_sortkey(q))?;
    }
    meta.tail = p;
    meta.count -= removed as u64;
    store_meta(r, key, &meta)?;
    Ok(Reply::Int(removed as i64))
}

fn lpos(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let (mut rank, mut want, mut maxlen) = (1i64, None::<i64>, 0i64);
    let mut i = 3;
    while i < a.len() {
        let Some(v) = a.get(i + 1) else { return fail(SYNTAX) };
        match upper(&a[i]).as_str() {
            "RANK" => {
                rank = int(v)?;
                if rank == 0 {
                    return fail("ERR RANK can't be zero: use 1 to start from the first match, 2 from the second ... or use negative to start from the end of the list");
                }
                if rank == i64::MIN {
                    return fail("ERR value is out of range");
                }
            }
            "COUNT" => {
                let c = int(v)?;
                if c < 0 {
                    return fail("ERR COUNT can't be negative");
                }
                want = Some(c);
            }
            "MAXLEN" => {
                maxlen = int(v)?;
                if maxlen < 0 {
                    return fail("ERR MAXLEN can't be negative");
                }
            }
            _ => return fail(SYNTAX),
        }
        i += 2;
    }
    let none = if want.is_some() { Reply::Array(Vec::new()) } else { Reply::Nil };
    let Some(meta) = collection(r, &a[1], KeyType::List)? else { return Ok(none) };
    let n = meta.count as i64;
    let element = &a[2][..];
    let limit = want.map_or(1, |c| if c == 0 { usize::MAX } else { c as usize });
    let mut found = Vec::new();
    let mut skip = rank.unsigned_abs() - 1;
    let mut scanned = 0i64;
    let (from, to) = (list_sortkey(meta.head), list_sortkey(meta.tail));
    let mut index = if rank > 0 { 0 } else { n - 1 };
    r.scan(&a[1], &from, Some(&to), rank < 0, &mut |_, _, v| {
        if maxlen != 0 && scanned >= maxlen {
            return false;
        }
        scanned += 1;
        if v == element {
            if skip > 0 {
                skip -= 1;
            } else {
                found.push(Reply::Int(index));
            }
        }
        index += if rank > 0 { 1 } else { -1 };
        found.len() < limit
    })?;
    Ok(match want {
        Some(_) => Reply::Array(found),
        None => found.pop().unwrap_or(Reply::Nil),
    })
}
