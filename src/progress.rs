//! What a running build shows: a live spinner on a terminal (`--progress auto`), plain lines
//! (`plain`, or auto without a terminal), or one JSON event per line (`json`, for CI systems
//! and wrappers), plus the build log file and dib's timing tables.
//!
//! ```text
//! executor ──step_start/step_end/restore/output/…──► Reporter ──auto──► spinner + lines (stderr)
//!          ──hook output lines──────────────────────►          ──plain─► lines (stderr)
//!                                                               ──json──► events (stderr)
//!                                                               └──────► --logfile (timestamped)
//! ```
//!
//! # JSON events (`--progress json`), schema version 1
//!
//! One object per line on stderr; every object has `"v": 1` and `"event"`. Log messages are
//! events too (`"log"`), so every line parses. New fields may be added within a version; a
//! field is never removed or changes meaning without a new `v`.
//!
//! | event | fields |
//! |---|---|
//! | `build-start` | `image`, `types`, `elements` |
//! | `step-start` | `step` (`phase/hook`), `key` |
//! | `step-end` | `step`, `key`, `state` (`cached`, `run`, `failed`), `seconds`, `bytes_packed` (compressed layer bytes written, 0 when cached) |
//! | `restore` | `steps` (how many cached steps were applied), `bytes` (compressed), `seconds` |
//! | `output` | `type`, `path`, `state` (`unchanged`, `cached`, `written`), `seconds` |
//! | `hook-output` | `step`, `line` |
//! | `log` | `level` (`error`, `warn`, `info`, `debug`, `trace`), `message` |
//! | `build-end` | `outcome` (`ok`, `failed`, `cancelled`), `exit`, `seconds`, `steps`, `cached` |

use crate::phase::Phase;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// The progress bar on screen, if any: log lines are written while it is hidden.
static ACTIVE_BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Registers (or, with None, forgets) the bar that log output must be drawn around.
fn set_active_bar(bar: Option<ProgressBar>) {
    let mut guard = ACTIVE_BAR.lock().unwrap_or_else(|p| p.into_inner());
    *guard = bar;
}

/// The bar log output must be drawn around, if one is on screen.
pub fn active_bar() -> Option<ProgressBar> {
    ACTIVE_BAR.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The version of the JSON event schema.
pub const EVENT_SCHEMA: u32 = 1;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// A spinner on a terminal, plain lines otherwise.
    #[default]
    Auto,
    /// Plain lines.
    Plain,
    /// One JSON event per line.
    Json,
}

impl Mode {
    pub const NAMES: [&'static str; 3] = ["auto", "plain", "json"];

    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "auto" => Some(Mode::Auto),
            "plain" => Some(Mode::Plain),
            "json" => Some(Mode::Json),
            _ => None,
        }
    }
}

/// One progress event (see the module docs for the schema).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event<'a> {
    BuildStart {
        image: &'a str,
        types: Vec<&'a str>,
        elements: &'a [String],
    },
    StepStart {
        step: &'a str,
        key: &'a str,
    },
    StepEnd {
        step: &'a str,
        key: &'a str,
        state: &'a str,
        seconds: f64,
        bytes_packed: u64,
    },
    Restore {
        steps: usize,
        bytes: u64,
        seconds: f64,
    },
    Output {
        r#type: &'a str,
        path: &'a str,
        state: &'a str,
        seconds: f64,
    },
    HookOutput {
        step: &'a str,
        line: &'a str,
    },
    Log {
        level: &'a str,
        message: &'a str,
    },
    BuildEnd {
        outcome: &'a str,
        exit: u8,
        seconds: f64,
        steps: usize,
        cached: usize,
    },
}

/// The event as one JSON line (with the schema version).
pub fn event_line(event: &Event) -> String {
    #[derive(Serialize)]
    struct Versioned<'a, 'b> {
        v: u32,
        #[serde(flatten)]
        event: &'b Event<'a>,
    }
    serde_json::to_string(&Versioned {
        v: EVENT_SCHEMA,
        event,
    })
    .unwrap_or_else(|e| {
        format!("{{\"v\":1,\"event\":\"log\",\"level\":\"error\",\"message\":\"{e}\"}}")
    })
}

/// The build's live display and its log file.
pub struct Reporter {
    bar: ProgressBar,
    mode: Mode,
    tty: bool,
    quiet: bool,
    log: Mutex<Option<File>>,
}

impl Reporter {
    /// `log`: the per-build log file (appended to). `quiet`: hook output goes to the log only.
    /// Also installs the SIGINT/SIGTERM handlers ([`crate::cancel`]).
    pub fn new(log: Option<&Path>, quiet: bool, mode: Mode) -> io::Result<Reporter> {
        let file = match log {
            Some(p) => Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("cannot open the build log {}: {e}", p.display()),
                        )
                    })?,
            ),
            None => None,
        };
        let tty = mode == Mode::Auto && io::stderr().is_terminal();
        let bar = if tty {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
                bar.set_style(style);
            }
            bar
        } else {
            ProgressBar::hidden()
        };
        crate::cancel::install_handlers();
        if tty {
            set_active_bar(Some(bar.clone()));
        }
        Ok(Reporter {
            bar,
            mode,
            tty,
            quiet,
            log: Mutex::new(file),
        })
    }

    /// A reporter that shows nothing (for `plan` and tests).
    pub fn silent() -> Reporter {
        Reporter {
            bar: ProgressBar::hidden(),
            mode: Mode::Plain,
            tty: false,
            quiet: true,
            log: Mutex::new(None),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Emits an event (json mode) and logs it.
    pub fn event(&self, event: &Event) {
        if self.mode == Mode::Json && !self.quiet {
            eprintln!("{}", event_line(event));
        }
    }

    /// Shows which hook runs now.
    pub fn start_hook(&self, phase: Phase, hook: &str, element: &str) {
        self.bar.set_message(format!("{phase}/{hook} ({element})"));
        if self.tty {
            self.bar.enable_steady_tick(Duration::from_millis(120));
        }
    }

    /// A status message for the terminal (unless quiet or json) and the log.
    pub fn println(&self, msg: &str) {
        if self.mode != Mode::Json {
            self.display(msg);
        }
        self.log_line(msg);
    }

    /// A line of hook output of `step`, without prefix.
    pub fn hook_line(&self, step: &str, line: &str) {
        let shown = format!("[{step}] {line}");
        if !self.quiet {
            match self.mode {
                Mode::Json => self.event(&Event::HookOutput { step, line }),
                _ => self.display(&shown),
            }
        }
        self.log_line(&shown);
    }

    /// A timing table (not in json mode: events carry the times).
    pub fn table(&self, title: &str, rows: &[(String, f64)]) {
        let t = timing_table(title, rows);
        if self.mode != Mode::Json && !self.quiet {
            self.display(t.trim_end());
        }
        self.log_line(t.trim_end());
    }

    fn display(&self, line: &str) {
        if self.quiet {
            return;
        }
        if self.tty {
            self.bar.println(line);
        } else {
            eprintln!("{line}");
        }
    }

    fn log_line(&self, line: &str) {
        let mut guard = match self.log.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(file) = guard.as_mut() {
            let stamp = humantime::format_rfc3339_millis(SystemTime::now());
            if let Err(e) = writeln!(file, "{stamp} {line}") {
                tracing::warn!("cannot write to the build log: {e}; logging stops");
                *guard = None;
            }
        }
    }

    /// Clears the spinner.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
        if self.tty {
            set_active_bar(None);
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.finish();
    }
}

/// dib-run-parts' PROFILING table: one row per script, name padded to 40, seconds `%10.3f`.
pub fn timing_table(title: &str, rows: &[(String, f64)]) -> String {
    let mut s = String::new();
    s.push_str("----------------------- PROFILING -----------------------\n\n");
    s.push_str(&format!("Target: {title}\n\n"));
    s.push_str(&format!("{:<40} {:>9}\n", "Script", "Seconds"));
    s.push_str(&format!(
        "{:<40} {:>9}\n",
        "---------------------------------------", "----------"
    ));
    s.push('\n');
    for (name, secs) in rows {
        s.push_str(&format!("{name:<40} {secs:>10.3}\n"));
    }
    s.push('\n');
    s.push_str("--------------------- END PROFILING ---------------------\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_table_matches_dib_layout() {
        let t = timing_table(
            "install.d",
            &[("10-a".into(), 1.5), ("50-long-name".into(), 12.3456)],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "----------------------- PROFILING -----------------------"
        );
        assert_eq!(lines[2], "Target: install.d");
        assert_eq!(lines[4], format!("Script{}   Seconds", " ".repeat(34)));
        assert_eq!(lines[5], format!("{} ----------", "-".repeat(39) + " "));
        assert_eq!(lines[7], format!("10-a{}      1.500", " ".repeat(36)));
        assert_eq!(lines[8].len(), 51);
        assert!(lines[8].ends_with("    12.346"));
        assert_eq!(
            lines.last().copied(),
            Some("--------------------- END PROFILING ---------------------")
        );
    }

    #[test]
    fn events_are_one_versioned_json_object_each() {
        let line = event_line(&Event::StepEnd {
            step: "install.d/50-foo",
            key: "abc",
            state: "run",
            seconds: 1.5,
            bytes_packed: 42,
        });
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["event"], "step-end");
        assert_eq!(v["step"], "install.d/50-foo");
        assert_eq!(v["bytes_packed"], 42);
        assert!(!line.contains('\n'));
        let out = event_line(&Event::Output {
            r#type: "tar",
            path: "x.tar",
            state: "written",
            seconds: 0.1,
        });
        assert!(out.contains("\"type\":\"tar\""), "{out}");
    }
}
