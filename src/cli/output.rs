//! The summary printed after a mirror run: a table for people, JSON for scripts.

use serde::Serialize;

use super::MirrorOutcome;
use crate::mirror::{ItemOutcome, PruneReport};

/// Summary format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// An aligned table.
    Text,
    /// One JSON document.
    Json,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Row {
    mirror: String,
    item: String,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    destination_digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    /// Referrers the destination holds for the item, with `spec.referrers.enabled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    referrers: Option<u32>,
}

fn rows(outcomes: &[MirrorOutcome]) -> Vec<Row> {
    let mut rows = Vec::new();
    for o in outcomes {
        match &o.result {
            Err(message) => rows.push(Row {
                mirror: o.name.clone(),
                item: "-".into(),
                state: "Failed",
                source_digest: None,
                destination_digest: None,
                reason: Some("MirrorFailed".into()),
                message: Some(message.clone()),
                referrers: None,
            }),
            Ok(report) => {
                for p in &o.planned {
                    rows.push(Row {
                        mirror: o.name.clone(),
                        item: p.clone(),
                        state: "Planned",
                        source_digest: None,
                        destination_digest: None,
                        reason: None,
                        message: None,
                        referrers: None,
                    });
                }
                if let Some(p) = &o.prune {
                    prune_rows(&mut rows, o, p);
                }
                for i in &report.items {
                    let note = i.referrers.as_ref().and_then(|r| r.note.clone());
                    let (state, reason, message) = match &i.result {
                        Ok(ItemOutcome::Copied) => ("Copied", None, note),
                        Ok(ItemOutcome::UpToDate) => ("UpToDate", None, note),
                        Err(e) => ("Failed", Some(e.reason().to_string()), Some(e.to_string())),
                    };
                    rows.push(Row {
                        mirror: o.name.clone(),
                        item: i.item.name().to_string(),
                        state,
                        source_digest: i.source_digest.clone(),
                        destination_digest: i.destination_digest.clone(),
                        reason,
                        message,
                        referrers: i.referrers.as_ref().map(|r| r.count),
                    });
                }
            }
        }
    }
    rows
}

fn prune_rows(rows: &mut Vec<Row>, o: &MirrorOutcome, p: &PruneReport) {
    let row =
        |item: &str, state: &'static str, reason: Option<&str>, message: Option<String>| Row {
            mirror: o.name.clone(),
            item: item.to_string(),
            state,
            source_digest: None,
            destination_digest: None,
            reason: reason.map(str::to_string),
            message,
            referrers: None,
        };
    let pruned = if o.dry_run { "WouldPrune" } else { "Pruned" };
    for t in &p.outcome.pruned {
        rows.push(row(t, pruned, None, None));
    }
    for r in &p.outcome.retained {
        rows.push(row(
            &r.tag,
            "Retained",
            Some(r.reason.reason()),
            Some(r.message.clone()),
        ));
    }
    let referrer = if o.dry_run {
        "WouldPruneReferrer"
    } else {
        "PrunedReferrer"
    };
    for r in &p.outcome.referrers_pruned {
        rows.push(row(r, referrer, None, None));
    }
    for r in &p.outcome.referrers_kept {
        rows.push(row("-", "RetainedReferrer", None, Some(r.clone())));
    }
    let note = p.skipped.map(|s| s.message()).or(p.outcome.warning.clone());
    if let Some(message) = note {
        rows.push(row("-", "NotPruned", None, Some(message)));
    }
    if p.unrecorded > 0 {
        let message = format!(
            "{} copied tag(s) not recorded (the record is full): they will never be pruned",
            p.unrecorded
        );
        rows.push(row("-", "NotRecorded", None, Some(message)));
    }
}

/// Renders the summary.
pub fn render(outcomes: &[MirrorOutcome], format: OutputFormat) -> String {
    let rows = rows(outcomes);
    match format {
        OutputFormat::Json => {
            serde_json::to_string_pretty(&rows).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
                + "\n"
        }
        OutputFormat::Text => {
            let short = |d: &Option<String>| {
                d.as_deref()
                    .map(|d| d.get(..19).unwrap_or(d).to_string())
                    .unwrap_or_else(|| "-".into())
            };
            let table: Vec<[String; 6]> = rows
                .iter()
                .map(|r| {
                    [
                        r.mirror.clone(),
                        r.item.clone(),
                        r.state.to_string(),
                        short(&r.source_digest),
                        short(&r.destination_digest),
                        r.message.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            let header = [
                "MIRROR",
                "ITEM",
                "STATE",
                "SOURCE",
                "DESTINATION",
                "MESSAGE",
            ]
            .map(String::from);
            let mut widths = [0usize; 6];
            for row in std::iter::once(&header).chain(table.iter()) {
                for (w, cell) in widths.iter_mut().zip(row.iter()) {
                    *w = (*w).max(cell.len());
                }
            }
            let mut out = String::new();
            for row in std::iter::once(&header).chain(table.iter()) {
                let line: Vec<String> = row
                    .iter()
                    .zip(widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect();
                out.push_str(line.join("  ").trim_end());
                out.push('\n');
            }
            out
        }
    }
}
