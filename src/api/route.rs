//! Routing and input validation on the raw request path, before any decoding or normalisation.
//!
//! A path either maps to one [`Route`] with validated parameters or to a [`RouteError`]; nothing
//! from the path reaches the upstream unless it passed these checks.

use crate::observe::RouteLabel;
use http::Method;
use std::sync::Arc;

/// The client API's routes, with their parameters checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /api/fota/v1/licenses/{account}/index/{startIndex}`
    LicensePage { account: Arc<str>, index: u64 },
    /// `GET /api/fota/v1/subscriptions/{account}`
    Subscription { account: Arc<str> },
    /// `GET /gateway/v1/accounts/{account}/licenses`
    AccountLicenses { account: Arc<str> },
    /// `GET /gateway/v1/accounts/{account}/licenses/{deviceId}`
    DeviceLicense {
        account: Arc<str>,
        device_id: String,
    },
    /// `POST /api/ts/v1/oauth2/token`
    Token,
    /// `POST /api/m2m/v1/session/login`
    SessionLogin,
}

/// Every client route's path template (as in `deploy/openapi.yaml`) and its methods.
pub const CLIENT_ROUTES: [(&str, &[&str]); 6] = [
    (
        "/api/fota/v1/licenses/{account}/index/{startIndex}",
        &["GET", "HEAD"],
    ),
    ("/api/fota/v1/subscriptions/{account}", &["GET", "HEAD"]),
    ("/gateway/v1/accounts/{account}/licenses", &["GET", "HEAD"]),
    (
        "/gateway/v1/accounts/{account}/licenses/{deviceId}",
        &["GET", "HEAD"],
    ),
    ("/api/ts/v1/oauth2/token", &["POST"]),
    ("/api/m2m/v1/session/login", &["POST"]),
];

impl Route {
    /// The route's metric label.
    pub fn label(&self) -> RouteLabel {
        match self {
            Route::LicensePage { .. } => RouteLabel::Licenses,
            Route::Subscription { .. } => RouteLabel::Subscriptions,
            Route::AccountLicenses { .. } => RouteLabel::AccountLicenses,
            Route::DeviceLicense { .. } => RouteLabel::DeviceLicense,
            Route::Token => RouteLabel::OauthToken,
            Route::SessionLogin => RouteLabel::SessionLogin,
        }
    }

    /// The route's entry in [`CLIENT_ROUTES`].
    pub fn template(&self) -> &'static str {
        CLIENT_ROUTES[self.label() as usize].0
    }

    /// The account the route reads, for authorization.
    pub fn account(&self) -> Option<&str> {
        match self {
            Route::LicensePage { account, .. }
            | Route::Subscription { account }
            | Route::AccountLicenses { account }
            | Route::DeviceLicense { account, .. } => Some(account),
            Route::Token | Route::SessionLogin => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    NotFound,
    MethodNotAllowed { allow: &'static str },
    InvalidParameter(&'static str),
}

pub use crate::params::{
    parse_u64_param, valid_account, INVALID_ACCOUNT, INVALID_DEVICE, INVALID_INDEX,
};

const LICENSES: &str = "/api/fota/v1/licenses/";
const SUBSCRIPTIONS: &str = "/api/fota/v1/subscriptions/";
const ACCOUNTS: &str = "/gateway/v1/accounts/";
const GET_ALLOW: &str = "GET, HEAD";
const POST_ALLOW: &str = "POST";

fn account(s: &str) -> Result<Arc<str>, RouteError> {
    if valid_account(s) {
        Ok(Arc::from(s))
    } else {
        Err(RouteError::InvalidParameter(INVALID_ACCOUNT))
    }
}

fn check_method(method: &Method, post: bool) -> Result<(), RouteError> {
    let ok = if post {
        method == Method::POST
    } else {
        method == Method::GET || method == Method::HEAD
    };
    if ok {
        Ok(())
    } else {
        Err(RouteError::MethodNotAllowed {
            allow: if post { POST_ALLOW } else { GET_ALLOW },
        })
    }
}

/// Maps a method and a raw path (no query) to a route.
pub fn route(method: &Method, path: &str) -> Result<Route, RouteError> {
    if let Some(rest) = path.strip_prefix(LICENSES) {
        // `{account}/index/{startIndex}`, split without allocating (the hottest route: plain
        // byte scans).
        let Some(slash) = rest.bytes().position(|b| b == b'/') else {
            return Err(RouteError::NotFound);
        };
        let (acct, tail) = rest.split_at(slash);
        let Some(idx) = tail
            .strip_prefix("/index/")
            .filter(|i| !i.bytes().any(|b| b == b'/'))
        else {
            return Err(RouteError::NotFound);
        };
        check_method(method, false)?;
        let account = account(acct)?;
        let index = parse_u64_param(idx).ok_or(RouteError::InvalidParameter(INVALID_INDEX))?;
        return Ok(Route::LicensePage { account, index });
    }
    if let Some(rest) = path.strip_prefix(SUBSCRIPTIONS) {
        if rest.contains('/') {
            return Err(RouteError::NotFound);
        }
        check_method(method, false)?;
        return Ok(Route::Subscription {
            account: account(rest)?,
        });
    }
    if let Some(rest) = path.strip_prefix(ACCOUNTS) {
        let Some((acct, tail)) = rest.split_once('/') else {
            return Err(RouteError::NotFound);
        };
        if tail == "licenses" {
            check_method(method, false)?;
            return Ok(Route::AccountLicenses {
                account: account(acct)?,
            });
        }
        return match tail.strip_prefix("licenses/") {
            Some(dev) if !dev.contains('/') => {
                check_method(method, false)?;
                let account = account(acct)?;
                parse_u64_param(dev).ok_or(RouteError::InvalidParameter(INVALID_DEVICE))?;
                Ok(Route::DeviceLicense {
                    account,
                    device_id: dev.to_string(),
                })
            }
            _ => Err(RouteError::NotFound),
        };
    }
    match path {
        "/api/ts/v1/oauth2/token" => check_method(method, true).map(|_| Route::Token),
        "/api/m2m/v1/session/login" => check_method(method, true).map(|_| Route::SessionLogin),
        _ => Err(RouteError::NotFound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(p: &str) -> Result<Route, RouteError> {
        route(&Method::GET, p)
    }

    #[test]
    fn license_page() {
        assert_eq!(
            get("/api/fota/v1/licenses/0402196254-00001/index/0"),
            Ok(Route::LicensePage {
                account: "0402196254-00001".into(),
                index: 0
            })
        );
        assert_eq!(
            get("/api/fota/v1/licenses/a/index/007").unwrap(),
            Route::LicensePage {
                account: "a".into(),
                index: 7
            }
        );
    }

    #[test]
    fn bad_parameters_are_400() {
        let bad_account = RouteError::InvalidParameter(INVALID_ACCOUNT);
        let bad_index = RouteError::InvalidParameter(INVALID_INDEX);
        for p in [
            "/api/fota/v1/licenses//index/0",
            "/api/fota/v1/licenses/a%2Fb/index/0",
            "/api/fota/v1/licenses/../index/0",
            "/api/fota/v1/licenses/a.b/index/0",
            "/api/fota/v1/licenses/a_b/index/0",
        ] {
            assert_eq!(get(p), Err(bad_account.clone()), "{p}");
        }
        let long = format!("/api/fota/v1/licenses/{}/index/0", "a".repeat(65));
        assert_eq!(get(&long), Err(bad_account.clone()));
        for p in [
            "/api/fota/v1/licenses/a/index/",
            "/api/fota/v1/licenses/a/index/-1",
            "/api/fota/v1/licenses/a/index/1e3",
            "/api/fota/v1/licenses/a/index/18446744073709551616",
            "/api/fota/v1/licenses/a/index/%30",
            "/api/fota/v1/licenses/a/index/000000000000000000001",
        ] {
            assert_eq!(get(p), Err(bad_index.clone()), "{p}");
        }
        assert_eq!(
            get("/gateway/v1/accounts/a/licenses/12x"),
            Err(RouteError::InvalidParameter(INVALID_DEVICE))
        );
        assert_eq!(get("/api/fota/v1/subscriptions/a.b"), Err(bad_account));
    }

    #[test]
    fn other_shapes_are_404() {
        for p in [
            "/",
            "/api/fota/v1/licenses/a",
            "/api/fota/v1/licenses/a/index/0/",
            "/api/fota/v1/licenses/a/b/index/0",
            "/api/fota/v1/licenses/a/page/0",
            "/api/fota/v1/subscriptions/a/b",
            "/gateway/v1/accounts/a",
            "/gateway/v1/accounts/a/licenses/1/2",
            "/api/fota/v1/licenses",
        ] {
            assert_eq!(get(p), Err(RouteError::NotFound), "{p}");
        }
    }

    #[test]
    fn methods() {
        assert_eq!(
            route(&Method::POST, "/api/fota/v1/licenses/a/index/0"),
            Err(RouteError::MethodNotAllowed { allow: GET_ALLOW })
        );
        assert_eq!(
            route(&Method::HEAD, "/api/fota/v1/licenses/a/index/0")
                .unwrap()
                .label()
                .as_str(),
            "licenses"
        );
        assert_eq!(
            get("/api/ts/v1/oauth2/token"),
            Err(RouteError::MethodNotAllowed { allow: POST_ALLOW })
        );
        assert_eq!(
            route(&Method::POST, "/api/m2m/v1/session/login"),
            Ok(Route::SessionLogin)
        );
    }
}
