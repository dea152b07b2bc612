//! Commands on keys of any type. DEL, RENAME, COPY and the EXPIRE family touch every record of the
//! key (O(records): a key's expiry lives on each of its records); TYPE, EXISTS and TTL read one.

use crate::args::{int, is, upper};
use crate::glob::glob_match;
use crate::layout::{self, delete_key, lookup, member_of, KeyType, ELEMENTS, SCORES};
use crate::{fail, Records, Reply, Res, SYNTAX, WRONGTYPE};
use bytes::Bytes;

pub fn run(name: &str, r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let key = &a[1][..];
    match name {
        "DEL" | "UNLINK" => {
            let mut n = 0;
            for k in &a[1..] {
                n += delete_key(r, k)? as i64;
            }
            Ok(Reply::Int(n))
        }
        "EXISTS" | "TOUCH" => {
            let mut n = 0;
            for k in &a[1..] {
                n += (lookup(r, k)?.kind != KeyType::None) as i64;
            }
            Ok(Reply::Int(n))
        }
        "TYPE" => Ok(Reply::Simple(lookup(r, key)?.kind.name().into())),
        "EXPIRE" | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT" => expire(name, r, a),
        "PERSIST" => {
            let k = lookup(r, key)?;
            if k.kind == KeyType::None || k.expire_at_ms == 0 {
                return Ok(Reply::Int(0));
            }
            layout::set_expiry(r, key, 0)?;
            Ok(Reply::Int(1))
        }
        "TTL" | "PTTL" | "EXPIRETIME" | "PEXPIRETIME" => {
            let k = lookup(r, key)?;
            Ok(Reply::Int(match k.kind {
                KeyType::None => -2,
                _ if k.expire_at_ms == 0 => -1,
                _ => {
                    // Expiries written through Redis are below i64::MAX; ones written through
                    // Tern's own API may not be.
                    let at = k.expire_at_ms.min(i64::MAX as u64) as i64;
                    let left = at.saturating_sub(r.now_ms() as i64).max(0);
                    match name {
                        "TTL" => left.saturating_add(500) / 1000,
                        "PTTL" => left,
                        "EXPIRETIME" => at.saturating_add(500) / 1000,
                        _ => at,
                    }
                }
            }))
        }
        "RENAME" | "RENAMENX" => {
            let (src, dst) = (key, &a[2][..]);
            let from = lookup(r, src)?;
            if from.kind == KeyType::None {
                return fail("ERR no such key");
            }
            if src == dst {
                return Ok(if name == "RENAME" { Reply::Ok } else { Reply::Int(0) });
            }
            if name == "RENAMENX" && lookup(r, dst)?.kind != KeyType::None {
                return Ok(Reply::Int(0));
            }
            copy_key(r, src, dst, from.expire_at_ms)?;
            delete_key(r, src)?;
            Ok(if name == "RENAME" { Reply::Ok } else { Reply::Int(1) })
        }
        "COPY" => {
            let (src, dst) = (key, &a[2][..]);
            let mut replace = false;
            let mut i = 3;
            while i < a.len() {
                if is(&a[i], "REPLACE") {
                    replace = true;
                } else if is(&a[i], "DB") && i + 1 < a.len() {
                    if int(&a[i + 1])? != 0 {
                        return fail("ERR DB index is out of range (Tern has one database, 0)");
                    }
                    i += 1;
                } else {
                    return fail(SYNTAX);
                }
                i += 1;
            }
            if src == dst {
                return fail("ERR source and destination objects are the same");
            }
            let from = lookup(r, src)?;
            if from.kind == KeyType::None || (!replace && lookup(r, dst)?.kind != KeyType::None) {
                return Ok(Reply::Int(0));
            }
            copy_key(r, src, dst, from.expire_at_ms)?;
            Ok(Reply::Int(1))
        }
        "OBJECT" => object(r, a),
        "MEMORY" => match (upper(&a[1]).as_str(), a.len()) {
            // The bytes of the key's records as stored (sortkeys, values, and each record's key and
            // header), before compression.
            ("USAGE", 3) | ("USAGE", 5) => {
                let mut bytes = 0u64;
                r.scan(&a[2], b"", None, false, &mut |sk, _, v| {
                    bytes += (a[2].len() + sk.len() + v.len() + 24) as u64;
                    true
                })?;
                Ok(if bytes == 0 { Reply::Nil } else { Reply::Int(bytes as i64) })
            }
            _ => fail(format!("ERR unknown subcommand or wrong number of arguments for '{}'. Try MEMORY HELP.", String::from_utf8_lossy(&a[1]))),
        },
        "DUMP" => dump(r, key),
        "RESTORE" => restore(r, a),
        "TERN.DIGEST" => Ok(Reply::bulk(digest(r, key)?.to_string())),
        "TERN.SCAN" => scan(r, a),
        _ => fail(format!("ERR unknown keyspace command '{name}'")),
    }
}

/// Replaces `dst` (another key) with a copy of every record of `src`, expiring at `expire_at_ms`.
fn copy_key(r: &mut dyn Records, src: &[u8], dst: &[u8], expire_at_ms: u64) -> Res<()> {
    delete_key(r, dst)?;
    layout::each_chunk(r, src, &mut |r, chunk| {
        for (sk, _, v) in &chunk {
            r.put(dst, sk, expire_at_ms, v)?;
        }
        Ok(())
    })?;
    Ok(())
}

fn expire(name: &str, r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let n = int(&a[2])?;
    let now = r.now_ms() as i64;
    let invalid = || Reply::err(format!("ERR invalid expire time in '{}' command", name.to_ascii_lowercase()));
    let at = match name {
        "EXPIRE" => n.checked_mul(1000).and_then(|v| v.checked_add(now)),
        "PEXPIRE" => n.checked_add(now),
        "EXPIREAT" => n.checked_mul(1000),
        _ => Some(n),
    }
    .ok_or_else(invalid)?;
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for o in &a[3..] {
        match upper(o).as_str() {
            "NX" => nx = true,
            "XX" => xx = true,
            "GT" => gt = true,
            "LT" => lt = true,
            other => return fail(format!("ERR Unsupported option {other}")),
        }
    }
    if nx && (xx || gt || lt) {
        return fail("ERR NX and XX, GT or LT options at the same time are not compatible");
    }
    if gt && lt {
        return fail("ERR GT and LT options at the same time are not compatible");
    }
    let k = lookup(r, &a[1])?;
    if k.kind == KeyType::None {
        return Ok(Reply::Int(0));
    }
    // No expiry counts as an infinite one for GT and LT.
    let current = k.expire_at_ms.min(i64::MAX as u64);
    let refused = (nx && current != 0)
        || (xx && current == 0)
        || (gt && (current == 0 || at <= current as i64))
        || (lt && current != 0 && at >= current as i64);
    if refused {
        return Ok(Reply::Int(0));
    }
    if at <= now {
        delete_key(r, &a[1])?;
    } else {
        layout::set_expiry(r, &a[1], at as u64)?;
    }
    Ok(Reply::Int(1))
}

fn object(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let sub = upper(&a[1]);
    if sub == "HELP" {
        let lines = [
            "OBJECT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
            "ENCODING <key>",
            "    Return the kind of internal representation used in order to store the value",
            "    associated with a <key>.",
            "FREQ <key>",
            "    Return the access frequency index of the <key> (Tern does not track it: 0).",
            "IDLETIME <key>",
            "    Return the idle time of the <key> (Tern does not track it: 0).",
            "REFCOUNT <key>",
            "    Return the number of references of the value associated with the specified",
            "    <key> (always 1).",
        ];
        return Ok(Reply::Array(lines.iter().map(|l| Reply::Simple(l.to_string())).collect()));
    }
    if a.len() != 3 {
        return fail(format!("ERR unknown subcommand or wrong number of arguments for '{}'. Try OBJECT HELP.", String::from_utf8_lossy(&a[1])));
    }
    let k = lookup(r, &a[2])?;
    if k.kind == KeyType::None {
        return Ok(Reply::Nil);
    }
    match sub.as_str() {
        "ENCODING" => {
            let encoding = match k.kind {
                KeyType::String => {
                    let v = r.get(&a[2], b"")?.map(|(_, v)| v).unwrap_or_default();
                    if crate::strings::parse_int_value(&v).is_some() {
                        "int"
                    } else if v.len() <= 44 {
                        "embstr"
                    } else {
                        "raw"
                    }
                }
                KeyType::List => "quicklist",
                KeyType::ZSet => "skiplist",
                _ => "hashtable",
            };
            Ok(Reply::bulk(encoding))
        }
        "FREQ" | "IDLETIME" => Ok(Reply::Int(0)),
        "REFCOUNT" => Ok(Reply::Int(1)),
        _ => fail(format!("ERR unknown subcommand '{}'. Try OBJECT HELP.", String::from_utf8_lossy(&a[1]))),
    }
}

/// A fingerprint of everything `key` holds (sortkeys, expiries and values): WATCH compares it.
pub fn digest(r: &mut dyn Records, key: &[u8]) -> Res<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |bytes: &[u8]| {
        for &b in (bytes.len() as u64).to_be_bytes().iter().chain(bytes) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    r.scan(key, b"", None, false, &mut |sk, expire, v| {
        mix(sk);
        mix(&expire.to_be_bytes());
        mix(v);
        true
    })?;
    Ok(h)
}

/// TERN.SCAN key resume count type [MATCH pattern]: HSCAN, SSCAN and ZSCAN's step on a key of
/// `type` (hash, set or zset). Visits up to `count` elements from the sortkey `resume` on; answers
/// [next resume or nil when done, items].
fn scan(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let key = &a[1][..];
    let count = int(&a[3])?.clamp(1, 100_000) as usize;
    let pattern = match &a[5..] {
        [] => None,
        [m, p] if is(m, "MATCH") => Some(p.clone()),
        _ => return fail(SYNTAX),
    };
    let k = lookup(r, key)?;
    if k.kind != KeyType::None && !a[4].eq_ignore_ascii_case(k.kind.name().as_bytes()) {
        return fail(WRONGTYPE);
    }
    let (from, to): (&[u8], Option<&[u8]>) = match k.kind {
        KeyType::None => return Ok(Reply::Array(vec![Reply::Nil, Reply::Array(Vec::new())])),
        KeyType::Hash => (b"", None),
        KeyType::Set | KeyType::ZSet => (ELEMENTS, Some(SCORES)),
        _ => return fail(WRONGTYPE),
    };
    let start = if a[2][..] > *from { a[2].to_vec() } else { from.to_vec() };
    let mut items = Vec::new();
    let mut seen = 0;
    let mut last: Option<Vec<u8>> = None;
    let mut size = 0;
    r.scan(key, &start, to, false, &mut |sk, _, v| {
        seen += 1;
        last = Some(sk.to_vec());
        let element = match k.kind {
            KeyType::Hash => layout::hash_field_of_sortkey(sk).unwrap_or_default(),
            _ => member_of(sk),
        };
        if pattern.as_ref().is_none_or(|p| glob_match(p, element)) {
            size += element.len() + v.len() + 32;
            items.push(Reply::bulk(element.to_vec()));
            match k.kind {
                KeyType::Hash => items.push(Reply::bulk(v.to_vec())),
                KeyType::ZSet if v.len() == 8 => {
                    let score = f64::from_bits(u64::from_be_bytes(v.try_into().expect("8 bytes")));
                    items.push(Reply::bulk(crate::format_score(score)));
                }
                _ => {}
            }
        }
        seen < count && size < crate::REPLY_BYTES_MAX / 2
    })?;
    let next = match last {
        Some(mut sk) if seen >= count || size >= crate::REPLY_BYTES_MAX / 2 => {
            sk.push(0);
            Reply::bulk(sk)
        }
        _ => Reply::Nil,
    };
    Ok(Reply::Array(vec![next, Reply::Array(items)]))
}

/// DUMP's payload: the key's content by type (not its records), so that RESTORE rebuilds the
/// layout itself and a payload, whatever it holds, can only make a well-formed key.
/// `TERN` `1` type, then u32 BE counts and lengths, then a CRC32 of everything before it.
const DUMP_MAGIC: &[u8] = b"TERN1";

fn dump(r: &mut dyn Records, key: &[u8]) -> Res<Reply> {
    let k = lookup(r, key)?;
    let mut items: Vec<Vec<u8>> = Vec::new();
    let code = match k.kind {
        KeyType::None => return Ok(Reply::Nil),
        KeyType::String => {
            items.push(r.get(key, b"")?.map(|(_, v)| v).unwrap_or_default());
            b's'
        }
        KeyType::Hash => {
            for (f, v) in crate::hash::fields(r, key, true)? {
                items.push(f);
                items.push(v);
            }
            b'h'
        }
        KeyType::List | KeyType::Set | KeyType::ZSet => {
            let mut size = 0;
            r.scan(key, ELEMENTS, Some(SCORES), false, &mut |sk, _, v| {
                size += sk.len() + v.len();
                match k.kind {
                    KeyType::List => items.push(v.to_vec()),
                    KeyType::Set => items.push(member_of(sk).to_vec()),
                    _ => {
                        items.push(member_of(sk).to_vec());
                        items.push(v.to_vec());
                    }
                }
                size < crate::REPLY_BYTES_MAX
            })?;
            if size >= crate::REPLY_BYTES_MAX {
                return fail(format!("ERR the key is larger than a reply may be ({} bytes)", crate::REPLY_BYTES_MAX));
            }
            match k.kind {
                KeyType::List => b'l',
                KeyType::Set => b'e',
                _ => b'z',
            }
        }
    };
    let mut out = DUMP_MAGIC.to_vec();
    out.push(code);
    out.extend_from_slice(&(items.len() as u32).to_be_bytes());
    for item in &items {
        out.extend_from_slice(&(item.len() as u32).to_be_bytes());
        out.extend_from_slice(item);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    Ok(Reply::bulk(out))
}

/// A DUMP payload's type and items, if it is whole and its checksum right.
fn undump(payload: &[u8]) -> Option<(u8, Vec<&[u8]>)> {
    let body_len = payload.len().checked_sub(4)?;
    let (body, crc) = payload.split_at(body_len);
    if crc32fast::hash(body).to_be_bytes() != crc || !body.starts_with(DUMP_MAGIC) {
        return None;
    }
    let mut pos = DUMP_MAGIC.len();
    let code = *body.get(pos)?;
    pos += 1;
    let word = |pos: &mut usize| -> Option<usize> {
        let w = u32::from_be_bytes(body.get(*pos..*pos + 4)?.try_into().ok()?) as usize;
        *pos += 4;
        Some(w)
    };
    let n = word(&mut pos)?;
    let mut items = Vec::with_capacity(n.min(body.len() / 4));
    for _ in 0..n {
        let len = word(&mut pos)?;
        items.push(body.get(pos..pos.checked_add(len)?)?);
        pos += len;
    }
    (pos == body.len()).then_some((code, items))
}

fn restore(r: &mut dyn Records, a: &[Bytes]) -> Res<Reply> {
    let key = &a[1][..];
    let ttl = int(&a[2])?;
    if ttl < 0 {
        return fail("ERR Invalid TTL value, must be >= 0");
    }
    let (mut replace, mut absttl) = (false, false);
    let mut i = 4;
    while i < a.len() {
        match upper(&a[i]).as_str() {
            "REPLACE" => replace = true,
            "ABSTTL" => absttl = true,
            "IDLETIME" | "FREQ" if i + 1 < a.len() => {
                if int(&a[i + 1])? < 0 {
                    return fail("ERR Invalid IDLETIME or FREQ value, must be >= 0");
                }
                i += 1;
            }
            _ => return fail(SYNTAX),
        }
        i += 1;
    }
    let Some((code, items)) = undump(&a[3]) else { return fail("ERR DUMP payload version or checksum are wrong") };
    if !replace && lookup(r, key)?.kind != KeyType::None {
        return fail("BUSYKEY Target key name already exists.");
    }
    let expire = match (ttl, absttl) {
        (0, _) => 0,
        (t, true) => t as u64,
        (t, false) => r.now_ms().saturating_add(t as u64),
    };
    if expire >= i64::MAX as u64 {
        return fail("ERR Invalid TTL value, must be >= 0 and end before the year 292277026");
    }
    // Checked whole before anything is written.
    let pairs = matches!(code, b'h' | b'z');
    if (code == b's' && items.len() != 1) || (pairs && items.len() % 2 == 1) || !matches!(code, b's' | b'h' | b'l' | b'e' | b'z') {
        return fail("ERR Bad data format");
    }
    for (n, item) in items.iter().enumerate() {
        let member = matches!(code, b'e') || (pairs && n % 2 == 0);
        if member {
            layout::check_member(item)?;
        } else if code == b'z' {
            if item.len() != 8 || f64::from_bits(u64::from_be_bytes((*item).try_into().expect("8 bytes"))).is_nan() {
                return fail("ERR Bad data format");
            }
        } else {
            layout::check_value(item)?;
        }
    }
    delete_key(r, key)?;
    if expire != 0 && expire <= r.now_ms() {
        return Ok(Reply::Ok);
    }
    match code {
        b's' => r.put(key, b"", expire, items[0])?,
        b'h' => {
            for fv in items.chunks(2) {
                r.put(key, &layout::hash_sortkey(fv[0]), expire, fv[1])?;
            }
        }
        _ => {
            let kind = match code {
                b'l' => KeyType::List,
                b'e' => KeyType::Set,
                _ => KeyType::ZSet,
            };
            let mut meta = layout::Meta::new(kind);
            meta.expire_at_ms = expire;
            let step = if kind == KeyType::ZSet { 2 } else { 1 };
            for item in items.chunks(step) {
                match kind {
                    KeyType::List => {
                        r.put(key, &layout::list_sortkey(meta.tail), expire, item[0])?;
                        meta.tail += 1;
                    }
                    _ => {
                        let sk = layout::member_sortkey(item[0]);
                        if let Some((_, old)) = r.get(key, &sk)? {
                            // A member given twice: the last one counts, once.
                            if kind == KeyType::ZSet {
                                let old = f64::from_bits(u64::from_be_bytes(old.as_slice().try_into().unwrap_or_default()));
                                r.delete(key, &layout::score_sortkey(old, item[0]))?;
                            }
                            meta.count -= 1;
                        }
                        r.put(key, &sk, expire, if kind == KeyType::ZSet { item[1] } else { b"" })?;
                        if kind == KeyType::ZSet {
                            let score = f64::from_bits(u64::from_be_bytes(item[1].try_into().expect("checked")));
                            r.put(key, &layout::score_sortkey(score, item[0]), expire, b"")?;
                        }
                    }
                }
                meta.count += 1;
            }
            layout::store_meta(r, key, &meta)?;
        }
    }
    Ok(Reply::Ok)
}
