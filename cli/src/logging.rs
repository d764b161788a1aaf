//! Log output of the daemons (`hostbind-proxy run`, `hostbind-agent run`), on stderr:
//! human-readable text on a terminal; one JSON object per line ([`JsonLines`]) when stderr is
//! not a terminal or goes to journald (systemd sets `JOURNAL_STREAM` to stderr's
//! `DEVICE:INODE`), so log collectors get structured fields. `HOSTBIND_LOG_FORMAT=text|json`
//! overrides the choice. hostbind's crates log at the configured level, other crates at `warn`
//! ([`default_filter`]); `RUST_LOG` overrides both. In JSON mode every line is JSON: the error a
//! daemon stops with goes through the log too ([`report_fatal`]).

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
    /// One JSON object per line, fields at the top level ([`JsonLines`]).
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

/// The filter when `RUST_LOG` is not set: hostbind's own crates (targets `hostbind*`) at
/// `level`, every other crate (the TPM stack, hyper, libvirt bindings, ...) at `warn` (or
/// `error` when `level` is `error`): their INFO lines are for their developers, not for admins.
pub fn default_filter(level: &str) -> String {
    let level = level.trim();
    let others = if level.eq_ignore_ascii_case("error") || level.eq_ignore_ascii_case("off") {
        level
    } else {
        "warn"
    };
    format!("{others},hostbind={level}")
}

/// Installs the global tracing subscriber writing to stderr at `default_level` for hostbind's
/// crates (see [`default_filter`]; `RUST_LOG` overrides it) in the format [`choose`] picks.
/// Does nothing if a subscriber is installed already. Returns the format used.
pub fn init(default_level: &str) -> LogFormat {
    let s = Surroundings::detect();
    let format = choose(&s);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter(default_level)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.event_format(JsonLines).try_init(),
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

/// The ENVIRONMENT entries of a daemon's man page for its log (the same for every binary).
pub fn man_environment() -> Vec<crate::docs::Entry> {
    use crate::docs::Entry;
    vec![
        Entry::new(FORMAT_ENV, "text or json: the format of the log of run on stderr. By default JSON (one object per line, fatal errors included) under systemd and when stderr is a file or a pipe, text on a terminal."),
        Entry::new("RUST_LOG", "A log filter overriding the default level (info for hostbind, warn for the libraries it uses), e.g. debug or info,tss_esapi=debug."),
        Entry::new("JOURNAL_STREAM", "Set by systemd; when it names stderr, the log is JSON."),
    ]
}

/// Whether a fatal error of this process is written as a JSON log line rather than as text:
/// for a daemon (`run`) whenever its log is JSON ([`choose`]); for the other commands, whose
/// stderr is for a person, only when stderr is the journal or `HOSTBIND_LOG_FORMAT=json`.
pub fn errors_as_json(daemon: bool, s: &Surroundings) -> bool {
    match s.forced.as_deref().map(str::trim) {
        Some("json") => true,
        Some("text") => false,
        _ if daemon => choose(s) == LogFormat::Json,
        _ => s.journal,
    }
}

/// Reports the error that ends the process: as an ERROR log line (JSON, like every other line
/// of the log) when [`errors_as_json`], else as `{text_prefix}{message}` on stderr.
pub fn report_fatal(daemon: bool, text_prefix: &str, message: &str) {
    if errors_as_json(daemon, &Surroundings::detect()) {
        init("info");
        tracing::error!(target: "hostbind", "{message}");
    } else {
        eprintln!("{text_prefix}{message}");
    }
}

/// Formats each event as one JSON object on one line: `timestamp` (RFC 3339, UTC), `level`,
/// `target`, `message`, then the event's fields at the top level. A field whose text is a JSON
/// object (e.g. `event = %serde_json::to_string(&ev)`) is kept as a nested object, not as a
/// string holding JSON. Fields about the `log` crate's call site (`log.file`, ...) are left out.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use tracing_log::NormalizeEvent;
        use tracing_subscriber::fmt::time::FormatTime;
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut ts = String::new();
        tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut tracing_subscriber::fmt::format::Writer::new(&mut ts))?;
        let mut fields = FieldMap::default();
        event.record(&mut fields);
        let mut line = serde_json::Map::new();
        line.insert("timestamp".into(), ts.into());
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        if let Some(m) = fields.message.take() {
            line.insert("message".into(), m.into());
        }
        for (k, v) in fields.fields {
            let k = if line.contains_key(&k) {
                format!("field.{k}")
            } else {
                k
            };
            line.insert(k, v);
        }
        let text = serde_json::to_string(&line).map_err(|_| std::fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// The fields of one event, as JSON values.
#[derive(Default)]
struct FieldMap {
    message: Option<String>,
    fields: Vec<(String, serde_json::Value)>,
}

impl FieldMap {
    fn put(&mut self, field: &tracing::field::Field, v: serde_json::Value) {
        let name = field.name();
        if name.starts_with("log.") {
            return;
        }
        if name == "message" {
            self.message = Some(match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            });
            return;
        }
        self.fields.push((name.to_string(), v));
    }

    /// A text value; one that is a JSON object stays an object.
    fn text(s: String) -> serde_json::Value {
        if s.starts_with('{') {
            if let Ok(v @ serde_json::Value::Object(_)) = serde_json::from_str(&s) {
                return v;
            }
        }
        serde_json::Value::String(s)
    }
}

impl tracing::field::Visit for FieldMap {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.put(field, FieldMap::text(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.put(field, FieldMap::text(value.to_string()));
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        self.put(field, value.to_string().into());
    }
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

    /// Captures what a JSON subscriber with `filter` writes while `f` runs.
    fn capture(filter: &str, f: impl FnOnce()) -> Vec<serde_json::Value> {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let b2 = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(move || b2.clone())
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    #[test]
    fn json_lines_nest_json_objects_and_keep_types() {
        let ev = serde_json::json!({"event": "connected", "host_id": "ab"}).to_string();
        let none: Option<&str> = None;
        let lines = capture("trace", || {
            tracing::info!(target: "hostbind_agent::agent", event = %ev, n = 3u64, ok = true, last_host = none, "event");
            tracing::warn!(target: "hostbind_agent::agent", text = "{not json", "plain {}", 1);
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        let l = &lines[0];
        assert_eq!(l["level"], "INFO");
        assert_eq!(l["target"], "hostbind_agent::agent");
        assert_eq!(l["message"], "event");
        assert_eq!(l["event"]["event"], "connected", "{l}");
        assert_eq!(l["n"], 3);
        assert_eq!(l["ok"], true);
        assert!(l.get("last_host").is_none(), "{l}");
        assert!(
            humantime::parse_rfc3339(l["timestamp"].as_str().unwrap()).is_ok(),
            "{l}"
        );
        assert_eq!(lines[1]["text"], "{not json");
        assert_eq!(lines[1]["message"], "plain 1");
    }

    #[test]
    fn other_crates_are_quiet_below_warn_by_default() {
        assert_eq!(default_filter("info"), "warn,hostbind=info");
        assert_eq!(default_filter("trace"), "warn,hostbind=trace");
        assert_eq!(default_filter("error"), "error,hostbind=error");
        let lines = capture(&default_filter("debug"), || {
            tracing::info!(target: "tss_esapi::context", "Flushing handle 1");
            tracing::warn!(target: "tss_esapi::context", "something odd");
            tracing::debug!(target: "hostbind_proxy::daemon", "ours");
        });
        let msgs: Vec<&str> = lines
            .iter()
            .map(|l| l["message"].as_str().unwrap())
            .collect();
        assert_eq!(msgs, ["something odd", "ours"]);
    }

    #[test]
    fn fatal_errors_follow_the_log_format() {
        // A daemon logging JSON (not a terminal) reports its fatal error as JSON.
        assert!(errors_as_json(true, &s(None, false, false)));
        assert!(!errors_as_json(true, &s(None, false, true)));
        // Commands for people: text, unless the journal or the environment says JSON.
        assert!(!errors_as_json(false, &s(None, false, false)));
        assert!(errors_as_json(false, &s(None, true, false)));
        assert!(errors_as_json(false, &s(Some("json"), false, true)));
        assert!(!errors_as_json(true, &s(Some("text"), true, false)));
    }
}
