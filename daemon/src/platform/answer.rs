//! The platform's answer read: the token, its scope and lifetime (against
//! the answer's `Date`), and `Retry-After`.

use std::time::{Duration, SystemTime};

use credd_core::platform_api::{CheckedAnswer, TokenAnswer};

use super::{Grant, MAX_RETRY_AFTER, PlatformError};

/// Parses a 200 body. `now` is the platform's clock (its `Date` header).
pub fn parse_grant(body: &[u8], now: SystemTime) -> Result<Grant, PlatformError> {
    let malformed = |problem: String| PlatformError::Malformed { problem };
    let parsed: TokenAnswer<'_> = serde_json::from_slice(body).map_err(|e| {
        // serde_json's message can quote the offending value; describe the
        // error by its category and position only.
        malformed(match e.classify() {
            serde_json::error::Category::Data => format!(
                "expected a JSON object with string fields \"token\" and \"expires_at\" (line {}, column {})",
                e.line(),
                e.column()
            ),
            _ => format!(
                "not valid JSON (line {}, column {}; {} bytes)",
                e.line(),
                e.column(),
                body.len()
            ),
        })
    })?;
    let CheckedAnswer {
        token,
        expires_at,
        scope,
    } = parsed.check().map_err(|e| malformed(e.to_string()))?;
    let stated: jiff::Timestamp = expires_at.parse().map_err(|_| {
        malformed("\"expires_at\" is not an RFC 3339 timestamp such as 2026-01-01T12:00:00Z".into())
    })?;
    let expires_at = SystemTime::try_from(stated)
        .map_err(|_| malformed("\"expires_at\" is out of range".into()))?;
    let lifetime = expires_at.duration_since(now).unwrap_or(Duration::ZERO);
    if lifetime.is_zero() {
        return Err(PlatformError::AlreadyExpired {
            expires_at: stated.to_string(),
        });
    }
    Ok(Grant {
        token,
        expires_at,
        lifetime,
        scope,
    })
}

/// The platform's clock from a `Date` header value, if it parses.
pub fn parse_date(value: &str) -> Option<SystemTime> {
    httpdate::parse_http_date(value).ok()
}

/// A `Retry-After` value (seconds or an HTTP date, relative to `now`),
/// capped at [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}
