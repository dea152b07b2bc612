//! The catalog as records. Meta's catalog group stores the catalog under one hashkey, one record per
//! node, table, partition and dropped table plus a small header, so one change writes only what it
//! changed (a 65,536-partition table is many bounded writes, not one value too large for raft). A
//! `version` record is bumped by every write and every write is conditional on it (check_and_mutate):
//! a write computed on a stale catalog (a persist that timed out and committed later, a leader that
//! lost and regained leadership) fails instead of overwriting what it never saw.
//!
//! Pure: encoding, decoding and the difference between two catalogs; the service does the I/O.

use crate::catalog::{Catalog, NodeRecord, PartitionRecord, TableRecord};
use std::collections::{BTreeMap, BTreeSet};
use tern_core::{NodeId, PeerId, TableId, TernError};

/// The hashkey every catalog record lives under (one partition, so each write is atomic).
pub const CATALOG_HASHKEY: &[u8] = b"catalog";
/// Sortkey of the catalog version: a big-endian u64, absent before the first write.
pub const VERSION: &[u8] = b"version";
/// Sortkey of the whole catalog as written by Tern before records (one JSON value); migrated on load.
const LEGACY: &[u8] = b"";
const HEADER: &[u8] = b"header";
const NODE: &[u8] = b"node/";
const TABLE: &[u8] = b"table/";
const PARTITION: &[u8] = b"part/";
const DROPPED: &[u8] = b"dropped/";

/// Most bytes (sortkeys and values) one catalog write carries; larger changes are split.
pub const WRITE_BYTES_MAX: usize = 1 << 20;
/// Most records one catalog write carries.
pub const WRITE_RECORDS_MAX: usize = 4096;

#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    next_node_id: NodeId,
    next_table_id: TableId,
    next_peer_id: PeerId,
    draining: BTreeSet<NodeId>,
    balancer_paused: bool,
    cluster_id: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TableHeader {
    id: TableId,
    name: String,
    partition_count: u32,
    replica_count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backup_policy: Option<crate::catalog::BackupPolicy>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    restoring: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    duplications: Vec<crate::catalog::Duplication>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    split: Option<crate::split::TableSplit>,
    #[serde(default)]
    created_partition_count: u32,
}

/// One record written or removed.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Set(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

impl Change {
    fn bytes(&self) -> usize {
        match self {
            Change::Set(k, v) => k.len() + v.len(),
            Change::Delete(k) => k.len(),
        }
    }
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("catalog records serialize")
}

fn key(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    [prefix, rest].concat()
}

fn node_key(id: NodeId) -> Vec<u8> {
    key(NODE, &id.to_be_bytes())
}

fn dropped_key(id: TableId) -> Vec<u8> {
    key(DROPPED, &id.to_be_bytes())
}

fn table_key(name: &str) -> Vec<u8> {
    key(TABLE, name.as_bytes())
}

fn partition_key(table: TableId, partition: u32) -> Vec<u8> {
    key(PARTITION, &[&table.to_be_bytes()[..], &partition.to_be_bytes()[..]].concat())
}

fn header(c: &Catalog) -> Vec<u8> {
    json(&Header {
        next_node_id: c.next_node_id,
        next_table_id: c.next_table_id,
        next_peer_id: c.next_peer_id,
        draining: c.draining.clone(),
        balancer_paused: c.balancer_paused,
        cluster_id: c.cluster_id,
    })
}

fn table_header(t: &TableRecord) -> Vec<u8> {
    json(&TableHeader {
        id: t.id,
        name: t.name.clone(),
        partition_count: t.partition_count,
        replica_count: t.replica_count,
        backup_policy: t.backup_policy.clone(),
        restoring: t.restoring,
        duplications: t.duplications.clone(),
        split: t.split.clone(),
        created_partition_count: t.created_partition_count,
    })
}

/// The records that turn `old` into `new`, in an order where every prefix leaves a loadable catalog
/// (the writes may be cut short by a failure between them): the header first, so ids handed out are
/// reserved before anything uses them; then nodes; then removed tables' headers, and only then their
/// dropped-table markers (a live table is never listed as dropped); then partitions; then new or
/// changed tables' headers, so a table appears only once all its partitions are there and
/// disappears before they go; partitions a table no longer has go last.
pub fn diff(old: &Catalog, new: &Catalog) -> Vec<Change> {
    let mut first = Vec::new();
    let (old_header, new_header) = (header(old), header(new));
    if old_header != new_header {
        first.push(Change::Set(HEADER.to_vec(), new_header));
    }
    for (id, n) in &new.nodes {
        if old.nodes.get(id) != Some(n) {
            first.push(Change::Set(node_key(*id), json(n)));
        }
    }
    first.extend(old.nodes.keys().filter(|id| !new.nodes.contains_key(id)).map(|id| Change::Delete(node_key(*id))));

    let same_table = |name: &str| match (old.tables.get(name), new.tables.get(name)) {
        (Some(o), Some(n)) if o.id == n.id => Some((o, n)),
        _ => None,
    };
    let mut removed_tables = Vec::new();
    let mut partitions = Vec::new();
    let mut tables = Vec::new();
    let mut last = Vec::new();
    for (name, o) in &old.tables {
        if same_table(name).is_none() {
            removed_tables.push(Change::Delete(table_key(name)));
            partitions.extend((0..o.partitions.len() as u32).map(|i| Change::Delete(partition_key(o.id, i))));
        }
    }
    for (name, n) in &new.tables {
        match same_table(name) {
            Some((o, _)) => {
                for (i, p) in n.partitions.iter().enumerate() {
                    if o.partitions.get(i) != Some(p) {
                        partitions.push(Change::Set(partition_key(n.id, i as u32), json(p)));
                    }
                }
                last.extend((n.partitions.len()..o.partitions.len()).map(|i| Change::Delete(partition_key(o.id, i as u32))));
                if table_header(o) != table_header(n) {
                    tables.push(Change::Set(table_key(name), table_header(n)));
                }
            }
            None => {
                partitions.extend(n.partitions.iter().enumerate().map(|(i, p)| Change::Set(partition_key(n.id, i as u32), json(p))));
                tables.push(Change::Set(table_key(name), table_header(n)));
            }
        }
    }
    let old_dropped: BTreeSet<TableId> = old.dropped_tables.iter().copied().collect();
    let new_dropped: BTreeSet<TableId> = new.dropped_tables.iter().copied().collect();
    removed_tables.extend(new_dropped.difference(&old_dropped).map(|id| Change::Set(dropped_key(*id), Vec::new())));
    removed_tables.extend(old_dropped.difference(&new_dropped).map(|id| Change::Delete(dropped_key(*id))));
    first.into_iter().chain(removed_tables).chain(partitions).chain(tables).chain(last).collect()
}

/// Splits changes, in order, into writes of at most `WRITE_BYTES_MAX` bytes and `WRITE_RECORDS_MAX`
/// records (a single change larger than that is a write of its own).
pub fn writes(changes: Vec<Change>) -> Vec<Vec<Change>> {
    let mut out: Vec<Vec<Change>> = Vec::new();
    let mut bytes = 0;
    for c in changes {
        let fits = out.last().is_some_and(|w| w.len() < WRITE_RECORDS_MAX && bytes + c.bytes() <= WRITE_BYTES_MAX);
        if !fits {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += c.bytes();
        out.last_mut().expect("pushed").push(c);
    }
    out
}

/// A catalog read back from its records.
#[derive(Debug, Default)]
pub struct Loaded {
    pub catalog: Catalog,
    /// The version the records were at (0: never written).
    pub version: u64,
    /// Writes still owed before the catalog is served: migrating a catalog stored as one value, and
    /// removing the partitions of a table whose creation was cut short.
    pub cleanup: Vec<Change>,
}

fn corrupt(what: impl std::fmt::Display) -> TernError {
    TernError::Corruption(format!("catalog: {what}"))
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, value: &[u8]) -> Result<T, TernError> {
    serde_json::from_slice(value).map_err(|e| corrupt(format!("{what}: {e}")))
}

fn be<const N: usize>(what: &str, bytes: &[u8]) -> Result<[u8; N], TernError> {
    bytes.try_into().map_err(|_| corrupt(format!("{what} key of {} bytes", bytes.len())))
}

/// The version among the catalog's records (sortkey, value); 0 if none was ever written.
pub fn version_of(records: &[(Vec<u8>, Vec<u8>)]) -> Result<u64, TernError> {
    match records.iter().find(|(k, _)| k == VERSION) {
        Some((_, v)) => Ok(u64::from_be_bytes(be("version", v)?)),
        None => Ok(0),
    }
}

/// Rebuilds the catalog from every record under `CATALOG_HASHKEY` (sortkey, value), in any order.
pub fn decode(records: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) -> Result<Loaded, TernError> {
    let mut loaded = Loaded::default();
    let mut legacy = None;
    let mut header = None;
    let mut tables: BTreeMap<TableId, TableHeader> = BTreeMap::new();
    let mut partitions: BTreeMap<(TableId, u32), PartitionRecord> = BTreeMap::new();
    let mut others = Vec::new();
    for (sortkey, value) in records {
        let c = &mut loaded.catalog;
        if sortkey != LEGACY && sortkey != VERSION {
            others.push(sortkey.clone());
        }
        if sortkey == LEGACY {
            legacy = Some(parse::<Catalog>("catalog in one record", &value)?);
        } else if sortkey == VERSION {
            loaded.version = u64::from_be_bytes(be("version", &value)?);
        } else if sortkey == HEADER {
            header = Some(parse::<Header>("header", &value)?);
        } else if let Some(id) = sortkey.strip_prefix(NODE) {
            c.nodes.insert(u64::from_be_bytes(be("node", id)?), parse::<NodeRecord>("node", &value)?);
        } else if let Some(id) = sortkey.strip_prefix(DROPPED) {
            c.dropped_tables.push(TableId::from_be_bytes(be("dropped table", id)?));
        } else if sortkey.starts_with(TABLE) {
            let t = parse::<TableHeader>("table", &value)?;
            tables.insert(t.id, t);
        } else if let Some(rest) = sortkey.strip_prefix(PARTITION) {
            let k: [u8; 8] = be("partition", rest)?;
            let table = TableId::from_be_bytes(k[..4].try_into().expect("4 bytes"));
            let index = u32::from_be_bytes(k[4..].try_into().expect("4 bytes"));
            partitions.insert((table, index), parse::<PartitionRecord>("partition", &value)?);
        } else {
            return Err(corrupt(format!("unknown record {:?}", String::from_utf8_lossy(&sortkey))));
        }
    }
    if let Some(catalog) = legacy {
        // The catalog in one record stays authoritative until its migration deletes it, last: a
        // migration cut short is started over (records it wrote are replaced).
        loaded.cleanup = others.into_iter().map(Change::Delete).collect();
        loaded.cleanup.extend(diff(&Catalog::default(), &catalog));
        loaded.cleanup.push(Change::Delete(LEGACY.to_vec()));
        loaded.catalog = catalog;
        return Ok(loaded);
    }
    let c = &mut loaded.catalog;
    if let Some(h) = header {
        (c.next_node_id, c.next_table_id, c.next_peer_id) = (h.next_node_id, h.next_table_id, h.next_peer_id);
        (c.draining, c.balancer_paused, c.cluster_id) = (h.draining, h.balancer_paused, h.cluster_id);
    } else if !c.nodes.is_empty() || !tables.is_empty() {
        return Err(corrupt("records without a header"));
    }
    for (id, t) in tables {
        tern_core::limits::check_partition_count(t.partition_count).map_err(|e| corrupt(format!("table {}: {e}", t.name)))?;
        // A split that has switched has its children's records too.
        let count = match &t.split {
            Some(s) if s.switching => s.partition_count,
            _ => t.partition_count,
        };
        tern_core::limits::check_partition_count(count).map_err(|e| corrupt(format!("table {} splitting: {e}", t.name)))?;
        let mut parts = Vec::with_capacity(count as usize);
        for i in 0..count {
            parts.push(partitions.remove(&(id, i)).ok_or_else(|| corrupt(format!("table {} has no record of partition {i}", t.name)))?);
        }
        let record = TableRecord {
            id,
            name: t.name.clone(),
            partition_count: t.partition_count,
            replica_count: t.replica_count,
            partitions: parts,
            backup_policy: t.backup_policy.clone(),
            restoring: t.restoring,
            duplications: t.duplications,
            split: t.split,
            created_partition_count: t.created_partition_count,
        };
        c.tables.insert(t.name, record);
    }
    // Partitions without a table: a creation cut short before its table record, or a drop cut short
    // after it. Nothing refers to them; they are removed.
    loaded.cleanup.extend(partitions.into_keys().map(|(t, i)| Change::Delete(partition_key(t, i))));
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(store: &mut BTreeMap<Vec<u8>, Vec<u8>>, changes: &[Change]) {
        for c in changes {
            match c {
                Change::Set(k, v) => store.insert(k.clone(), v.clone()),
                Change::Delete(k) => store.remove(k),
            };
        }
    }

    fn load(store: &BTreeMap<Vec<u8>, Vec<u8>>) -> Loaded {
        decode(store.clone()).unwrap()
    }

    fn cluster() -> (Catalog, Vec<NodeId>) {
        let mut c = Catalog::default();
        let nodes: Vec<NodeId> = (0..4).map(|i| c.register(&format!("n{i}:1"), "").unwrap()).collect();
        c.cluster_id = 77;
        (c, nodes)
    }

    /// Every kind of change round-trips through records, and a change writes only what it changed.
    #[test]
    fn changes_round_trip_and_stay_small() {
        let mut store = BTreeMap::new();
        let (mut c, nodes) = cluster();
        apply(&mut store, &diff(&Catalog::default(), &c));
        assert_eq!(load(&store).catalog, c);
        let before = c.clone();
        c.create_table("a", 64, 3, &nodes).unwrap();
        c.create_table("b", 4, 3, &nodes).unwrap();
        let changes = diff(&before, &c);
        assert_eq!(changes.len(), 1 + 64 + 4 + 2, "header, partitions, two tables");
        apply(&mut store, &changes);
        assert_eq!(load(&store).catalog, c);

        let before = c.clone();
        c.transfer_leader("a", 5, c.tables["a"].partitions[5].peers[1].1).unwrap();
        let changes = diff(&before, &c);
        assert_eq!(changes.len(), 1, "one partition record: {changes:?}");
        apply(&mut store, &changes);
        assert_eq!(load(&store).catalog, c);

        let before = c.clone();
        let policy = crate::catalog::BackupPolicy { root: "/backups".into(), interval_seconds: 3600, keep: 3, rate_mb: 0 };
        c.set_backup_policy("a", Some(policy)).unwrap();
        c.tables.get_mut("a").unwrap().restoring = true;
        let dup = crate::catalog::Duplication {
            id: 99,
            remote_meta: vec!["10.0.0.1:7000".into()],
            remote_table: "a2".into(),
            remote_tag: 5,
            paused: false,
            log_entries_max: crate::catalog::DUP_LOG_ENTRIES_DEFAULT,
        };
        c.tables.get_mut("a").unwrap().duplications.push(dup);
        let changes = diff(&before, &c);
        assert_eq!(changes.len(), 1, "one table header: {changes:?}");
        apply(&mut store, &changes);
        assert_eq!(load(&store).catalog, c);

        let before = c.clone();
        c.drop_table("b").unwrap();
        c.decommission(nodes[3], &nodes[..3]).unwrap();
        c.nodes.get_mut(&nodes[0]).unwrap().zone = "z".into();
        apply(&mut store, &diff(&before, &c));
        let loaded = load(&store);
        assert_eq!(loaded.catalog, c);
        assert!(loaded.cleanup.is_empty());
        assert!(diff(&c, &c).is_empty());
    }

    /// A change cut short after any of its writes leaves a catalog that loads, holds every table it
    /// had before or after the change (never a table without partitions), and is cleaned up.
    #[test]
    fn every_prefix_of_a_change_loads() {
        let (mut c, nodes) = cluster();
        c.create_table("keep", 8, 3, &nodes).unwrap();
        c.create_table("gone", 8, 3, &nodes).unwrap();
        let mut base = BTreeMap::new();
        apply(&mut base, &diff(&Catalog::default(), &c));
        let before = c.clone();
        c.drop_table("gone").unwrap();
        c.create_table("new", 16, 3, &nodes).unwrap();
        let changes = diff(&before, &c);
        for cut in 0..=changes.len() {
            let mut store = base.clone();
            apply(&mut store, &changes[..cut]);
            let mut loaded = load(&store);
            assert_eq!(loaded.catalog.tables["keep"], c.tables["keep"]);
            for t in ["gone", "new"] {
                if let Some(table) = loaded.catalog.tables.get(t) {
                    assert_eq!(table.partitions.len(), table.partition_count as usize);
                }
            }
            assert!(loaded.catalog.next_table_id >= c.next_table_id || cut == 0);
            apply(&mut store, &std::mem::take(&mut loaded.cleanup));
            assert!(load(&store).cleanup.is_empty(), "cleanup is complete at cut {cut}");
        }
    }

    /// A 65,536-partition table (the largest allowed) is written as many bounded writes.
    #[test]
    fn the_largest_table_is_split_into_bounded_writes() {
        let (mut c, nodes) = cluster();
        let before = c.clone();
        c.create_table("huge", tern_core::limits::PARTITION_COUNT_MAX, 3, &nodes).unwrap();
        let writes = writes(diff(&before, &c));
        assert!(writes.len() > 1);
        for w in &writes {
            assert!(w.len() <= WRITE_RECORDS_MAX);
            assert!(w.iter().map(Change::bytes).sum::<usize>() <= WRITE_BYTES_MAX);
        }
        let mut store = BTreeMap::new();
        apply(&mut store, &diff(&Catalog::default(), &before));
        for w in &writes {
            apply(&mut store, w);
        }
        assert_eq!(load(&store).catalog, c);
    }

    /// A catalog stored by an older Tern as one JSON value is migrated to records.
    #[test]
    fn a_catalog_in_one_record_is_migrated() {
        let (mut c, nodes) = cluster();
        c.create_table("t", 4, 3, &nodes).unwrap();
        let mut store = BTreeMap::from([(LEGACY.to_vec(), serde_json::to_vec(&c).unwrap())]);
        let mut loaded = load(&store);
        assert_eq!(loaded.catalog, c);
        apply(&mut store, &std::mem::take(&mut loaded.cleanup));
        assert!(!store.contains_key(LEGACY));
        let again = load(&store);
        assert_eq!(again.catalog, c);
        assert!(again.cleanup.is_empty());
    }

    /// A migration cut short after any of its writes is started over on the next load and ends with
    /// the same catalog.
    #[test]
    fn a_migration_cut_short_starts_over() {
        let (mut c, nodes) = cluster();
        c.create_table("t", 4096, 3, &nodes).unwrap();
        let legacy = BTreeMap::from([(LEGACY.to_vec(), serde_json::to_vec(&c).unwrap())]);
        let writes = writes(load(&legacy).cleanup);
        assert!(writes.len() > 1);
        for cut in 0..writes.len() {
            let mut store = legacy.clone();
            store.insert(VERSION.to_vec(), 1u64.to_be_bytes().to_vec());
            for w in &writes[..cut] {
                apply(&mut store, w);
            }
            let mut loaded = load(&store);
            assert_eq!(loaded.catalog, c, "cut after {cut} writes");
            apply(&mut store, &std::mem::take(&mut loaded.cleanup));
            let done = load(&store);
            assert_eq!(done.catalog, c);
            assert!(done.cleanup.is_empty());
        }
    }

    /// Records that do not fit the layout are corruption, named, never a panic.
    #[test]
    fn malformed_records_are_refused() {
        for (k, v) in [
            (b"node/x".to_vec(), b"{}".to_vec()),
            (b"header".to_vec(), b"not json".to_vec()),
            (b"version".to_vec(), b"1".to_vec()),
            (b"mystery".to_vec(), b"".to_vec()),
            (b"part/123".to_vec(), b"{}".to_vec()),
        ] {
            let e = decode([(k.clone(), v)]).unwrap_err();
            assert!(matches!(e, TernError::Corruption(_)), "{k:?}: {e}");
        }
        let (mut c, nodes) = cluster();
        c.create_table("t", 2, 3, &nodes).unwrap();
        let mut store = BTreeMap::new();
        apply(&mut store, &diff(&Catalog::default(), &c));
        store.remove(&partition_key(c.tables["t"].id, 1));
        assert!(decode(store).unwrap_err().to_string().contains("partition 1"));
    }
}
