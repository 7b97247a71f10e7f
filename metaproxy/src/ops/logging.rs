//! Logging: `tracing` to stderr, text or JSON. `METAPROXY_LOG` (or
//! `RUST_LOG`) sets the filter. The kernel programs' aya-log records arrive
//! through the `log` bridge.
//!
//! Lines (the audit lines of issued credentials among them) are written by
//! a thread of their own: a slow journald or a full pipe never holds a
//! request. If that writer falls too far behind, lines are dropped and
//! counted ([`dropped_lines`], the `metaproxy_log_lines_dropped_total`
//! metric), never silently.
//!
//! A bare level (`METAPROXY_LOG=trace`) applies to metaproxy's own crates
//! only; everything else stays at `warn` unless named
//! (`METAPROXY_LOG=debug,hyper=debug`). The AWS SDK's trace output, for one,
//! carries the daemon's own IMDS token and request signatures.

use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines the writer had to drop.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Log lines dropped so far because the writer fell behind.
pub fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |c| u64::try_from(c.dropped_lines()).unwrap_or(u64::MAX))
}

/// The filter when none is given.
const DEFAULT: &str = "info";
/// The level for crates the admin did not name.
const OTHERS: &str = "warn";

/// Sets up logging. Keep the guard until exit: dropping it flushes the
/// lines still queued.
#[must_use = "dropping the guard stops the log writer"]
/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init(format: LogFormat) -> WorkerGuard {
    let given = std::env::var("METAPROXY_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| DEFAULT.into());
    let filter = EnvFilter::try_new(scoped(&given)).unwrap_or_else(|e| {
        eprintln!("metaproxy: METAPROXY_LOG {given:?}: {e}; using {DEFAULT:?}");
        EnvFilter::new(scoped(DEFAULT))
    });
    // Colour only for a person at a terminal: journald and log files get
    // plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .thread_name("metaproxy-log")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        // One object per line: `timestamp`, `level`, `target`, `fields`
        // (`message` and the event's own fields) and `span`s, as
        // tracing-subscriber names them.
        LogFormat::Json => builder.json().init(),
    }
    guard
}

/// A value for a log line that someone else wrote (a container's name, a
/// comm, a cgroup path, a reason quoting them): control and format
/// characters are escaped (see [`is_hidden`]), so nobody can forge log
/// lines or terminal escapes through it, nor make it read otherwise than
/// it is stored.
#[derive(Debug, Clone, Copy)]
pub struct Clean<'a>(pub &'a str);

/// Whether `c` changes how text around it shows rather than showing
/// itself: control characters (C0, DEL, C1), and Unicode's format
/// characters (general category Cf: bidi embeddings, overrides and
/// isolates such as U+202E and U+2066-U+2069, zero-width U+200B-U+200F,
/// U+FEFF, tags) and line and paragraph separators (U+2028, U+2029).
/// Reordered by a terminal or an editor, `job-\u{202e}txt.exe` reads as
/// `job-exe.txt`.
pub fn is_hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{ad}'
                | '\u{600}'..='\u{605}'
                | '\u{61c}'
                | '\u{6dd}'
                | '\u{70f}'
                | '\u{890}'..='\u{891}'
                | '\u{8e2}'
                | '\u{180e}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206f}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{110bd}'
                | '\u{110cd}'
                | '\u{13430}'..='\u{1343f}'
                | '\u{1bca0}'..='\u{1bca3}'
                | '\u{1d173}'..='\u{1d17a}'
                | '\u{e0001}'
                | '\u{e0020}'..='\u{e007f}'
        )
}

impl std::fmt::Display for Clean<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        for c in self.0.chars() {
            if is_hidden(c) {
                for e in c.escape_default() {
                    f.write_char(e)?;
                }
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// Rewrites bare levels in `filter` to apply to metaproxy's crates only
/// (the `metaproxy` target prefix covers the kernel programs' records too).
pub fn scoped(filter: &str) -> String {
    let mut directives: Vec<String> = Vec::new();
    let names_ours = filter.split(',').any(|d| d.trim().starts_with("metaproxy"));
    let mut others_named = false;
    for d in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !d.contains('=') && !d.contains('[') && !d.contains("::");
        if !bare {
            directives.push(d.to_string());
            continue;
        }
        if !names_ours {
            directives.push(format!("metaproxy={d}"));
        }
        others_named = true;
    }
    if others_named || !directives.iter().any(|d| !d.contains('=')) {
        directives.insert(0, OTHERS.to_string());
    }
    directives.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            Clean("job\n2026-11-26T00:00:00Z INFO forged\x1b[31m").to_string(),
            "job\\n2026-11-26T00:00:00Z INFO forged\\u{1b}[31m"
        );
        assert_eq!(Clean("plain-name_1").to_string(), "plain-name_1");
    }

    #[test]
    fn bidi_and_other_format_characters_are_escaped() {
        assert_eq!(
            Clean("job-\u{202e}txt.exe").to_string(),
            "job-\\u{202e}txt.exe"
        );
        for c in [
            '\u{202a}',
            '\u{202b}',
            '\u{202c}',
            '\u{202d}',
            '\u{202e}',
            '\u{2066}',
            '\u{2067}',
            '\u{2068}',
            '\u{2069}',
            '\u{200b}',
            '\u{200c}',
            '\u{200d}',
            '\u{200e}',
            '\u{200f}',
            '\u{feff}',
            '\u{2028}',
            '\u{2029}',
            '\u{61c}',
            '\u{ad}',
            '\u{e0041}',
            '\u{85}',
        ] {
            assert!(is_hidden(c), "{:x}", c as u32);
            let cleaned = Clean(&format!("a{c}b")).to_string();
            assert_eq!(cleaned, format!("a\\u{{{:x}}}b", c as u32));
        }
        // What shows as itself stays: letters of any script, emoji, marks.
        for s in ["ci-déploiement", "名前", "Ωmega", "job 🚀", "e\u{301}"] {
            assert_eq!(Clean(s).to_string(), s);
        }
    }

    #[test]
    fn bare_levels_cover_only_our_crates() {
        assert_eq!(scoped("trace"), "warn,metaproxy=trace");
        assert_eq!(scoped("info"), "warn,metaproxy=info");
        assert_eq!(scoped("info,metaproxy=debug"), "warn,metaproxy=debug");
        assert_eq!(
            scoped("debug,hyper=debug"),
            "warn,metaproxy=debug,hyper=debug"
        );
        assert_eq!(scoped("aws_config=trace"), "warn,aws_config=trace");
        for f in ["trace", "info,metaproxy=debug", "debug,hyper=debug"] {
            assert!(EnvFilter::try_new(scoped(f)).is_ok(), "{f}");
        }
    }
}
