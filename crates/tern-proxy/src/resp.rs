//! RESP2/RESP3 framing: an incremental request parser with explicit limits, and reply encoding.
//!
//! Requests are arrays of bulk strings (what every client library sends) or inline commands (what a
//! person types over telnet). Anything else, or anything over a limit, is a protocol error: the
//! connection answers with `-ERR Protocol error: ...` and closes, as Redis does.

use bytes::{Bytes, BytesMut};

/// Largest bulk string in a request. Values are limited to 1 MiB by the store; this leaves room for
/// the error to come from the store with its precise limit rather than from the framing.
pub const BULK_BYTES_MAX: usize = tern_core::limits::WRITE_REQUEST_BYTES_MAX;
/// Most arguments in one command (MSET of the store's 10,000-record limit fits).
pub const ARGS_MAX: usize = 2 * tern_core::limits::MULTI_RECORDS_MAX + 16;
/// Largest inline command line.
pub const INLINE_BYTES_MAX: usize = 64 * 1024;
/// Largest whole request frame: a client's unparsed input never grows past this.
pub const FRAME_BYTES_MAX: usize = 2 * BULK_BYTES_MAX;

#[derive(Debug, PartialEq)]
pub struct ProtocolError(pub String);

fn perr<T>(msg: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(msg.into()))
}

/// Finds "\r\n" at or after `from`; returns the index of '\r'.
fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?.windows(2).position(|w| w == b"\r\n").map(|p| p + from)
}

fn parse_len(digits: &[u8], what: &str) -> Result<i64, ProtocolError> {
    std::str::from_utf8(digits).ok().and_then(|s| s.parse::<i64>().ok()).map_or_else(|| perr(format!("invalid {what} length")), Ok)
}

/// Takes one complete command off the front of `buf`: Ok(None) if more bytes are needed.
pub fn parse_command(buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != b'*' {
        return parse_inline(buf);
    }
    let Some(end) = line_end(buf, 1) else {
        return if buf.len() > INLINE_BYTES_MAX { perr("too big mbulk count string") } else { Ok(None) };
    };
    let count = parse_len(&buf[1..end], "multibulk")?;
    if count > ARGS_MAX as i64 {
        return perr(format!("invalid multibulk length: {count} arguments; the limit is {ARGS_MAX}"));
    }
    // First pass: check the frame is complete without copying.
    let mut pos = end + 2;
    let mut spans = Vec::with_capacity(count.max(0) as usize);
    for _ in 0..count.max(0) {
        if pos >= buf.len() {
            return Ok(None);
        }
        if buf[pos] != b'$' {
            return perr(format!("expected '$', got '{}'", buf[pos].escape_ascii()));
        }
        let Some(e) = line_end(buf, pos + 1) else {
            return if buf.len() - pos > 32 { perr("too big bulk count string") } else { Ok(None) };
        };
        let len = parse_len(&buf[pos + 1..e], "bulk")?;
        if len < 0 || len > BULK_BYTES_MAX as i64 {
            return perr(format!("invalid bulk length: {len} bytes; the limit is {BULK_BYTES_MAX}"));
        }
        let start = e + 2;
        let stop = start + len as usize;
        if stop - end > FRAME_BYTES_MAX {
            return perr(format!("request is larger than {FRAME_BYTES_MAX} bytes"));
        }
        if buf.len() < stop + 2 {
            return Ok(None);
        }
        if &buf[stop..stop + 2] != b"\r\n" {
            return perr("bulk string not terminated by CRLF");
        }
        spans.push((start, stop));
        pos = stop + 2;
    }
    let frame = buf.split_to(pos).freeze();
    Ok(Some(spans.into_iter().map(|(a, b)| frame.slice(a..b)).collect()))
}

fn parse_inline(buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    let Some(pos) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > INLINE_BYTES_MAX { perr("too big inline request") } else { Ok(None) };
    };
    let line = buf.split_to(pos + 1);
    let text = &line[..pos];
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    let mut args = Vec::new();
    let mut cur: Option<Vec<u8>> = None;
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < text.len() {
        let c = text[i];
        match quote {
            Some(q) if c == q => {
                // As Redis: a closing quote must end the argument.
                if text.get(i + 1).is_some_and(|n| !n.is_ascii_whitespace()) {
                    return perr("unbalanced quotes in request");
                }
                quote = None;
            }
            Some(b'"') if c == b'\\' && i + 1 < text.len() => {
                i += 1;
                let e = match text[i] {
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    other => other,
                };
                cur.get_or_insert_with(Vec::new).push(e);
            }
            Some(_) => cur.get_or_insert_with(Vec::new).push(c),
            None if c == b'"' || c == b'\'' => {
                quote = Some(c);
                cur.get_or_insert_with(Vec::new);
            }
            None if c.is_ascii_whitespace() => {
                if let Some(a) = cur.take() {
                    args.push(Bytes::from(a));
                }
            }
            None => cur.get_or_insert_with(Vec::new).push(c),
        }
        i += 1;
    }
    if quote.is_some() {
        return perr("unbalanced quotes in request");
    }
    if let Some(a) = cur {
        args.push(Bytes::from(a));
    }
    if args.len() > ARGS_MAX {
        return perr("too many arguments in inline request");
    }
    Ok(Some(args))
}

pub use tern_redis::{format_double, Reply};

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Result<Vec<Vec<Bytes>>, ProtocolError> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(c) = parse_command(&mut buf)? {
            out.push(c);
        }
        Ok(out)
    }

    /// Pipelined multibulk commands parse one by one; a partial frame waits for more bytes.
    #[test]
    fn multibulk_and_pipelining() {
        let cmds = parse_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n").unwrap();
        assert_eq!(cmds, vec![vec![Bytes::from("GET"), Bytes::from("k")], vec![Bytes::from("PING")]]);
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$5\r\nab"[..]);
        assert_eq!(parse_command(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"cde\r\n");
        assert_eq!(parse_command(&mut buf).unwrap().unwrap()[1], Bytes::from("abcde"));
        assert!(buf.is_empty());
        let binary = parse_all(b"*1\r\n$4\r\na\r\nb\r\n").unwrap();
        assert_eq!(binary[0][0], Bytes::from("a\r\nb"), "bulk strings are binary safe");
    }

    /// Inline commands split on spaces and honour quotes.
    #[test]
    fn inline() {
        let cmds = parse_all(b"SET k \"a b\\n\" \r\nPING\n").unwrap();
        assert_eq!(cmds[0], vec![Bytes::from("SET"), Bytes::from("k"), Bytes::from("a b\n")]);
        assert_eq!(cmds[1], vec![Bytes::from("PING")]);
        assert!(parse_all(b"SET k \"open\r\n").is_err());
        assert!(parse_all(b"set \"\"\"test-key\"\"\" v\r\n").is_err(), "a closing quote must end its argument");
    }

    /// Oversized or malformed frames are errors naming the problem, never an allocation of the
    /// claimed size.
    #[test]
    fn limits_and_garbage() {
        let e = parse_all(format!("*{}\r\n", ARGS_MAX + 1).as_bytes()).unwrap_err();
        assert!(e.0.contains("limit"), "{e:?}");
        let e = parse_all(format!("*1\r\n${}\r\n", BULK_BYTES_MAX + 1).as_bytes()).unwrap_err();
        assert!(e.0.contains("bulk length"), "{e:?}");
        assert!(parse_all(b"*1\r\n$-5\r\n").is_err());
        assert!(parse_all(b"*x\r\n").is_err());
        assert!(parse_all(b"*1\r\n+OK\r\n").is_err());
        assert!(parse_all(b"*1\r\n$2\r\nabcd\r\n").is_err(), "bulk longer than its length");
        assert!(parse_all(&vec![b'a'; INLINE_BYTES_MAX + 1]).is_err());
    }

    /// Replies encode per protocol version.
    #[test]
    fn encoding() {
        let enc = |r: Reply, v3: bool| {
            let mut out = Vec::new();
            r.encode(v3, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(enc(Reply::Nil, false), "$-1\r\n");
        assert_eq!(enc(Reply::Nil, true), "_\r\n");
        let m = Reply::Map(vec![(Reply::bulk("a"), Reply::Int(1))]);
        assert_eq!(enc(m.clone(), false), "*2\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(enc(m, true), "%1\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(enc(Reply::Double(3.5), false), "$3\r\n3.5\r\n");
        assert_eq!(enc(Reply::err("ERR x\r\ny"), false), "-ERR x  y\r\n");
        assert_eq!(format_double(10.5), "10.5");
        assert_eq!(format_double(3.0), "3");
    }
}
