//! Structured logs. JSON by default because agents run unattended and their logs
//! are shipped and searched by machines; `text` is for a developer's terminal.
//!
//! Both tiers read their `[log]` section into the one [`LogConfig`], so the
//! keys, their defaults and their checks cannot drift apart between them.

use serde::Deserialize;
use tracing_subscriber::EnvFilter;

use crate::config::Issues;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

/// Operators raise it with `RUST_LOG` when they need more.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// The `[log]` section of both tiers (`DCS_EDGE_LOG__LEVEL`,
/// `DCS_AGG_LOG__FORMAT`, ...). Both tiers document the same defaults
/// (`format = "json"`, `level = "info"`), so one `Default` serves both; a
/// tier that ever needs another default sets it in its own `Config`'s
/// `Default`, not here.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `json` for log shippers, `text` for a terminal.
    pub format: LogFormat,
    /// A tracing filter: `info`, `debug`, or e.g. `dcs_edge=debug,info`.
    /// `RUST_LOG`, when set, wins over it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Json,
            level: DEFAULT_LOG_LEVEL.into(),
        }
    }
}

impl LogConfig {
    /// Records an empty `log.level`: an empty filter would silence all but
    /// errors, which is never what an operator who wrote the key meant.
    pub fn check(&self, issues: &mut Issues) {
        issues.check(
            !self.level.trim().is_empty(),
            "log.level",
            "must not be empty (e.g. \"info\", or \"debug\" for more)",
        );
    }

    /// Installs the global subscriber this section describes; see [`init`].
    pub fn init(&self) {
        init(self.format, &self.level);
    }
}

/// Installs the global subscriber. `RUST_LOG` wins over `level` so an operator can
/// raise verbosity without editing the config. Calling it twice is harmless
/// (tests start several services in one process).
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        #[serde(default)]
        log: LogConfig,
    }

    fn load(env: &[(&str, &str)]) -> Result<Sample, crate::config::ConfigError> {
        crate::config::load(
            None,
            "DCS_T_",
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_are_json_at_info() {
        let s = load(&[]).unwrap();
        assert_eq!(s.log.format, LogFormat::Json);
        assert_eq!(s.log.level, "info");
        assert_eq!(s.log, LogConfig::default());
    }

    #[test]
    fn each_key_can_be_overridden_and_a_misspelt_one_is_named() {
        let s = load(&[("DCS_T_LOG__FORMAT", "text"), ("DCS_T_LOG__LEVEL", "debug")]).unwrap();
        assert_eq!(s.log.format, LogFormat::Text);
        assert_eq!(s.log.level, "debug");
        let err = load(&[("DCS_T_LOG__LEVLE", "debug")]).unwrap_err();
        assert!(err.to_string().contains("log.levle"), "{err}");
    }

    #[test]
    fn an_empty_level_is_named() {
        let mut issues = Issues::default();
        LogConfig {
            level: " ".into(),
            ..LogConfig::default()
        }
        .check(&mut issues);
        let err = issues.into_result().unwrap_err();
        assert_eq!(err.issues[0].key, "log.level");
    }
}
