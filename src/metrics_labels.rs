//! The closed label sets of credlock's metrics: each an enum with its label text, so a label
//! value is never typed twice.

/// Why a request was answered locally without reaching the upstream: the `reason` label of
/// `credlock_refused_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    BadTarget,
    UnknownCredentialPath,
    Method,
    /// The request announced a body (IMDS requests have none).
    Body,
    NoLockedCredentials,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 5] = [
        Self::BadTarget,
        Self::UnknownCredentialPath,
        Self::Method,
        Self::Body,
        Self::NoLockedCredentials,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::BadTarget => "bad_target",
            Self::UnknownCredentialPath => "unknown_credential_path",
            Self::Method => "method",
            Self::Body => "body",
            Self::NoLockedCredentials => "no_locked_credentials",
        }
    }
}

impl From<crate::route::Refusal> for RefusalReason {
    fn from(r: crate::route::Refusal) -> Self {
        match r {
            crate::route::Refusal::BadTarget => Self::BadTarget,
            crate::route::Refusal::UnknownCredentialPath => Self::UnknownCredentialPath,
            crate::route::Refusal::Method => Self::Method,
        }
    }
}

/// Route labels of `credlock_requests_total`, indexed by [`RouteLabel`].
pub const ROUTES: [&str; 5] = [
    "token",
    "credentials",
    "role_listing",
    "passthrough",
    "refused",
];

/// The `route` label of the per-request metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteLabel {
    Token = 0,
    Credentials = 1,
    RoleListing = 2,
    Passthrough = 3,
    Refused = 4,
}

impl RouteLabel {
    pub fn as_str(self) -> &'static str {
        ROUTES[self as usize]
    }
}

/// `2xx`..`5xx` for a status code.
pub fn code_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The `result` label of `credlock_endpoint_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointResult {
    Served,
    Unauthorized,
    Forbidden,
    Unavailable,
    Refused,
}

impl EndpointResult {
    pub const ALL: [EndpointResult; 5] = [
        Self::Served,
        Self::Unauthorized,
        Self::Forbidden,
        Self::Unavailable,
        Self::Refused,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Served => "served",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::Unavailable => "unavailable",
            Self::Refused => "refused",
        }
    }
}
