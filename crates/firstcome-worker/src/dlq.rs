//! `firstcome-worker dlq list|show`: the dead letters, read-only, with what
//! their headers say. A table for people, `--json` for scripts.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use firstcome::config::CommonConfig;
use rdkafka::message::{Headers, Message, OwnedMessage};
use serde::Serialize;
use serde_json::Value;

use crate::deadletter::headers;

/// One dead letter as the tool shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterView {
    /// Partition of the dead-letter topic.
    pub partition: i32,
    /// Offset there.
    pub offset: i64,
    /// The record key, normally the coupon id.
    pub key: Option<String>,
    /// The request id, when the value is an issue request.
    pub request_id: Option<String>,
    /// `firstcome.error.kind`.
    pub kind: Option<String>,
    /// `firstcome.error.message`.
    pub message: Option<String>,
    /// `firstcome.error.attempts`.
    pub attempts: Option<u32>,
    /// `firstcome.failed_at.last`.
    pub last_failed_at: Option<DateTime<Utc>>,
    /// Every header.
    pub headers: BTreeMap<String, String>,
    /// The original value, as text.
    pub value: Option<String>,
}

impl DeadLetterView {
    fn from_message(m: &OwnedMessage) -> Self {
        let headers: BTreeMap<String, String> = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        let v = String::from_utf8_lossy(h.value.unwrap_or_default());
                        (h.key.to_owned(), v.into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let value = m.payload().map(|p| String::from_utf8_lossy(p).into_owned());
        let request_id = value
            .as_deref()
            .and_then(|v| serde_json::from_str::<Value>(v).ok())
            .and_then(|v| v["request_id"].as_str().map(str::to_owned));
        Self {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            request_id,
            kind: headers.get(headers::ERROR_KIND).cloned(),
            message: headers.get(headers::ERROR_MESSAGE).cloned(),
            attempts: headers.get(headers::ATTEMPTS).and_then(|a| a.parse().ok()),
            last_failed_at: headers
                .get(headers::LAST_FAILED_AT)
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc)),
            headers,
            value,
        }
    }
}

/// Which dead letters to show; every set field must match.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Filter {
    /// Only this coupon (the record key).
    #[arg(long)]
    pub coupon: Option<String>,
    /// Only this error kind (e.g. `invalid_record`, `unknown_coupon`,
    /// `key_mismatch`, `permanent_failure`).
    #[arg(long)]
    pub kind: Option<String>,
    /// Only letters whose last failure is at or after this time (RFC 3339).
    #[arg(long)]
    pub since: Option<DateTime<Utc>>,
    /// Only letters whose last failure is before this time (RFC 3339).
    #[arg(long)]
    pub until: Option<DateTime<Utc>>,
    /// Only this partition of the dead-letter topic.
    #[arg(long)]
    pub partition: Option<i32>,
    /// Only this offset (with `--partition`).
    #[arg(long, requires = "partition")]
    pub offset: Option<i64>,
}

impl Filter {
    fn matches(&self, l: &DeadLetterView) -> bool {
        self.coupon
            .as_ref()
            .is_none_or(|c| l.key.as_ref() == Some(c))
            && self
                .kind
                .as_ref()
                .is_none_or(|k| l.kind.as_ref() == Some(k))
            && self.partition.is_none_or(|p| l.partition == p)
            && self.offset.is_none_or(|o| l.offset == o)
            && self
                .since
                .is_none_or(|s| l.last_failed_at.is_some_and(|t| t >= s))
            && self
                .until
                .is_none_or(|u| l.last_failed_at.is_some_and(|t| t < u))
    }
}

/// The dead letters that pass `filter`, oldest first per partition.
pub fn list(common: &CommonConfig, filter: &Filter) -> anyhow::Result<Vec<DeadLetterView>> {
    let all = firstcome::kafka::read_topic(common, &common.dlq_topic, Duration::from_secs(60))?;
    Ok(all
        .iter()
        .map(DeadLetterView::from_message)
        .filter(|l| filter.matches(l))
        .collect())
}

/// The letters as a table for people.
pub fn table(letters: &[DeadLetterView]) -> String {
    let dash = || "-".to_owned();
    let mut out = format!(
        "{:<14} {:<18} {:<28} {:<36} {:>8}  {:<25} {}\n",
        "partition/off", "kind", "coupon", "request_id", "attempts", "last failure", "message"
    );
    for l in letters {
        let message: String = l
            .message
            .clone()
            .unwrap_or_default()
            .chars()
            .take(80)
            .collect();
        out.push_str(&format!(
            "{:<14} {:<18} {:<28} {:<36} {:>8}  {:<25} {}\n",
            format!("{}/{}", l.partition, l.offset),
            l.kind.clone().unwrap_or_else(dash),
            l.key.clone().unwrap_or_else(dash),
            l.request_id.clone().unwrap_or_else(dash),
            l.attempts.map_or_else(dash, |a| a.to_string()),
            l.last_failed_at.map_or_else(dash, |t| t.to_rfc3339()),
            message,
        ));
    }
    out.push_str(&format!("{} dead letter(s)\n", letters.len()));
    out
}

/// One letter in full, for people.
pub fn detail(l: &DeadLetterView) -> String {
    let mut out = format!("dead letter {}/{}\n", l.partition, l.offset);
    out.push_str(&format!("  key:   {}\n", l.key.as_deref().unwrap_or("-")));
    for (k, v) in &l.headers {
        out.push_str(&format!("  {k}: {v}\n"));
    }
    out.push_str(&format!("  value: {}\n", l.value.as_deref().unwrap_or("-")));
    out
}

/// The replay count a record carries (0 when it has none).
pub fn replay_count<M: Message>(m: &M) -> u32 {
    m.headers()
        .and_then(|h| {
            h.iter()
                .find(|h| h.key == headers::REPLAY_COUNT)
                .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
        })
        .unwrap_or(0)
}
