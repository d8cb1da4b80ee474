//! Plain-text views for people: the tables and blocks the `sagaflow` commands print. Scripts
//! use the JSON form of the same structs instead.

use std::time::Duration;

use sagaflow_protocol::{Direction, Timestamp};
use serde_json::Value;

use super::audit::AuditPage;
use super::inspect::{ActivityView, HistoryView, OwnershipView, SagaDetail, TimelineEntry};
use super::list::ListPage;
use super::retention::RetentionReport;
use super::stuck::{StuckKind, StuckReport};
use super::time::{format_duration, format_time};
use crate::store::HistoryEntry;

/// Longest cell text in a table column that holds free text (errors, details, outputs).
const CELL: usize = 60;

/// Renders rows under a header, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(i) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    let mut out = vec![
        line(header.to_vec()),
        line(rule.iter().map(String::as_str).collect()),
    ];
    for row in rows {
        out.push(line(row.iter().map(String::as_str).collect()));
    }
    out.join("\n")
}

/// `text` cut to `max` characters, with an ellipsis when cut; line breaks become spaces so a
/// cell stays on its row.
pub fn truncate(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        flat
    } else {
        format!("{}…", flat.chars().take(max).collect::<String>())
    }
}

fn opt_time(at: Option<Timestamp>) -> String {
    at.map(format_time).unwrap_or_else(|| "-".into())
}

fn or_dash(text: Option<&str>) -> String {
    text.map(str::to_string).unwrap_or_else(|| "-".into())
}

/// `sagaflow list`: one row per saga, and how to get the next page.
pub fn list_table(page: &ListPage) -> String {
    if page.sagas.is_empty() {
        return "No sagas match.".into();
    }
    let rows: Vec<Vec<String>> = page
        .sagas
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                format!("{}@{}", s.name, s.version),
                s.status.as_str().to_string(),
                or_dash(s.current_step.as_deref()),
                format_time(s.created_at),
                format_time(s.updated_at),
                or_dash(s.start_key.as_deref()),
                s.last_error
                    .as_deref()
                    .map_or_else(|| "-".into(), |e| truncate(e, CELL)),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "id",
            "saga",
            "status",
            "step",
            "created",
            "updated",
            "start key",
            "last error",
        ],
        &rows,
    );
    match &page.next {
        Some(next) => out.push_str(&format!(
            "\n\n{} sagas shown; the next page: add --after {next}",
            page.sagas.len()
        )),
        None => out.push_str(&format!("\n\n{} sagas", page.sagas.len())),
    }
    out
}

/// `sagaflow stuck`: the totals, then one row per saga with the reason.
pub fn stuck_table(report: &StuckReport) -> String {
    let mut out = format!(
        "{} stuck, {} without progress for over {} (as of {})",
        report.stuck_total,
        report.no_progress_total,
        format_duration(report.threshold),
        format_time(report.now)
    );
    if report.sagas.is_empty() {
        out.push_str("\n\nNothing needs an operator.");
        return out;
    }
    let rows: Vec<Vec<String>> = report
        .sagas
        .iter()
        .map(|s| {
            vec![
                s.saga.id.to_string(),
                format!("{}@{}", s.saga.name, s.saga.version),
                match s.kind {
                    StuckKind::Stuck => "stuck".into(),
                    StuckKind::NoProgress => format!("{} (idle)", s.saga.status.as_str()),
                },
                or_dash(s.saga.current_step.as_deref()),
                format_duration(s.idle_for),
                s.reason.clone(),
            ]
        })
        .collect();
    out.push_str("\n\n");
    out.push_str(&table(
        &["id", "saga", "status", "step", "idle for", "reason"],
        &rows,
    ));
    let total = report.stuck_total + report.no_progress_total;
    if (report.sagas.len() as u64) < total {
        out.push_str(&format!(
            "\n\n{} of {total} shown; raise --limit to see more",
            report.sagas.len()
        ));
    }
    out
}

fn activity_line(activity: &ActivityView) -> String {
    match activity {
        ActivityView::NotStarted => "not started".into(),
        ActivityView::Finished => "finished".into(),
        ActivityView::Idle => "waiting on nothing".into(),
        ActivityView::WaitingForOperator { step, direction } => {
            format!("waiting for an operator at {step} ({direction})")
        }
        ActivityView::InFlight {
            step,
            direction,
            attempt,
            since,
            deadline,
            ..
        } => format!(
            "{step} ({direction}) attempt {attempt} in flight since {}, times out at {}",
            opt_time(*since),
            opt_time(*deadline)
        ),
        ActivityView::BackingOff {
            step,
            direction,
            attempt,
            retry_at,
        } => format!(
            "{step} ({direction}) attempt {attempt} retries at {}",
            format_time(*retry_at)
        ),
    }
}

fn compact(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Which node drives a saga, for `show`.
fn ownership_line(view: &OwnershipView) -> String {
    let partition = view.partition;
    match (&view.owner, &view.last_owner, view.lease_expires_at) {
        (Some(owner), _, Some(until)) => format!(
            "node {owner} (partition {partition}, epoch {}, lease until {})",
            view.epoch,
            format_time(until)
        ),
        (None, Some(last), Some(until)) => format!(
            "no node now (partition {partition}: {last}'s lease ran out at {}; \
             a live engine takes it over within a lease)",
            format_time(until)
        ),
        _ => format!("no node yet (partition {partition} was never taken: is an engine running?)"),
    }
}

/// `sagaflow show`: the saga, its steps, the idempotency keys and every attempt.
pub fn show_text(detail: &SagaDetail) -> String {
    let mut fields: Vec<(&str, String)> = vec![
        ("saga", detail.id.to_string()),
        (
            "definition",
            format!("{} version {}", detail.name, detail.version),
        ),
        ("status", detail.status.as_str().to_string()),
        ("activity", activity_line(&detail.activity)),
        ("driven by", ownership_line(&detail.ownership)),
        ("next wake-up", opt_time(detail.next_wake)),
        ("start key", or_dash(detail.start_key.as_deref())),
        ("created", format_time(detail.created_at)),
        ("updated", format_time(detail.updated_at)),
        (
            "history",
            format!(
                "{} records (row version {})",
                detail.history_len, detail.row_version
            ),
        ),
        ("deadline", opt_time(detail.deadline)),
        (
            "past pivot",
            if detail.past_pivot { "yes" } else { "no" }.into(),
        ),
    ];
    if let Some(failure) = &detail.failure {
        fields.push(("failure", failure.clone()));
    }
    if let Some(stuck) = &detail.stuck {
        fields.push((
            "stuck",
            format!("at {} ({}): {}", stuck.step, stuck.direction, stuck.reason),
        ));
    }
    if !detail.compensation_queue.is_empty() {
        fields.push(("to compensate", detail.compensation_queue.join(", ")));
    }
    fields.push(("input", truncate(&detail.input.to_string(), 120)));
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{k:<width$}  {v}"))
        .collect();

    out.push(String::new());
    out.push("Steps".into());
    let steps: Vec<Vec<String>> = detail
        .steps
        .iter()
        .map(|s| {
            vec![
                s.index.to_string(),
                s.name.clone(),
                serde_label(&s.kind),
                serde_label(&s.status),
                s.forward_attempts.to_string(),
                s.compensation_attempts.to_string(),
                s.output
                    .as_ref()
                    .map_or_else(|| "-".into(), |o| truncate(&compact(o), 40)),
                s.last_error
                    .as_deref()
                    .map_or_else(|| "-".into(), |e| truncate(e, CELL)),
            ]
        })
        .collect();
    out.push(table(
        &[
            "#",
            "step",
            "kind",
            "status",
            "forward",
            "compensation",
            "output",
            "last error",
        ],
        &steps,
    ));

    let keys: Vec<Vec<String>> = detail
        .steps
        .iter()
        .flat_map(|s| {
            s.idempotency_keys.iter().map(move |key| {
                let used: Vec<String> = s
                    .attempts
                    .iter()
                    .filter(|a| &a.idempotency_key == key)
                    .map(|a| a.attempt.to_string())
                    .collect();
                let direction = s
                    .attempts
                    .iter()
                    .find(|a| &a.idempotency_key == key)
                    .map_or_else(String::new, |a| a.direction.clone());
                vec![s.name.clone(), direction, key.clone(), used.join(", ")]
            })
        })
        .collect();
    out.push(String::new());
    out.push("Idempotency keys".into());
    if keys.is_empty() {
        out.push("none yet: no attempt was dispatched".into());
    } else {
        out.push(table(&["step", "direction", "key", "attempts"], &keys));
    }

    let attempts: Vec<Vec<String>> = detail
        .steps
        .iter()
        .flat_map(|s| {
            s.attempts.iter().map(move |a| {
                vec![
                    s.name.clone(),
                    a.direction.clone(),
                    a.attempt.to_string(),
                    a.status.as_str().to_string(),
                    format_time(a.dispatched_at),
                    opt_time(a.finished_at),
                    a.error
                        .as_deref()
                        .map_or_else(|| "-".into(), |e| truncate(e, CELL)),
                ]
            })
        })
        .collect();
    out.push(String::new());
    out.push("Attempts".into());
    if attempts.is_empty() {
        out.push("none yet".into());
    } else {
        out.push(table(
            &[
                "step",
                "direction",
                "attempt",
                "status",
                "dispatched",
                "finished",
                "error",
            ],
            &attempts,
        ));
    }
    out.join("\n")
}

/// An enum's serde name (`compensatable`, `succeeded`), as the JSON form spells it.
fn serde_label<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

/// Each step's input and output schema as pretty JSON (`sagaflow show --schema`), or a line
/// saying its worker registered none.
pub fn schemas_text(detail: &SagaDetail) -> String {
    let mut out = vec!["Schemas (JSON Schema, as the workers registered them)".to_string()];
    for step in &detail.steps {
        for (what, schema) in [
            ("input", &step.input_schema),
            ("output", &step.output_schema),
        ] {
            out.push(String::new());
            match schema {
                Some(schema) => {
                    out.push(format!("{} `{}` {what}:", step.index, step.name));
                    out.push(
                        serde_json::to_string_pretty(schema).unwrap_or_else(|_| compact(schema)),
                    );
                }
                None if what == "output" => out.push(format!(
                    "{} `{}` output: none registered (skip-step --output needs \
                     --unchecked-output)",
                    step.index, step.name
                )),
                None => out.push(format!(
                    "{} `{}` input: none registered",
                    step.index, step.name
                )),
            }
        }
    }
    out.join("\n")
}

/// One history record's error and details, on one line; times as RFC3339.
pub fn detail_summary(error: Option<&str>, detail: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(error) = error {
        parts.push(truncate(error, 100));
    }
    match detail {
        Value::Object(map) => {
            for (key, value) in map {
                // The key is in `show`; on every dispatch row it would only repeat itself.
                if key == "idempotency_key" || value.is_null() {
                    continue;
                }
                let text = match value {
                    Value::Number(n) if key == "deadline" || key == "at" => n
                        .as_i64()
                        .map_or_else(|| n.to_string(), |ms| format_time(Timestamp(ms))),
                    other => compact(other),
                };
                parts.push(format!("{key}={}", truncate(&text, CELL)));
            }
        }
        Value::Null => {}
        other => parts.push(truncate(&compact(other), CELL)),
    }
    parts.join("; ")
}

fn elapsed(entry: &TimelineEntry) -> String {
    let ms = entry.extra.elapsed_ms.max(0) as u64;
    format!("+{}", format_duration(Duration::from_millis(ms)))
}

/// `sagaflow history`: every record of one saga, in order.
pub fn history_table(view: &HistoryView) -> String {
    let header = format!(
        "History of saga {} ({}@{}, {}): {} records",
        view.saga_id,
        view.name,
        view.version,
        view.status.as_str(),
        view.entries.len()
    );
    let rows: Vec<Vec<String>> = view
        .entries
        .iter()
        .map(|e| {
            vec![
                e.seq.to_string(),
                format_time(e.at),
                elapsed(e),
                e.kind.as_str().to_string(),
                or_dash(e.step.as_deref()),
                or_dash(e.direction.map(Direction::as_str)),
                e.attempt.map_or_else(|| "-".into(), |a| a.to_string()),
                e.actor.clone(),
                written_by(e),
                detail_summary(e.error.as_deref(), &e.detail),
            ]
        })
        .collect();
    format!(
        "{header}\n\n{}",
        table(
            &[
                "seq",
                "at",
                "elapsed",
                "event",
                "step",
                "direction",
                "attempt",
                "actor",
                "written by",
                "detail",
            ],
            &rows,
        )
    )
}

/// The node and epoch that wrote a record (`-` for an operator's write from the CLI).
fn written_by<X>(entry: &HistoryEntry<X>) -> String {
    match (&entry.node, entry.epoch) {
        (Some(node), Some(epoch)) => format!("{node} e{epoch}"),
        (Some(node), None) => node.clone(),
        _ => "-".into(),
    }
}

/// `sagaflow audit`: matching records of every saga, by time.
pub fn audit_table(page: &AuditPage) -> String {
    if page.entries.is_empty() {
        return "No history records match.".into();
    }
    let rows: Vec<Vec<String>> = page
        .entries
        .iter()
        .map(|e| {
            vec![
                format_time(e.at),
                e.extra.saga_id.to_string(),
                format!("{}@{}", e.extra.saga_name, e.extra.saga_version),
                e.seq.to_string(),
                e.kind.as_str().to_string(),
                or_dash(e.step.as_deref()),
                or_dash(e.direction.map(Direction::as_str)),
                e.attempt.map_or_else(|| "-".into(), |a| a.to_string()),
                e.actor.clone(),
                detail_summary(e.error.as_deref(), &e.detail),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "at",
            "saga id",
            "saga",
            "seq",
            "event",
            "step",
            "direction",
            "attempt",
            "actor",
            "detail",
        ],
        &rows,
    );
    match &page.next {
        Some(next) => out.push_str(&format!(
            "\n\n{} records shown; the next page: add --after {next}",
            page.entries.len()
        )),
        None => out.push_str(&format!("\n\n{} records", page.entries.len())),
    }
    out
}

/// `sagaflow retention`: how many finished sagas went (or would go).
pub fn retention_text(report: &RetentionReport) -> String {
    if report.dry_run {
        format!(
            "{} finished sagas last changed before {} would be removed, with their history and \
             attempts (dry run: nothing was removed; run again without --dry-run to remove them)",
            report.sagas,
            format_time(report.cutoff)
        )
    } else {
        format!(
            "Removed {} finished sagas last changed before {}, with their history and attempts",
            report.sagas,
            format_time(report.cutoff)
        )
    }
}

/// `sagaflow nodes`: the engine nodes and their partitions.
pub fn nodes_table(view: &super::nodes::NodesView) -> String {
    let rows: Vec<Vec<String>> = view
        .nodes
        .iter()
        .map(|node| {
            let partitions: Vec<String> = node
                .leases
                .iter()
                .map(|l| format!("{}@{}", l.partition, l.epoch))
                .collect();
            let expiry = node.leases.iter().map(|l| l.expires_at).min();
            let renewed = node.leases.iter().filter_map(|l| l.renewed_at).max();
            vec![
                node.id.clone(),
                <&str>::from(node.state).to_string(),
                node.leases.len().to_string(),
                or_dash(
                    (!partitions.is_empty())
                        .then(|| partitions.join(" "))
                        .as_deref(),
                ),
                expiry.map_or_else(|| "-".into(), format_time),
                renewed.map_or_else(|| "-".into(), format_time),
                format_time(node.last_seen),
            ]
        })
        .collect();
    let mut out = if rows.is_empty() {
        "No engine node has registered with this database.".to_string()
    } else {
        table(
            &[
                "node",
                "state",
                "held",
                "partitions (partition@epoch)",
                "first lease expiry",
                "last renewal",
                "last heartbeat",
            ],
            &rows,
        )
    };
    let unowned: Vec<String> = view.unowned.iter().map(u32::to_string).collect();
    out.push_str(&format!(
        "\n\n{} partitions; not held by any node: {}",
        view.partitions,
        if unowned.is_empty() {
            "none".into()
        } else {
            unowned.join(", ")
        }
    ));
    out
}
