//! The conntrack listener: a `NETLINK_NETFILTER` socket subscribed to the conntrack event
//! groups, read in batches on its own thread, with full-table dumps (on another) at start and
//! after lost events.
//!
//! Two threads, each owning one socket opened in the caller's network namespace:
//!
//! - the *event* thread reads a socket that joins `NFNLGRP_CONNTRACK_NEW`, (unless
//!   [`Updates::None`]) `_UPDATE` and, when asked ([`ListenerOptions::destroys`]; the agent
//!   does not), `_DESTROY`, has a large receive buffer (`SO_RCVBUFFORCE`,
//!   several MB) and is read with `recvmmsg` into a fixed array of slots: one syscall per
//!   batch of up to [`SLOTS`] kernel messages, no allocation per event. After a round that
//!   found events but did not fill the slots it waits [`ListenerOptions::coalesce`] (20 ms)
//!   before the next, so under load the kernel queues a batch per wake-up instead of one
//!   event: the agent's CPU per event falls as the rate rises, for at most 20 ms of latency;
//! - the *dump* thread sends `IPCTNL_MSG_CT_GET | NLM_F_DUMP` and reads the table, at start
//!   (after the event socket subscribed, so nothing falls between them) and when the event
//!   thread asks after the kernel reported lost events (`ENOBUFS`). Flows found by a dump are
//!   [`FlowEventKind::Existing`]. Dumping on its own thread keeps the event socket read while a
//!   large table is dumped: on one thread, a dump taking longer than the socket buffer lasts
//!   overflowed it again, and a sustained storm became one dump after another with the live
//!   events (a concurrent scan's among them) dropped in between. Under sustained loss the
//!   interval between dumps doubles up to [`ListenerOptions::max_resync_interval`], so the
//!   dumps do not take the CPU the event thread needs; it falls back after a quiet interval.
//!
//! Every event is parsed in place ([`super::ctnetlink`]), filtered by customer source right
//! after the original tuple, and pushed to a batch that goes out with `blocking_send` when a
//! receive round is done (or the batch is full). A slow consumer only makes the kernel drop
//! events on this socket, which is counted and repaired by a dump: the kernel never waits.
//!
//! A kernel-side filter was considered: ctnetlink's `CTA_FILTER` applies to dumps only, and a
//! classic BPF socket filter would need `unsafe` (`SO_ATTACH_FILTER`) to match a list of
//! prefixes; filtering costs a few nanoseconds here, so it stays in user space.
//!
//! [`FlowEventKind::Existing`]: crate::messages::FlowEventKind::Existing

use crate::logging::error_chain;
use std::fs;
use std::io::{self, IoSliceMut};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use nix::errno::Errno;
// The address type must have real storage: with `()` nix hands the kernel a dangling
// one-byte name pointer, and the second call fails with EFAULT after consuming messages.
use nix::sys::socket::{MsgFlags, MultiHeaders, NetlinkAddr, recvmmsg, setsockopt, sockopt};
use nix::sys::time::TimeVal;
use tokio::sync::mpsc::Sender;

use crate::messages::{FlowEvent, FlowEventKind, Observation, TcpState, Time};

use super::ctnetlink::{
    self, NFNLGRP_CONNTRACK_DESTROY, NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_UPDATE,
    NLM_F_DUMP_INTR, Parsed,
};
use super::filter::{CustomerFilter, FilterHandle};
use super::{ObserveError, ObserveStats, add};

/// Messages read per `recvmmsg` call.
pub const SLOTS: usize = 256;
/// Bytes per slot: one conntrack event is a few hundred bytes.
pub const SLOT_SIZE: usize = 4096;
const DUMP_BUF: usize = 64 * 1024;

/// Which update events to keep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Updates {
    /// Do not subscribe to updates at all.
    None,
    /// Keep updates that carry a signal: a TCP flow answered (`SYN_RECV`), established or
    /// reset/closed (`CLOSE`), and every non-TCP update (reply seen, assured). TCP teardown
    /// states (`FIN_WAIT` ... `TIME_WAIT`) are dropped: the destroy event follows.
    #[default]
    Signals,
    /// Keep every update.
    All,
}

/// How the listener runs.
#[derive(Clone, Debug)]
pub struct ListenerOptions {
    /// Receive buffer of the event socket (`SO_RCVBUFFORCE`, falling back to `SO_RCVBUF`).
    pub rcvbuf: usize,
    /// Which updates to keep.
    pub updates: Updates,
    /// Subscribe to `DESTROY` events. The detector counts nothing at a flow's end (a scan's
    /// closed port is unaccepted already at its `NEW`, and the kernel reports the reset only
    /// by deleting the flow), so the agent leaves them off: in a storm of short flows they
    /// are half the events, and the kernel builds none for a group nobody listens to.
    pub destroys: bool,
    /// Turn on `net.netfilter.nf_conntrack_acct` and `nf_conntrack_timestamp` (and
    /// `nf_conntrack_events` when it is off) in the listener's namespace, logging each change.
    pub enable_sysctls: bool,
    /// Take a full dump when the listener starts.
    pub dump_at_start: bool,
    /// At most one resynchronising dump per this interval after lost events.
    pub min_resync_interval: Duration,
    /// While losses keep coming, the interval between dumps doubles up to this.
    pub max_resync_interval: Duration,
    /// After a receive round that found events without filling every slot, wait this long
    /// before the next, so the kernel queues a batch; zero reads again at once.
    pub coalesce: Duration,
    /// How often the thread looks at its stop flag when no events come.
    pub poll_interval: Duration,
    /// Observations per batch sent to the channel (a batch goes out earlier when a receive
    /// round is done).
    pub max_batch: usize,
    /// Send [`Observation::Tick`] after this long without any observation, so the detector's
    /// windows close on a quiet link; `None` sends none.
    pub tick: Option<Duration>,
}

impl Default for ListenerOptions {
    fn default() -> ListenerOptions {
        ListenerOptions {
            rcvbuf: 8 * 1024 * 1024,
            updates: Updates::Signals,
            destroys: false,
            enable_sysctls: true,
            dump_at_start: true,
            min_resync_interval: Duration::from_secs(1),
            max_resync_interval: Duration::from_secs(30),
            coalesce: Duration::from_millis(20),
            poll_interval: Duration::from_millis(100),
            max_batch: 4096,
            tick: Some(Duration::from_secs(1)),
        }
    }
}

/// Whether an update event carries a signal under [`Updates::Signals`].
pub fn update_has_signal(e: &FlowEvent) -> bool {
    // A kernel meter's label (`crate::meter`): a flood in progress.
    if e.labels & crate::meter::METER_BITS != 0 {
        return true;
    }
    !matches!(
        e.tcp_state,
        Some(
            TcpState::FinWait
                | TcpState::CloseWait
                | TcpState::LastAck
                | TcpState::TimeWait
                | TcpState::Listen
                | TcpState::None
        )
    )
}

/// The running listener. Dropping it stops the threads and waits for them.
#[derive(Debug)]
pub struct ConntrackListener {
    stop: Arc<AtomicBool>,
    stats: Arc<ObserveStats>,
    threads: Vec<JoinHandle<()>>,
}

impl ConntrackListener {
    /// Opens the sockets in the calling thread's network namespace, adjusts the sysctls, and
    /// starts the event and dump threads, which deliver batches to `tx` until [`stop`] is
    /// called, the listener is dropped, or the receiver is closed.
    ///
    /// [`stop`]: ConntrackListener::stop
    pub fn open(
        filter: Arc<FilterHandle>,
        opts: ListenerOptions,
        tx: Sender<Vec<Observation>>,
    ) -> Result<ConntrackListener, ObserveError> {
        let stats = Arc::new(ObserveStats::default());
        let core = Core::open(filter.clone(), opts.clone(), stats.clone())?;
        let dumper = Dumper::open(filter, &opts, stats.clone())?;
        // One request waits at most: asking while a dump is pending or running changes nothing.
        let (want_dump, dump_requests) = std::sync::mpsc::sync_channel(1);
        if opts.dump_at_start {
            let _ = want_dump.try_send(());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(2);
        let flag = stop.clone();
        let dump_tx = tx.clone();
        threads.push(
            std::thread::Builder::new()
                .name("egd-ct-dump".into())
                .spawn(move || dumper.run(dump_requests, dump_tx, &flag))
                .map_err(|e| ObserveError::Thread("conntrack dump", e))?,
        );
        let flag = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("egd-conntrack".into())
            .spawn(move || core.run(tx, want_dump, &flag));
        let mut listener = ConntrackListener {
            stop,
            stats,
            threads,
        };
        match spawned {
            Ok(t) => listener.threads.push(t),
            // Dropping `listener` stops the dump thread.
            Err(e) => return Err(ObserveError::Thread("conntrack listener", e)),
        }
        Ok(listener)
    }

    /// The listener's counters.
    pub fn stats(&self) -> Arc<ObserveStats> {
        self.stats.clone()
    }

    /// Asks the threads to stop (they notice within `poll_interval`) and waits for them.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for ConntrackListener {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Batches observations and sends them when full or flushed.
struct Sink {
    tx: Sender<Vec<Observation>>,
    batch: Vec<Observation>,
    cap: usize,
    closed: bool,
    last_sent: Instant,
}

impl Sink {
    fn new(tx: Sender<Vec<Observation>>, cap: usize) -> Sink {
        let cap = cap.max(1);
        Sink {
            tx,
            batch: Vec::with_capacity(cap),
            cap,
            closed: false,
            last_sent: Instant::now(),
        }
    }

    fn push(&mut self, o: Observation) {
        self.batch.push(o);
        if self.batch.len() >= self.cap {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.batch.is_empty() || self.closed {
            return;
        }
        let b = std::mem::replace(&mut self.batch, Vec::with_capacity(self.cap));
        if self.tx.blocking_send(b).is_err() {
            self.closed = true;
        }
        self.last_sent = Instant::now();
    }
}

/// When to resynchronise after lost events: at most once per interval, the interval doubling
/// (up to a maximum) while losses keep coming and back at the minimum after a quiet interval.
#[derive(Debug)]
struct Resync {
    min: Duration,
    max: Duration,
    interval: Duration,
    last: Option<Instant>,
    pending: bool,
}

impl Resync {
    fn new(min: Duration, max: Duration) -> Resync {
        Resync {
            min,
            max: max.max(min),
            interval: min,
            last: None,
            pending: false,
        }
    }

    /// Events were lost.
    fn lost(&mut self) {
        self.pending = true;
    }

    /// Whether a dump is due `now`; if so, it counts as started.
    fn due(&mut self, now: Instant) -> bool {
        if !self.pending {
            return false;
        }
        if let Some(last) = self.last {
            let since = now.saturating_duration_since(last);
            if since < self.interval {
                return false;
            }
            // Losses came again within the next interval: the storm goes on, back off.
            self.interval = if since < self.interval * 2 {
                (self.interval * 2).min(self.max)
            } else {
                self.min
            };
        }
        self.pending = false;
        self.last = Some(now);
        true
    }
}

/// The event socket and its buffers: everything the event thread owns.
struct Core {
    events: Socket,
    filter_handle: Arc<FilterHandle>,
    filter: Arc<CustomerFilter>,
    filter_gen: u64,
    opts: ListenerOptions,
    stats: Arc<ObserveStats>,
    buf: Vec<u8>,
    lens: [(usize, bool); SLOTS],
}

fn sockopt_err(option: &'static str) -> impl FnOnce(Errno) -> ObserveError {
    move |e| ObserveError::SocketOption {
        option,
        source: io::Error::from(e),
    }
}

/// The customer filter as of now, with the generation it was taken at.
fn current_filter(handle: &FilterHandle) -> (Arc<CustomerFilter>, u64) {
    // An impossible generation, so `refresh` records the current one with its filter.
    let mut generation = u64::MAX;
    let mut f = handle.get();
    handle.refresh(&mut generation, &mut f);
    (f, generation)
}

impl Core {
    fn open(
        filter_handle: Arc<FilterHandle>,
        opts: ListenerOptions,
        stats: Arc<ObserveStats>,
    ) -> Result<Core, ObserveError> {
        let mut events = Socket::new(NETLINK_NETFILTER).map_err(ObserveError::Socket)?;
        events.bind_auto().map_err(ObserveError::Socket)?;
        if setsockopt(&events, sockopt::RcvBufForce, &opts.rcvbuf).is_err() {
            // Without CAP_NET_ADMIN the kernel caps the size at net.core.rmem_max.
            setsockopt(&events, sockopt::RcvBuf, &opts.rcvbuf).map_err(sockopt_err("SO_RCVBUF"))?;
        }
        let timeout = TimeVal::new(
            opts.poll_interval.as_secs() as _,
            opts.poll_interval.subsec_micros() as _,
        );
        setsockopt(&events, sockopt::ReceiveTimeout, &timeout)
            .map_err(sockopt_err("SO_RCVTIMEO"))?;
        let mut groups = vec![NFNLGRP_CONNTRACK_NEW];
        if opts.destroys {
            groups.push(NFNLGRP_CONNTRACK_DESTROY);
        }
        if opts.updates != Updates::None {
            groups.push(NFNLGRP_CONNTRACK_UPDATE);
        }
        for group in groups {
            events
                .add_membership(group)
                .map_err(|source| ObserveError::Subscribe { group, source })?;
        }
        if opts.enable_sysctls {
            enable_sysctls();
        }
        let (filter, filter_gen) = current_filter(&filter_handle);
        tracing::info!(
            rcvbuf = setsockopt_get_rcvbuf(&events),
            updates = ?opts.updates,
            coalesce_ms = opts.coalesce.as_secs_f64() * 1e3,
            "conntrack listener subscribed"
        );
        Ok(Core {
            events,
            filter_handle,
            filter,
            filter_gen,
            opts,
            stats,
            buf: vec![0; SLOTS * SLOT_SIZE],
            lens: [(0, false); SLOTS],
        })
    }

    fn run(mut self, tx: Sender<Vec<Observation>>, want_dump: SyncSender<()>, stop: &AtomicBool) {
        let mut sink = Sink::new(tx, self.opts.max_batch);
        let mut resync = Resync::new(self.opts.min_resync_interval, self.opts.max_resync_interval);
        // The start dump counts as the first resync.
        if self.opts.dump_at_start {
            resync.lost();
            resync.due(Instant::now());
        }
        let mut last_error_log: Option<Instant> = None;
        // Built here: the headers hold raw pointers and cannot cross threads.
        let mut headers = MultiHeaders::<NetlinkAddr>::preallocate(SLOTS, None);
        while !stop.load(Ordering::Relaxed) && !sink.closed {
            if resync.due(Instant::now()) {
                // The `Lost` observations are in the channel before the dump's flows.
                sink.flush();
                match want_dump.try_send(()) {
                    Ok(()) | Err(TrySendError::Full(())) => {}
                    Err(TrySendError::Disconnected(())) => {
                        tracing::error!(
                            "conntrack dump thread gone; lost events are not resynchronised"
                        );
                    }
                }
            }
            let mut read = 0;
            match self.receive(&mut headers, &mut sink) {
                Ok(n) => read = n,
                Err(Received::Lost) => {
                    add(&self.stats.lost, 1);
                    sink.push(Observation::Lost { time: Time::now() });
                    resync.lost();
                }
                Err(Received::Failed(e)) => {
                    if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::error!(error = %error_chain(&e), "conntrack listener: receive failed");
                        last_error_log = Some(Instant::now());
                    }
                    std::thread::sleep(self.opts.poll_interval);
                }
            }
            if let Some(tick) = self.opts.tick
                && sink.batch.is_empty()
                && sink.last_sent.elapsed() >= tick
            {
                sink.push(Observation::Tick { time: Time::now() });
            }
            sink.flush();
            if read > 0 && read < SLOTS && !self.opts.coalesce.is_zero() {
                // The queue is drained: let the next events gather into one batch.
                std::thread::sleep(self.opts.coalesce);
            }
        }
        tracing::info!("conntrack listener stopped");
    }

    /// One `recvmmsg` round: waits up to `poll_interval` for the first message, then takes
    /// whatever else is queued, up to [`SLOTS`] messages. Returns how many it read.
    fn receive(
        &mut self,
        headers: &mut MultiHeaders<NetlinkAddr>,
        sink: &mut Sink,
    ) -> Result<usize, Received> {
        let n = {
            let Core {
                events, buf, lens, ..
            } = self;
            let mut chunks = buf.chunks_exact_mut(SLOT_SIZE);
            let mut iovs: [[IoSliceMut<'_>; 1]; SLOTS] =
                std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())]);
            let res = recvmmsg(
                events.as_raw_fd(),
                headers,
                iovs.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            );
            match res {
                Ok(results) => {
                    let mut n = 0;
                    for (i, r) in results.enumerate() {
                        lens[i] = (r.bytes, r.flags.contains(MsgFlags::MSG_TRUNC));
                        n = i + 1;
                    }
                    n
                }
                Err(Errno::EAGAIN | Errno::EINTR) => return Ok(0),
                Err(Errno::ENOBUFS) => return Err(Received::Lost),
                Err(e) => return Err(Received::Failed(ObserveError::Receive(e.into()))),
            }
        };
        // The filter as of now: a reload installed before these events were queued applies
        // to them (one atomic load when nothing changed).
        self.filter_handle
            .refresh(&mut self.filter_gen, &mut self.filter);
        let time = Time::now();
        let mut seen = 0u64;
        let mut kept = 0u64;
        let mut dropped = 0u64;
        let mut errors = 0u64;
        let mut overrun = false;
        let updates = self.opts.updates;
        for i in 0..n {
            let (len, truncated) = self.lens[i];
            if truncated {
                errors += 1;
                continue;
            }
            let data = &self.buf[i * SLOT_SIZE..i * SLOT_SIZE + len.min(SLOT_SIZE)];
            let c = ctnetlink::parse_buffer(
                data,
                time,
                &self.filter,
                |e| {
                    if e.kind == FlowEventKind::Update
                        && updates == Updates::Signals
                        && !update_has_signal(&e)
                    {
                        dropped += 1;
                        return;
                    }
                    kept += 1;
                    sink.push(Observation::Flow(e));
                },
                |_, p| {
                    if p == Parsed::Overrun {
                        overrun = true;
                    }
                },
            );
            seen += c.kept + c.foreign;
            errors += c.errors;
        }
        add(&self.stats.events_seen, seen);
        add(&self.stats.events_kept, kept);
        add(&self.stats.updates_dropped, dropped);
        add(&self.stats.parse_errors, errors);
        if overrun {
            return Err(Received::Lost);
        }
        Ok(n)
    }
}

/// The dump socket: everything the dump thread owns.
struct Dumper {
    dump: Socket,
    filter_handle: Arc<FilterHandle>,
    filter: Arc<CustomerFilter>,
    filter_gen: u64,
    stats: Arc<ObserveStats>,
    max_batch: usize,
    poll_interval: Duration,
    retry_interval: Duration,
    dump_buf: Vec<u8>,
    seq: u32,
}

impl Dumper {
    fn open(
        filter_handle: Arc<FilterHandle>,
        opts: &ListenerOptions,
        stats: Arc<ObserveStats>,
    ) -> Result<Dumper, ObserveError> {
        let mut dump = Socket::new(NETLINK_NETFILTER).map_err(ObserveError::Socket)?;
        dump.bind_auto().map_err(ObserveError::Socket)?;
        setsockopt(&dump, sockopt::ReceiveTimeout, &TimeVal::new(10, 0))
            .map_err(sockopt_err("SO_RCVTIMEO"))?;
        let (filter, filter_gen) = current_filter(&filter_handle);
        Ok(Dumper {
            dump,
            filter_handle,
            filter,
            filter_gen,
            stats,
            max_batch: opts.max_batch,
            poll_interval: opts.poll_interval,
            retry_interval: opts.min_resync_interval.max(opts.poll_interval),
            dump_buf: vec![0; DUMP_BUF],
            seq: 0,
        })
    }

    /// Dumps the table for each request until stopped or the event thread is gone; a failed
    /// dump is retried after `retry_interval`.
    fn run(mut self, requests: Receiver<()>, tx: Sender<Vec<Observation>>, stop: &AtomicBool) {
        let mut sink = Sink::new(tx, self.max_batch);
        while !stop.load(Ordering::Relaxed) && !sink.closed {
            match requests.recv_timeout(self.poll_interval) {
                Ok(()) => {}
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            }
            loop {
                self.filter_handle
                    .refresh(&mut self.filter_gen, &mut self.filter);
                let started = Time::now();
                let result = self.dump_table(&mut sink, stop);
                if result.is_ok() {
                    sink.push(Observation::Resynced {
                        time: Time::now(),
                        started,
                    });
                }
                sink.flush();
                let Err(e) = result else { break };
                tracing::warn!(error = %error_chain(&e), "conntrack dump failed; retrying later");
                let until = Instant::now() + self.retry_interval;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(self.poll_interval.min(until - Instant::now()));
                }
                if stop.load(Ordering::Relaxed) || sink.closed {
                    break;
                }
            }
        }
    }

    /// Dumps the whole conntrack table into the sink.
    fn dump_table(&mut self, sink: &mut Sink, stop: &AtomicBool) -> Result<(), ObserveError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut req = [0u8; ctnetlink::NLMSG_HDRLEN + ctnetlink::NFGENMSG_LEN];
        let len = ctnetlink::dump_request(&mut req, seq);
        self.dump
            .send_to(&req[..len], &SocketAddr::new(0, 0), 0)
            .map_err(ObserveError::DumpRequest)?;
        add(&self.stats.dumps, 1);
        let started = Instant::now();
        let (mut flows, mut kept, mut errors) = (0u64, 0u64, 0u64);
        let mut interrupted = false;
        let result = loop {
            if stop.load(Ordering::Relaxed) {
                break Ok(());
            }
            let mut slice: &mut [u8] = &mut self.dump_buf[..];
            let n = match self.dump.recv(&mut slice, MsgFlags::MSG_TRUNC.bits()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(ObserveError::Receive(e)),
            };
            if n > self.dump_buf.len() {
                errors += 1;
                continue;
            }
            let time = Time::now();
            let mut done = None;
            let c = ctnetlink::parse_buffer(
                &self.dump_buf[..n],
                time,
                &self.filter,
                |e| sink.push(Observation::Flow(e)),
                |m, p| match p {
                    Parsed::Done if m.seq == seq => done = Some(Ok(())),
                    Parsed::Error(code) if code < 0 && m.seq == seq => {
                        done = Some(Err(ObserveError::DumpRefused(
                            io::Error::from_raw_os_error(-code),
                        )))
                    }
                    _ => {}
                },
            );
            for m in ctnetlink::messages(&self.dump_buf[..n]).flatten() {
                if m.flags & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
            }
            flows += c.kept + c.foreign;
            kept += c.kept;
            errors += c.errors;
            if let Some(r) = done {
                break r;
            }
        };
        add(&self.stats.dump_flows, flows);
        add(&self.stats.events_kept, kept);
        add(&self.stats.parse_errors, errors);
        tracing::info!(
            flows,
            customer_flows = kept,
            errors,
            interrupted,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "conntrack table dumped"
        );
        result
    }
}

enum Received {
    Lost,
    Failed(ObserveError),
}

fn setsockopt_get_rcvbuf(s: &Socket) -> usize {
    nix::sys::socket::getsockopt(s, sockopt::RcvBuf).unwrap_or(0)
}

/// Turns on the conntrack sysctls the signals need, in the calling thread's namespace, and
/// logs each change. Missing files (conntrack not loaded yet) are logged, not fatal.
pub fn enable_sysctls() {
    for (key, want, only_if_zero) in [
        ("nf_conntrack_acct", "1", false),
        ("nf_conntrack_timestamp", "1", false),
        // 0 turns events off; 2 (the default on recent kernels) turns them on with a listener.
        ("nf_conntrack_events", "1", true),
    ] {
        let path = format!("/proc/sys/net/netfilter/{key}");
        match fs::read_to_string(&path) {
            Ok(old) => {
                let old = old.trim();
                if old == want || (only_if_zero && old != "0") {
                    continue;
                }
                match fs::write(&path, want) {
                    Ok(()) => tracing::info!(
                        sysctl = %format!("net.netfilter.{key}"),
                        old,
                        new = want,
                        "changed sysctl for conntrack observation"
                    ),
                    Err(e) => tracing::warn!(
                        sysctl = %format!("net.netfilter.{key}"),
                        error = %e,
                        "cannot change sysctl; conntrack events will lack its data"
                    ),
                }
            }
            Err(e) => tracing::warn!(
                sysctl = %format!("net.netfilter.{key}"),
                error = %e,
                "cannot read sysctl (is nf_conntrack loaded?)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::proto;

    fn update(proto_: u8, tcp_state: Option<TcpState>) -> FlowEvent {
        FlowEvent {
            time: Time(1),
            kind: FlowEventKind::Update,
            src: "203.0.113.10".parse().unwrap(),
            dst: "198.51.100.20".parse().unwrap(),
            proto: proto_,
            sport: 40000,
            dport: 22,
            icmp: None,
            status: 0,
            tcp_state,
            orig_packets: None,
            orig_bytes: None,
            reply_packets: None,
            reply_bytes: None,
            start: None,
            stop: None,
            labels: 0,
        }
    }

    #[test]
    fn signal_updates_are_answers_establishment_and_resets() {
        use TcpState::*;
        for keep in [SynRecv, Established, Close, SynSent2, Other(42)] {
            assert!(
                update_has_signal(&update(proto::TCP, Some(keep))),
                "{keep:?}"
            );
        }
        for drop in [FinWait, CloseWait, LastAck, TimeWait, Listen, None] {
            assert!(
                !update_has_signal(&update(proto::TCP, Some(drop))),
                "{drop:?}"
            );
        }
        assert!(update_has_signal(&update(proto::UDP, Option::None)));
        assert!(update_has_signal(&update(proto::TCP, Option::None)));
    }

    #[test]
    fn resync_backs_off_while_losses_keep_coming_and_recovers_after_quiet() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(8));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut r = Resync::new(min, max);
        assert!(!r.due(at(0)), "nothing lost, nothing to do");
        r.lost();
        assert!(r.due(at(0)), "the first loss dumps at once");
        assert!(!r.due(at(10)), "one dump per loss");
        // Losses all the time: dumps at 1, 3, 7, 15, 23 s (interval 1, 2, 4, 8, then the cap).
        let mut dumps = Vec::new();
        for ms in (100..25_000).step_by(100) {
            r.lost();
            if r.due(at(ms)) {
                dumps.push(ms);
            }
        }
        assert_eq!(dumps, [1_000, 3_000, 7_000, 15_000, 23_000]);
        // Quiet for longer than twice the interval: the next loss dumps at once and the
        // interval is back at the minimum.
        r.lost();
        assert!(r.due(at(60_000)));
        r.lost();
        assert!(!r.due(at(60_900)));
        assert!(r.due(at(61_000)));
    }

    #[test]
    fn defaults_are_router_sized() {
        let o = ListenerOptions::default();
        assert!(o.rcvbuf >= 4 * 1024 * 1024);
        assert_eq!(o.updates, Updates::Signals);
        assert!(o.enable_sysctls && o.dump_at_start);
        assert!(!o.destroys, "the detector uses no flow ends");
    }
}
