//! Administering cross-cluster duplication: `add` checks the remote side before meta records the
//! duplication (the remote table exists with as many partitions, and the remote cluster's tag is not
//! this one's), `list` and `change` are meta calls. The servers ship the data (`tern_server::dup`).

use crate::client::{Client, ClientConfig};
use tern_core::{TernError, TernResult};
use tern_proto::*;

/// What `dup add` asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct AddDuplication {
    pub table: String,
    pub remote_meta: Vec<String>,
    /// Empty: the same name as the local table.
    pub remote_table: String,
    /// 0: meta's default.
    pub log_entries_max: u64,
}

/// Checks the remote cluster and table, then records the duplication in this cluster's meta.
/// Returns its id.
pub async fn add(local: &Client, req: &AddDuplication) -> TernResult<u64> {
    let remote_table = if req.remote_table.is_empty() { req.table.clone() } else { req.remote_table.clone() };
    let local_table = local.table_info(&req.table).await?;
    let local_settings = local.cluster_settings().await?;
    let mut cfg = ClientConfig::new(req.remote_meta.clone());
    cfg.timeout = local.config().timeout;
    let remote = Client::new(cfg)?;
    let remote_settings =
        remote.cluster_settings().await.map_err(|e| TernError::Unavailable(format!("remote cluster at {}: {e}", req.remote_meta.join(","))))?;
    if remote_settings.cluster_tag == 0 {
        return Err(TernError::invalid("the remote cluster has no servers registered yet (no cluster id)"));
    }
    if remote_settings.cluster_id == local_settings.cluster_id {
        return Err(TernError::invalid("the remote meta addresses are this cluster's own"));
    }
    if remote_settings.cluster_tag == local_settings.cluster_tag {
        return Err(TernError::invalid(format!(
            "both clusters have tag {}: record versions could not tell their writes apart (the tag comes from the cluster id)",
            local_settings.cluster_tag
        )));
    }
    let remote_info = remote.table_info(&remote_table).await.map_err(|e| match e {
        TernError::TableNotFound(_) => TernError::TableNotFound(format!(
            "{remote_table} in the remote cluster: create it there first, with {} partitions",
            local_table.partition_count
        )),
        e => e,
    })?;
    if remote_info.partition_count != local_table.partition_count {
        return Err(TernError::invalid(format!(
            "table {} has {} partitions and the remote {remote_table} has {}: duplication ships partition i to partition i, so they must match",
            req.table, local_table.partition_count, remote_info.partition_count
        )));
    }
    // Last writer wins from here on; what each side holds already must not race with it: the
    // remote table starts empty (the full copy fills it), or already duplicates into this one
    // (the second direction of a two-way pair: it holds this table's records).
    let reverse = list(&remote, &remote_table).await?.iter().any(|d| d.remote_tag == local_settings.cluster_tag && d.remote_table == req.table);
    if !reverse {
        let (records, _) = remote.table(&remote_table).full_scan(&crate::FullScanCursor::default(), 1, true).await?;
        if !records.is_empty() {
            return Err(TernError::invalid(format!(
                "the remote table {remote_table} is not empty: duplicate into an empty table (the first full copy fills it), or add the second direction of a two-way pair once the first exists"
            )));
        }
    }
    let request = AddDuplicationRequest {
        table: req.table.clone(),
        remote_meta: req.remote_meta.clone(),
        remote_table,
        remote_tag: remote_settings.cluster_tag,
        log_entries_max: req.log_entries_max,
    };
    let r = local
        .meta_call(|mut m| {
            let request = request.clone();
            async move { m.add_duplication(request).await.map(|r| r.into_inner()) }
        })
        .await?;
    tern_proto::check(&r.error)?;
    Ok(r.id)
}

/// Duplications of one table (or every table, with an empty name) with each partition's progress.
pub async fn list(client: &Client, table: &str) -> TernResult<Vec<Duplication>> {
    let table = table.to_string();
    let r = client
        .meta_call(|mut m| {
            let table = table.clone();
            async move { m.list_duplications(ListDuplicationsRequest { table }).await.map(|r| r.into_inner()) }
        })
        .await?;
    tern_proto::check(&r.error)?;
    Ok(r.duplications)
}

/// Pauses, resumes or removes a duplication; meta's answer says what it did.
pub async fn change(client: &Client, id: u64, action: DuplicationAction) -> TernResult<String> {
    let r = client
        .meta_call(|mut m| async move { m.change_duplication(ChangeDuplicationRequest { id, action: action as i32 }).await.map(|r| r.into_inner()) })
        .await?;
    tern_proto::check(&r.error)?;
    Ok(r.message)
}
