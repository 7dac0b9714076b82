//! `firstcome-worker dlq list|show|replay`: the dead letters with what their
//! headers say (`list`, `show`: read-only; a table for people, `--json` for
//! scripts), and `replay`, which puts them back on the request topic.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use firstcome::config::CommonConfig;
use rdkafka::message::{Message, OwnedMessage};
use serde::Serialize;
use serde_json::Value;

use crate::deadletter::{self, Header};
use crate::metrics::RetryStep;
use crate::record::replay_count;
use crate::retry::{Failure, Policy, Stop};

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
        let headers = firstcome::kafka::text_headers(m);
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
            kind: headers.get(Header::ErrorKind.as_str()).cloned(),
            message: headers.get(Header::ErrorMessage.as_str()).cloned(),
            attempts: headers
                .get(Header::Attempts.as_str())
                .and_then(|a| a.parse().ok()),
            last_failed_at: headers
                .get(Header::LastFailedAt.as_str())
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

/// Options of `dlq replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayOptions {
    /// Which dead letters to replay.
    /// Which dead letters.
    #[command(flatten)]
    pub filter: Filter,
    /// Consumer group that remembers how far replay got, so a replay that
    /// stopped resumes there. Its position moves past every record it looks
    /// at, replayed or not: use another group to go over the topic again.
    #[arg(long, default_value = "firstcome-dlq-replay")]
    pub group: String,
    /// Print what would happen to each record; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Replay at most this many records, then stop (a later run resumes).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Replay at most this many records per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Refuse a record that was already replayed this many times.
    #[arg(long, env = "FIRSTCOME_MAX_REPLAYS", default_value_t = 3)]
    pub max_replays: u32,
}

/// What a replay did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Dead letters looked at.
    pub examined: usize,
    /// Put back on the request topic (or, in a dry run, that would be).
    pub replayed: usize,
    /// Refused: replayed `max_replays` times already.
    pub refused: usize,
    /// Not matched by the filter.
    pub skipped: usize,
    /// Whether nothing was changed.
    pub dry_run: bool,
}

/// Puts the selected dead letters back on the request topic with their
/// original key and value (so the request keeps its `request_id`, and a
/// decision already made stands), without the error headers and with the
/// replay count raised. Offsets are stored in `opts.group` only after the
/// broker acknowledged the replayed record.
pub async fn replay(
    common: &CommonConfig,
    opts: &ReplayOptions,
    report: &mut impl std::io::Write,
) -> anyhow::Result<ReplaySummary> {
    use rdkafka::consumer::{BaseConsumer, Consumer};

    /// Five tries about a second apart, then the run stops (a later run
    /// resumes where it stopped).
    const REPLAY_RETRY: Policy<'static> = Policy {
        backoff: crate::config::Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(1),
        },
        permanent_attempts: 1,
        transient_attempts: Some(5),
        metrics: None,
    };
    let never = tokio_util::sync::CancellationToken::new();
    let topic = &common.dlq_topic;
    let consumer: BaseConsumer = firstcome::kafka::client_config(common)?
        .set("group.id", &opts.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()?;
    let producer = firstcome::kafka::HealingProducer::new(firstcome::kafka::producer_config(
        common,
        Duration::from_secs(10),
        Duration::ZERO,
    )?)?;

    let Range {
        start,
        mut end,
        total,
    } = range(&consumer, topic)?;
    let mut summary = ReplaySummary {
        dry_run: opts.dry_run,
        ..Default::default()
    };
    if end.is_empty() {
        writeln!(
            report,
            "nothing to replay: group {} is at the end of {topic}",
            opts.group
        )?;
        return Ok(summary);
    }
    consumer.assign(&start)?;

    let pause = opts
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let mut done: std::collections::HashMap<i32, i64> = std::collections::HashMap::new();
    // Progress is committed every COMMIT_EVERY letters and before any
    // error, so a run that stops half-way (a send that gives up, a stall)
    // is taken up where it stopped, never replayed from the start (red team
    // #11); and the limit is on waiting for the next letter, not on the
    // whole run, so `--rate 1` over thousands of letters can finish.
    let mut since_commit = 0usize;
    let outcome: anyhow::Result<()> = async {
        let mut idle_until = std::time::Instant::now() + READ_STALL;
        'records: while !end.is_empty() {
            anyhow::ensure!(
                std::time::Instant::now() < idle_until,
                "no letter of {topic} came for {READ_STALL:?}; run again to go on"
            );
            let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            idle_until = std::time::Instant::now() + READ_STALL;
            let m = m?.detach();
            let (p, o) = (m.partition(), m.offset());
            let Some(&high) = end.get(&p) else { continue };
            if o >= high {
                end.remove(&p);
                continue;
            }
            if o + 1 >= high {
                end.remove(&p);
            }
            let letter = DeadLetterView::from_message(&m);
            let count = replay_count(&m);
            let what = format!(
                "{p}/{o} {} coupon {} request {}",
                letter.kind.as_deref().unwrap_or("-"),
                letter.key.as_deref().unwrap_or("-"),
                letter.request_id.as_deref().unwrap_or("-"),
            );
            if !opts.filter.matches(&letter) {
                summary.skipped += 1;
            } else if count >= opts.max_replays {
                summary.refused += 1;
                writeln!(
                    report,
                    "refused {what}: replayed {count} times already (--max-replays {}); fix the cause, then raise --max-replays",
                    opts.max_replays
                )?;
            } else if opts.limit.is_some_and(|l| summary.replayed >= l) {
                // Not stored: a later run starts here.
                break 'records;
            } else if opts.dry_run {
                summary.replayed += 1;
                writeln!(report, "would replay {what} as replay {}", count + 1)?;
            } else {
                // A few tries, so a producer the broker stopped taking records
                // from is replaced (see `HealingProducer`) rather than ending the run.
                let send = || async {
                    let record = deadletter::replayed(&m, &common.request_topic);
                    producer
                        .send(record, Duration::from_secs(10))
                        .await
                        .map_err(|e| Failure::Transient(anyhow::Error::new(e)))
                };
                match REPLAY_RETRY.run(RetryStep::Replay, &never, send).await {
                    Ok(_) => {}
                    Err(Stop::GaveUp { error, .. }) => {
                        return Err(error.context(format!("replaying {p}/{o}")));
                    }
                    Err(Stop::Aborted) => unreachable!("a replay is never cancelled"),
                }
                summary.replayed += 1;
                writeln!(report, "replayed {what} as replay {}", count + 1)?;
                if let Some(pause) = pause {
                    tokio::time::sleep(pause).await;
                }
            }
            summary.examined += 1;
            done.insert(p, o + 1);
            since_commit += 1;
            if since_commit >= COMMIT_EVERY && !opts.dry_run {
                commit_progress(&consumer, topic, &done)?;
                since_commit = 0;
            }
            eprint!("\r[replay] {}/{total} examined", summary.examined);
        }
        Ok(())
    }
    .await;
    eprintln!();
    if !opts.dry_run && !done.is_empty() {
        let committed = commit_progress(&consumer, topic, &done);
        outcome?;
        committed?;
    } else {
        outcome?;
    }
    writeln!(
        report,
        "{}: {} examined, {} replayed, {} refused, {} not matching",
        if opts.dry_run { "dry run" } else { "done" },
        summary.examined,
        summary.replayed,
        summary.refused,
        summary.skipped
    )?;
    Ok(summary)
}

/// What a replay run goes through: from where the group stopped (or the
/// log's start) to where each partition ends now.
struct Range {
    /// The first offset to read in each partition with letters left.
    start: rdkafka::TopicPartitionList,
    /// Where each of those partitions ends (the offset after its last
    /// letter).
    end: std::collections::HashMap<i32, i64>,
    /// Letters in the range.
    total: i64,
}

/// Finds the [`Range`] of the group `consumer` belongs to over `topic`.
fn range(consumer: &rdkafka::consumer::BaseConsumer, topic: &str) -> anyhow::Result<Range> {
    use rdkafka::consumer::Consumer;
    use rdkafka::{Offset, TopicPartitionList};
    const TIMEOUT: Duration = Duration::from_secs(30);
    let meta = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    let Some(t) = meta.topics().first().filter(|t| t.error().is_none()) else {
        anyhow::bail!("dead-letter topic {topic} does not exist");
    };
    let mut all = TopicPartitionList::new();
    for p in t.partitions() {
        all.add_partition(topic, p.id());
    }
    let committed = consumer.committed_offsets(all, TIMEOUT)?;
    let mut range = Range {
        start: TopicPartitionList::new(),
        end: std::collections::HashMap::new(),
        total: 0,
    };
    for e in committed.elements() {
        let (low, high) = consumer.fetch_watermarks(topic, e.partition(), TIMEOUT)?;
        let from = match e.offset() {
            Offset::Offset(o) if o >= low => o,
            _ => low,
        };
        if from < high {
            range
                .start
                .add_partition_offset(topic, e.partition(), Offset::Offset(from))?;
            range.end.insert(e.partition(), high);
            range.total += high - from;
        }
    }
    Ok(range)
}

/// Letters replayed between commits of the group's position.
const COMMIT_EVERY: usize = 100;

/// Longest the replay waits for the next letter before it stops (with its
/// progress committed).
const READ_STALL: Duration = Duration::from_secs(60);

/// Commits the group's position after the letters `done` (partition → the
/// offset after the last one examined).
fn commit_progress<C: rdkafka::consumer::Consumer>(
    consumer: &C,
    topic: &str,
    done: &std::collections::HashMap<i32, i64>,
) -> anyhow::Result<()> {
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (p, next) in done {
        tpl.add_partition_offset(topic, *p, rdkafka::Offset::Offset(*next))?;
    }
    consumer.commit(&tpl, rdkafka::consumer::CommitMode::Sync)?;
    Ok(())
}

/// The subcommands of `dlq`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Dead letters with what their headers say, one line each.
    List {
        /// The settings every binary shares.
        #[command(flatten)]
        common: CommonConfig,
        /// Which dead letters.
        #[command(flatten)]
        filter: Filter,
        /// JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back on the request topic (same key, value and
    /// request id; error headers stripped; replay count raised).
    Replay {
        /// The settings every binary shares.
        #[command(flatten)]
        common: CommonConfig,
        /// What to replay.
        #[command(flatten)]
        opts: ReplayOptions,
        /// Print the summary as JSON at the end.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter in full: every header and the original value.
    Show {
        /// The settings every binary shares.
        #[command(flatten)]
        common: CommonConfig,
        /// Partition of the dead-letter topic.
        #[arg(long)]
        partition: i32,
        /// Offset there.
        #[arg(long)]
        offset: i64,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `dlq` subcommand.
pub async fn run(command: Command) -> anyhow::Result<std::process::ExitCode> {
    match command {
        Command::List {
            common,
            filter,
            json,
        } => {
            super::start(&common)?;
            let letters = list(&common, &filter)?;
            super::print(json, true, &letters, || table(&letters))?;
        }
        Command::Show {
            common,
            partition,
            offset,
            json,
        } => {
            super::start(&common)?;
            let filter = Filter {
                partition: Some(partition),
                offset: Some(offset),
                ..Default::default()
            };
            let letter = list(&common, &filter)?.into_iter().next().ok_or_else(|| {
                anyhow::anyhow!("no dead letter at partition {partition}, offset {offset}")
            })?;
            super::print(json, true, &letter, || detail(&letter))?;
        }
        Command::Replay { common, opts, json } => {
            super::start(&common)?;
            let summary = replay(&common, &opts, &mut std::io::stdout()).await?;
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
