//! ThingSpace's routes (SPEC §1): what the gateway asks for, as paths under `upstream.base_url`
//! and the metric endpoint each belongs to. The only place that knows ThingSpace's URLs.

use crate::observe::Endpoint;

pub const OAUTH_TOKEN: &str = "/api/ts/v1/oauth2/token";
pub const SESSION_LOGIN: &str = "/api/m2m/v1/session/login";

/// A readable ThingSpace resource (the things the cache stores).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    /// One license page: devices with IMEIs above `index` (the cursor; 0 first).
    LicensePage {
        account: &'a str,
        index: u64,
    },
    Subscription {
        account: &'a str,
    },
}

impl Resource<'_> {
    /// The path under `upstream.base_url` (parameters were validated on the client's path).
    pub fn path(&self) -> String {
        match self {
            Resource::LicensePage { account, index } => {
                format!("/api/fota/v1/licenses/{account}/index/{index}")
            }
            Resource::Subscription { account } => format!("/api/fota/v1/subscriptions/{account}"),
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        match self {
            Resource::LicensePage { .. } => Endpoint::Licenses,
            Resource::Subscription { .. } => Endpoint::Subscriptions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let page = Resource::LicensePage {
            account: "0402196254-00001",
            index: 7,
        };
        assert_eq!(
            page.path(),
            "/api/fota/v1/licenses/0402196254-00001/index/7"
        );
        assert_eq!(page.endpoint(), Endpoint::Licenses);
        let sub = Resource::Subscription { account: "a" };
        assert_eq!(sub.path(), "/api/fota/v1/subscriptions/a");
        assert_eq!(sub.endpoint(), Endpoint::Subscriptions);
    }
}
