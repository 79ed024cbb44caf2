//! Prometheus metrics: text exposition (format 0.0.4) on a loopback address, off unless the
//! policy sets `metrics.listen`.
//!
//! Stages keep their own counters (atomics they own); the daemon gives the server one
//! function that renders every stage's counters into a [`Exposition`]. Nothing here is on a
//! hot path: a scrape reads atomics.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

/// Builds one exposition document.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A counter without labels.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.header(name, help, "counter");
        self.sample(name, &[], value as f64);
    }

    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.header(name, help, "gauge");
        self.sample(name, &[], value);
    }

    /// A labelled family: `(label values, value)` per series.
    pub fn family(
        &mut self,
        name: &str,
        help: &str,
        kind: &str,
        label: &str,
        series: &[(&str, f64)],
    ) {
        self.header(name, help, kind);
        for (v, x) in series {
            self.sample(name, &[(label, v)], *x);
        }
    }

    /// A labelled summary without quantiles: `(label value, sum, count)` per series.
    pub fn summary_family(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        series: &[(&str, f64, u64)],
    ) {
        self.header(name, help, "summary");
        for (v, sum, count) in series {
            self.sample(&format!("{name}_sum"), &[(label, v)], *sum);
            self.sample(&format!("{name}_count"), &[(label, v)], *count as f64);
        }
    }

    /// A latency histogram.
    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.header(name, help, "histogram");
        let mut cum = 0;
        for (i, le) in BUCKETS_MS.iter().enumerate() {
            cum += h.buckets[i].load(Ordering::Relaxed);
            self.sample(
                &format!("{name}_bucket"),
                &[("le", &format!("{}", *le as f64 / 1000.0))],
                cum as f64,
            );
        }
        let count = h.count.load(Ordering::Relaxed);
        self.sample(&format!("{name}_bucket"), &[("le", "+Inf")], count as f64);
        self.sample(
            &format!("{name}_sum"),
            &[],
            h.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        );
        self.sample(&format!("{name}_count"), &[], count as f64);
    }

    /// The document.
    pub fn finish(self) -> String {
        self.out
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

/// Serves `GET /metrics` on `addr` until `stop` turns true.
pub async fn serve(
    addr: SocketAddr,
    render: Render,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    info!(%addr, "metrics listening");
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            accepted = listener.accept() => {
                let Ok((mut s, _)) = accepted else { continue };
                let render = Arc::clone(&render);
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let n = match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                        Ok(Ok(n)) => n,
                        _ => return,
                    };
                    let req = String::from_utf8_lossy(&buf[..n]);
                    let path = req.split_whitespace().nth(1).unwrap_or("");
                    let resp = if req.starts_with("GET ") && (path == "/metrics" || path.starts_with("/metrics?")) {
                        let body = render();
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    } else {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 22\r\nConnection: close\r\n\r\ntry GET /metrics here\n".to_owned()
                    };
                    if let Err(e) = s.write_all(resp.as_bytes()).await {
                        warn!(error = %e, "metrics: write failed");
                    }
                    let _ = s.shutdown().await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        let mut e = Exposition::default();
        e.counter("egressguard_events_total", "Conntrack events seen.", 42);
        e.family(
            "egressguard_blocks",
            "Active holds by kind.",
            "gauge",
            "kind",
            &[("block", 2.0), ("quarantine", 1.0)],
        );
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(40));
        e.histogram("egressguard_nft_apply_seconds", "nft apply latency.", &h);
        let t = e.finish();
        assert!(
            t.contains("# TYPE egressguard_events_total counter\negressguard_events_total 42\n"),
            "{t}"
        );
        assert!(t.contains("egressguard_blocks{kind=\"block\"} 2\n"), "{t}");
        assert!(
            t.contains("egressguard_nft_apply_seconds_bucket{le=\"0.005\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("egressguard_nft_apply_seconds_bucket{le=\"0.05\"} 2\n"),
            "{t}"
        );
        assert!(t.contains("egressguard_nft_apply_seconds_count 2\n"), "{t}");
    }

    #[tokio::test]
    async fn serves_metrics_on_loopback() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let (stop_tx, stop) = watch::channel(false);
        let render: Render = Arc::new(|| "egressguard_up 1\n".to_owned());
        let server = tokio::spawn(serve(addr, render, stop));
        let mut body = String::new();
        for _ in 0..50 {
            if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await
                    .unwrap();
                s.read_to_string(&mut body).await.unwrap();
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(body.ends_with("egressguard_up 1\n"), "{body}");
        stop_tx.send(true).unwrap();
        server.await.unwrap().unwrap();
    }
}
