//! `[alerts]`: where alerts go, and how deliveries are retried.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::channel::Channel;
use crate::problem::{Problem, http_url, positive};
use crate::secret::SecretRef;

/// `[alerts]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Alertmanager's base URL (`POST {url}/api/v2/alerts`).
    pub alertmanager_url: Option<String>,
    /// A JSON webhook, signed with HMAC-SHA256 of `webhook_secret`.
    pub webhook_url: Option<String>,
    /// The webhook's signing secret (`env:VAR` or `file:PATH`).
    pub webhook_secret: Option<SecretRef>,
    /// A Slack-compatible incoming webhook.
    pub slack_webhook_url: Option<String>,
    /// First retry delay after a failed delivery (doubling up to `retry_max`).
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// How often firing alerts are re-posted to Alertmanager (keep it below its
    /// `resolve_timeout`, 5 minutes by default).
    #[serde(with = "humantime_serde")]
    pub repost_interval: Duration,
    /// Per-request timeout of a delivery.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            alertmanager_url: None,
            webhook_url: None,
            webhook_secret: None,
            slack_webhook_url: None,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            repost_interval: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// A channel that cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AlertsConfigError(pub Problem);

impl AlertsConfig {
    /// Everything wrong with the section.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out: Vec<Problem> = [
            ("alerts.alertmanager_url", &self.alertmanager_url),
            ("alerts.webhook_url", &self.webhook_url),
            ("alerts.slack_webhook_url", &self.slack_webhook_url),
        ]
        .into_iter()
        .filter_map(|(key, url)| {
            http_url(
                key,
                "is",
                url.as_deref()?,
                "use http(s)://HOST[:PORT][/PATH]",
            )
        })
        .collect();
        if self.webhook_url.is_some() {
            out.extend(self.webhook_secret().err().map(|e| e.0));
        }
        out.extend(
            [
                ("alerts.retry_initial", self.retry_initial, "1s"),
                ("alerts.retry_max", self.retry_max, "5m"),
                ("alerts.repost_interval", self.repost_interval, "60s"),
                ("alerts.request_timeout", self.request_timeout, "10s"),
            ]
            .into_iter()
            .filter_map(|(k, d, ex)| positive(k, d, ex)),
        );
        out
    }

    /// The webhook's signing secret, resolved.
    fn webhook_secret(&self) -> Result<Vec<u8>, AlertsConfigError> {
        let problem = |what: String| {
            AlertsConfigError(Problem::new(
                "alerts.webhook_secret",
                what,
                "set alerts.webhook_secret = \"env:VAR\" or \"file:PATH\" naming the signing secret receivers check",
            ))
        };
        let secret = self
            .webhook_secret
            .as_ref()
            .ok_or_else(|| problem("alerts.webhook_url is set but no signing secret is".into()))?
            .resolve()
            .map_err(|e| problem(e.to_string()))?;
        Ok(secret.expose().as_bytes().to_vec())
    }

    /// The configured channels.
    pub fn channels(&self) -> Result<Vec<Channel>, AlertsConfigError> {
        let mut out = Vec::new();
        if let Some(url) = &self.alertmanager_url {
            out.push(Channel::Alertmanager {
                url: url.trim_end_matches('/').to_owned(),
            });
        }
        if let Some(url) = &self.webhook_url {
            out.push(Channel::Webhook {
                url: url.clone(),
                secret: self.webhook_secret()?,
            });
        }
        if let Some(url) = &self.slack_webhook_url {
            out.push(Channel::Slack { url: url.clone() });
        }
        Ok(out)
    }
}
