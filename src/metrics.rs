//! Prometheus metrics: text exposition (format 0.0.4) over HTTP on a loopback address, off
//! unless the policy sets `metrics.listen`.
//!
//! Stages keep their own counters (atomics they own); the daemon gives the server one
//! function that renders every stage's counters into an [`Exposition`], which the
//! `prometheus-client` crate encodes (names, label escaping, number formats). Nothing here is
//! on a hot path: a scrape reads atomics.
//!
//! HTTP is hyper's (HTTP/1.1 and 1.0, keep-alive), and every local user can connect, so the
//! listener bounds what a client can hold:
//!
//! - at most [`MAX_CONNECTIONS`] connections; one more evicts the connection that has been
//!   idle longest (a scraper's fresh connection sends its request at once, so a flood of
//!   idle connections cannot keep a scrape out), with a warning at most every 10 s;
//! - [`IDLE_TIMEOUT`] to send a request's headers, [`MAX_LIFETIME`] for a connection in all
//!   (a client that never reads its response is dropped then), 16 KiB of buffer;
//! - failed accepts (`EMFILE`) back off ([`crate::accept::Backoff`]) instead of spinning.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use crate::accept::{Backoff, RateLimit};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a connection may wait before its request's headers are in.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may stay open, keep-alive or not.
pub const MAX_LIFETIME: Duration = Duration::from_secs(30);
/// Read buffer of a connection (hyper's minimum is 8 KiB).
const MAX_BUF: usize = 16 * 1024;
/// At most one warning about evictions or failed accepts per this interval.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A sample's value: integers print as integers (`2`), others in the shortest form.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Value {
    Int(i64),
    Float(f64),
}

impl Value {
    fn of(x: f64) -> Value {
        // Integral and exactly representable: print it without a fraction, as before.
        if x.fract() == 0.0 && x.abs() < 9.0e15 {
            Value::Int(x as i64)
        } else {
            Value::Float(x)
        }
    }
}

/// One series of a family: its label (name, value), if any, and what it holds.
#[derive(Clone, Debug)]
enum Sample {
    Value(Option<(String, String)>, Value),
    /// A histogram's cumulative-free bucket counts `(upper bound, count)`, sum and count.
    Histogram(Option<(String, String)>, Vec<(f64, u64)>, f64, u64),
}

/// One metric family.
#[derive(Clone, Debug)]
struct Family {
    /// The name the encoder is given (a counter's without `_total`: it appends that).
    name: String,
    help: String,
    kind: MetricType,
    samples: Vec<Sample>,
}

/// Builds one exposition document.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<Family>,
    /// Summaries without quantiles, written after the rest (prometheus-client 0.26 has no
    /// summary type; they keep their `# TYPE ... summary` and their series this way).
    summaries: String,
}

/// A label value as the text format escapes it.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn kind_of(kind: &str) -> MetricType {
    match kind {
        "counter" => MetricType::Counter,
        "gauge" => MetricType::Gauge,
        "histogram" | "summary" => MetricType::Histogram,
        _ => MetricType::Unknown,
    }
}

impl Exposition {
    fn push(&mut self, name: &str, help: &str, kind: MetricType, samples: Vec<Sample>) {
        let name = match kind {
            MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        self.families.push(Family {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            samples,
        });
    }

    /// A counter without labels (its name ends in `_total`).
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        let v = i64::try_from(value).map_or(Value::Float(value as f64), Value::Int);
        self.push(
            name,
            help,
            MetricType::Counter,
            vec![Sample::Value(None, v)],
        );
    }

    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.push(
            name,
            help,
            MetricType::Gauge,
            vec![Sample::Value(None, Value::of(value))],
        );
    }

    /// A labelled family (`counter` or `gauge`): `(label value, value)` per series.
    pub fn family(
        &mut self,
        name: &str,
        help: &str,
        kind: &str,
        label: &str,
        series: &[(&str, f64)],
    ) {
        let samples = series
            .iter()
            .map(|(v, x)| Sample::Value(Some((label.to_owned(), (*v).to_owned())), Value::of(*x)))
            .collect();
        self.push(name, help, kind_of(kind), samples);
    }

    /// A labelled summary without quantiles: `(label value, sum, count)` per series.
    pub fn summary_family(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        series: &[(&str, f64, u64)],
    ) {
        use std::fmt::Write;
        let s = &mut self.summaries;
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} summary");
        for (v, sum, count) in series {
            let v = escape_label(v);
            let _ = writeln!(s, "{name}_sum{{{label}=\"{v}\"}} {sum}");
            let _ = writeln!(s, "{name}_count{{{label}=\"{v}\"}} {count}");
        }
    }

    /// A latency histogram.
    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        let buckets = BUCKETS_MS
            .iter()
            .zip(&h.buckets)
            .map(|(le, n)| (*le as f64 / 1000.0, n.load(Ordering::Relaxed)))
            .collect();
        let sample = Sample::Histogram(
            None,
            buckets,
            h.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            h.count.load(Ordering::Relaxed),
        );
        self.push(name, help, MetricType::Histogram, vec![sample]);
    }

    /// The document.
    pub fn finish(mut self) -> String {
        let summaries = std::mem::take(&mut self.summaries);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        // Writing to a String does not fail; an encoder error would be a bug of ours (a
        // name the encoder refuses): say so in the document rather than panic.
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
            out = format!("# egressguard: cannot encode the metrics: {e}\n");
        }
        out.push_str(&summaries);
        out
    }
}

impl Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.families {
            let mut m = enc.encode_descriptor(&f.name, &f.help, None, f.kind)?;
            for s in &f.samples {
                let (label, value, hist) = match s {
                    Sample::Value(l, v) => (l, Some(*v), None),
                    Sample::Histogram(l, b, sum, count) => (l, None, Some((b, *sum, *count))),
                };
                let one = |mut m: prometheus_client::encoding::MetricEncoder| match (value, hist) {
                    (Some(v), _) => match (f.kind, v) {
                        (MetricType::Counter, Value::Int(i)) => {
                            ConstCounter::new(i.unsigned_abs()).encode(m)
                        }
                        (MetricType::Counter, Value::Float(x)) => ConstCounter::new(x).encode(m),
                        (_, Value::Int(i)) => ConstGauge::new(i).encode(m),
                        (_, Value::Float(x)) => ConstGauge::new(x).encode(m),
                    },
                    (None, Some((b, sum, count))) => {
                        m.encode_histogram::<NoLabelSet>(sum, count, b, None)
                    }
                    (None, None) => Ok(()),
                };
                match label {
                    None => one(m.encode_family(&Vec::<(String, String)>::new())?)?,
                    Some(l) => one(m.encode_family(&[(l.0.as_str(), l.1.as_str())])?)?,
                }
            }
        }
        Ok(())
    }
}

const BUCKETS_MS: [u64; 10] = [1, 2, 5, 10, 25, 50, 100, 250, 1000, 5000];

/// A lock-free latency histogram (seconds, buckets from 1 ms to 5 s).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 10],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros();
        if let Some(i) = BUCKETS_MS
            .iter()
            .position(|le| us <= u128::from(*le) * 1000)
        {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Renders the current metrics.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The open connections, with when each was last busy, and how to close each.
#[derive(Debug, Default)]
struct Table {
    next: u64,
    open: HashMap<u64, (Instant, Option<oneshot::Sender<()>>)>,
}

/// The connection bound: admitting one more evicts the idlest.
#[derive(Clone, Debug, Default)]
struct Conns(Arc<Mutex<Table>>);

/// One connection's entry, removed on drop.
#[derive(Debug)]
struct Conn {
    conns: Conns,
    id: u64,
}

impl Conns {
    /// Admits a connection; returns its entry, the signal that it is evicted, and whether
    /// another one was evicted to make room.
    fn admit(&self, now: Instant) -> (Conn, oneshot::Receiver<()>, bool) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut evicted = false;
        if t.open.len() >= MAX_CONNECTIONS
            && let Some(id) = t
                .open
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(id, _)| *id)
            && let Some((_, Some(tx))) = t.open.remove(&id)
        {
            let _ = tx.send(());
            evicted = true;
        }
        let (tx, rx) = oneshot::channel();
        let id = t.next;
        t.next += 1;
        t.open.insert(id, (now, Some(tx)));
        (
            Conn {
                conns: self.clone(),
                id,
            },
            rx,
            evicted,
        )
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).open.len()
    }
}

impl Conn {
    /// A request came in at `now`: the connection is not idle.
    fn touch(&self, now: Instant) {
        let mut t = self.conns.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = t.open.get_mut(&self.id) {
            e.0 = now;
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let mut t = self.conns.0.lock().unwrap_or_else(|p| p.into_inner());
        t.open.remove(&self.id);
    }
}

/// Serves `GET /metrics` on `addr` until `stop` turns true.
pub async fn serve(
    addr: SocketAddr,
    render: Render,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    info!(%addr, "metrics listening");
    let conns = Conns::default();
    let mut backoff = Backoff::default();
    let mut accept_warn = RateLimit::new(WARN_EVERY);
    let mut evict_warn = RateLimit::new(WARN_EVERY);
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff.reset();
                    let (conn, evicted, made_room) = conns.admit(Instant::now());
                    if made_room && let Some(held_back) = evict_warn.allow(Instant::now()) {
                        warn!(%peer, held_back, max = MAX_CONNECTIONS, "metrics: connection limit reached, closed the idlest connection");
                    }
                    tokio::spawn(connection(stream, Arc::clone(&render), conn, evicted));
                }
                Err(e) => {
                    let pause = backoff.failed();
                    if let Some(held_back) = accept_warn.allow(Instant::now()) {
                        warn!(error = %e, retry_ms = pause.as_millis() as u64, held_back, open = conns.len(), "metrics: accept failed");
                    }
                    tokio::select! {
                        _ = stop.changed() => return Ok(()),
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }
}

/// Serves one connection until it closes, is evicted, or reaches [`MAX_LIFETIME`].
async fn connection(
    stream: tokio::net::TcpStream,
    render: Render,
    conn: Conn,
    evicted: oneshot::Receiver<()>,
) {
    let conn = Arc::new(conn);
    let service = {
        let conn = Arc::clone(&conn);
        hyper::service::service_fn(move |req: Request<Incoming>| {
            conn.touch(Instant::now());
            let resp = respond(&req, &render);
            async move { Ok::<_, Infallible>(resp) }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(IDLE_TIMEOUT)
        .max_buf_size(MAX_BUF);
    let serving = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        r = serving => if let Err(e) = r {
            debug!(error = %e, "metrics: connection ended");
        },
        _ = evicted => debug!("metrics: connection evicted"),
        _ = tokio::time::sleep(MAX_LIFETIME) => debug!("metrics: connection reached its lifetime"),
    }
}

fn respond(req: &Request<Incoming>, render: &Render) -> Response<Full<Bytes>> {
    let ok = req.method() == Method::GET && req.uri().path() == "/metrics";
    let (status, ctype, body) = if ok {
        (
            StatusCode::OK,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            render(),
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "try GET /metrics here\n".to_owned(),
        )
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The document as the hand-written encoder wrote it before prometheus-client: the same
    /// bytes, sample for sample.
    #[test]
    fn exposition_format_is_byte_compatible() {
        let mut e = Exposition::default();
        e.counter("egressguard_events_total", "Conntrack events seen.", 42);
        e.family(
            "egressguard_blocks",
            "Active holds by kind.",
            "gauge",
            "kind",
            &[("block", 2.0), ("quarantine", 1.0)],
        );
        e.family(
            "egressguard_detections_total",
            "Detections by category.",
            "counter",
            "category",
            &[("port_scan", 3.0)],
        );
        e.gauge("egressguard_last_seconds", "Last.", 0.0125);
        e.family(
            "egressguard_breaker_network_tripped",
            "1 while tripped.",
            "gauge",
            "network",
            &[("203.0.113.0/25", 1.0), ("a\"b\\c\nd", 0.0)],
        );
        e.summary_family(
            "egressguard_bgp_apply_seconds",
            "Apply.",
            "peer",
            &[("rr1", 0.5, 4), ("a\"b", 0.0, 0)],
        );
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(40));
        e.histogram("egressguard_nft_apply_seconds", "nft apply latency.", &h);
        let t = e.finish();
        let want = [
            "# HELP egressguard_events_total Conntrack events seen.\n# TYPE egressguard_events_total counter\negressguard_events_total 42\n",
            "# TYPE egressguard_blocks gauge\negressguard_blocks{kind=\"block\"} 2\negressguard_blocks{kind=\"quarantine\"} 1\n",
            "# TYPE egressguard_detections_total counter\negressguard_detections_total{category=\"port_scan\"} 3\n",
            "egressguard_last_seconds 0.0125\n",
            "egressguard_breaker_network_tripped{network=\"203.0.113.0/25\"} 1\n",
            "egressguard_breaker_network_tripped{network=\"a\\\"b\\\\c\\nd\"} 0\n",
            "# TYPE egressguard_bgp_apply_seconds summary\negressguard_bgp_apply_seconds_sum{peer=\"rr1\"} 0.5\n",
            "egressguard_bgp_apply_seconds_count{peer=\"rr1\"} 4\n",
            "egressguard_bgp_apply_seconds_count{peer=\"a\\\"b\"} 0\n",
            "egressguard_nft_apply_seconds_bucket{le=\"0.001\"} 0\n",
            "egressguard_nft_apply_seconds_bucket{le=\"0.005\"} 1\n",
            "egressguard_nft_apply_seconds_bucket{le=\"0.05\"} 2\n",
            "egressguard_nft_apply_seconds_bucket{le=\"1\"} 2\n",
            "egressguard_nft_apply_seconds_bucket{le=\"+Inf\"} 2\n",
            "egressguard_nft_apply_seconds_count 2\n",
        ];
        for w in want {
            assert!(t.contains(w), "missing {w:?} in:\n{t}");
        }
        assert!(!t.contains("_total_total"), "{t}");
        assert!(
            !t.contains("# EOF"),
            "Prometheus text 0.0.4, not OpenMetrics:\n{t}"
        );
    }

    #[test]
    fn admitting_past_the_bound_evicts_the_idlest() {
        let conns = Conns::default();
        let t0 = Instant::now();
        let mut held = Vec::new();
        for i in 0..MAX_CONNECTIONS {
            let (c, rx, made_room) = conns.admit(t0 + Duration::from_millis(i as u64));
            assert!(!made_room);
            held.push((c, rx));
        }
        // The first one is busy again: the second is now the idlest.
        held[0].0.touch(t0 + Duration::from_millis(500));
        let (_c, _rx, made_room) = conns.admit(t0 + Duration::from_secs(1));
        assert!(made_room);
        assert_eq!(conns.len(), MAX_CONNECTIONS);
        assert!(held[1].1.try_recv().is_ok(), "the idlest was told to go");
        assert!(held[0].1.try_recv().is_err(), "a busy one stays");
        drop(held);
        assert_eq!(conns.len(), 1);
    }

    fn free_port() -> SocketAddr {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    }

    async fn get(addr: SocketAddr, req: &[u8]) -> String {
        for _ in 0..50 {
            if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                s.write_all(req).await.unwrap();
                let mut body = String::new();
                s.read_to_string(&mut body).await.unwrap();
                return body;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no metrics server on {addr}");
    }

    #[tokio::test]
    async fn serves_metrics_on_loopback() {
        let addr = free_port();
        let (stop_tx, stop) = watch::channel(false);
        let render: Render = Arc::new(|| "egressguard_up 1\n".to_owned());
        let server = tokio::spawn(serve(addr, render, stop));
        let body = get(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(body.contains("text/plain; version=0.0.4"), "{body}");
        assert!(body.ends_with("egressguard_up 1\n"), "{body}");
        let body = get(addr, b"GET /metrics HTTP/1.0\r\n\r\n").await;
        assert!(body.ends_with("egressguard_up 1\n"), "HTTP/1.0: {body}");
        let body = get(addr, b"GET /other HTTP/1.0\r\n\r\n").await;
        assert!(
            body.contains("404") && body.ends_with("try GET /metrics here\n"),
            "{body}"
        );
        let body = get(addr, b"\x16\x03\x01garbage\r\n\r\n").await;
        assert!(!body.contains("200 OK"), "{body}");
        stop_tx.send(true).unwrap();
        server.await.unwrap().unwrap();
    }

    /// More idle connections than the bound: a scrape still answers.
    #[tokio::test]
    async fn idle_connections_do_not_keep_a_scrape_out() {
        let addr = free_port();
        let (stop_tx, stop) = watch::channel(false);
        let render: Render = Arc::new(|| "egressguard_up 1\n".to_owned());
        let server = tokio::spawn(serve(addr, render, stop));
        let _ = get(addr, b"GET /metrics HTTP/1.0\r\n\r\n").await;
        let mut idle = Vec::new();
        for _ in 0..(MAX_CONNECTIONS * 4) {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let body = tokio::time::timeout(
            Duration::from_secs(2),
            get(addr, b"GET /metrics HTTP/1.0\r\n\r\n"),
        )
        .await
        .expect("a scrape answers while idle connections fill the bound");
        assert!(body.ends_with("egressguard_up 1\n"), "{body}");
        stop_tx.send(true).unwrap();
        server.await.unwrap().unwrap();
    }
}
