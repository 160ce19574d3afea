//! API errors with their HTTP status beside them.

use axum::http::StatusCode;

use crate::auth::ApiAuthError;
use crate::protocol::rest::BodyError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("authentication failed: {0}")]
    Unauthorized(ApiAuthError),
    #[error("app not found")]
    AppNotFound,
    #[error("app is disabled")]
    AppDisabled,
    /// The app store could not answer (its database is down) and the app is not cached.
    #[error("app lookup failed")]
    AppLookupFailed,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Body(BodyError),
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("rate limit exceeded: at most {} per second", .0.limit)]
    RateLimited(crate::rate_limit::Decision),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::AppNotFound | ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::AppDisabled => StatusCode::FORBIDDEN,
            ApiError::AppLookupFailed => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Body(BodyError::PayloadTooLarge(_)) | ApiError::PayloadTooLarge(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::Body(_) => StatusCode::BAD_REQUEST,
        }
    }
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        ApiError::Body(e)
    }
}
