//! A small client the kernel tests run inside test cgroups: it connects to
//! an address the way any program would and reports, as one JSON line, what
//! happened (connect error, HTTP status, local ports).
//!
//! ```text
//! mp-client get ADDR [PATH]     one request
//! mp-client v2 ADDR PATH        IMDSv2: PUT a token, then GET PATH with it
//! mp-client hold ADDR N         open N connections at once, then request on each
//! mp-client churn ADDR N        N short request/close cycles (RST on close)
//! ```

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use serde_json::json;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
        Some("hold") => hold(addr, n()),
        Some("churn") => churn(addr, n()),
        _ => usage(),
    };
    println!("{out}");
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
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
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

fn churn(addr: SocketAddr, n: usize) -> serde_json::Value {
    let (mut ok, mut failed) = (0usize, 0usize);
    let mut last_error = None;
    for _ in 0..n {
        let result = connect(addr).and_then(|mut s| {
            let status = request(&mut s, "/")?;
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
