//! One error taxonomy for everything llm-edge answers itself, mapped to OpenAI-shaped bodies.

use bytes::Bytes;
use serde::Serialize;

/// Every error llm-edge produces on its own (upstream error responses pass through instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeError {
    /// The request body is not valid JSON (or not a JSON object).
    InvalidJson(String),
    /// The request body has no usable top-level `model` string.
    MissingModel,
    /// Any other malformed request (bad method, bad path metadata, ...).
    BadRequest(String),
    /// The requested model is not configured.
    UnknownModel(String),
    /// No route matches the path.
    UnknownPath(String),
    /// The method is not allowed on this path.
    MethodNotAllowed(String),
    /// The request body exceeds `limits.max_body`.
    BodyTooLarge { limit: usize },
    /// No replica could be reached (connect error, no resolved address, all attempts failed).
    UpstreamUnreachable(String),
    /// The upstream did not answer within its timeout.
    UpstreamTimeout(String),
    /// Every upstream key for the model is cooling down (or all are busy).
    RateLimited {
        /// Seconds until the earliest key recovers.
        retry_after: u64,
        /// What is limiting.
        why: String,
    },
    /// Every upstream key is dead (401/402/403) or none serves the model.
    CredentialsExhausted(String),
    /// The upstream response broke after it had started streaming.
    UpstreamStreamBroken(String),
    /// The client went away while the request was being read or forwarded.
    ClientClosed,
    /// A bug or an invariant that did not hold.
    Internal(String),
    /// No valid client key (401).
    Unauthorized(String),
    /// The client key may not do this (403).
    Forbidden(String),
    /// The client key is over one of its limits (429).
    ClientRateLimited {
        /// Seconds until the request would be accepted.
        retry_after: u64,
        /// Which limit.
        why: String,
    },
    /// The URI is longer than `limits.max_uri` (414).
    UriTooLong { limit: usize },
    /// Too many or too large request headers (431).
    HeadersTooLarge(String),
    /// The client sent the body too slowly (408).
    RequestTimeout(String),
    /// Too many requests in flight on this instance (503).
    Overloaded,
    /// The resolved upstream address is refused by the egress policy (502).
    EgressRefused(String),
    /// CORS preflight from an origin that is not allowed (403).
    OriginNotAllowed,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorFields<'a>,
}

#[derive(Serialize)]
struct ErrorFields<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    code: &'a str,
}

impl EdgeError {
    /// HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            Self::InvalidJson(_) | Self::MissingModel | Self::BadRequest(_) => 400,
            Self::UnknownModel(_) | Self::UnknownPath(_) => 404,
            Self::MethodNotAllowed(_) => 405,
            Self::BodyTooLarge { .. } => 413,
            Self::UpstreamUnreachable(_)
            | Self::UpstreamStreamBroken(_)
            | Self::CredentialsExhausted(_) => 502,
            Self::RateLimited { .. } => 429,
            Self::UpstreamTimeout(_) => 504,
            Self::ClientClosed => 499,
            Self::Internal(_) => 500,
            Self::Unauthorized(_) => 401,
            Self::Forbidden(_) | Self::OriginNotAllowed => 403,
            Self::ClientRateLimited { .. } => 429,
            Self::UriTooLong { .. } => 414,
            Self::HeadersTooLarge(_) => 431,
            Self::RequestTimeout(_) => 408,
            Self::Overloaded => 503,
            Self::EgressRefused(_) => 502,
        }
    }

    /// OpenAI-style `type` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidJson(_)
            | Self::MissingModel
            | Self::BadRequest(_)
            | Self::UnknownModel(_)
            | Self::UnknownPath(_)
            | Self::MethodNotAllowed(_)
            | Self::BodyTooLarge { .. }
            | Self::ClientClosed
            | Self::UriTooLong { .. }
            | Self::HeadersTooLarge(_)
            | Self::RequestTimeout(_)
            | Self::OriginNotAllowed => "invalid_request_error",
            Self::UpstreamUnreachable(_)
            | Self::UpstreamTimeout(_)
            | Self::UpstreamStreamBroken(_)
            | Self::CredentialsExhausted(_)
            | Self::EgressRefused(_) => "upstream_error",
            Self::RateLimited { .. } | Self::ClientRateLimited { .. } => "rate_limit_error",
            Self::Internal(_) | Self::Overloaded => "server_error",
            Self::Unauthorized(_) => "authentication_error",
            Self::Forbidden(_) => "permission_error",
        }
    }

    /// Stable machine-readable `code`, also used as the metric/log label.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::MissingModel => "missing_model",
            Self::BadRequest(_) => "bad_request",
            Self::UnknownModel(_) => "model_not_found",
            Self::UnknownPath(_) => "not_found",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::BodyTooLarge { .. } => "request_too_large",
            Self::UpstreamUnreachable(_) => "upstream_unreachable",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::UpstreamStreamBroken(_) => "upstream_stream_error",
            Self::RateLimited { .. } => "upstream_rate_limited",
            Self::CredentialsExhausted(_) => "upstream_credentials_exhausted",
            Self::ClientClosed => "client_closed",
            Self::Internal(_) => "internal_error",
            Self::Unauthorized(_) => "invalid_api_key",
            Self::Forbidden(_) => "model_not_allowed",
            Self::ClientRateLimited { .. } => "rate_limit_exceeded",
            Self::UriTooLong { .. } => "uri_too_long",
            Self::HeadersTooLarge(_) => "headers_too_large",
            Self::RequestTimeout(_) => "request_timeout",
            Self::Overloaded => "overloaded",
            Self::EgressRefused(_) => "egress_refused",
            Self::OriginNotAllowed => "origin_not_allowed",
        }
    }

    /// Human-readable message (never contains secrets).
    pub fn message(&self) -> String {
        match self {
            Self::InvalidJson(why) => format!("request body is not valid JSON: {why}"),
            Self::MissingModel => "request body has no string field \"model\"".to_string(),
            Self::BadRequest(why) => why.clone(),
            Self::UnknownModel(m) => format!("model \"{m}\" is not served here"),
            Self::UnknownPath(p) => format!("no route for path {p}"),
            Self::MethodNotAllowed(m) => format!("method {m} is not allowed on this path"),
            Self::BodyTooLarge { limit } => {
                format!("request body exceeds the limit of {limit} bytes")
            }
            Self::UpstreamUnreachable(why) => format!("upstream unreachable: {why}"),
            Self::UpstreamTimeout(why) => format!("upstream timed out: {why}"),
            Self::UpstreamStreamBroken(why) => format!("upstream response broke off: {why}"),
            Self::RateLimited { retry_after, why } => {
                format!("{why}; retry after {retry_after} s")
            }
            Self::CredentialsExhausted(why) => {
                format!("no usable upstream credential: {why}")
            }
            Self::ClientClosed => "client closed the connection".to_string(),
            Self::Internal(why) => format!("internal error: {why}"),
            Self::Unauthorized(why) | Self::Forbidden(why) => why.clone(),
            Self::ClientRateLimited { retry_after, why } => {
                format!("{why}; retry after {retry_after} s")
            }
            Self::UriTooLong { limit } => format!("request URI exceeds the limit of {limit} bytes"),
            Self::HeadersTooLarge(why) => why.clone(),
            Self::RequestTimeout(why) => why.clone(),
            Self::Overloaded => "too many requests in flight; try again shortly".to_string(),
            Self::EgressRefused(why) => format!("upstream address refused: {why}"),
            Self::OriginNotAllowed => "origin not allowed by the CORS policy".to_string(),
        }
    }

    /// Seconds for a `Retry-After` header, when the error has one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after, .. } | Self::ClientRateLimited { retry_after, .. } => {
                Some(*retry_after)
            }
            Self::Overloaded => Some(1),
            _ => None,
        }
    }

    /// The OpenAI-shaped JSON body `{"error":{"message","type","code"}}`.
    pub fn body(&self) -> Bytes {
        let message = self.message();
        let body = ErrorBody {
            error: ErrorFields {
                message: &message,
                kind: self.kind(),
                code: self.code(),
            },
        };
        // Serialising a struct of strings cannot fail.
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }
}

impl std::fmt::Display for EdgeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message(), self.code())
    }
}

impl std::error::Error for EdgeError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_openai_shaped() {
        let e = EdgeError::UnknownModel("gpt-x".into());
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("gpt-x"));
        assert_eq!(e.status(), 404);
    }

    #[test]
    fn statuses_follow_the_design() {
        assert_eq!(EdgeError::InvalidJson("x".into()).status(), 400);
        assert_eq!(EdgeError::BodyTooLarge { limit: 1 }.status(), 413);
        assert_eq!(EdgeError::UpstreamUnreachable("x".into()).status(), 502);
        assert_eq!(EdgeError::UpstreamTimeout("x".into()).status(), 504);
    }
}
