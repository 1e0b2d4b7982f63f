//! `/metrics`: the connectors' statuses in the OpenMetrics text format,
//! encoded by `prometheus-client` (the Prometheus project's Rust client)
//! at each scrape.
//!
//! The statuses ([`crate::status`]) hold the state (counters, gauges and
//! the crate's histograms) because the HTTP API and the logs read it too;
//! this module only says how each piece is exposed: a [`Collector`] over a
//! snapshot of them, so connectors a reload adds or removes appear and
//! disappear without a registry to keep in step.
//!
//! Two things the crate leaves to its users: it writes label values as
//! they are (client_rust#151), so each goes through [`escaped`] here; and
//! it writes only OpenMetrics, so a scraper that does not ask for it (by
//! `Accept`, as Prometheus does) gets the classic text format from
//! [`classic`] (counter families named with their `_total`, no `# EOF`),
//! which `promtool check metrics` and older scrapers read.
use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::status::ConnectorStatus;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`classic`]'s text.
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The classic Prometheus text format of [`render`]'s OpenMetrics: the
/// same samples, counter families named as their samples (`_total`), no
/// `# EOF`.
pub fn classic(openmetrics: &str) -> String {
    let counters: Vec<&str> =
        openmetrics.lines().filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "].into_iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(&name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        match descriptor {
            Some(renamed) => out.push_str(&renamed),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Whether `Accept` headers ask for OpenMetrics: an entry of its media
/// type whose quality is not 0 (`q=0` refuses it).
pub fn wants_openmetrics<'a>(accept: impl Iterator<Item = &'a str>) -> bool {
    accept.flat_map(|header| header.split(',')).any(|entry| {
        let mut parts = entry.split(';').map(str::trim);
        let kind = parts.next().unwrap_or_default();
        let quality = parts.filter_map(|p| p.strip_prefix("q=")).find_map(|q| q.parse::<f64>().ok()).unwrap_or(1.0);
        kind.eq_ignore_ascii_case("application/openmetrics-text") && quality > 0.0
    })
}

/// A label value as the text formats require it: `\\`, `\"` and line
/// feeds escaped (borrowed when there is nothing to escape, as for every
/// name kawka checks: connectors, topics, event types).
pub fn escaped(value: &str) -> Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(value);
    }
    Cow::Owned(value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"))
}

/// What one scrape shows.
#[derive(Debug, Default)]
pub struct Scrape {
    pub connectors: Vec<Arc<ConnectorStatus>>,
    /// Reload attempts by outcome, where the daemon reloads.
    pub reloads: Option<Vec<(String, u64)>>,
    /// Writer schemas found in the registry client's cache, and fetched.
    pub registry_cache: Option<(u64, u64)>,
}

/// The OpenMetrics text of a scrape.
pub fn render(scrape: Scrape) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut out = String::with_capacity(4096);
    // Writing to a String cannot fail; an encoder error would be a bug in
    // the label sets below, and a scrape still gets what was written.
    if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::warn!(%error, "metrics encoding stopped early");
    }
    out
}

type Labels<'a> = Vec<(&'static str, Cow<'a, str>)>;

/// A connector's own label.
fn of(connector: &ConnectorStatus) -> Labels<'_> {
    vec![("connector", escaped(&connector.name))]
}

/// One family: its descriptor once, then each sample with its labels.
/// Counter names leave out `_total`: the encoder appends it.
fn family<'v>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels<'v>, Sample<'v>)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, sample) in samples {
        sample.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A family of one sample without labels.
fn single(encoder: &mut DescriptorEncoder, name: &str, help: &str, sample: Sample) -> Result<(), std::fmt::Error> {
    let kind = match sample {
        Sample::Counter(_) => MetricType::Counter,
        Sample::Histogram(_) => MetricType::Histogram,
        Sample::Gauge(_) | Sample::Int(_) => MetricType::Gauge,
    };
    sample.encode(encoder.encode_descriptor(name, help, None, kind)?)
}

/// A sample's value.
enum Sample<'v> {
    Counter(u64),
    Gauge(f64),
    Int(i64),
    Histogram(&'v prometheus_client::metrics::histogram::Histogram),
}

impl Sample<'_> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        match self {
            Sample::Counter(n) => ConstCounter::new(*n).encode(encoder),
            Sample::Gauge(x) => ConstGauge::new(*x).encode(encoder),
            Sample::Int(n) => ConstGauge::new(*n).encode(encoder),
            Sample::Histogram(histogram) => histogram.encode(encoder),
        }
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let connectors = &self.connectors;
        use MetricType::{Counter, Gauge, Histogram};
        let events: Vec<_> = connectors.iter().map(|c| (c, c.events_snapshot())).collect();
        family(
            &mut encoder,
            "kawka_events",
            "Events by connector, event type and outcome.",
            Counter,
            events.iter().flat_map(|(c, counts)| {
                counts.iter().map(|((event_type, outcome), n)| {
                    let labels = vec![
                        ("connector", escaped(&c.name)),
                        ("event_type", escaped(event_type)),
                        ("outcome", Cow::Borrowed(outcome.name())),
                    ];
                    (labels, Sample::Counter(*n))
                })
            }),
        )?;
        family(
            &mut encoder,
            "kawka_duplicates",
            "Writes the sink found already applied.",
            Counter,
            connectors.iter().map(|c| (of(c), Sample::Counter(c.duplicates.load(Ordering::Relaxed)))),
        )?;
        let retries: Vec<_> = connectors.iter().map(|c| (c, c.retries_snapshot())).collect();
        family(
            &mut encoder,
            "kawka_retries",
            "Retries of transient failures by stage and class.",
            Counter,
            retries.iter().flat_map(|(c, counts)| {
                counts.iter().map(|((stage, class), n)| {
                    let labels = vec![
                        ("connector", escaped(&c.name)),
                        ("stage", Cow::Borrowed(*stage)),
                        ("class", Cow::Borrowed(*class)),
                    ];
                    (labels, Sample::Counter(*n))
                })
            }),
        )?;
        family(
            &mut encoder,
            "kawka_batch_events",
            "Events per written batch.",
            Histogram,
            connectors.iter().map(|c| (of(c), Sample::Histogram(&c.batch_events))),
        )?;
        family(
            &mut encoder,
            "kawka_sink_write_seconds",
            "Time to make one batch durable in the sink.",
            Histogram,
            connectors.iter().map(|c| (of(c), Sample::Histogram(&c.write_seconds))),
        )?;
        let partitions: Vec<_> = connectors.iter().map(|c| (c, c.partitions())).collect();
        // Partition numbers as label text, kept alive for the encoder.
        let numbers: Vec<Vec<String>> =
            partitions.iter().map(|(_, ps)| ps.iter().map(|p| p.partition.to_string()).collect()).collect();
        let per_partition = |value: fn(&crate::status::PartitionStatus) -> Option<i64>| {
            partitions.iter().zip(&numbers).flat_map(move |((c, ps), numbers)| {
                ps.iter().zip(numbers).filter_map(move |(p, number)| {
                    value(p).map(|v| {
                        let labels = vec![
                            ("connector", escaped(&c.name)),
                            ("topic", escaped(&p.topic)),
                            ("partition", Cow::Borrowed(number.as_str())),
                        ];
                        (labels, Sample::Int(v))
                    })
                })
            })
        };
        family(
            &mut encoder,
            "kawka_consumer_lag",
            "High watermark minus durable position, per partition (where the broker reports it).",
            Gauge,
            per_partition(|p| p.lag),
        )?;
        family(
            &mut encoder,
            "kawka_position",
            "Next offset whose effect is not durable yet, per partition.",
            Gauge,
            per_partition(|p| p.position),
        )?;
        family(
            &mut encoder,
            "kawka_freshness_seconds",
            "Now minus the timestamp of the newest written event.",
            Gauge,
            connectors.iter().filter_map(|c| c.freshness_seconds().map(|s| (of(c), Sample::Gauge(s)))),
        )?;
        let states: Vec<String> = connectors
            .iter()
            .map(|c| {
                serde_json::to_value(c.state()).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
            })
            .collect();
        family(
            &mut encoder,
            "kawka_connector_ready",
            "1 when the connector is ready (see /readyz).",
            Gauge,
            connectors.iter().zip(&states).map(|(c, state)| {
                let labels = vec![("connector", escaped(&c.name)), ("state", Cow::Borrowed(state.as_str()))];
                (labels, Sample::Int(i64::from(c.is_ready())))
            }),
        )?;
        let parked: Vec<_> = connectors.iter().filter_map(|c| c.parked().map(|p| (c, p))).collect();
        family(
            &mut encoder,
            "kawka_parked_keys",
            "Keys held behind a failed event (on_error: park).",
            Gauge,
            parked.iter().map(|(c, p)| (of(c), Sample::Int(p.keys as i64))),
        )?;
        family(
            &mut encoder,
            "kawka_parked_keys_limit",
            "park.max_keys: above it the fallback applies.",
            Gauge,
            parked.iter().map(|(c, p)| (of(c), Sample::Int(p.limit as i64))),
        )?;
        family(
            &mut encoder,
            "kawka_parked_oldest_seconds",
            "How long the longest-parked key has been parked.",
            Gauge,
            parked.iter().filter_map(|(c, p)| {
                let since = p.oldest.as_ref()?.since_ms;
                Some((of(c), Sample::Gauge((crate::status::now_ms() - since).max(0) as f64 / 1000.0)))
            }),
        )?;
        family(
            &mut encoder,
            "kawka_park_overflow",
            "Failed events whose key was not parked because park.max_keys keys were.",
            Counter,
            parked.iter().map(|(c, _)| (of(c), Sample::Counter(c.park_overflows.load(Ordering::Relaxed)))),
        )?;
        family(
            &mut encoder,
            "kawka_parked_released",
            "Parked keys seen released, by a replay or kawka dlq release.",
            Counter,
            parked.iter().map(|(c, _)| (of(c), Sample::Counter(c.parked_released.load(Ordering::Relaxed)))),
        )?;
        let rebuilds: Vec<_> = connectors.iter().filter_map(|c| c.rebuild().map(|r| (c, r))).collect();
        family(
            &mut encoder,
            "kawka_rebuild_done_ratio",
            "Share of the log the running or last rebuild has made durable.",
            Gauge,
            rebuilds.iter().map(|(c, r)| (of(c), Sample::Gauge(r.percent / 100.0))),
        )?;
        family(
            &mut encoder,
            "kawka_rebuild_events_per_second",
            "Rate of the running or last rebuild.",
            Gauge,
            rebuilds.iter().map(|(c, r)| (of(c), Sample::Gauge(r.events_per_second))),
        )?;
        family(
            &mut encoder,
            "kawka_applied_waiters",
            "Read-your-writes waits in progress.",
            Gauge,
            connectors.iter().map(|c| (of(c), Sample::Int(c.waiters.load(Ordering::Relaxed)))),
        )?;
        family(
            &mut encoder,
            "kawka_applied_timeouts",
            "Read-your-writes waits that timed out.",
            Counter,
            connectors.iter().map(|c| (of(c), Sample::Counter(c.wait_timeouts.load(Ordering::Relaxed)))),
        )?;
        family(
            &mut encoder,
            "kawka_applied_wait_seconds",
            "Time read-your-writes waits took.",
            Histogram,
            connectors.iter().map(|c| (of(c), Sample::Histogram(&c.wait_seconds))),
        )?;
        if let Some(reloads) = &self.reloads {
            family(
                &mut encoder,
                "kawka_config_reload",
                "Reload attempts by outcome.",
                Counter,
                reloads.iter().map(|(outcome, n)| (vec![("outcome", escaped(outcome))], Sample::Counter(*n))),
            )?;
        }
        if let Some((hits, misses)) = self.registry_cache {
            single(
                &mut encoder,
                "kawka_registry_cache_hits",
                "Writer schemas found in the cache.",
                Sample::Counter(hits),
            )?;
            let help = "Writer schemas fetched from the registry.";
            single(&mut encoder, "kawka_registry_cache_misses", help, Sample::Counter(misses))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_only_when_asked_for() {
        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1";
        assert!(wants_openmetrics([prometheus].into_iter()));
        assert!(!wants_openmetrics(["text/plain;version=0.0.4"].into_iter()));
        assert!(!wants_openmetrics(["application/openmetrics-text;q=0, text/plain"].into_iter()));
        assert!(!wants_openmetrics(std::iter::empty()));
    }

    #[test]
    fn label_values_are_escaped_and_the_classic_format_names_counters_by_their_samples() {
        assert_eq!(escaped("plain.name-1"), Cow::Borrowed("plain.name-1"));
        assert_eq!(escaped("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        let openmetrics = "# HELP kawka_events Events.\n# TYPE kawka_events counter\n\
                           kawka_events_total{connector=\"c\"} 2\n# HELP kawka_position Next.\n\
                           # TYPE kawka_position gauge\nkawka_position{connector=\"c\"} 7\n# EOF\n";
        assert_eq!(
            classic(openmetrics),
            "# HELP kawka_events_total Events.\n# TYPE kawka_events_total counter\n\
             kawka_events_total{connector=\"c\"} 2\n# HELP kawka_position Next.\n\
             # TYPE kawka_position gauge\nkawka_position{connector=\"c\"} 7\n"
        );
    }
}
