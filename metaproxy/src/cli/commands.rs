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
    if args.follow {
        if !args.json {
            writeln!(out, "{}", table_line(&header(), &FOLLOW_WIDTHS))?;
        }
        // NDJSON: print each complete line as it arrives.
        let mut buf = Vec::new();
        return admin_client::get(socket, "/v1/connections?follow=true", |chunk| {
            buf.extend_from_slice(chunk);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                if args.json {
                    out.write_all(json_line(&line).as_bytes())?;
                } else if let Ok(conn) = serde_json::from_slice::<Connection>(&line) {
                    writeln!(out, "{}", table_line(&cells(&conn), &FOLLOW_WIDTHS))?;
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
    let conns = admin_client::parse_connections(&body)?;
    if args.json {
        for conn in conns {
            writeln!(out, "{}", json_printable(&serde_json::to_string(&conn)?))?;
        }
    } else {
        write!(out, "{}", table(&conns))?;
    }
    Ok(())
}

/// The table of `conns`, each column as wide as its widest cell, header
/// first.
fn table(conns: &[Connection]) -> String {
    let rows: Vec<Cells> = std::iter::once(header())
        .chain(conns.iter().map(cells))
        .collect();
    let mut widths = [0; COLUMNS.len()];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    rows.iter()
        .map(|row| table_line(row, &widths) + "\n")
        .collect()
}

/// The table's columns, and whether each aligns right (a figure's does).
const COLUMNS: [(&str, bool); 10] = [
    ("TIME", false),
    ("CGROUP ID", true),
    ("CGROUP", false),
    ("PID", true),
    ("COMM", false),
    ("ORIGINAL DST", false),
    ("CONTAINER", false),
    ("ROLE", false),
    ("REQUEST", false),
    ("OUTCOME", false),
];

/// The widest a cell is shown but the last's: a longer value keeps its
/// start and end, with an ellipsis between.
const MAX_CELL: usize = 60;

/// `--follow`'s widths: rows come one at a time, so the columns cannot
/// follow their content; a value wider than its column is cut to fit.
const FOLLOW_WIDTHS: [usize; COLUMNS.len()] = [24, 9, 40, 7, 15, 20, 28, 20, 50, 0];

/// One row's cells, printable.
type Cells = [String; COLUMNS.len()];

fn header() -> Cells {
    COLUMNS.map(|(name, _)| name.to_string())
}

/// `cells` in columns of `widths`, each cut to its width; the last is
/// neither cut nor padded.
fn table_line(cells: &Cells, widths: &[usize; COLUMNS.len()]) -> String {
    let last = COLUMNS.len() - 1;
    let shown: Vec<String> = cells
        .iter()
        .zip(widths)
        .zip(COLUMNS)
        .enumerate()
        .map(|(i, ((cell, &width), (_, right)))| {
            if i == last {
                cell.clone()
            } else if right {
                format!("{:>width$}", cut(cell, width))
            } else {
                format!("{:<width$}", cut(cell, width))
            }
        })
        .collect();
    shown.join(" ")
}

/// `s` in at most `max` characters: its start and end, with `…` for
/// what is cut from the middle.
fn cut(s: &str, max: usize) -> String {
    let len = s.chars().count();
    if len <= max {
        return s.to_string();
    }
    let keep = max.saturating_sub(1);
    let head = keep.div_ceil(2);
    let tail = keep - head;
    let start: String = s.chars().take(head).collect();
    let end: String = s.chars().skip(len - tail).collect();
    format!("{start}…{end}")
}

fn cells(c: &Connection) -> Cells {
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
    let mut cells = [
        c.time.clone(),
        c.cgroup_id.map_or_else(dash, |id| id.to_string()),
        c.cgroup.as_deref().map_or_else(dash, short_cgroup),
        c.pid.map_or_else(dash, |p| p.to_string()),
        c.comm.as_deref().unwrap_or("-").to_string(),
        c.original_dst.as_deref().unwrap_or("-").to_string(),
        container,
        role.to_string(),
        c.request.as_deref().unwrap_or("-").to_string(),
        outcome,
    ]
    .map(|cell| printable(&cell));
    // The last column is not padded: nothing follows it to push out of line.
    for cell in &mut cells[..COLUMNS.len() - 1] {
        *cell = cut(cell, MAX_CELL);
    }
    cells
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
        if !probe::steering_in_place(pins, generation) {
            // Still fail closed (the drop-ins only ask that): said, not
            // failed, since a generation from before slots has none.
            eprintln!(
                "warning: the slot steering of generation {generation} is not pinned: redirected connects are refused until metaproxy runs again"
            );
        }
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

    fn connection(cgroup: &str, container: &str) -> Connection {
        Connection {
            time: "2026-01-02T03:04:05.678Z".into(),
            client: "172.17.0.2:40000".into(),
            cgroup_id: Some(4242),
            cgroup: Some(cgroup.into()),
            pid: Some(77),
            comm: Some("aws".into()),
            original_dst: Some("169.254.169.254:80".into()),
            via: None,
            container_id: Some("0123456789abcdef".repeat(4)),
            container: Some(container.into()),
            role: Some("arn:aws:iam::123456789012:role/ci-deploy".into()),
            request: Some("GET /latest/meta-data/iam/security-credentials/ci-deploy".into()),
            outcome: crate::ops::connlog::Outcome::Served,
            reason: None,
        }
    }

    /// Where each of `cells` begins in `line` (and ends, for the columns
    /// that align right), in characters, each looked for after the last.
    fn columns(line: &str, cells: &[String]) -> Vec<usize> {
        let chars: Vec<char> = line.chars().collect();
        let mut from = 0;
        cells
            .iter()
            .zip(COLUMNS)
            .map(|(cell, (_, right))| {
                let cell: Vec<char> = cell.chars().collect();
                let at = (from..chars.len())
                    .find(|&i| chars[i..].starts_with(&cell))
                    .unwrap_or_else(|| panic!("{cell:?} not in {line:?}"));
                from = at + cell.len();
                if right {
                    from
                } else {
                    at
                }
            })
            .collect()
    }

    #[test]
    fn the_connection_table_sizes_its_columns_and_cuts_long_values() {
        let long = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{}.scope",
            "7".repeat(36),
            "ab".repeat(32)
        );
        let conns = [
            connection(&long, "runner-abc123-project-42-concurrent-0-build"),
            connection("/docker/abc", "job"),
        ];
        let table = table(&conns);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        let starts = columns(lines[0], &header());
        for (line, conn) in lines[1..].iter().zip(&conns) {
            assert_eq!(columns(line, &cells(conn)), starts, "\n{table}");
        }
        // The long path keeps its start and end, in MAX_CELL characters.
        let cgroup = &cells(&conns[0])[2];
        assert_eq!(cgroup.chars().count(), MAX_CELL, "{cgroup}");
        assert!(cgroup.starts_with("/kubepods.slice/"), "{cgroup}");
        assert!(cgroup.ends_with("abababab.scope"), "{cgroup}");
        assert!(cgroup.contains('…'), "{cgroup}");
        // Short values are whole, and the columns no wider than needed.
        assert_eq!(cells(&conns[1])[2], "/docker/abc");
        assert!(lines.iter().all(|l| l.chars().count() < 300), "{table}");
        // Followed, the columns are fixed: a wide value is cut to fit.
        let followed = [
            table_line(&header(), &FOLLOW_WIDTHS),
            table_line(&cells(&conns[0]), &FOLLOW_WIDTHS),
        ];
        let starts = |l: &str| {
            let mut at = 0;
            FOLLOW_WIDTHS[..FOLLOW_WIDTHS.len() - 1]
                .iter()
                .map(|w| {
                    at += w + 1;
                    l.chars().nth(at - 1)
                })
                .collect::<Vec<_>>()
        };
        assert!(
            starts(&followed[1]).iter().all(|c| *c == Some(' ')),
            "{followed:#?}"
        );
        assert_eq!(starts(&followed[0]), starts(&followed[1]));
        assert_eq!(cut("abcdef", 5), "ab…ef");
        assert_eq!(cut("abcdef", 6), "abcdef");
    }

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
