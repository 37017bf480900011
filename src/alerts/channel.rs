//! The channels an alert is delivered to, and what each one is sent: Alertmanager's v2 API, a
//! JSON webhook signed with HMAC-SHA256, and a Slack-compatible incoming webhook.
//!
//! Flow: a stored [`Alert`] → [`Channel::request`] (pure: URL, headers, body) → [`send`].
//!
//! The webhook's body carries an `id` (subject and transition) and the headers
//! `X-Keywarden-Timestamp` (Unix seconds) and `X-Keywarden-Signature: sha256=HEX`, the
//! HMAC-SHA256 of `"{timestamp}.{body}"` under the shared secret: a receiver recomputes it, rejects
//! old timestamps and remembers ids, so a captured request cannot be replayed.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Value, json};

use super::Alert;

/// Where alerts go.
#[derive(Clone, PartialEq, Eq)]
pub enum Channel {
    /// Alertmanager (base URL).
    Alertmanager {
        /// Base URL.
        url: String,
    },
    /// A signed JSON webhook.
    Webhook {
        /// URL.
        url: String,
        /// HMAC key.
        secret: Vec<u8>,
    },
    /// A Slack-compatible incoming webhook.
    Slack {
        /// URL.
        url: String,
    },
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret, never a URL (it may carry a token).
        f.write_str(self.label())
    }
}

/// One HTTP request to make.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// URL.
    pub url: String,
    /// Extra headers.
    pub headers: Vec<(&'static str, String)>,
    /// JSON body.
    pub body: Vec<u8>,
}

/// RFC 3339 time of Unix seconds.
fn rfc3339(unix: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The signature header value of `body` sent at `timestamp`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, &signed).as_ref())
    )
}

/// Alertmanager's representation of `alert` (firing since `starts_at`, resolved at `ends_at`).
pub fn alertmanager_alert(alert: &Alert, starts_at: i64, ends_at: Option<i64>) -> Value {
    let mut labels = serde_json::Map::new();
    for (k, v) in &alert.labels {
        labels.insert(k.clone(), json!(v));
    }
    labels.insert("alertname".into(), json!(alert.name));
    labels.insert("severity".into(), json!(alert.severity.label()));
    let mut v = json!({
        "labels": labels,
        "annotations": {
            "summary": alert.summary,
            "description": alert.description,
            "transition": alert.transition,
        },
        "startsAt": rfc3339(starts_at),
    });
    if let Some(end) = ends_at {
        v["endsAt"] = json!(rfc3339(end));
    }
    v
}

impl Channel {
    /// Metric label and log name.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Alertmanager { .. } => "alertmanager",
            Self::Webhook { .. } => "webhook",
            Self::Slack { .. } => "slack",
        }
    }

    /// The request delivering `alert` (firing since `starts_at`), sent at `now`.
    pub fn request(&self, alert: &Alert, starts_at: i64, now: i64) -> Request {
        match self {
            Self::Alertmanager { url } => {
                let ends_at = alert.resolved.then_some(now);
                Request {
                    url: format!("{url}/api/v2/alerts"),
                    headers: Vec::new(),
                    body: json!([alertmanager_alert(alert, starts_at, ends_at)])
                        .to_string()
                        .into_bytes(),
                }
            }
            Self::Webhook { url, secret } => {
                let body = json!({
                    "id": format!("{}/{}", alert.key, alert.transition),
                    "alert": alert.name,
                    "severity": alert.severity.label(),
                    "transition": alert.transition,
                    "resolved": alert.resolved,
                    "labels": alert.labels,
                    "summary": alert.summary,
                    "description": alert.description,
                    "sent_at": now,
                })
                .to_string()
                .into_bytes();
                Request {
                    url: url.clone(),
                    headers: vec![
                        ("X-Keywarden-Timestamp", now.to_string()),
                        ("X-Keywarden-Signature", signature(secret, now, &body)),
                    ],
                    body,
                }
            }
            Self::Slack { url } => {
                let mark = if alert.resolved {
                    "RESOLVED"
                } else {
                    alert.severity.label()
                };
                Request {
                    url: url.clone(),
                    headers: Vec::new(),
                    body: json!({
                        "text": format!(
                            "*[{}] {}*\n{}",
                            mark.to_uppercase(),
                            alert.summary,
                            alert.description
                        ),
                    })
                    .to_string()
                    .into_bytes(),
                }
            }
        }
    }
}

/// Sends `req`; `Err` names why it was not accepted (the caller retries).
pub async fn send(http: &reqwest::Client, req: &Request) -> Result<(), String> {
    let mut builder = http
        .post(&req.url)
        .header("content-type", "application/json")
        .body(req.body.clone());
    for (k, v) in &req.headers {
        builder = builder.header(*k, v);
    }
    let response = builder.send().await.map_err(|e| {
        // The URL may carry a token: report the error without it.
        crate::problem::one_line(&e.without_url().to_string())
    })?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered HTTP {}", status.as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::Severity;
    use std::collections::BTreeMap;

    fn alert(resolved: bool) -> Alert {
        Alert {
            key: "timelock:0xabc:0x01".into(),
            transition: if resolved { "executed" } else { "scheduled" }.into(),
            name: "GovernanceTimelockOperation".into(),
            severity: Severity::Critical,
            labels: BTreeMap::from([("timelock".to_owned(), "0xabc".to_owned())]),
            summary: "removes compose hash 0x29 (12 instances)".into(),
            description: "details".into(),
            resolved,
        }
    }

    #[test]
    fn alertmanager_gets_labels_annotations_and_an_end_once_resolved() {
        let am = Channel::Alertmanager {
            url: "http://127.0.0.1:9093".into(),
        };
        let r = am.request(&alert(false), 1_700_000_000, 1_700_000_100);
        assert_eq!(r.url, "http://127.0.0.1:9093/api/v2/alerts");
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body[0]["labels"]["alertname"],
            "GovernanceTimelockOperation"
        );
        assert_eq!(body[0]["labels"]["severity"], "critical");
        assert_eq!(body[0]["labels"]["timelock"], "0xabc");
        assert_eq!(body[0]["startsAt"], "2023-11-14T22:13:20Z");
        assert!(body[0].get("endsAt").is_none());
        let r = am.request(&alert(true), 1_700_000_000, 1_700_000_100);
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body[0]["endsAt"], "2023-11-14T22:15:00Z");
    }

    #[test]
    fn the_webhook_is_signed_over_timestamp_and_body() {
        let wh = Channel::Webhook {
            url: "http://127.0.0.1:1/hook".into(),
            secret: b"s3cret".to_vec(),
        };
        let r = wh.request(&alert(false), 1, 1_700_000_000);
        let ts = &r.headers[0].1;
        assert_eq!(ts, "1700000000");
        assert_eq!(r.headers[1].1, signature(b"s3cret", 1_700_000_000, &r.body));
        assert_ne!(r.headers[1].1, signature(b"other", 1_700_000_000, &r.body));
        assert_ne!(r.headers[1].1, signature(b"s3cret", 1_700_000_001, &r.body));
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["id"], "timelock:0xabc:0x01/scheduled");
        assert_eq!(format!("{wh:?}"), "webhook");
    }

    #[test]
    fn slack_gets_one_text() {
        let r = Channel::Slack {
            url: "http://127.0.0.1:1/slack".into(),
        }
        .request(&alert(false), 1, 2);
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert!(
            body["text"]
                .as_str()
                .unwrap()
                .starts_with("*[CRITICAL] removes compose hash")
        );
    }
}
