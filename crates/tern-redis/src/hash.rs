//! Hashes: one record per field, no metadata (see `layout`). HSET, HGET, HDEL and the like cost
//! one record per field named; HLEN, HGETALL, HKEYS, HVALS and HRANDFIELD read every field.

use crate::args::{int, is};
use crate::layout::{check_member, check_value, hash_field_of_sortkey, hash_sortkey, lookup, KeyType};
use crate::strings::{parse_float_value, parse_int_value};
use crate::{fail, format_double, Records, Reply, Res, SYNTAX, WRONGTYPE};
use bytes::Bytes;

pub fn run(name: &str, r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let key = &a[1][..];
    match name {
        "HSET" | "HMSET" => {
            if a.len() % 2 == 1 {
                return Err(crate::commands::wrong_args(name).into());
            }
            let expire = hash_expiry(r, key)?;
            let mut added = 0;
            for fv in a[2..].chunks(2) {
                check_member(&fv[0])?;
                check_value(&fv[1])?;
            }
            for fv in a[2..].chunks(2) {
                let sk = hash_sortkey(&fv[0]);
                if r.get(key, &sk)?.is_none() {
                    added += 1;
                }
                r.put(key, &sk, expire, &fv[1])?;
            }
            Ok(if name == "HSET" { Reply::Int(added) } else { Reply::Ok })
        }
        "HSETNX" => {
            let expire = hash_expiry(r, key)?;
            check_member(&a[2])?;
            check_value(&a[3])?;
            let sk = hash_sortkey(&a[2]);
            if r.get(key, &sk)?.is_some() {
                return Ok(Reply::Int(0));
            }
            r.put(key, &sk, expire, &a[3])?;
            Ok(Reply::Int(1))
        }
        "HGET" => Ok(Reply::opt(field(r, key, &a[2])?.map(Bytes::from))),
        "HMGET" => {
            let mut out = Vec::with_capacity(a.len() - 2);
            for f in &a[2..] {
                out.push(Reply::opt(field(r, key, f)?.map(Bytes::from)));
            }
            Ok(Reply::Array(out))
        }
        "HEXISTS" => Ok(Reply::Int(field(r, key, &a[2])?.is_some() as i64)),
        "HSTRLEN" => Ok(Reply::Int(field(r, key, &a[2])?.map_or(0, |v| v.len() as i64))),
        "HDEL" => {
            hash_expiry(r, key)?;
            let mut removed = 0;
            for f in &a[2..] {
                let sk = hash_sortkey(f);
                if r.get(key, &sk)?.is_some() {
                    r.delete(key, &sk)?;
                    removed += 1;
                }
            }
            Ok(Reply::Int(removed))
        }
        "HLEN" => Ok(Reply::Int(fields(r, key, false)?.len() as i64)),
        "HKEYS" => Ok(Reply::Array(fields(r, key, false)?.into_iter().map(|(f, _)| Reply::bulk(f)).collect())),
        "HVALS" => Ok(Reply::Array(fields(r, key, true)?.into_iter().map(|(_, v)| Reply::bulk(v)).collect())),
        "HGETALL" => Ok(Reply::Map(fields(r, key, true)?.into_iter().map(|(f, v)| (Reply::bulk(f), Reply::bulk(v))).collect())),
        "HINCRBY" => {
            let delta = int(&a[3])?;
            let expire = hash_expiry(r, key)?;
            check_member(&a[2])?;
            let sk = hash_sortkey(&a[2]);
            let old = match r.get(key, &sk)? {
                None => 0,
                Some((_, v)) => parse_int_value(&v).ok_or_else(|| Reply::err("ERR hash value is not an integer"))?,
            };
            let Some(new) = old.checked_add(delta) else { return fail("ERR increment or decrement would overflow") };
            r.put(key, &sk, expire, new.to_string().as_bytes())?;
            Ok(Reply::Int(new))
        }
        "HINCRBYFLOAT" => {
            let delta = crate::args::float(&a[3])?;
            if !delta.is_finite() {
                return fail("ERR value is NaN or Infinity");
            }
            let expire = hash_expiry(r, key)?;
            check_member(&a[2])?;
            let sk = hash_sortkey(&a[2]);
            let old = match r.get(key, &sk)? {
                None => 0.0,
                Some((_, v)) => parse_float_value(&v).ok_or_else(|| Reply::err("ERR hash value is not a float"))?,
            };
            let new = old + delta;
            if !new.is_finite() {
                return fail("ERR increment would produce NaN or Infinity");
            }
            let text = format_double(new);
            r.put(key, &sk, expire, text.as_bytes())?;
            Ok(Reply::bulk(text))
        }
        "HRANDFIELD" => randfield(r, a),
        _ => fail(format!("ERR unknown hash command '{name}'")),
    }
}

/// The expiry new fields of `key` take (0 for a new hash); WRONGTYPE unless it is a hash or absent.
fn hash_expiry(r: &mut dyn Records, key: &[u8]) -> Res<u64> {
    let k = lookup(r, key)?;
    match k.kind {
        KeyType::None => Ok(0),
        KeyType::Hash => Ok(k.expire_at_ms),
        _ => fail(WRONGTYPE),
    }
}

/// One field's value; WRONGTYPE if the key holds another type.
fn field(r: &mut dyn Records, key: &[u8], f: &[u8]) -> Res<Option<Vec<u8>>> {
    if let Some((_, v)) = r.get(key, &hash_sortkey(f))? {
        return Ok(Some(v));
    }
    hash_expiry(r, key)?;
    Ok(None)
}

/// Every field (and value) of the hash at `key`.
pub fn fields(r: &mut dyn Records, key: &[u8], values: bool) -> Res<Vec<(Vec<u8>, Vec<u8>)>> {
    hash_expiry(r, key)?;
    let mut out = Vec::new();
    let mut size = 0;
    r.scan(key, b"", None, false, &mut |sk, _, v| {
        if let Some(f) = hash_field_of_sortkey(sk) {
            size += f.len() + if values { v.len() } else { 0 } + 16;
            out.push((f.to_vec(), if values { v.to_vec() } else { Vec::new() }));
        }
        size <= crate::REPLY_BYTES_MAX
    })?;
    if size > crate::REPLY_BYTES_MAX {
        return fail(format!("ERR the hash is larger than a reply may be ({} bytes); read it with HSCAN", crate::REPLY_BYTES_MAX));
    }
    Ok(out)
}

fn randfield(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let key = &a[1][..];
    let with_values = match a.len() {
        2 | 3 => false,
        4 if is(&a[3], "WITHVALUES") => true,
        _ => return fail(SYNTAX),
    };
    let Some(count) = a.get(2) else {
        let all = fields(r, key, false)?;
        if all.is_empty() {
            return Ok(Reply::Nil);
        }
        let pick = (r.random() % all.len() as u64) as usize;
        return Ok(Reply::bulk(all[pick].0.clone()));
    };
    let count = int(count)?;
    if !(-(i64::MAX / 2)..=i64::MAX / 2).contains(&count) {
        return fail("ERR value is out of range");
    }
    let all: Vec<(Bytes, Bytes)> = fields(r, key, with_values)?.into_iter().map(|(f, v)| (f.into(), v.into())).collect();
    let picks = crate::random_picks(r, all.len(), count)?;
    // Repeated picks share their bytes; the reply they make is checked before it is built.
    let size: usize = picks.iter().map(|&i| all[i].0.len() + all[i].1.len() + 32).sum();
    if size > crate::REPLY_BYTES_MAX {
        return fail(format!("ERR the reply would be {size} bytes; the limit is {} (ask for fewer)", crate::REPLY_BYTES_MAX));
    }
    Ok(if with_values {
        Reply::Pairs(picks.into_iter().map(|i| (Reply::Bulk(all[i].0.clone()), Reply::Bulk(all[i].1.clone()))).collect())
    } else {
        Reply::Array(picks.into_iter().map(|i| Reply::Bulk(all[i].0.clone())).collect())
    })
}
