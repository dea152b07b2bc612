//! Redis-style glob patterns for SCAN/HSCAN MATCH: `*`, `?`, `[abc]`, `[^a-z]`, `\x`.

/// Matches one pattern element at `p` against byte `c`; returns (matched, length of the element).
fn element(p: &[u8], c: u8) -> (bool, usize) {
    match p[0] {
        b'?' => (true, 1),
        b'\\' if p.len() > 1 => (p[1] == c, 2),
        b'[' => {
            let mut i = 1;
            let negate = p.get(1) == Some(&b'^');
            if negate {
                i += 1;
            }
            let mut hit = false;
            while i < p.len() && p[i] != b']' {
                if p[i] == b'\\' && i + 1 < p.len() {
                    hit |= p[i + 1] == c;
                    i += 2;
                } else if i + 2 < p.len() && p[i + 1] == b'-' && p[i + 2] != b']' {
                    let (a, b) = if p[i] <= p[i + 2] { (p[i], p[i + 2]) } else { (p[i + 2], p[i]) };
                    hit |= (a..=b).contains(&c);
                    i += 3;
                } else {
                    hit |= p[i] == c;
                    i += 1;
                }
            }
            // An unterminated class runs to the end of the pattern, as in Redis.
            (hit != negate, (i + 1).min(p.len()))
        }
        other => (other == c, 1),
    }
}

/// Whether `text` matches `pattern`. Linear backtracking on the last `*`, so no pattern is
/// exponential.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            while p < pattern.len() && pattern[p] == b'*' {
                p += 1;
            }
            star = Some((p, t));
            continue;
        }
        if p < pattern.len() {
            let (hit, len) = element(&pattern[p..], text[t]);
            if hit {
                p += len;
                t += 1;
                continue;
            }
        }
        match star {
            Some((sp, st)) => {
                p = sp;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn patterns() {
        let m = |p: &str, t: &str| glob_match(p.as_bytes(), t.as_bytes());
        assert!(m("*", ""));
        assert!(m("user:*", "user:42"));
        assert!(!m("user:*", "order:1"));
        assert!(m("h?llo", "hello") && !m("h?llo", "hllo"));
        assert!(m("h[ae]llo", "hallo") && !m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo") && !m("h[^e]llo", "hello"));
        assert!(m("h[a-c]x", "hbx") && !m("h[a-c]x", "hdx"));
        assert!(m("a\\*b", "a*b") && !m("a\\*b", "axb"));
        assert!(m("*a*b*c*", "xxaxxbxxc"));
        assert!(!m(&"*a".repeat(30), &"a".repeat(29)), "no exponential blow-up, and a correct answer");
    }
}
