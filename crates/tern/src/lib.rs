//! The `tern` binary's subcommands as a library, so integration tests can drive them in-process.
//!
//! Owns: command-line parsing and validation (`main.rs`), the playground (`playground`: a whole cluster
//! in one process), the shell (`shell`: parser and commands over tern-client) and the load generator
//! (`bench`). Must not contain storage, consensus or routing logic: it composes the other crates.

pub mod bench;
pub mod playground;
pub mod shell;
