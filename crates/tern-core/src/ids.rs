//! Identifiers. Node and peer ids are allocated by meta and never reused, even after removal.

/// A server process, allocated by meta at first registration and persisted in the server's data dir.
pub type NodeId = u64;
/// One member of one raft group, allocated by meta; unique across the cluster.
pub type PeerId = u64;
/// A table, allocated by meta; never reused after a drop.
pub type TableId = u32;

/// A partition's raft group: the table id in the high 32 bits, the partition index in the low 32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub u64);

impl GroupId {
    pub fn new(table_id: TableId, partition: u32) -> GroupId {
        GroupId(((table_id as u64) << 32) | partition as u64)
    }
    pub fn table_id(self) -> TableId {
        (self.0 >> 32) as TableId
    }
    pub fn partition(self) -> u32 {
        self.0 as u32
    }
}

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.table_id(), self.partition())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The group id packs table and partition losslessly, including extreme values.
    #[test]
    fn group_id_round_trip() {
        for (t, p) in [(0, 0), (1, 7), (u32::MAX, u32::MAX), (42, 65535)] {
            let g = GroupId::new(t, p);
            assert_eq!((g.table_id(), g.partition()), (t, p));
        }
    }
}
