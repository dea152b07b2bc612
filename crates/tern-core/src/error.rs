//! The error type shared by all crates. Structured fields, mapped to wire codes only at service edges.

use crate::NodeId;

/// Wire-level error classes (mirrors `tern.ErrorCode` in proto/tern.proto).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidArgument = 1,
    TableNotFound = 2,
    PartitionNotFound = 3,
    NotLeader = 4,
    StaleConfig = 5,
    Busy = 6,
    Timeout = 7,
    TableExists = 8,
    NotEnoughNodes = 9,
    Internal = 10,
    WrongType = 11,
    Corruption = 12,
    ProposalDropped = 13,
    PartitionSplit = 14,
    Unavailable = 100,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TernError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("table {0:?} not found")]
    TableNotFound(String),
    #[error("partition {0} is not hosted here")]
    PartitionNotFound(String),
    #[error("not leader (leader hint: node {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("stale routing: {0}")]
    StaleConfig(String),
    #[error("server busy: {0}")]
    Busy(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("table {0:?} already exists")]
    TableExists(String),
    #[error("not enough nodes: {0}")]
    NotEnoughNodes(String),
    #[error("wrong type: {0}")]
    WrongType(String),
    #[error("data corruption: {0}")]
    Corruption(String),
    #[error("proposal dropped: {0}")]
    ProposalDropped(String),
    /// The partition has split: the table has `partition_count` partitions now, and the hashkey
    /// (or the request's partition count) belongs to the new routing.
    #[error("partition split: {message}")]
    PartitionSplit { partition_count: u32, message: String },
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type TernResult<T> = Result<T, TernError>;

impl TernError {
    pub fn invalid(msg: impl Into<String>) -> TernError {
        TernError::InvalidArgument(msg.into())
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            TernError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            TernError::TableNotFound(_) => ErrorCode::TableNotFound,
            TernError::PartitionNotFound(_) => ErrorCode::PartitionNotFound,
            TernError::NotLeader { .. } => ErrorCode::NotLeader,
            TernError::StaleConfig(_) => ErrorCode::StaleConfig,
            TernError::Busy(_) => ErrorCode::Busy,
            TernError::Timeout(_) => ErrorCode::Timeout,
            TernError::TableExists(_) => ErrorCode::TableExists,
            TernError::NotEnoughNodes(_) => ErrorCode::NotEnoughNodes,
            TernError::WrongType(_) => ErrorCode::WrongType,
            TernError::Corruption(_) => ErrorCode::Corruption,
            TernError::ProposalDropped(_) => ErrorCode::ProposalDropped,
            TernError::PartitionSplit { .. } => ErrorCode::PartitionSplit,
            TernError::Unavailable(_) => ErrorCode::Unavailable,
            TernError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// Errors after which a client may retry the same request (possibly elsewhere).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            TernError::NotLeader { .. }
                | TernError::StaleConfig(_)
                | TernError::Busy(_)
                | TernError::Timeout(_)
                | TernError::PartitionNotFound(_)
                | TernError::ProposalDropped(_)
                | TernError::PartitionSplit { .. }
                | TernError::Unavailable(_)
        )
    }

    /// Rebuilds an error from its wire form (`leader` and `partition_count` are the structured
    /// fields of NOT_LEADER and PARTITION_SPLIT).
    pub fn from_code(code: i32, message: String, leader: NodeId, partition_count: u32) -> TernError {
        match code {
            1 => TernError::InvalidArgument(message),
            2 => TernError::TableNotFound(message),
            3 => TernError::PartitionNotFound(message),
            4 => TernError::NotLeader { leader: (leader != 0).then_some(leader) },
            5 => TernError::StaleConfig(message),
            6 => TernError::Busy(message),
            7 => TernError::Timeout(message),
            8 => TernError::TableExists(message),
            9 => TernError::NotEnoughNodes(message),
            11 => TernError::WrongType(message),
            12 => TernError::Corruption(message),
            13 => TernError::ProposalDropped(message),
            14 => TernError::PartitionSplit { partition_count, message },
            100 => TernError::Unavailable(message),
            _ => TernError::Internal(message),
        }
    }

    /// The bare message (without the class prefix), for the wire.
    pub fn message(&self) -> String {
        match self {
            TernError::InvalidArgument(m)
            | TernError::TableNotFound(m)
            | TernError::PartitionNotFound(m)
            | TernError::StaleConfig(m)
            | TernError::Busy(m)
            | TernError::Timeout(m)
            | TernError::TableExists(m)
            | TernError::NotEnoughNodes(m)
            | TernError::WrongType(m)
            | TernError::Corruption(m)
            | TernError::ProposalDropped(m)
            | TernError::Unavailable(m)
            | TernError::Internal(m)
            | TernError::PartitionSplit { message: m, .. } => m.clone(),
            TernError::NotLeader { .. } => self.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every error survives the wire round trip with its class and payload.
    #[test]
    fn wire_round_trip() {
        let cases = vec![
            TernError::invalid("x"),
            TernError::TableNotFound("t".into()),
            TernError::NotLeader { leader: Some(3) },
            TernError::NotLeader { leader: None },
            TernError::Busy("q".into()),
            TernError::WrongType("w".into()),
            TernError::Unavailable("u".into()),
            TernError::PartitionSplit { partition_count: 16, message: "p".into() },
        ];
        for e in cases {
            let leader = if let TernError::NotLeader { leader } = &e { leader.unwrap_or(0) } else { 0 };
            let count = if let TernError::PartitionSplit { partition_count, .. } = &e { *partition_count } else { 0 };
            let back = TernError::from_code(e.code() as i32, e.message(), leader, count);
            assert_eq!(back, e);
        }
    }
}
