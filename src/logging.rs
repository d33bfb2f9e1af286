//! Logging set-up: tracing to stderr, filtered by `-v` or `RUST_LOG`, drawn around the live
//! progress display so log lines never tear it; with `--progress json`, every log line is a
//! `log` event (see `crate::progress`), so stderr stays one JSON object per line.

use std::io::{self, IsTerminal, Write};
use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// stderr, suspending the active progress bar around each write.
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match crate::progress::active_bar() {
            Some(bar) => bar.suspend(|| io::stderr().write_all(buf))?,
            None => io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// Formats each log line as one `log` progress event.
struct JsonEvents;

#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        } else {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_string();
        } else {
            self.0.push_str(&format!(" {}={value}", field.name()));
        }
    }
}

impl<S, N> FormatEvent<S, N> for JsonEvents
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut message = Message::default();
        event.record(&mut message);
        let level = event.metadata().level().as_str().to_ascii_lowercase();
        let line = crate::progress::event_line(&crate::progress::Event::Log {
            level: &level,
            message: &message.0,
        });
        writeln!(writer, "{line}")
    }
}

/// Installs the global subscriber. `verbose` 0 shows info and up, 1 debug, 2+ trace. `json`:
/// log lines are JSON `log` events.
pub fn init(verbose: u8, json: bool) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| Stderr)
        .with_ansi(!json && io::stderr().is_terminal())
        .without_time()
        .with_target(false);
    let _ = if json {
        builder.event_format(JsonEvents).try_init()
    } else {
        builder.try_init()
    };
}
