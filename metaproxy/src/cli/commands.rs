//! The CLI's commands other than `run`: `connections`, `status`, `detach`,
//! `policy`.

use std::io::Write as _;

use crate::{
    cli::{ConnectionsArgs, DetachArgs, PolicyCommand, StatusArgs},
    kernel::probe,
    ops::admin_client,
    ops::connlog::Connection,
    ops::logging,
};

pub async fn connections(args: ConnectionsArgs) -> anyhow::Result<()> {
    let socket = &args.admin.admin_socket;
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(out, "{}", row(HEADER))?;
    }
    if args.follow {
        // NDJSON: print each complete line as it arrives.
        let mut buf = Vec::new();
        return admin_client::get(socket, "/v1/connections?follow=true", |chunk| {
            buf.extend_from_slice(chunk);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                if args.json {
                    out.write_all(json_line(&line).as_bytes())?;
                } else if let Ok(conn) = serde_json::from_slice::<Connection>(&line) {
                    writeln!(out, "{}", table_row(&conn))?;
                }
                out.flush()?;
            }
            Ok(())
        })
        .await;
    }
    let mut body = Vec::new();
    admin_client::get(socket, "/v1/connections", |chunk| {
        body.extend_from_slice(chunk);
        Ok(())
    })
    .await?;
    for conn in admin_client::parse_connections(&body)? {
        if args.json {
            writeln!(out, "{}", json_printable(&serde_json::to_string(&conn)?))?;
        } else {
            writeln!(out, "{}", table_row(&conn))?;
        }
    }
    Ok(())
}

fn table_row(c: &Connection) -> String {
    let outcome = match &c.reason {
        Some(reason) => format!("{} ({reason})", c.outcome),
        None => c.outcome.to_string(),
    };
    let container = match (&c.container, &c.container_id) {
        (Some(name), Some(id)) => format!("{name} ({})", &id[..id.len().min(12)]),
        _ => "-".into(),
    };
    let role = c
        .role
        .as_deref()
        .map_or("-", |arn| arn.rsplit('/').next().unwrap_or(arn));
    let dash = || "-".to_string();
    row([
        &c.time,
        &c.cgroup_id.map_or_else(dash, |id| id.to_string()),
        &c.cgroup.as_deref().map_or_else(dash, short_cgroup),
        &c.pid.map_or_else(dash, |p| p.to_string()),
        c.comm.as_deref().unwrap_or("-"),
        c.original_dst.as_deref().unwrap_or("-"),
        &container,
        role,
        c.request.as_deref().unwrap_or("-"),
        &outcome,
    ])
}

/// A cgroup path with container ids cut to their usual 12 characters.
fn short_cgroup(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            if seg.len() == 64 && seg.bytes().all(|b| b.is_ascii_hexdigit()) {
                &seg[..12]
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

const HEADER: [&str; 10] = [
    "TIME",
    "CGROUP ID",
    "CGROUP",
    "PID",
    "COMM",
    "ORIGINAL DST",
    "CONTAINER",
    "ROLE",
    "REQUEST",
    "OUTCOME",
];

/// Shown as-is, a container's name or comm could carry terminal escapes,
/// or bidi controls that make it read as another (see
/// [`logging::is_hidden`]).
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if logging::is_hidden(c) { '?' } else { c })
        .collect()
}

/// A JSON line with the characters [`logging::is_hidden`] names written
/// as `\uXXXX` escapes: the same JSON value, and nothing a terminal
/// interprets. (serde_json escapes only the C0 controls.)
fn json_printable(line: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(line.len());
    for c in line.chars() {
        if logging::is_hidden(c) {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One line of the followed JSON stream, printable, still one line: its
/// own newline ends it as is (escaped, it would join every line into one).
fn json_line(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line.strip_suffix(b"\n").unwrap_or(line));
    format!("{}\n", json_printable(&text))
}

fn row(cols: [&str; 10]) -> String {
    let cols = cols.map(printable);
    format!(
        "{:<24} {:>9} {:<28} {:>7} {:<15} {:<20} {:<28} {:<20} {:<50} {}",
        cols[0], cols[1], cols[2], cols[3], cols[4], cols[5], cols[6], cols[7], cols[8], cols[9]
    )
}

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    if args.redirect {
        let pins = &args.pins.pin_dir;
        let generation = probe::redirect_in_place(pins)?.ok_or_else(|| {
            anyhow::anyhow!(
                "no redirect under {}: IMDS connects are not intercepted",
                pins.display()
            )
        })?;
        let daemon = if std::os::unix::net::UnixStream::connect(&args.admin.admin_socket).is_ok() {
            "running"
        } else {
            "not running (connects are refused until it is)"
        };
        let on: Vec<String> = probe::guard_in_place(pins, generation)?
            .into_iter()
            .map(|index| probe::interface_name(index).unwrap_or_else(|| format!("#{index}")))
            .collect();
        let guard = if on.is_empty() {
            "no interface routes to IMDS yet".to_string()
        } else {
            on.join(", ")
        };
        println!(
            "redirect in place: generation {generation}; packet guard on {guard}; daemon {daemon}"
        );
        return Ok(());
    }
    let status = admin_client::status(&args.admin.admin_socket).await?;
    println!("{}", serde_json::to_string(&status)?);
    Ok(())
}

pub fn detach(args: DetachArgs) -> anyhow::Result<()> {
    // Detaching under a running daemon would open the door to the real IMDS
    // while the admin believes metaproxy guards it.
    if std::os::unix::net::UnixStream::connect(&args.admin.admin_socket).is_ok() {
        anyhow::bail!(
            "a metaproxy daemon is running (it answers on {}): stop it first (`systemctl stop metaproxy`, or SIGTERM), then detach",
            args.admin.admin_socket.display()
        );
    }
    let removed = probe::detach(&args.pins.pin_dir)?;
    if removed == 0 {
        println!("nothing attached under {}", args.pins.pin_dir.display());
    } else {
        println!(
            "detached: removed {removed} links under {}; IMDS connects are no longer intercepted",
            args.pins.pin_dir.display()
        );
    }
    Ok(())
}

/// `metaproxy policy check FILE` and `metaproxy policy explain CONTAINER`.
pub async fn policy(cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Check { file } => {
            let policy = crate::policy::file::PolicyFile::load(&file)?;
            println!("{}: ok, {} rules", file.display(), policy.rules());
            // A draft may live anywhere; `run` refuses it where others
            // could change it.
            if let Err(e) = crate::config::check_policy_file(&file) {
                eprintln!("note: metaproxy run would refuse this file where it is: {e}");
            }
            Ok(())
        }
        PolicyCommand::Explain { container, admin } => {
            anyhow::ensure!(
                crate::model::ids::is_container_ref(&container),
                "{container:?} is not a container name or id"
            );
            let mut out = std::io::stdout().lock();
            admin_client::get(
                &admin.admin_socket,
                &format!("/v1/explain?container={container}"),
                |chunk| Ok(out.write_all(chunk)?),
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_table_and_json_show_no_bidi_or_control_characters() {
        assert_eq!(
            printable("job-\u{202e}txt.exe\x1b[2J\u{2066}x\u{200b}"),
            "job-?txt.exe?[2J?x?"
        );
        assert_eq!(printable("名前-ok"), "名前-ok");
        let value = serde_json::json!({
            "container": "a\u{202e}b\u{1b}c\u{feff}\u{e0041}",
            "comm": "名前",
        });
        let line = json_printable(&value.to_string());
        assert!(line.chars().all(|c| !logging::is_hidden(c)), "{line:?}");
        assert!(
            line.contains(r"a\u202eb\u001bc\ufeff\udb40\udc41"),
            "{line}"
        );
        // The same JSON value, readable by any parser.
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back, value);
        // Followed, line by line: each still ends its line.
        let followed = json_line(format!("{}\n", value).as_bytes());
        assert_eq!(followed.lines().count(), 1, "{followed:?}");
        assert!(followed.ends_with("}\n"), "{followed:?}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&followed).unwrap(),
            value
        );
    }
}
