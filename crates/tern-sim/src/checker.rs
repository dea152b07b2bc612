//! A linearizability checker for key-value histories (Wing & Gong's search with Lowe's memoisation,
//! as in Porcupine), partitioned by hashkey: operations on different hashkeys commute, so each
//! hashkey's sub-history is checked on its own. A step budget turns a search that would take too long
//! into `Unknown` instead of a hang.

use std::collections::{BTreeMap, HashSet};

/// The model of one hashkey: its sortkeys and values.
pub type Model = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    Get {
        sortkey: Vec<u8>,
    },
    Set {
        sortkey: Vec<u8>,
        value: Vec<u8>,
    },
    /// Several sortkeys of the hashkey, atomically.
    MultiSet {
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// Several sortkeys read in one request (must see one state).
    MultiGet {
        sortkeys: Vec<Vec<u8>>,
    },
    Del {
        sortkey: Vec<u8>,
    },
    Incr {
        sortkey: Vec<u8>,
        delta: i64,
    },
    /// Set `set_sortkey` if `check_sortkey` is absent (expected None) or equals the expected value.
    CheckAndSet {
        check_sortkey: Vec<u8>,
        expected: Option<Vec<u8>>,
        set_sortkey: Vec<u8>,
        value: Vec<u8>,
    },
    /// If `check_sortkey` is absent (expected None) or equals the expected value, set every pair
    /// and delete every listed sortkey, atomically.
    CheckAndMutate {
        check_sortkey: Vec<u8>,
        expected: Option<Vec<u8>>,
        sets: Vec<(Vec<u8>, Vec<u8>)>,
        dels: Vec<Vec<u8>>,
    },
    /// The records with sortkeys in [start, stop) (an empty stop: to the end), in order.
    Scan {
        start: Vec<u8>,
        stop: Vec<u8>,
    },
    /// How many records the hashkey has.
    Count,
    /// Redis RPUSH of one element onto the hashkey's list: answers the new length.
    ListPush {
        value: Vec<u8>,
    },
    /// Redis LPOP: the first element, if any.
    ListPop,
    /// Redis LRANGE 0 -1: every element.
    ListRange,
}

impl Input {
    /// Whether the operation only reads (it changes nothing, and needs no exactly-once sequence).
    pub fn is_read(&self) -> bool {
        matches!(self, Input::Get { .. } | Input::MultiGet { .. } | Input::Scan { .. } | Input::Count | Input::ListRange)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    Done,
    Value(Option<Vec<u8>>),
    Values(Vec<Option<Vec<u8>>>),
    Existed(bool),
    Integer(i64),
    Applied(bool),
    Records(Vec<(Vec<u8>, Vec<u8>)>),
    Count(u64),
}

/// One completed or outcome-unknown operation on one hashkey.
#[derive(Clone, Debug)]
pub struct Operation {
    pub client: u64,
    pub hashkey: Vec<u8>,
    pub input: Input,
    /// None: the outcome is unknown (the client gave up); the operation may or may not have happened.
    pub output: Option<Output>,
    pub call: u64,
    /// Ignored when the output is unknown.
    pub ret: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Linearizable,
    /// No order explains the history of this hashkey.
    Violation {
        hashkey: Vec<u8>,
    },
    /// The search budget ran out for this hashkey.
    Unknown {
        hashkey: Vec<u8>,
    },
}

fn parse_int(v: Option<&Vec<u8>>) -> Option<i64> {
    match v {
        None => Some(0),
        Some(b) if b.is_empty() => Some(0),
        Some(b) => std::str::from_utf8(b).ok()?.parse().ok(),
    }
}

/// Where the model keeps a list key's elements: one entry, the elements length-prefixed.
const LIST: &[u8] = b"list";

fn list_of(model: &Model) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest: &[u8] = model.get(LIST).map_or(&[], |v| v.as_slice());
    while rest.len() >= 4 {
        let n = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        out.push(rest[4..4 + n].to_vec());
        rest = &rest[4 + n..];
    }
    out
}

fn store_list(model: &mut Model, list: &[Vec<u8>]) {
    if list.is_empty() {
        model.remove(LIST);
        return;
    }
    let mut v = Vec::new();
    for e in list {
        v.extend_from_slice(&(e.len() as u32).to_be_bytes());
        v.extend_from_slice(e);
    }
    model.insert(LIST.to_vec(), v);
}

/// Applies `input` to `model`; returns the new model if the observed output (if known) matches.
pub fn step(model: &Model, input: &Input, output: Option<&Output>) -> Option<Model> {
    let mut next = model.clone();
    let actual = match input {
        Input::Get { sortkey } => Output::Value(model.get(sortkey).cloned()),
        Input::MultiGet { sortkeys } => Output::Values(sortkeys.iter().map(|s| model.get(s).cloned()).collect()),
        Input::Set { sortkey, value } => {
            next.insert(sortkey.clone(), value.clone());
            Output::Done
        }
        Input::MultiSet { pairs } => {
            for (s, v) in pairs {
                next.insert(s.clone(), v.clone());
            }
            Output::Done
        }
        Input::Del { sortkey } => Output::Existed(next.remove(sortkey).is_some()),
        Input::Incr { sortkey, delta } => {
            let old = parse_int(model.get(sortkey))?;
            let new = old.checked_add(*delta)?;
            next.insert(sortkey.clone(), new.to_string().into_bytes());
            Output::Integer(new)
        }
        Input::CheckAndSet { check_sortkey, expected, set_sortkey, value } => {
            let pass = model.get(check_sortkey) == expected.as_ref();
            if pass {
                next.insert(set_sortkey.clone(), value.clone());
            }
            Output::Applied(pass)
        }
        Input::CheckAndMutate { check_sortkey, expected, sets, dels } => {
            let pass = model.get(check_sortkey) == expected.as_ref();
            if pass {
                for (s, v) in sets {
                    next.insert(s.clone(), v.clone());
                }
                for s in dels {
                    next.remove(s);
                }
            }
            Output::Applied(pass)
        }
        Input::Scan { start, stop } => Output::Records(
            model.iter().filter(|(k, _)| *k >= start && (stop.is_empty() || *k < stop)).map(|(k, v)| (k.clone(), v.clone())).collect(),
        ),
        Input::Count => Output::Count(model.len() as u64),
        Input::ListPush { value } => {
            let mut list = list_of(model);
            list.push(value.clone());
            store_list(&mut next, &list);
            Output::Integer(list.len() as i64)
        }
        Input::ListPop => {
            let mut list = list_of(model);
            let first = (!list.is_empty()).then(|| list.remove(0));
            store_list(&mut next, &list);
            Output::Value(first)
        }
        Input::ListRange => Output::Values(list_of(model).into_iter().map(Some).collect()),
    };
    match output {
        Some(o) if *o != actual => None,
        _ => Some(next),
    }
}

/// Checks every hashkey's sub-history; the first violation (or unknown) is reported.
pub fn check(history: &[Operation], steps_per_key_max: u64) -> Verdict {
    let mut by_key: BTreeMap<&[u8], Vec<&Operation>> = BTreeMap::new();
    for op in history {
        by_key.entry(&op.hashkey).or_default().push(op);
    }
    let mut unknown = None;
    for (hashkey, ops) in by_key {
        match check_one(&ops, steps_per_key_max) {
            Some(true) => {}
            Some(false) => return Verdict::Violation { hashkey: hashkey.to_vec() },
            None => unknown = unknown.or(Some(hashkey.to_vec())),
        }
    }
    match unknown {
        Some(hashkey) => Verdict::Unknown { hashkey },
        None => Verdict::Linearizable,
    }
}

#[derive(Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
}

/// Some(true) linearizable, Some(false) not, None budget exhausted.
fn check_one(ops: &[&Operation], steps_max: u64) -> Option<bool> {
    // Events in time order; calls before returns at equal times (they overlap); unknown outcomes
    // return after everything.
    let mut events: Vec<(u64, u8, Event)> = Vec::with_capacity(ops.len() * 2);
    for (i, op) in ops.iter().enumerate() {
        events.push((op.call, 0, Event { op: i, is_call: true }));
        let ret = if op.output.is_some() { op.ret.max(op.call) } else { u64::MAX };
        events.push((ret, 1, Event { op: i, is_call: false }));
    }
    events.sort_by_key(|(t, kind, e)| (*t, *kind, e.op));
    let events: Vec<Event> = events.into_iter().map(|(_, _, e)| e).collect();
    // A doubly linked list over event positions, with a head sentinel at index n.
    let n = events.len();
    let mut next: Vec<usize> = (1..=n).collect();
    let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { n } else { i - 1 }).collect();
    next.push(0); // sentinel's next
    prev.push(n);
    let end = n; // list terminator == sentinel index (circular)
    let mut return_pos = vec![0usize; ops.len()];
    for (pos, e) in events.iter().enumerate() {
        if !e.is_call {
            return_pos[e.op] = pos;
        }
    }
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, pos: usize| {
        let (p, q) = (prev[pos], next[pos]);
        next[p] = q;
        if q != end {
            prev[q] = p;
        } else {
            prev[end] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, pos: usize| {
        let (p, q) = (prev[pos], next[pos]);
        next[p] = pos;
        if q != end {
            prev[q] = pos;
        } else {
            prev[end] = pos;
        }
    };
    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, Model)> = HashSet::new();
    let mut stack: Vec<(usize, Model)> = Vec::new();
    let mut state = Model::new();
    let mut cursor = next[end];
    let mut steps = 0u64;
    loop {
        if next[end] == end {
            return Some(true);
        }
        steps += 1;
        if steps > steps_max {
            return None;
        }
        if cursor == end {
            // Nothing more can be linearized at this level: backtrack.
            let (pos, previous) = stack.pop()?;
            let op = events[pos].op;
            linearized[op / 64] &= !(1 << (op % 64));
            relink(&mut next, &mut prev, return_pos[op]);
            relink(&mut next, &mut prev, pos);
            state = previous;
            cursor = next[pos];
            continue;
        }
        let e = events[cursor];
        if e.is_call {
            let op = ops[e.op];
            if let Some(new_state) = step(&state, &op.input, op.output.as_ref()) {
                let mut bits = linearized.clone();
                bits[e.op / 64] |= 1 << (e.op % 64);
                if cache.insert((bits.clone(), new_state.clone())) {
                    stack.push((cursor, std::mem::replace(&mut state, new_state)));
                    linearized = bits;
                    unlink(&mut next, &mut prev, cursor);
                    unlink(&mut next, &mut prev, return_pos[e.op]);
                    cursor = next[end];
                    continue;
                }
            }
            cursor = next[cursor];
        } else {
            // A return whose call is not linearized yet: this branch is dead.
            if stack.is_empty() {
                return Some(false);
            }
            let (pos, previous) = stack.pop().expect("not empty");
            let op = events[pos].op;
            linearized[op / 64] &= !(1 << (op % 64));
            relink(&mut next, &mut prev, return_pos[op]);
            relink(&mut next, &mut prev, pos);
            state = previous;
            cursor = next[pos];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: u64, input: Input, output: Option<Output>, call: u64, ret: u64) -> Operation {
        Operation { client, hashkey: b"h".to_vec(), input, output, call, ret }
    }
    fn set(v: &str) -> Input {
        Input::Set { sortkey: b"s".to_vec(), value: v.as_bytes().to_vec() }
    }
    fn get() -> Input {
        Input::Get { sortkey: b"s".to_vec() }
    }
    fn val(v: &str) -> Option<Output> {
        Some(Output::Value(Some(v.as_bytes().to_vec())))
    }
    const BUDGET: u64 = 1_000_000;

    /// Sequential and properly overlapping histories are accepted.
    #[test]
    fn accepts_linearizable_histories() {
        let h = vec![op(1, set("a"), Some(Output::Done), 0, 10), op(2, get(), val("a"), 20, 30)];
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
        // A read overlapping a write may see either value.
        let h = vec![op(1, set("a"), Some(Output::Done), 0, 10), op(1, set("b"), Some(Output::Done), 20, 40), op(2, get(), val("a"), 25, 30)];
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
        let h = vec![op(1, set("a"), Some(Output::Done), 0, 10), op(1, set("b"), Some(Output::Done), 20, 40), op(2, get(), val("b"), 25, 30)];
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
        // An unknown write may or may not have happened.
        let h = vec![op(1, set("a"), None, 0, 0), op(2, get(), Some(Output::Value(None)), 20, 30)];
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
        let h = vec![op(1, set("a"), None, 0, 0), op(2, get(), val("a"), 20, 30)];
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
    }

    /// A read that returns an older value after a newer one was read is a stale read.
    #[test]
    fn rejects_stale_read() {
        let h = vec![
            op(1, set("a"), Some(Output::Done), 0, 10),
            op(1, set("b"), Some(Output::Done), 20, 30),
            op(2, get(), val("b"), 40, 50),
            op(3, get(), val("a"), 60, 70),
        ];
        assert_eq!(check(&h, BUDGET), Verdict::Violation { hashkey: b"h".to_vec() });
    }

    /// An acknowledged write that a later read does not see was lost.
    #[test]
    fn rejects_lost_write() {
        let h = vec![op(1, set("a"), Some(Output::Done), 0, 10), op(2, get(), Some(Output::Value(None)), 20, 30)];
        assert!(matches!(check(&h, BUDGET), Verdict::Violation { .. }));
    }

    /// A multi_get that sees half of a multi_set saw a non-atomic write.
    #[test]
    fn rejects_non_atomic_multi_set() {
        let pairs = vec![(b"x".to_vec(), b"1".to_vec()), (b"y".to_vec(), b"1".to_vec())];
        let h = vec![
            op(1, Input::MultiSet { pairs }, Some(Output::Done), 0, 10),
            op(2, Input::MultiGet { sortkeys: vec![b"x".to_vec(), b"y".to_vec()] }, Some(Output::Values(vec![Some(b"1".to_vec()), None])), 5, 8),
        ];
        assert!(matches!(check(&h, BUDGET), Verdict::Violation { .. }));
    }

    /// Two increments that both return the same value means one was lost or applied twice.
    #[test]
    fn incr_semantics() {
        let incr = || Input::Incr { sortkey: b"n".to_vec(), delta: 1 };
        let ok = vec![op(1, incr(), Some(Output::Integer(1)), 0, 10), op(2, incr(), Some(Output::Integer(2)), 5, 15)];
        assert_eq!(check(&ok, BUDGET), Verdict::Linearizable);
        let bad = vec![op(1, incr(), Some(Output::Integer(1)), 0, 10), op(2, incr(), Some(Output::Integer(1)), 5, 15)];
        assert!(matches!(check(&bad, BUDGET), Verdict::Violation { .. }));
        // Applied twice: a single unknown incr cannot explain a jump of two.
        let twice = vec![op(1, incr(), None, 0, 0), op(2, Input::Get { sortkey: b"n".to_vec() }, Some(Output::Value(Some(b"2".to_vec()))), 20, 30)];
        assert!(matches!(check(&twice, BUDGET), Verdict::Violation { .. }));
    }

    /// Histories of different hashkeys are independent; a budget of zero steps reports Unknown.
    #[test]
    fn partitioning_and_budget() {
        let mut h = vec![op(1, set("a"), Some(Output::Done), 0, 10)];
        let mut other = op(2, get(), Some(Output::Value(None)), 20, 30);
        other.hashkey = b"other".to_vec();
        h.push(other);
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
        assert!(matches!(check(&h, 0), Verdict::Unknown { .. }));
    }

    /// Many concurrent writers and readers: the search finishes quickly thanks to memoisation.
    #[test]
    fn larger_concurrent_history() {
        let mut h = Vec::new();
        for i in 0..200u64 {
            let t = i * 10;
            h.push(op(i % 5, set(&format!("v{i}")), Some(Output::Done), t, t + 25));
            h.push(op(100 + i % 5, get(), val(&format!("v{i}")), t + 26, t + 30));
        }
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
    }
}
