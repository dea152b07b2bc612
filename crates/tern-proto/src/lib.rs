//! Generated protobuf types for proto/tern.proto, and with the "grpc" feature its gRPC clients and
//! servers, plus conversions between wire errors and `tern_core::TernError`.
//!
//! Owns: the wire format. Must not contain logic beyond conversions; depends only on tern-core (and,
//! with "grpc", tonic).

#[allow(clippy::all)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/tern.rs"));
}
pub use generated::*;

use tern_core::TernError;

impl From<&TernError> for Error {
    fn from(e: &TernError) -> Error {
        let leader_node = match e {
            TernError::NotLeader { leader } => leader.unwrap_or(0),
            _ => 0,
        };
        let partition_count = match e {
            TernError::PartitionSplit { partition_count, .. } => *partition_count,
            _ => 0,
        };
        Error { code: e.code() as i32, message: e.message(), leader_node, partition_count }
    }
}

impl From<TernError> for Error {
    fn from(e: TernError) -> Error {
        Error::from(&e)
    }
}

impl From<&Error> for TernError {
    fn from(e: &Error) -> TernError {
        TernError::from_code(e.code, e.message.clone(), e.leader_node, e.partition_count)
    }
}

/// Turns an optional wire error into a result.
pub fn check(error: &Option<Error>) -> Result<(), TernError> {
    match error {
        Some(e) if e.code != 0 => Err(TernError::from(e)),
        _ => Ok(()),
    }
}

/// A gRPC transport failure as a Tern error: the server may or may not have seen the request.
#[cfg(feature = "grpc")]
pub fn from_status(status: &tonic::Status) -> TernError {
    match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => TernError::invalid(status.message()),
        tonic::Code::DeadlineExceeded => TernError::Timeout(status.message().to_string()),
        tonic::Code::ResourceExhausted => TernError::Busy(status.message().to_string()),
        _ => TernError::Unavailable(format!("{}: {}", status.code(), status.message())),
    }
}
