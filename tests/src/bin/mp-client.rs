//! A small client the kernel tests run inside test cgroups: it connects to
//! an address the way any program would and reports, as one JSON line, what
//! happened (connect error, HTTP status, local ports).
//!
//! ```text
//! mp-client get ADDR [PATH]     one request
//! mp-client v2 ADDR PATH        IMDSv2: PUT a token, then GET PATH with it
//! mp-client raw ADDR METHOD PATH [HEADER]...   one request, headers "Name: value"
//! mp-client burst ADDR PATH N   N requests at the same moment, one thread each
//! mp-client udp ADDR            connect a UDP socket (reports the errno)
//! mp-client bind ADDR           bind and listen on ADDR (reports the errno)
//! mp-client flood ADDR N SECS   open N connections, half trickling headers
//!                               (slowloris), half idle after one request
//! mp-client latency ADDR PATH N [HEADER]...
//!                               N sequential connect+GET+close; percentiles
//! mp-client interleave N SEED TARGET...
//!                               N rounds of one connect+GET+close to each
//!                               TARGET ("ADDR|PATH[|HEADER]"), so all see
//!                               the same moment, each round in an order
//!                               shuffled from SEED; percentiles each
//! mp-client throughput ADDR PATH CLIENTS SECS [HEADER]...
//!                               CLIENTS threads of connect+GET+close; requests/s
//! mp-client linger ADDR N SECS  N connections held open SECS seconds, sending
//!                               nothing (prints a line once all are open)
//! mp-client connects ADDR N     N connect()s alone (RST on close); percentiles
//! mp-client download ADDR PATH N
//!                               N sequential GETs of PATH, each on a
//!                               connection of its own; MiB/s of the bodies
//! mp-client upload ADDR BYTES CONNS
//!                               BYTES sent to a sink over CONNS connections
//!                               in turn, each until the sink has read all;
//!                               MiB/s
//! mp-client udp-rr ADDR N       N datagrams of 64 bytes, each waiting for
//!                               its echo; percentiles
//! mp-client idle ADDR N SECS    open N connections, send nothing, hold them
//! mp-client keepalive ADDR PATH N SECS
//!                               open N connections, one GET PATH (kept
//!                               alive) on each, hold them
//! mp-client hold ADDR N         open N connections at once, then request on each
//! mp-client churn ADDR N        N short request/close cycles (RST on close)
//! mp-client occupy ADDR PATH N SECS
//!                               open N connections and send a GET on each
//!                               every 3 s for SECS: keeps places that only
//!                               idle timeouts would free
//! mp-client v6only ADDR        an IPV6_V6ONLY socket connects to ADDR as
//!                               ::ffff:ADDR: the connect hook runs, then
//!                               the kernel fails it before any SYN
//!                               (ENETUNREACH)
//! mp-client closefirst ADDR PATH N
//!                               N keep-alive GETs, each on a connection the
//!                               client then closes first (FIN, TIME_WAIT here)
//! ```

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use serde_json::json;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("interleave") && args.len() >= 4 {
        match (args[1].parse(), args[2].parse()) {
            (Ok(n), Ok(seed)) => println!("{}", interleave(n, seed, &args[3..])),
            _ => std::process::exit(2),
        }
        return;
    }
    let usage = || -> ! {
        eprintln!("usage: mp-client get ADDR [PATH] | v2 ADDR PATH | hold ADDR N | churn ADDR N");
        std::process::exit(2)
    };
    let addr: SocketAddr = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage());
    let n = || {
        args.get(2)
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or_else(|| usage())
    };
    let out = match args.first().map(String::as_str) {
        Some("get") => get(addr, args.get(2).map_or("/", String::as_str)),
        Some("v2") => v2(addr, args.get(2).map_or("/", String::as_str)),
        Some("raw") if args.len() >= 4 => raw(addr, &args[2], &args[3], &args[4..]),
        Some("udp") => udp(addr),
        Some("bind") => bind(addr),
        Some("flood") if args.len() == 4 => {
            flood(addr, n(), args[3].parse().unwrap_or_else(|_| usage()))
        }
        Some("burst") if args.len() == 4 => {
            burst(addr, &args[2], args[3].parse().unwrap_or_else(|_| usage()))
        }
        Some("hold") => hold(addr, n()),
        Some("churn") => churn(addr, n()),
        Some("v6only") => v6only(addr),
        Some("occupy") if args.len() == 5 => occupy(
            addr,
            &args[2],
            args[3].parse().unwrap_or_else(|_| usage()),
            args[4].parse().unwrap_or_else(|_| usage()),
        ),
        Some("closefirst") if args.len() == 4 => {
            close_first(addr, &args[2], args[3].parse().unwrap_or_else(|_| usage()))
        }
        Some("latency") if args.len() >= 4 => latency(
            addr,
            &args[2],
            args[3].parse().unwrap_or_else(|_| usage()),
            &headers(&args[4..]),
        ),
        Some("throughput") if args.len() >= 5 => throughput(
            addr,
            &args[2],
            args[3].parse().unwrap_or_else(|_| usage()),
            args[4].parse().unwrap_or_else(|_| usage()),
            &headers(&args[5..]),
        ),
        Some("connects") => connects(addr, n()),
        Some("linger") if args.len() == 4 => {
            linger(addr, n(), args[3].parse().unwrap_or_else(|_| usage()))
        }
        Some("download") if args.len() == 4 => {
            download(addr, &args[2], args[3].parse().unwrap_or_else(|_| usage()))
        }
        Some("upload") if args.len() == 4 => upload(
            addr,
            args[2].parse().unwrap_or_else(|_| usage()),
            args[3].parse().unwrap_or_else(|_| usage()),
        ),
        Some("udp-rr") => udp_rr(addr, n()),
        Some("serve") if args.len() == 3 => {
            serve(addr, args[2].parse().unwrap_or_else(|_| usage()))
        }
        Some("idle") if args.len() == 4 => {
            idle(addr, n(), args[3].parse().unwrap_or_else(|_| usage()))
        }
        Some("keepalive") if args.len() == 5 => keepalive(
            addr,
            &args[2],
            args[3].parse().unwrap_or_else(|_| usage()),
            args[4].parse().unwrap_or_else(|_| usage()),
        ),
        _ => usage(),
    };
    println!("{out}");
}

fn flood(addr: SocketAddr, n: usize, secs: u64) -> serde_json::Value {
    let mut conns = Vec::with_capacity(n);
    let mut failed = 0;
    for i in 0..n {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            failed += 1;
            continue;
        };
        let start: &[u8] = if i % 2 == 0 {
            b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nX-Slow: "
        } else {
            b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: x\r\n\r\n"
        };
        let _ = s.write_all(start);
        conns.push(s);
    }
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < until {
        for s in conns.iter_mut().step_by(2) {
            let _ = s.write_all(b"x");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    json!({ "ok": true, "opened": conns.len(), "failed": failed })
}

fn bind(addr: SocketAddr) -> serde_json::Value {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => json!({ "ok": true }),
        Err(e) => error_json(&e),
    }
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// Sends one GET and returns the response's status code.
fn request(stream: &mut TcpStream, path: &str) -> std::io::Result<u16> {
    exchange(stream, "GET", path, "").map(|(status, _)| status)
}

/// Sends one request (Connection: close) and returns status and body.
fn exchange(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &str,
) -> std::io::Result<(u16, String)> {
    exchange_full(stream, method, path, headers).map(|(status, _, body)| (status, body))
}

type Headers = serde_json::Map<String, serde_json::Value>;

/// Sends one request and returns status, headers (lowercased names) and body.
fn exchange_full(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &str,
) -> std::io::Result<(u16, Headers, String)> {
    // One write, as HTTP clients send a request head (`write!` on the
    // socket would send each piece of the format as a segment of its own).
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), json!(v.trim())))
        .collect();
    Ok((status, headers, body.to_string()))
}

fn raw(addr: SocketAddr, method: &str, path: &str, headers: &[String]) -> serde_json::Value {
    let headers: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    match connect(addr).and_then(|mut s| exchange_full(&mut s, method, path, &headers)) {
        Ok((status, headers, body)) => {
            json!({ "ok": true, "status": status, "headers": headers, "body": body })
        }
        Err(e) => error_json(&e),
    }
}

fn udp(addr: SocketAddr) -> serde_json::Value {
    let any: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    match std::net::UdpSocket::bind(any).and_then(|s| s.connect(addr)) {
        Ok(()) => json!({ "ok": true }),
        Err(e) => error_json(&e),
    }
}

fn burst(addr: SocketAddr, path: &str, n: usize) -> serde_json::Value {
    let start = std::sync::Arc::new(std::sync::Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let (start, path) = (start.clone(), path.to_string());
            std::thread::spawn(move || {
                let mut s = connect(addr).ok()?;
                start.wait();
                exchange(&mut s, "GET", &path, "").ok()
            })
        })
        .collect();
    let results: Vec<Option<(u16, String)>> = threads
        .into_iter()
        .map(|t| t.join().ok().flatten())
        .collect();
    let statuses: Vec<u16> = results
        .iter()
        .map(|r| r.as_ref().map_or(0, |(s, _)| *s))
        .collect();
    let mut keys: Vec<String> = results
        .iter()
        .flatten()
        .filter_map(|(_, body)| serde_json::from_str::<serde_json::Value>(body).ok())
        .filter_map(|v| v["AccessKeyId"].as_str().map(str::to_owned))
        .collect();
    keys.sort();
    keys.dedup();
    json!({ "ok": true, "statuses": statuses, "access_key_ids": keys })
}

fn v2(addr: SocketAddr, path: &str) -> serde_json::Value {
    let token = connect(addr).and_then(|mut s| {
        exchange(
            &mut s,
            "PUT",
            "/latest/api/token",
            "X-aws-ec2-metadata-token-ttl-seconds: 60\r\n",
        )
    });
    let (token_status, token) = match token {
        Ok(t) => t,
        Err(e) => return error_json(&e),
    };
    let got = connect(addr).and_then(|mut s| {
        exchange(
            &mut s,
            "GET",
            path,
            &format!("X-aws-ec2-metadata-token: {token}\r\n"),
        )
    });
    match got {
        Ok((status, body)) => {
            json!({ "ok": true, "token_status": token_status, "status": status, "body": body })
        }
        Err(e) => error_json(&e),
    }
}

fn error_json(e: &std::io::Error) -> serde_json::Value {
    json!({ "ok": false, "error": e.to_string(), "errno": e.raw_os_error() })
}

fn get(addr: SocketAddr, path: &str) -> serde_json::Value {
    let mut stream = match connect(addr) {
        Ok(s) => s,
        Err(e) => return error_json(&e),
    };
    let local_port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
    match request(&mut stream, path) {
        Ok(status) => {
            json!({ "ok": true, "status": status, "local_port": local_port, "pid": std::process::id() })
        }
        Err(e) => error_json(&e),
    }
}

fn hold(addr: SocketAddr, n: usize) -> serde_json::Value {
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        match connect(addr) {
            Ok(s) => streams.push(s),
            Err(e) => return error_json(&e),
        }
    }
    // All n are connected (and accepted) at once before any is used.
    let mut ports = Vec::new();
    let mut statuses = Vec::new();
    for mut s in streams {
        ports.push(s.local_addr().map(|a| a.port()).unwrap_or(0));
        statuses.push(request(&mut s, "/").unwrap_or(0));
    }
    json!({ "ok": true, "ports": ports, "statuses": statuses, "pid": std::process::id() })
}

/// `Name: value` arguments as header lines.
fn headers(args: &[String]) -> String {
    args.iter().map(|h| format!("{h}\r\n")).collect()
}

/// Percentiles of `micros` (sorted here).
fn percentiles(mut micros: Vec<f64>) -> serde_json::Value {
    micros.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        micros
            .get(((micros.len() as f64 * p) as usize).min(micros.len().saturating_sub(1)))
            .copied()
    };
    json!({ "p50_us": pct(0.5), "p90_us": pct(0.9), "p99_us": pct(0.99) })
}

/// Sequential connect + GET + close, as SDKs fetch credentials.
fn latency(addr: SocketAddr, path: &str, n: usize, headers: &str) -> serde_json::Value {
    // One target: the order is moot, and so is the seed.
    let mut timed = timed_rounds(n, 0, &[(addr, path, headers.to_string())]);
    let (micros, failed) = timed.pop().unwrap_or_default();
    let mut out = percentiles(micros);
    out["ok"] = json!(failed == 0);
    out["n"] = json!(n);
    out["failed"] = json!(failed);
    out
}

/// Sequential connect + GET + close to each target, `n` rounds (see
/// [`timed_rounds`]): every target is measured under the same conditions, which on a small
/// shared machine drift more from one second to the next than the
/// difference being measured.
fn interleave(n: usize, seed: u64, targets: &[String]) -> serde_json::Value {
    let targets: Vec<Target> = targets
        .iter()
        .map(|t| {
            let mut parts = t.splitn(3, '|');
            let addr = parts.next().and_then(|a| a.parse().ok());
            let path = parts.next().unwrap_or("/");
            let header = parts.next().map(|h| format!("{h}\r\n")).unwrap_or_default();
            (
                addr.unwrap_or_else(|| panic!("bad target {t}")),
                path,
                header,
            )
        })
        .collect();
    let timed = timed_rounds(n, seed, &targets);
    let ok = timed.iter().all(|(_, failed)| *failed == 0);
    let per_target: Vec<_> = timed
        .into_iter()
        .map(|(micros, failed)| {
            let mut out = percentiles(micros);
            out["failed"] = json!(failed);
            out
        })
        .collect();
    json!({ "ok": ok, "n": n, "targets": per_target })
}

/// Where a timed request goes: address, path, header lines.
type Target<'a> = (SocketAddr, &'a str, String);

/// `n` rounds of one connect + GET + close to each target; per target, the
/// microseconds of each 200 answer and the count of failures.
///
/// Each round visits the targets in a fresh random order (from `seed`, so
/// a run can be repeated). What ran just before a request, and is still
/// finishing (a server's close, its lingering reads), costs the request
/// after it: a fixed or rotated order would always bill the same target
/// for the same neighbour, while a shuffled one gives every target the
/// same mix of neighbours.
fn timed_rounds(n: usize, seed: u64, targets: &[Target]) -> Vec<(Vec<f64>, usize)> {
    let mut timed = vec![(Vec::with_capacity(n), 0); targets.len()];
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut order: Vec<usize> = (0..targets.len()).collect();
    for _ in 0..n {
        rng.shuffle(&mut order);
        for &i in &order {
            let (addr, path, header) = &targets[i];
            let started = std::time::Instant::now();
            match connect(*addr).and_then(|mut s| exchange(&mut s, "GET", path, header)) {
                Ok((200, _)) => timed[i].0.push(started.elapsed().as_secs_f64() * 1e6),
                _ => timed[i].1 += 1,
            }
        }
    }
    timed
}

/// `clients` threads doing connect + GET + close for `secs` seconds.
fn throughput(
    addr: SocketAddr,
    path: &str,
    clients: usize,
    secs: u64,
    headers: &str,
) -> serde_json::Value {
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (path, headers) = (path.to_string(), headers.to_string());
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                while std::time::Instant::now() < until {
                    match connect(addr).and_then(|mut s| exchange(&mut s, "GET", &path, &headers)) {
                        Ok((200, _)) => ok += 1,
                        _ => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for t in threads {
        let (o, f) = t.join().unwrap_or((0, 1));
        ok += o;
        failed += f;
    }
    json!({ "ok": failed == 0, "requests": ok, "failed": failed, "per_second": ok as f64 / secs as f64 })
}

/// Opens `n` connections, sends nothing, and holds them `secs` seconds.
fn idle(addr: SocketAddr, n: usize, secs: u64) -> serde_json::Value {
    let conns: Vec<TcpStream> = (0..n)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    json!({ "ok": true, "opened": conns.len() })
}

fn keepalive(addr: SocketAddr, path: &str, n: usize, secs: u64) -> serde_json::Value {
    let request = format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n");
    let mut conns = Vec::with_capacity(n);
    let mut answered = 0;
    for _ in 0..n {
        let Ok(mut s) = connect(addr) else { continue };
        let mut buf = [0u8; 4096];
        if s.write_all(request.as_bytes()).is_ok()
            && s.read(&mut buf)
                .is_ok_and(|n| buf[..n].starts_with(b"HTTP/1.1 200"))
        {
            answered += 1;
        }
        conns.push(s);
    }
    std::thread::sleep(Duration::from_secs(secs));
    json!({ "ok": answered == n, "opened": conns.len(), "answered": answered })
}

/// connect() alone, then close with a reset (no TIME_WAIT): its latency.
/// Opens `n` connections and keeps every one open for `secs` seconds,
/// sending nothing, whether the server kept or closed it.
fn linger(addr: SocketAddr, n: usize, secs: u64) -> serde_json::Value {
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    for _ in 0..n {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => held.push(s),
            Err(_) => failed += 1,
        }
    }
    println!("{}", json!({ "connected": held.len(), "failed": failed }));
    std::thread::sleep(Duration::from_secs(secs));
    json!({ "ok": failed == 0, "connected": held.len() })
}

fn connects(addr: SocketAddr, n: usize) -> serde_json::Value {
    let mut micros = Vec::with_capacity(n);
    let mut failed = 0;
    for _ in 0..n {
        let started = std::time::Instant::now();
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => {
                micros.push(started.elapsed().as_secs_f64() * 1e6);
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            }
            Err(_) => failed += 1,
        }
    }
    let mut out = percentiles(micros);
    out["ok"] = json!(failed == 0);
    out["n"] = json!(n);
    out
}

/// MiB/s of `bytes` moved in `seconds`, with the figures behind it.
fn rate(ok: bool, bytes: u64, seconds: f64) -> serde_json::Value {
    json!({
        "ok": ok,
        "bytes": bytes,
        "seconds": seconds,
        "mib_per_s": bytes as f64 / (1024.0 * 1024.0) / seconds.max(1e-9),
    })
}

fn download(addr: SocketAddr, path: &str, n: usize) -> serde_json::Value {
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    let mut buf = vec![0u8; 1 << 20];
    let (mut bytes, mut ok) = (0u64, true);
    let started = std::time::Instant::now();
    for _ in 0..n {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
            ok = false;
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        if s.write_all(request.as_bytes()).is_err() {
            ok = false;
            continue;
        }
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(got) => bytes += got as u64,
                Err(_) => {
                    ok = false;
                    break;
                }
            }
        }
    }
    rate(ok, bytes, started.elapsed().as_secs_f64())
}

fn upload(addr: SocketAddr, total: u64, conns: u64) -> serde_json::Value {
    let chunk = vec![0x5au8; 1 << 20];
    let per_conn = total / conns.max(1);
    let (mut bytes, mut ok) = (0u64, true);
    let started = std::time::Instant::now();
    for _ in 0..conns {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
            ok = false;
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut left = per_conn;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if s.write_all(&chunk[..n]).is_err() {
                ok = false;
                break;
            }
            left -= n as u64;
            bytes += n as u64;
        }
        // The sink closes once it has read everything: only then is the
        // transfer done.
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut end = [0u8; 16];
        if s.read(&mut end).is_err() {
            ok = false;
        }
    }
    rate(ok, bytes, started.elapsed().as_secs_f64())
}

fn udp_rr(addr: SocketAddr, n: usize) -> serde_json::Value {
    let Ok(sock) = std::net::UdpSocket::bind("0.0.0.0:0") else {
        return json!({ "ok": false });
    };
    let _ = sock.set_read_timeout(Some(Duration::from_secs(1)));
    if sock.connect(addr).is_err() {
        return json!({ "ok": false });
    }
    let (payload, mut buf) = ([7u8; 64], [0u8; 512]);
    let (mut micros, mut lost) = (Vec::with_capacity(n), 0);
    for _ in 0..n {
        let started = std::time::Instant::now();
        if sock.send(&payload).is_ok() && sock.recv(&mut buf).is_ok() {
            micros.push(started.elapsed().as_secs_f64() * 1e6);
        } else {
            lost += 1;
        }
    }
    let mut out = percentiles(micros);
    out["ok"] = json!(lost == 0);
    out["n"] = json!(n);
    out["lost"] = json!(lost);
    out
}

/// The traffic bench's host side: a TCP sink on `sink` (reads each
/// connection to its end) and a UDP echo on `echo`. Runs until killed.
fn serve(sink: SocketAddr, echo: SocketAddr) -> serde_json::Value {
    let (Ok(listener), Ok(udp)) = (
        std::net::TcpListener::bind(sink),
        std::net::UdpSocket::bind(echo),
    ) else {
        return json!({ "ok": false });
    };
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let (mut conn, mut buf) = (conn, vec![0u8; 1 << 20]);
            while conn.read(&mut buf).is_ok_and(|n| n > 0) {}
        });
    }
    json!({ "ok": false })
}

fn occupy(addr: SocketAddr, path: &str, n: usize, secs: u64) -> serde_json::Value {
    let request = format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n");
    let ask = |s: &mut TcpStream| {
        let mut buf = [0u8; 4096];
        s.write_all(request.as_bytes()).is_ok()
            && s.read(&mut buf)
                .is_ok_and(|n| buf[..n].starts_with(b"HTTP/1.1 200"))
    };
    let mut conns: Vec<TcpStream> = (0..n).filter_map(|_| connect(addr).ok()).collect();
    let opened = conns.len();
    conns.retain_mut(|s| ask(s));
    let served_at_first = conns.len();
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_secs(3));
        conns.retain_mut(|s| ask(s));
    }
    json!({ "opened": opened, "served_at_first": served_at_first, "kept": conns.len() })
}

fn v6only(addr: SocketAddr) -> serde_json::Value {
    use socket2::{Domain, Socket, Type};
    let SocketAddr::V4(v4) = addr else {
        return json!({ "ok": false, "error": "v6only takes an IPv4 address" });
    };
    let mapped = SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port()));
    let result = (|| -> std::io::Result<Option<i32>> {
        let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        s.set_only_v6(true)?;
        Ok(s.connect(&mapped.into())
            .err()
            .and_then(|e| e.raw_os_error()))
    })();
    match result {
        Ok(errno) => json!({ "ok": true, "errno": errno }),
        Err(e) => error_json(&e),
    }
}

fn close_first(addr: SocketAddr, path: &str, n: usize) -> serde_json::Value {
    let mut failed = 0usize;
    let mut last_error = None;
    for _ in 0..n {
        let result = connect(addr).and_then(|mut s| {
            // No `Connection: close`: the server keeps the connection, so
            // the client's FIN comes first and its side ends in TIME_WAIT.
            let request = format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n");
            s.write_all(request.as_bytes())?;
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf)?;
            if !buf[..n].starts_with(b"HTTP/1.1 200") {
                return Err(std::io::Error::other(format!(
                    "{:?}",
                    String::from_utf8_lossy(&buf[..n])
                )));
            }
            s.shutdown(std::net::Shutdown::Write)?;
            // Until the server's FIN.
            while s.read(&mut buf)? > 0 {}
            Ok(())
        });
        if let Err(e) = result {
            failed += 1;
            last_error = Some(e.to_string());
        }
    }
    json!({ "ok": failed == 0, "n": n, "failed": failed, "last_error": last_error })
}

fn churn(addr: SocketAddr, n: usize) -> serde_json::Value {
    let (mut ok, mut failed) = (0usize, 0usize);
    let mut last_error = None;
    for _ in 0..n {
        let step = |what: &'static str| {
            move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"))
        };
        let result = connect(addr).map_err(step("connect")).and_then(|mut s| {
            let status = request(&mut s, "/").map_err(step("request"))?;
            // Reset instead of TIME_WAIT so 100k cycles do not run the
            // ephemeral port range dry.
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
            Ok(status)
        });
        match result {
            Ok(_) => ok += 1,
            Err(e) => {
                failed += 1;
                last_error = Some(e.to_string());
            }
        }
    }
    json!({ "ok": failed == 0, "succeeded": ok, "failed": failed, "last_error": last_error })
}
