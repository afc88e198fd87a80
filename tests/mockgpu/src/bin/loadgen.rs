//! `loadgen`: the two load shapes `wrk` cannot give the benchmark.
//!
//! - `rate`: open-loop, constant offered rate over a fixed set of keep-alive
//!   connections (wrk2's model: each connection sends at `rate / connections`
//!   on its own schedule). A request that could not go out on time because
//!   its connection was still busy with the previous one is timed from when
//!   it *should* have gone out (no coordinated omission); one that went out
//!   on time is timed from when it did (so the 1 ms timer granularity of the
//!   sender is not charged to the server).
//! - `streams`: N concurrent streamed requests, each on its own connection,
//!   started evenly over a ramp; the arrival time of every SSE event is taken
//!   as its bytes are read, and the gaps between content events, the time to
//!   the first content event, and failures are reported.
//!
//! Both print one JSON object on stdout. Single-threaded on purpose: on the
//! benchmark machine it shares a core with the mock, and one thread doing
//! nothing but reads and timestamps is the cheapest client there is.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{header, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Open-loop and streaming load for the Sluice benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct Target {
    /// Full URL, e.g. http://127.0.0.1:8080/v1/chat/completions
    #[arg(long)]
    url: String,
    /// File whose content is POSTed as the JSON body.
    #[arg(long)]
    body: String,
    /// Extra header `Name: value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Constant offered rate (open loop).
    Rate {
        #[command(flatten)]
        target: Target,
        /// Requests per second offered.
        #[arg(long)]
        rate: f64,
        /// Seconds of measured load.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Seconds of load before measuring starts.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// A request not answered within this many seconds counts as a timeout.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// N concurrent streams.
    Streams {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        streams: usize,
        /// Streams are started evenly over this many milliseconds.
        #[arg(long, default_value_t = 1000)]
        ramp_ms: u64,
        /// A stream not finished within this many seconds of its start fails.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
        /// Spread client sockets over 127.0.0.1 .. 127.0.0.N as source
        /// addresses (loopback targets only), so 10k connections do not
        /// crowd one address's ephemeral ports.
        #[arg(long, default_value_t = 8)]
        source_ips: u8,
    },
}

struct Prepared {
    addr: SocketAddr,
    uri: Uri,
    host: HeaderValue,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

fn prepare(t: &Target) -> Result<Prepared, String> {
    let uri: Uri = t.url.parse().map_err(|e| format!("--url: {e}"))?;
    let authority = uri.authority().ok_or("--url needs host:port")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let ip: IpAddr = authority
        .host()
        .trim_matches(|c| c == '[' || c == ']')
        .parse()
        .map_err(|_| "--url host must be an IP address".to_string())?;
    let body = std::fs::read(&t.body).map_err(|e| format!("--body {}: {e}", t.body))?;
    let mut headers = Vec::new();
    for h in &t.headers {
        let (n, v) = h
            .split_once(':')
            .ok_or(format!("--header {h}: want Name: value"))?;
        headers.push((
            HeaderName::from_bytes(n.trim().as_bytes()).map_err(|e| e.to_string())?,
            HeaderValue::from_str(v.trim()).map_err(|e| e.to_string())?,
        ));
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    Ok(Prepared {
        addr: SocketAddr::new(ip, port),
        uri: path.parse().map_err(|e| format!("{e}"))?,
        host: HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?,
        headers,
        body: Bytes::from(body),
    })
}

impl Prepared {
    fn request(&self) -> Request<Full<Bytes>> {
        let mut r = Request::new(Full::new(self.body.clone()));
        *r.method_mut() = Method::POST;
        *r.uri_mut() = self.uri.clone();
        let h = r.headers_mut();
        h.insert(header::HOST, self.host.clone());
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (n, v) in &self.headers {
            h.insert(n.clone(), v.clone());
        }
        r
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<Sender> {
    let tcp = match source {
        Some(ip) => {
            let s = TcpSocket::new_v4()?;
            s.bind(SocketAddr::new(ip, 0))?;
            s.connect(addr).await?
        }
        None => TcpStream::connect(addr).await?,
    };
    tcp.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(std::io::Error::other)?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn pcts(mut v: Vec<u64>) -> String {
    v.sort_unstable();
    let f = |p| percentile(&v, p).map_or("null".to_string(), |x| x.to_string());
    let mean = if v.is_empty() {
        "null".to_string()
    } else {
        format!("{:.1}", v.iter().sum::<u64>() as f64 / v.len() as f64)
    };
    format!(
        "{{\"count\":{},\"mean\":{},\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{}}}",
        v.len(),
        mean,
        f(50.0),
        f(90.0),
        f(99.0),
        f(99.9),
        v.last().map_or("null".to_string(), |x| x.to_string())
    )
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push(' '),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

// ---------------------------------------------------------------------------

#[derive(Default)]
struct RateResult {
    lat_us: Vec<u64>,
    ok: u64,
    non2xx: u64,
    errors: u64,
    timeouts: u64,
    late_sends: u64,
    first_error: Option<String>,
}

#[allow(clippy::too_many_arguments)]
async fn rate_conn(
    p: std::rc::Rc<Prepared>,
    index: usize,
    conns: usize,
    rate: f64,
    t0: Instant,
    measure_from: Instant,
    end: Instant,
    timeout: Duration,
) -> RateResult {
    let mut res = RateResult::default();
    let period = Duration::from_secs_f64(conns as f64 / rate);
    let offset = Duration::from_secs_f64(index as f64 / rate);
    let mut sender: Option<Sender> = None;
    let mut k: u32 = 0;
    let mut prev_done = t0;
    loop {
        let intended = t0 + offset + period * k;
        k += 1;
        if intended >= end {
            break;
        }
        // Free at the intended time: wait for it and time from the real send.
        // Still busy: send now and time from the intended time.
        let late = prev_done > intended;
        if !late {
            tokio::time::sleep_until(intended).await;
        }
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            match connect(p.addr, None).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    res.errors += 1;
                    res.first_error
                        .get_or_insert_with(|| format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    prev_done = Instant::now();
                    continue;
                }
            }
        }
        let s = sender.as_mut().unwrap();
        if s.ready().await.is_err() {
            sender = None;
            res.errors += 1;
            prev_done = Instant::now();
            continue;
        }
        let sent = Instant::now();
        let from = if late { intended } else { sent };
        let measured = intended >= measure_from;
        let fut = async {
            let resp = s.send_request(p.request()).await?;
            let status = resp.status();
            resp.into_body().collect().await?;
            Ok::<_, hyper::Error>(status)
        };
        let outcome = tokio::time::timeout(timeout, fut).await;
        let done = Instant::now();
        prev_done = done;
        if !measured {
            if !matches!(outcome, Ok(Ok(_))) {
                sender = None;
            }
            continue;
        }
        if late {
            res.late_sends += 1;
        }
        match outcome {
            Ok(Ok(status)) if status.is_success() => {
                res.ok += 1;
                res.lat_us.push((done - from).as_micros() as u64);
            }
            Ok(Ok(status)) => {
                res.non2xx += 1;
                res.first_error
                    .get_or_insert_with(|| format!("status {status}"));
            }
            Ok(Err(e)) => {
                res.errors += 1;
                res.first_error.get_or_insert_with(|| e.to_string());
                sender = None;
            }
            Err(_) => {
                res.timeouts += 1;
                sender = None;
            }
        }
    }
    res
}

async fn run_rate(
    target: Target,
    rate: f64,
    duration: f64,
    warmup: f64,
    conns: usize,
    timeout: f64,
) -> Result<String, String> {
    let p = std::rc::Rc::new(prepare(&target)?);
    let t0 = Instant::now() + Duration::from_millis(50);
    let measure_from = t0 + Duration::from_secs_f64(warmup);
    let end = measure_from + Duration::from_secs_f64(duration);
    let timeout = Duration::from_secs_f64(timeout);
    let mut handles = Vec::new();
    for i in 0..conns {
        handles.push(tokio::task::spawn_local(rate_conn(
            p.clone(),
            i,
            conns,
            rate,
            t0,
            measure_from,
            end,
            timeout,
        )));
    }
    let mut all = RateResult::default();
    for h in handles {
        let r = h.await.map_err(|e| e.to_string())?;
        all.lat_us.extend(r.lat_us);
        all.ok += r.ok;
        all.non2xx += r.non2xx;
        all.errors += r.errors;
        all.timeouts += r.timeouts;
        all.late_sends += r.late_sends;
        if all.first_error.is_none() {
            all.first_error = r.first_error;
        }
    }
    let finished = Instant::now();
    let elapsed = (finished - measure_from).as_secs_f64();
    Ok(format!(
        "{{\"mode\":\"rate\",\"target_rate\":{rate},\"duration\":{duration},\"connections\":{conns},\"ok\":{},\"achieved_rate\":{:.1},\"non2xx\":{},\"errors\":{},\"timeouts\":{},\"late_sends\":{},\"first_error\":{},\"latency_us\":{}}}",
        all.ok,
        all.ok as f64 / elapsed.max(duration),
        all.non2xx,
        all.errors,
        all.timeouts,
        all.late_sends,
        all.first_error.as_deref().map_or("null".into(), json_str),
        pcts(all.lat_us)
    ))
}

// ---------------------------------------------------------------------------

#[derive(Default)]
struct StreamResult {
    gaps_us: Vec<u64>,
    ttft_us: Option<u64>,
    content_events: u64,
    done: bool,
    error: Option<String>,
}

/// Splits the SSE byte stream into events and timestamps the content ones.
struct EventScanner {
    partial: Vec<u8>,
}

impl EventScanner {
    /// Returns (content events completed in `chunk`, saw `[DONE]`).
    fn feed(&mut self, chunk: &[u8]) -> (u32, bool) {
        self.partial.extend_from_slice(chunk);
        let (mut content, mut done) = (0, false);
        let mut start = 0;
        while let Some(p) = self.partial[start..].windows(2).position(|w| w == b"\n\n") {
            let ev = &self.partial[start..start + p];
            if is_content(ev) {
                content += 1;
            } else if ev.windows(6).any(|w| w == b"[DONE]") {
                done = true;
            }
            start += p + 2;
        }
        self.partial.drain(..start);
        (content, done)
    }
}

fn is_content(ev: &[u8]) -> bool {
    // `"content"` or `"text"`, optional spaces, `:`, optional spaces, and a
    // string that is not empty (re-serializing gateways may add spaces).
    for key in [&b"\"content\""[..], &b"\"text\""[..]] {
        let mut i = 0;
        while let Some(p) = ev[i..].windows(key.len()).position(|w| w == key) {
            let mut j = i + p + key.len();
            i = j;
            while ev.get(j) == Some(&b' ') {
                j += 1;
            }
            if ev.get(j) != Some(&b':') {
                continue;
            }
            j += 1;
            while ev.get(j) == Some(&b' ') {
                j += 1;
            }
            if ev.get(j) == Some(&b'"') && ev.get(j + 1).is_some_and(|&b| b != b'"') {
                return true;
            }
        }
    }
    false
}

async fn one_stream(
    p: std::rc::Rc<Prepared>,
    source: Option<IpAddr>,
    timeout: Duration,
) -> StreamResult {
    let mut res = StreamResult::default();
    let work = async {
        let mut sender = connect(p.addr, source)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let sent = Instant::now();
        let resp = sender
            .send_request(p.request())
            .await
            .map_err(|e| format!("request: {e}"))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(format!(
                "status {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ));
        }
        let mut body = resp.into_body();
        let mut scan = EventScanner {
            partial: Vec::with_capacity(512),
        };
        let mut last: Option<Instant> = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("body: {e}"))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let now = Instant::now();
            let (n, done) = scan.feed(&data);
            for _ in 0..n {
                match last {
                    None => res.ttft_us = Some((now - sent).as_micros() as u64),
                    Some(prev) => res.gaps_us.push((now - prev).as_micros() as u64),
                }
                last = Some(now);
                res.content_events += 1;
            }
            if done {
                res.done = true;
            }
        }
        Ok::<_, String>(())
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(())) if !res.done => res.error = Some("stream ended without [DONE]".into()),
        Ok(Ok(())) => {}
        Ok(Err(e)) => res.error = Some(e),
        Err(_) => res.error = Some("timeout".into()),
    }
    res
}

async fn run_streams(
    target: Target,
    streams: usize,
    ramp_ms: u64,
    timeout: f64,
    source_ips: u8,
) -> Result<String, String> {
    let p = std::rc::Rc::new(prepare(&target)?);
    let loopback = p.addr.ip().is_loopback() && p.addr.is_ipv4();
    let timeout = Duration::from_secs_f64(timeout);
    let t0 = Instant::now();
    let mut handles = Vec::with_capacity(streams);
    for i in 0..streams {
        let at = t0
            + Duration::from_secs_f64(ramp_ms as f64 / 1000.0 * i as f64 / streams.max(1) as f64);
        let source = (loopback && source_ips > 1).then(|| {
            IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                0,
                1 + (i % source_ips as usize) as u8,
            ))
        });
        let p = p.clone();
        handles.push(tokio::task::spawn_local(async move {
            tokio::time::sleep_until(at).await;
            one_stream(p, source, timeout).await
        }));
    }
    let (mut gaps, mut ttft) = (Vec::new(), Vec::new());
    let (mut completed, mut failed, mut events) = (0u64, 0u64, 0u64);
    let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
    for h in handles {
        let r = h.await.map_err(|e| e.to_string())?;
        events += r.content_events;
        gaps.extend(r.gaps_us);
        if let Some(t) = r.ttft_us {
            ttft.push(t);
        }
        match r.error {
            None => completed += 1,
            Some(e) => {
                failed += 1;
                let key: String = e.chars().take(120).collect();
                *errors.entry(key).or_default() += 1;
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let errs: Vec<String> = errors
        .iter()
        .take(5)
        .map(|(e, n)| format!("{}:{n}", json_str(e)))
        .collect();
    Ok(format!(
        "{{\"mode\":\"streams\",\"streams\":{streams},\"completed\":{completed},\"failed\":{failed},\"content_events\":{events},\"wall_s\":{wall:.3},\"errors\":{{{}}},\"gap_us\":{},\"ttft_us\":{}}}",
        errs.join(","),
        pcts(gaps),
        pcts(ttft)
    ))
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    let out = local.block_on(&rt, async move {
        match cli.command {
            Cmd::Rate {
                target,
                rate,
                duration,
                warmup,
                connections,
                timeout,
            } => run_rate(target, rate, duration, warmup, connections, timeout).await,
            Cmd::Streams {
                target,
                streams,
                ramp_ms,
                timeout,
                source_ips,
            } => run_streams(target, streams, ramp_ms, timeout, source_ips).await,
        }
    });
    match out {
        Ok(json) => println!("{json}"),
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    }
}
