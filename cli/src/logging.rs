//! Log output of the daemons (`hostbind-proxy run`, `hostbind-agent run`), on stderr:
//! human-readable text on a terminal; one JSON object per line when stderr is not a terminal or
//! goes to journald (systemd sets `JOURNAL_STREAM` to stderr's `DEVICE:INODE`), so log
//! collectors get structured fields. `HOSTBIND_LOG_FORMAT=text|json` overrides the choice;
//! `RUST_LOG` overrides the level.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

/// Environment variable that forces the format: `text` or `json`.
pub const FORMAT_ENV: &str = "HOSTBIND_LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (with colours on a terminal).
    Text,
    /// One JSON object per line, fields at the top level.
    Json,
}

/// What [`choose`] bases its decision on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Surroundings {
    /// The value of [`FORMAT_ENV`], if set.
    pub forced: Option<String>,
    /// Whether stderr is the journal stream systemd announced in `JOURNAL_STREAM`.
    pub journal: bool,
    /// Whether stderr is a terminal.
    pub terminal: bool,
}

impl Surroundings {
    /// Looks at this process's environment and stderr.
    pub fn detect() -> Surroundings {
        let stderr = std::io::stderr();
        Surroundings {
            forced: std::env::var(FORMAT_ENV).ok(),
            journal: std::env::var("JOURNAL_STREAM")
                .ok()
                .is_some_and(|v| stderr_is(&v)),
            terminal: stderr.is_terminal(),
        }
    }
}

/// Whether stderr is the file `DEVICE:INODE` names (the format of `JOURNAL_STREAM`).
fn stderr_is(dev_ino: &str) -> bool {
    let Some((dev, ino)) = dev_ino.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// The format for these surroundings: a valid [`FORMAT_ENV`] wins, then journald means JSON,
/// a terminal text, anything else (a file, a pipe) JSON.
pub fn choose(s: &Surroundings) -> LogFormat {
    match s.forced.as_deref().map(str::trim) {
        Some("json") => return LogFormat::Json,
        Some("text") => return LogFormat::Text,
        _ => {}
    }
    if s.journal || !s.terminal {
        LogFormat::Json
    } else {
        LogFormat::Text
    }
}

/// Installs the global tracing subscriber writing to stderr at `default_level` (a filter
/// directive such as "info"; `RUST_LOG` overrides it) in the format [`choose`] picks. Does
/// nothing if a subscriber is installed already. Returns the format used.
pub fn init(default_level: &str) -> LogFormat {
    let s = Surroundings::detect();
    let format = choose(&s);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.with_ansi(s.terminal).try_init(),
    };
    if let Some(bad) = s
        .forced
        .as_deref()
        .filter(|v| !matches!(v.trim(), "json" | "text"))
    {
        tracing::warn!("{FORMAT_ENV}={bad} is not 'text' or 'json'; ignoring it");
    }
    format
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(forced: Option<&str>, journal: bool, terminal: bool) -> Surroundings {
        Surroundings {
            forced: forced.map(str::to_string),
            journal,
            terminal,
        }
    }

    #[test]
    fn terminal_gets_text_everything_else_json() {
        assert_eq!(choose(&s(None, false, true)), LogFormat::Text);
        assert_eq!(choose(&s(None, false, false)), LogFormat::Json);
        assert_eq!(choose(&s(None, true, false)), LogFormat::Json);
        // journald wins over a terminal (systemd may also hand a tty to a service).
        assert_eq!(choose(&s(None, true, true)), LogFormat::Json);
    }

    #[test]
    fn the_environment_overrides() {
        assert_eq!(choose(&s(Some("text"), true, false)), LogFormat::Text);
        assert_eq!(choose(&s(Some("json"), false, true)), LogFormat::Json);
        assert_eq!(choose(&s(Some(" json\n"), false, true)), LogFormat::Json);
        // Unknown values are ignored (and warned about by `init`).
        assert_eq!(choose(&s(Some("xml"), false, true)), LogFormat::Text);
    }

    #[test]
    fn journal_stream_must_name_stderr() {
        assert!(!stderr_is("garbage"));
        assert!(!stderr_is("1:x"));
        assert!(!stderr_is("0:0"));
        let fd = std::io::stderr().as_fd().try_clone_to_owned().unwrap();
        let m = std::fs::File::from(fd).metadata().unwrap();
        assert!(stderr_is(&format!("{}:{}", m.dev(), m.ino())));
    }
}
