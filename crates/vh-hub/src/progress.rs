//! Progress bars for downloads and uploads on a terminal; nothing when stderr is not one.

use std::io::IsTerminal;

/// A byte-progress bar on stderr, or nothing when stderr is not a terminal.
pub struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    /// A bar for `total` bytes labelled `what`; hidden unless stderr is a terminal.
    pub fn new(what: &str, total: u64) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self(None);
        }
        let bar = indicatif::ProgressBar::new(total);
        let style = indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(what.to_string());
        Self(Some(bar))
    }

    /// Sets the total.
    pub fn set_total(&self, total: u64) {
        if let Some(bar) = &self.0 {
            bar.set_length(total);
        }
    }

    /// Sets the bytes done so far.
    pub fn set(&self, done: u64) {
        if let Some(bar) = &self.0 {
            bar.set_position(done);
        }
    }

    /// Adds bytes done.
    pub fn add(&self, bytes: u64) {
        if let Some(bar) = &self.0 {
            bar.inc(bytes);
        }
    }

    /// Ends the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}
