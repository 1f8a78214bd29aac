//! A fault-injecting TCP proxy for the end-to-end tests. It listens on 127.0.0.1, forwards
//! each connection to one loopback upstream (the moto server) and, while faults are on,
//! decides per connection (from a seeded generator, in fixed proportions) whether to pass it
//! through or to break it: close it at once, reset it part-way through the request, hold it
//! before forwarding, answer a canned 500 or 503 itself, or trickle the response back in
//! small chunks. It runs on a thread and runtime of its own, so a blocking test can use it,
//! and it is bounded: it accepts at most a given number of connections, stops accepting after
//! a given time, cuts any connection older than that, and stops when dropped.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// Forwards both ways untouched.
    Pass,
    /// Closes the client's connection at once, before reading anything.
    Drop,
    /// Reads part of the request, then closes with SO_LINGER 0 (the client sees a reset).
    Reset,
    /// Holds the connection 1–3 s, then forwards it untouched.
    Delay,
    /// Answers `500 Internal Server Error` itself (`Connection: close`), forwarding nothing.
    Http500,
    /// Answers `503 Service Unavailable` itself (`Connection: close`), forwarding nothing.
    Http503,
    /// Forwards the request untouched and the response in small chunks with pauses.
    Slow,
}

impl Fault {
    const ALL: [Fault; 7] = [
        Fault::Pass,
        Fault::Drop,
        Fault::Reset,
        Fault::Delay,
        Fault::Http500,
        Fault::Http503,
        Fault::Slow,
    ];

    /// The share of connections (in percent) each fault gets while faults are on.
    fn weight(self) -> u64 {
        match self {
            Fault::Pass => 40,
            Fault::Drop => 10,
            Fault::Reset => 10,
            Fault::Delay => 15,
            Fault::Http500 => 5,
            Fault::Http503 => 5,
            Fault::Slow => 15,
        }
    }

    /// The name used in the summary line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Pass => "pass",
            Fault::Drop => "drop",
            Fault::Reset => "reset",
            Fault::Delay => "delay",
            Fault::Http500 => "500",
            Fault::Http503 => "503",
            Fault::Slow => "slow",
        }
    }
}

/// A small seeded generator (splitmix64): the same seed gives the same faults in the same
/// order of accepted connections, so a failing run can be replayed with its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }

    fn fault(&mut self) -> Fault {
        let total: u64 = Fault::ALL.iter().map(|f| f.weight()).sum();
        let mut pick = self.next() % total;
        for f in Fault::ALL {
            if pick < f.weight() {
                return f;
            }
            pick -= f.weight();
        }
        unreachable!("the weights add up to the total")
    }
}

/// How far the proxy may go before it stops by itself.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections accepted in all; the proxy stops accepting after that many.
    pub max_connections: u64,
    /// How long the proxy accepts connections, and the longest any one connection lives.
    pub lifetime: Duration,
}

/// Counts of what the proxy did, per fault.
#[derive(Default)]
struct Counts([AtomicU64; 7]);

impl Counts {
    fn add(&self, f: Fault) {
        let i = Fault::ALL.iter().position(|&g| g == f).unwrap();
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// A running proxy; dropping it stops it (and cuts every connection through it).
pub struct FaultProxy {
    addr: SocketAddr,
    faults_on: Arc<AtomicBool>,
    counts: Arc<Counts>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1 (a free port) in front of `upstream` (`http://HOST:PORT`,
    /// a loopback address), with faults off; `seed` fixes which connection gets which fault.
    pub fn start(upstream: &str, seed: u64, limits: Limits) -> FaultProxy {
        let hostport = upstream
            .strip_prefix("http://")
            .unwrap_or(upstream)
            .trim_end_matches('/');
        let upstream: SocketAddr = hostport
            .parse()
            .unwrap_or_else(|e| panic!("upstream {hostport:?} is not IP:PORT: {e}"));
        assert!(
            upstream.ip().is_loopback(),
            "the fault proxy only forwards to loopback, not {upstream}"
        );
        let listener = StdListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let faults_on = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = {
            let faults_on = faults_on.clone();
            let counts = counts.clone();
            std::thread::Builder::new()
                .name("fault-proxy".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("the fault proxy's runtime");
                    rt.block_on(async move {
                        let listener = TcpListener::from_std(listener).unwrap();
                        tokio::select! {
                            _ = accept_loop(listener, upstream, seed, limits, faults_on, counts) => {}
                            _ = stopped => {}
                        }
                    });
                    // Dropping the runtime cancels every connection task still running.
                    rt.shutdown_timeout(Duration::from_secs(1));
                })
                .expect("start the fault proxy's thread")
        };
        FaultProxy {
            addr,
            faults_on,
            counts,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The proxy's address as an endpoint URL (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Turns faults on (every new connection draws one) or off (every new one passes).
    pub fn set_faults(&self, on: bool) {
        self.faults_on.store(on, Ordering::SeqCst);
    }

    /// How many connections got each fault so far (passes included).
    pub fn counts(&self) -> BTreeMap<Fault, u64> {
        Fault::ALL
            .iter()
            .zip(&self.counts.0)
            .map(|(&f, n)| (f, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// The counts as one line: `pass=N drop=N ...`.
    pub fn summary(&self) -> String {
        self.counts()
            .iter()
            .map(|(f, n)| format!("{}={n}", f.name()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    seed: u64,
    limits: Limits,
    faults_on: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    let mut rng = Rng(seed);
    let deadline = tokio::time::Instant::now() + limits.lifetime;
    let mut open = tokio::task::JoinSet::new();
    for _ in 0..limits.max_connections {
        while open.try_join_next().is_some() {}
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = tokio::time::sleep_until(deadline) => return,
        };
        let Ok((client, peer)) = accepted else {
            continue;
        };
        if !peer.ip().is_loopback() {
            continue;
        }
        // Draw for every connection, on or off, so the sequence depends on the seed only.
        let drawn = rng.fault();
        let delay = Duration::from_millis(rng.range(1000, 3001));
        let fault = if faults_on.load(Ordering::SeqCst) {
            drawn
        } else {
            Fault::Pass
        };
        counts.add(fault);
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        open.spawn(async move {
            let _ = tokio::time::timeout(left, serve(client, upstream, fault, delay)).await;
        });
    }
    // The last connection accepted: the ones still open finish (each bounded by the
    // lifetime) before the proxy stops.
    drop(listener);
    while open.join_next().await.is_some() {}
}

/// Handles one connection as `fault` says. Errors just end the connection: a broken
/// connection is what the proxy is for.
async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    fault: Fault,
    delay: Duration,
) -> std::io::Result<()> {
    match fault {
        Fault::Pass => forward(client, upstream, false).await,
        Fault::Delay => {
            tokio::time::sleep(delay).await;
            forward(client, upstream, false).await
        }
        Fault::Slow => forward(client, upstream, true).await,
        Fault::Drop => {
            drop(client);
            Ok(())
        }
        Fault::Reset => {
            let mut buf = [0u8; 48];
            let _ = tokio::time::timeout(Duration::from_secs(2), client.read(&mut buf)).await;
            client.set_zero_linger()?;
            drop(client);
            Ok(())
        }
        Fault::Http500 | Fault::Http503 => {
            read_head(&mut client).await;
            let (status, body) = if fault == Fault::Http500 {
                ("500 Internal Server Error", "fault proxy: injected 500\n")
            } else {
                ("503 Service Unavailable", "fault proxy: injected 503\n")
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            client.write_all(response.as_bytes()).await?;
            client.shutdown().await?;
            // Read (and discard) what else the client sends for a moment, so unread request
            // bytes do not turn the close into a reset before it has read the answer.
            let mut sink = [0u8; 4096];
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
            Ok(())
        }
    }
}

/// Reads until the end of an HTTP request head (a blank line), at most 64 KiB or 5 s.
async fn read_head(client: &mut TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while head.len() < 64 * 1024 {
            match client.read(&mut buf).await {
                Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                _ => return,
            }
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return;
            }
        }
    })
    .await;
}

/// Forwards `client` to `upstream` both ways; `slow` trickles the response back 128 bytes at
/// a time, 25 ms apart.
async fn forward(client: TcpStream, upstream: SocketAddr, slow: bool) -> std::io::Result<()> {
    let server = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect upstream"))??;
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let up = async {
        let r = tokio::io::copy(&mut client_rd, &mut server_wr).await;
        let _ = server_wr.shutdown().await;
        r
    };
    let down = async {
        if slow {
            let mut buf = [0u8; 128];
            loop {
                let n = server_rd.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                client_wr.write_all(&buf[..n]).await?;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        } else {
            tokio::io::copy(&mut server_rd, &mut client_wr).await?;
        }
        client_wr.shutdown().await
    };
    let (a, b) = tokio::join!(up, down);
    a?;
    b
}
