//! Training progress: a bar with steps, loss, tokens/s and ETA on a terminal; the same numbers
//! logged through `tracing` every `log_every` steps when stderr is not a terminal (cluster logs).
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::VecDeque;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Updates the throughput is averaged over.
const RATE_WINDOW: usize = 20;

/// Tokens per second over the last few updates.
#[derive(Debug, Default)]
pub struct Throughput {
    samples: VecDeque<(Instant, u64)>,
}

impl Throughput {
    /// Records the cumulative token count at `at`.
    pub fn record(&mut self, at: Instant, tokens: u64) {
        if self.samples.len() == RATE_WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back((at, tokens));
    }

    /// The rate between the oldest and newest sample in the window, once two exist.
    pub fn tokens_per_s(&self) -> Option<f64> {
        let (&(t0, n0), &(t1, n1)) = (self.samples.front()?, self.samples.back()?);
        let seconds = t1.duration_since(t0).as_secs_f64();
        (seconds > 0.0).then(|| n1.saturating_sub(n0) as f64 / seconds)
    }
}

/// Progress of one stage.
pub struct TrainProgress {
    stage: String,
    total_steps: u64,
    start_step: u64,
    started: Instant,
    log_every: u64,
    bar: Option<ProgressBar>,
    throughput: Throughput,
    silent: bool,
}

impl TrainProgress {
    /// A stage of `total_steps` updates, resumed at `start_step` with `start_tokens` consumed.
    pub fn new(
        stage: &str,
        start_step: u64,
        total_steps: u64,
        start_tokens: u64,
        log_every: u64,
    ) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
                .expect("the template is valid")
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(stage.to_owned());
            bar.set_position(start_step);
            bar
        });
        let mut throughput = Throughput::default();
        throughput.record(Instant::now(), start_tokens);
        Self {
            stage: stage.to_owned(),
            total_steps,
            start_step,
            started: Instant::now(),
            log_every: log_every.max(1),
            bar,
            throughput,
            silent: false,
        }
    }

    /// No bar and no log lines (data-parallel ranks other than rank 0, which reports for all).
    pub fn silent(mut self) -> Self {
        if let Some(bar) = self.bar.take() {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        self.silent = true;
        self
    }

    /// Reports that `step` updates are done, `tokens` consumed, with the latest training loss.
    pub fn update(&mut self, step: u64, tokens: u64, loss: f64) {
        self.throughput.record(Instant::now(), tokens);
        let eta = eta(
            self.started.elapsed(),
            step.saturating_sub(self.start_step),
            self.total_steps.saturating_sub(step),
        );
        let tokens_per_s = self.tokens_per_s();
        let line = status_line(loss, tokens_per_s, eta);
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(line);
            }
            None if !self.silent && (step % self.log_every == 0 || step == self.total_steps) => {
                tracing::info!(stage = %self.stage, step, total = self.total_steps, "{line}");
            }
            None => {}
        }
    }

    /// The current throughput, for the metrics record.
    pub fn tokens_per_s(&self) -> Option<f64> {
        self.throughput.tokens_per_s()
    }

    /// Prints a line above the bar (or logs it).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None if !self.silent => tracing::info!(stage = %self.stage, "{line}"),
            None => {}
        }
    }

    /// Leaves the bar in place with its final numbers.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// Progress of a long task outside training (sampling from the teacher): a bar of `unit`s with
/// rate and ETA on a terminal, nothing otherwise (the caller logs its own milestones).
pub struct TaskProgress {
    bar: Option<ProgressBar>,
}

impl TaskProgress {
    pub fn new(task: &str, total: u64, unit: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let template = format!(
                "{{prefix}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit} | \
                 {{per_sec}} | ETA {{eta}}"
            );
            let style = ProgressStyle::with_template(&template)
                .expect("the template is valid")
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(task.to_owned());
            bar
        });
        Self { bar }
    }

    pub fn inc(&self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(done);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// Remaining time from the pace of the steps done since this process started.
fn eta(elapsed: Duration, steps_done: u64, steps_left: u64) -> Option<Duration> {
    (steps_done > 0).then(|| elapsed.mul_f64(steps_left as f64 / steps_done as f64))
}

fn status_line(loss: f64, tokens_per_s: Option<f64>, eta: Option<Duration>) -> String {
    let rate = tokens_per_s.map_or_else(|| "-".to_owned(), format_rate);
    let eta = eta.map_or_else(|| "-".to_owned(), format_duration);
    format!("loss {loss:.4} | {rate} tok/s | ETA {eta}")
}

fn format_rate(rate: f64) -> String {
    match rate {
        r if r >= 1e6 => format!("{:.2}M", r / 1e6),
        r if r >= 1e3 => format!("{:.1}k", r / 1e3),
        r => format!("{r:.0}"),
    }
}

fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, min, sec) => format!("{min}m{sec:02}s"),
        (h, min, _) => format!("{h}h{min:02}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_uses_the_window() {
        let t0 = Instant::now();
        let mut rate = Throughput::default();
        assert_eq!(rate.tokens_per_s(), None);
        rate.record(t0, 0);
        assert_eq!(rate.tokens_per_s(), None);
        for i in 1..=RATE_WINDOW as u64 {
            // 1000 tok/s at first, then the window only sees 4000 tok/s.
            let tokens = if i <= 5 {
                i * 1000
            } else {
                5000 + (i - 5) * 4000
            };
            rate.record(t0 + Duration::from_secs(i), tokens);
        }
        let expected = (5000.0 + 15.0 * 4000.0 - 1000.0) / 19.0;
        assert!((rate.tokens_per_s().unwrap() - expected).abs() < 1e-9);
        rate.record(t0 + Duration::from_secs(21), 5000 + 16 * 4000);
        assert!((rate.tokens_per_s().unwrap() - (69_000.0 - 2000.0) / 19.0).abs() < 1e-9);
    }

    #[test]
    fn eta_scales_elapsed_by_steps_left() {
        assert_eq!(eta(Duration::from_secs(10), 0, 100), None);
        assert_eq!(
            eta(Duration::from_secs(10), 5, 20),
            Some(Duration::from_secs(40))
        );
    }

    #[test]
    fn formatting() {
        assert_eq!(format_duration(Duration::from_secs(59)), "59s");
        assert_eq!(format_duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(
            format_duration(Duration::from_secs(3 * 3600 + 7 * 60 + 9)),
            "3h07m"
        );
        assert_eq!(format_rate(512.4), "512");
        assert_eq!(format_rate(5120.0), "5.1k");
        assert_eq!(format_rate(2_500_000.0), "2.50M");
        assert_eq!(
            status_line(0.12345, Some(5120.0), Some(Duration::from_secs(65))),
            "loss 0.1235 | 5.1k tok/s | ETA 1m05s"
        );
        assert_eq!(
            status_line(1.0, None, None),
            "loss 1.0000 | - tok/s | ETA -"
        );
    }
}
