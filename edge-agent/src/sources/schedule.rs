//! When a source runs by itself: every interval, at the fire times of a cron
//! expression, or only when triggered (`manual`).
//!
//! # Design constraints
//! - The interval form (`schedule = "30s"`) keeps its meaning: the first run
//!   starts with the agent, the next one `interval + jitter` after the
//!   previous *start*.
//! - A cron schedule fires at wall-clock times in one time zone (UTC unless
//!   `timezone` names another), never at start-up. Each fire is delayed by a
//!   random `0..=jitter`, so many agents with one cron line do not hit a
//!   shared database in the same second.
//! - The next fire is computed from the previous fire time, not from "now",
//!   so a run that ends late neither repeats a fire nor drifts; fires missed
//!   while a run was still going are skipped (a source never runs twice at
//!   once anyway).
//! - Sleeps are cut into slices of at most [`MAX_SLEEP_SLICE`] and the wall
//!   clock is read again after each, so a clock corrected by NTP while the
//!   agent waits moves the run with it.

use std::time::Duration;

use croner::Cron;
use croner::parser::{CronParser, Seconds};
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};

/// Shorter intervals would make a source a busy loop over its files or
/// database for little gain in latency.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// How long the scheduler sleeps before it looks at the wall clock again.
pub const MAX_SLEEP_SLICE: Duration = Duration::from_secs(30);

/// Fires looked at when checking that `jitter` is shorter than the gaps
/// between fires: enough to cover an irregular expression's pattern (a
/// `0 9,17 * * 1-5` week has 10 fires).
const GAP_SAMPLE: usize = 32;

/// A parsed `schedule` (with its `timezone`).
#[derive(Debug, Clone)]
pub enum Schedule {
    Every(Duration),
    Cron(Box<CronSchedule>),
    Manual,
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Schedule::Every(a), Schedule::Every(b)) => a == b,
            (Schedule::Cron(a), Schedule::Cron(b)) => a.expression == b.expression && a.tz == b.tz,
            (Schedule::Manual, Schedule::Manual) => true,
            _ => false,
        }
    }
}

/// A cron expression and the time zone its fields are read in.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    expression: String,
    cron: Cron,
    tz: TimeZone,
}

impl Schedule {
    /// Parses `schedule` as `"manual"`, a cron expression (5 fields, or 6
    /// with seconds first) or an interval (`"30s"`, `"1h 30m"`).
    pub fn parse(schedule: &str, timezone: Option<&str>) -> Result<Schedule, ScheduleError> {
        let s = schedule.trim();
        if s == "manual" {
            return match timezone {
                None => Ok(Schedule::Manual),
                Some(_) => Err(ScheduleError::TimezoneWithoutCron),
            };
        }
        if looks_like_cron(s) {
            return CronSchedule::parse(s, timezone).map(|c| Schedule::Cron(Box::new(c)));
        }
        if timezone.is_some() {
            return Err(ScheduleError::TimezoneWithoutCron);
        }
        let every = humantime::parse_duration(s).map_err(|e| ScheduleError::Interval {
            value: s.to_owned(),
            reason: e.to_string(),
        })?;
        if every < MIN_INTERVAL {
            return Err(ScheduleError::TooShort);
        }
        Ok(Schedule::Every(every))
    }

    /// The longest `jitter` this schedule allows: its interval, or the
    /// shortest gap between the next cron fires (a longer jitter would make
    /// runs overtake the fires after them).
    pub fn max_jitter(&self) -> Option<Duration> {
        match self {
            Schedule::Every(every) => Some(*every),
            Schedule::Cron(c) => c.shortest_gap(Timestamp::now()),
            Schedule::Manual => None,
        }
    }
}

/// Five or more space-separated fields is a cron line; an interval such as
/// `"1h 30m"` has at most a few parts and no `*`.
fn looks_like_cron(s: &str) -> bool {
    s.split_whitespace().count() >= 5 || s.contains('*')
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "{value:?} is not an interval ({reason}); write e.g. \"30s\", \"5m\", a cron expression such as \"*/5 * * * *\", or \"manual\""
    )]
    Interval { value: String, reason: String },
    #[error("must be at least {}ms", MIN_INTERVAL.as_millis())]
    TooShort,
    #[error("{value:?} is not a cron expression: {reason}")]
    Cron { value: String, reason: String },
    #[error(
        "{0:?} is not a time zone name like \"UTC\" or \"Europe/Berlin\" (looked up in the system's tz database)"
    )]
    Timezone(String),
    #[error("timezone applies only to cron schedules")]
    TimezoneWithoutCron,
}

impl CronSchedule {
    pub fn parse(expression: &str, timezone: Option<&str>) -> Result<CronSchedule, ScheduleError> {
        let fields = expression.split_whitespace().count();
        let cron_error = |reason: String| ScheduleError::Cron {
            value: expression.to_owned(),
            reason,
        };
        // 5 fields (minute first) or 6 (second first); croner would also take
        // a 7th field, the year, which a collection schedule has no use for.
        if !(5..=6).contains(&fields) {
            return Err(cron_error(format!(
                "has {fields} fields; write 5 (minute hour day-of-month month day-of-week) or 6 (second first)"
            )));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expression)
            .map_err(|e| cron_error(e.to_string()))?;
        let tz = match timezone {
            None => TimeZone::UTC,
            Some(name) => {
                TimeZone::get(name).map_err(|_| ScheduleError::Timezone(name.to_owned()))?
            }
        };
        let schedule = CronSchedule {
            expression: expression.to_owned(),
            cron,
            tz,
        };
        // An expression that can never fire (`0 0 30 2 *`) is refused now
        // rather than leaving a source that silently never runs.
        if schedule.next_after(Timestamp::now()).is_none() {
            return Err(cron_error("never fires".into()));
        }
        Ok(schedule)
    }

    /// The first fire strictly after `after`, or `None` if there is none.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let from: Zoned = after.to_zoned(self.tz.clone());
        self.cron
            .find_next_occurrence(&from, false)
            .ok()
            .map(|z| z.timestamp())
    }

    /// The shortest gap between consecutive fires among the next
    /// [`GAP_SAMPLE`] after `from`.
    pub fn shortest_gap(&self, from: Timestamp) -> Option<Duration> {
        let mut previous = self.next_after(from)?;
        let mut shortest: Option<Duration> = None;
        for _ in 0..GAP_SAMPLE {
            let Some(next) = self.next_after(previous) else {
                break;
            };
            let gap = Duration::try_from(next.duration_since(previous)).unwrap_or(Duration::ZERO);
            shortest = Some(shortest.map_or(gap, |s| s.min(gap)));
            previous = next;
        }
        shortest
    }
}

/// A random delay in `0..=jitter`, drawn per run.
pub fn jitter_delay(jitter: Duration) -> Duration {
    jitter.mul_f64(fastrand::f64())
}

/// How long to wait from `now` until `at`; zero if `at` has passed.
pub fn until(at: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn intervals_and_manual_keep_their_meaning() {
        assert_eq!(
            Schedule::parse("30s", None),
            Ok(Schedule::Every(Duration::from_secs(30)))
        );
        assert_eq!(
            Schedule::parse("1h 30m", None),
            Ok(Schedule::Every(Duration::from_secs(5400)))
        );
        assert_eq!(Schedule::parse("manual", None), Ok(Schedule::Manual));
        assert_eq!(Schedule::parse("1ms", None), Err(ScheduleError::TooShort));
        assert!(matches!(
            Schedule::parse("soon", None),
            Err(ScheduleError::Interval { .. })
        ));
    }

    #[test]
    fn five_field_cron_fires_at_minute_boundaries_in_utc() {
        let Ok(Schedule::Cron(c)) = Schedule::parse("*/5 * * * *", None) else {
            panic!("a five-field expression is cron");
        };
        assert_eq!(
            c.next_after(ts("2026-12-04T10:02:17Z")),
            Some(ts("2026-12-04T10:05:00Z"))
        );
        // Strictly after: a fire time itself yields the following fire.
        assert_eq!(
            c.next_after(ts("2026-12-04T10:05:00Z")),
            Some(ts("2026-12-04T10:10:00Z"))
        );
        assert_eq!(
            c.shortest_gap(ts("2026-12-04T10:02:17Z")),
            Some(Duration::from_secs(300))
        );
    }

    #[test]
    fn six_field_cron_has_a_seconds_field() {
        let c = CronSchedule::parse("*/2 * * * * *", None).unwrap();
        assert_eq!(
            c.next_after(ts("2026-12-04T10:00:01.5Z")),
            Some(ts("2026-12-04T10:00:02Z"))
        );
        assert_eq!(
            c.shortest_gap(ts("2026-12-04T10:00:00Z")),
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn a_time_zone_moves_the_fires_and_follows_daylight_saving() {
        // 09:00 in Berlin is 08:00 UTC in winter and 07:00 UTC in summer.
        let c = CronSchedule::parse("0 9 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            c.next_after(ts("2026-12-04T00:00:00Z")),
            Some(ts("2026-12-04T08:00:00Z"))
        );
        assert_eq!(
            c.next_after(ts("2026-07-01T00:00:00Z")),
            Some(ts("2026-07-01T07:00:00Z"))
        );
        assert_eq!(
            CronSchedule::parse("0 9 * * *", Some("Mars/Olympus")).unwrap_err(),
            ScheduleError::Timezone("Mars/Olympus".into())
        );
    }

    #[test]
    fn bad_cron_expressions_are_refused_with_the_reason() {
        for bad in [
            "61 * * * *",
            "* * * * * * * *",
            "*/5 * * *",
            "0 0 30 2 *",
            "a b c d e",
        ] {
            let err = Schedule::parse(bad, None).unwrap_err();
            assert!(
                matches!(
                    err,
                    ScheduleError::Cron { .. } | ScheduleError::Interval { .. }
                ),
                "{bad}: {err}"
            );
        }
        let err = Schedule::parse("0 0 30 2 *", None).unwrap_err().to_string();
        assert!(err.contains("never fires"), "{err}");
        assert_eq!(
            Schedule::parse("30s", Some("UTC")),
            Err(ScheduleError::TimezoneWithoutCron)
        );
    }

    #[test]
    fn jitter_stays_within_its_bound_and_is_spread_over_it() {
        let bound = Duration::from_secs(10);
        let draws: Vec<Duration> = (0..2000).map(|_| jitter_delay(bound)).collect();
        assert!(draws.iter().all(|d| *d <= bound));
        assert!(draws.iter().any(|d| *d < bound / 10), "low values occur");
        assert!(
            draws.iter().any(|d| *d > bound * 9 / 10),
            "high values occur"
        );
        assert_eq!(jitter_delay(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn the_jitter_bound_is_the_interval_or_the_shortest_cron_gap() {
        assert_eq!(
            Schedule::parse("45s", None).unwrap().max_jitter(),
            Some(Duration::from_secs(45))
        );
        // Twice a day, 09:00 and 17:00: the short gap is 8 hours.
        let twice = Schedule::parse("0 9,17 * * *", None).unwrap();
        assert_eq!(twice.max_jitter(), Some(Duration::from_secs(8 * 3600)));
        assert_eq!(Schedule::Manual.max_jitter(), None);
    }

    #[test]
    fn waiting_for_a_past_time_is_no_wait() {
        let now = ts("2026-12-04T10:00:00Z");
        assert_eq!(until(ts("2026-12-04T09:59:00Z"), now), Duration::ZERO);
        assert_eq!(
            until(ts("2026-12-04T10:00:02Z"), now),
            Duration::from_secs(2)
        );
    }
}
