//! A command's answer, as the proxy encodes it for its client (RESP2 or RESP3), and as it travels
//! from a partition to the proxy inside a write or read response (`to_wire`/`from_wire`).

use bytes::Bytes;

/// A reply, encoded for the connection's protocol version.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Ok,
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Bytes),
    Nil,
    Array(Vec<Reply>),
    NilArray,
    /// A map in RESP3, a flat array in RESP2.
    Map(Vec<(Reply, Reply)>),
    /// A double in RESP3, a bulk string in RESP2.
    Double(f64),
    /// A verbatim text in RESP3 (INFO), a bulk string in RESP2.
    Text(String),
    /// A set in RESP3, an array in RESP2.
    Set(Vec<Reply>),
    /// Pairs (member and score, field and value): an array of two-element arrays in RESP3, a flat
    /// array in RESP2 (ZRANGE ... WITHSCORES, HRANDFIELD ... WITHVALUES).
    Pairs(Vec<(Reply, Reply)>),
}

impl Reply {
    pub fn bulk(b: impl Into<Bytes>) -> Reply {
        Reply::Bulk(b.into())
    }

    pub fn err(msg: impl Into<String>) -> Reply {
        Reply::Error(msg.into())
    }

    pub fn opt(v: Option<Bytes>) -> Reply {
        v.map_or(Reply::Nil, Reply::Bulk)
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Reply::Error(_))
    }

    /// Approximate encoded size, for reply size limits.
    pub fn size(&self) -> usize {
        match self {
            Reply::Bulk(b) => b.len() + 16,
            Reply::Array(a) | Reply::Set(a) => a.iter().map(Reply::size).sum::<usize>() + 16,
            Reply::Map(m) | Reply::Pairs(m) => m.iter().map(|(k, v)| k.size() + v.size()).sum::<usize>() + 16,
            Reply::Text(t) | Reply::Simple(t) | Reply::Error(t) => t.len() + 16,
            _ => 24,
        }
    }

    pub fn encode(&self, resp3: bool, out: &mut Vec<u8>) {
        use std::io::Write;
        match self {
            Reply::Ok => out.extend_from_slice(b"+OK\r\n"),
            Reply::Simple(s) => {
                out.push(b'+');
                out.extend(s.bytes().filter(|&b| b != b'\r' && b != b'\n'));
                out.extend_from_slice(b"\r\n");
            }
            Reply::Error(s) => {
                out.push(b'-');
                out.extend(s.bytes().map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
                out.extend_from_slice(b"\r\n");
            }
            Reply::Int(i) => {
                let _ = write!(out, ":{i}\r\n");
            }
            Reply::Bulk(b) => {
                let _ = write!(out, "${}\r\n", b.len());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Nil if resp3 => out.extend_from_slice(b"_\r\n"),
            Reply::Nil => out.extend_from_slice(b"$-1\r\n"),
            Reply::NilArray if resp3 => out.extend_from_slice(b"_\r\n"),
            Reply::NilArray => out.extend_from_slice(b"*-1\r\n"),
            Reply::Array(items) | Reply::Set(items) => {
                let kind = if resp3 && matches!(self, Reply::Set(_)) { '~' } else { '*' };
                let _ = write!(out, "{kind}{}\r\n", items.len());
                for i in items {
                    i.encode(resp3, out);
                }
            }
            Reply::Map(pairs) => {
                if resp3 {
                    let _ = write!(out, "%{}\r\n", pairs.len());
                } else {
                    let _ = write!(out, "*{}\r\n", pairs.len() * 2);
                }
                for (k, v) in pairs {
                    k.encode(resp3, out);
                    v.encode(resp3, out);
                }
            }
            Reply::Pairs(pairs) => {
                let _ = write!(out, "*{}\r\n", if resp3 { pairs.len() } else { pairs.len() * 2 });
                for (k, v) in pairs {
                    if resp3 {
                        out.extend_from_slice(b"*2\r\n");
                    }
                    k.encode(resp3, out);
                    v.encode(resp3, out);
                }
            }
            Reply::Double(d) => {
                let text = format_score(*d);
                if resp3 {
                    let _ = write!(out, ",{text}\r\n");
                } else {
                    Reply::Bulk(Bytes::from(text)).encode(resp3, out);
                }
            }
            Reply::Text(t) => {
                if resp3 {
                    let _ = write!(out, "={}\r\ntxt:", t.len() + 4);
                    out.extend_from_slice(t.as_bytes());
                    out.extend_from_slice(b"\r\n");
                } else {
                    Reply::Bulk(Bytes::copy_from_slice(t.as_bytes())).encode(resp3, out);
                }
            }
        }
    }

    /// The reply as bytes for a write or read response: a tag byte, then lengths as u32 BE.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size().min(crate::REPLY_BYTES_MAX));
        self.wire(&mut out);
        out
    }

    fn wire(&self, out: &mut Vec<u8>) {
        fn text(out: &mut Vec<u8>, tag: u8, b: &[u8]) {
            out.push(tag);
            out.extend_from_slice(&(b.len() as u32).to_be_bytes());
            out.extend_from_slice(b);
        }
        match self {
            Reply::Ok => out.push(b'O'),
            Reply::Simple(s) => text(out, b'+', s.as_bytes()),
            Reply::Error(s) => text(out, b'-', s.as_bytes()),
            Reply::Text(s) => text(out, b'=', s.as_bytes()),
            Reply::Bulk(b) => text(out, b'$', b),
            Reply::Int(i) => {
                out.push(b':');
                out.extend_from_slice(&i.to_be_bytes());
            }
            Reply::Double(d) => {
                out.push(b',');
                out.extend_from_slice(&d.to_bits().to_be_bytes());
            }
            Reply::Nil => out.push(b'_'),
            Reply::NilArray => out.push(b'N'),
            Reply::Array(items) | Reply::Set(items) => {
                out.push(if matches!(self, Reply::Set(_)) { b'~' } else { b'*' });
                out.extend_from_slice(&(items.len() as u32).to_be_bytes());
                items.iter().for_each(|i| i.wire(out));
            }
            Reply::Map(pairs) | Reply::Pairs(pairs) => {
                out.push(if matches!(self, Reply::Map(_)) { b'%' } else { b'P' });
                out.extend_from_slice(&(pairs.len() as u32).to_be_bytes());
                for (k, v) in pairs {
                    k.wire(out);
                    v.wire(out);
                }
            }
        }
    }

    /// Decodes `to_wire`'s bytes; None if they are not a whole reply.
    pub fn from_wire(bytes: &[u8]) -> Option<Reply> {
        let mut pos = 0;
        let reply = Reply::unwire(bytes, &mut pos, 0)?;
        (pos == bytes.len()).then_some(reply)
    }

    fn unwire(b: &[u8], pos: &mut usize, depth: usize) -> Option<Reply> {
        fn take<'a>(b: &'a [u8], pos: &mut usize, n: usize) -> Option<&'a [u8]> {
            let s = b.get(*pos..pos.checked_add(n)?)?;
            *pos += n;
            Some(s)
        }
        fn word(b: &[u8], pos: &mut usize) -> Option<u64> {
            Some(u64::from_be_bytes(take(b, pos, 8)?.try_into().ok()?))
        }
        fn len(b: &[u8], pos: &mut usize) -> Option<usize> {
            Some(u32::from_be_bytes(take(b, pos, 4)?.try_into().ok()?) as usize)
        }
        fn string(b: &[u8], pos: &mut usize) -> Option<String> {
            let n = len(b, pos)?;
            String::from_utf8(take(b, pos, n)?.to_vec()).ok()
        }
        if depth > 8 {
            return None;
        }
        let tag = *take(b, pos, 1)?.first()?;
        Some(match tag {
            b'O' => Reply::Ok,
            b'+' => Reply::Simple(string(b, pos)?),
            b'-' => Reply::Error(string(b, pos)?),
            b'=' => Reply::Text(string(b, pos)?),
            b'$' => {
                let n = len(b, pos)?;
                Reply::Bulk(Bytes::copy_from_slice(take(b, pos, n)?))
            }
            b':' => Reply::Int(word(b, pos)? as i64),
            b',' => Reply::Double(f64::from_bits(word(b, pos)?)),
            b'_' => Reply::Nil,
            b'N' => Reply::NilArray,
            b'*' | b'~' => {
                let n = len(b, pos)?;
                let mut items = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    items.push(Reply::unwire(b, pos, depth + 1)?);
                }
                if tag == b'~' {
                    Reply::Set(items)
                } else {
                    Reply::Array(items)
                }
            }
            b'%' | b'P' => {
                let n = len(b, pos)?;
                let mut pairs = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    pairs.push((Reply::unwire(b, pos, depth + 1)?, Reply::unwire(b, pos, depth + 1)?));
                }
                if tag == b'%' {
                    Reply::Map(pairs)
                } else {
                    Reply::Pairs(pairs)
                }
            }
            _ => return None,
        })
    }
}

/// Formats a float the way Redis prints INCRBYFLOAT results and scores: shortest exact form that
/// reads back as the same number, "inf"/"-inf" for infinities.
pub fn format_double(d: f64) -> String {
    if d.is_infinite() {
        return if d > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let s = format!("{d}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Formats a double the way Redis replies with one (scores, ZINCRBY): C's `%.17g`, so that it
/// reads back exactly and prints as Redis prints it.
pub fn format_score(d: f64) -> String {
    if d.is_infinite() {
        return if d > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if d == 0.0 {
        return if d.is_sign_negative() { "-0".into() } else { "0".into() };
    }
    fn trim(s: &str) -> &str {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.')
        } else {
            s
        }
    }
    let e = format!("{d:.16e}");
    let (mantissa, exp) = e.split_once('e').expect("exponent form");
    let exp: i32 = exp.parse().expect("exponent");
    if !(-4..17).contains(&exp) {
        format!("{}e{}{:02}", trim(mantissa), if exp < 0 { '-' } else { '+' }, exp.abs())
    } else {
        trim(&format!("{:.*}", (16 - exp) as usize, d)).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_print_as_redis_prints_them() {
        assert_eq!(format_score(10.0), "10");
        assert_eq!(format_score(1.5), "1.5");
        assert_eq!(format_score(0.1), "0.10000000000000001");
        assert_eq!(format_score(f64::MAX), "1.7976931348623157e+308");
        assert_eq!(format_score(-2.5e-10), "-2.5000000000000002e-10");
        assert_eq!(format_score(0.0001), "0.0001");
        assert_eq!(format_score(1e17), "1e+17");
        assert_eq!(format_score(f64::NEG_INFINITY), "-inf");
    }

    #[test]
    fn wire_round_trip() {
        let r = Reply::Array(vec![
            Reply::Ok,
            Reply::Int(-7),
            Reply::Bulk(Bytes::from_static(b"a\0b")),
            Reply::Nil,
            Reply::NilArray,
            Reply::Double(1.5),
            Reply::Error("WRONGTYPE x".into()),
            Reply::Map(vec![(Reply::Simple("k".into()), Reply::Set(vec![Reply::Int(1)]))]),
            Reply::Pairs(vec![(Reply::bulk("m"), Reply::Double(2.0))]),
        ]);
        assert_eq!(Reply::from_wire(&r.to_wire()), Some(r.clone()));
        let mut truncated = r.to_wire();
        truncated.pop();
        assert_eq!(Reply::from_wire(&truncated), None);
    }
}
