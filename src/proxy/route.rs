//! What a request asks for, decided once from its method and path: the handler, who may
//! call it, the methods it takes and the metrics series it counts in. The server acts on a
//! `Route`; nothing else looks at the path string.

use super::openai::Endpoint;
use crate::metrics::Series;
use http::Method;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/v1/completions`, `/v1/chat/completions`: the P/D flow.
    Inference(Endpoint),
    /// `/tokenize`, `/detokenize`, `/v1/embeddings`: passed to one instance as they are.
    Forwarded,
    Models,
    Ping,
    Health,
    Status,
    StatusInstances,
    Version,
    Metrics,
    Admin(AdminAction),
    /// Not an endpoint of this proxy (404).
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAction {
    AddInstance,
    RemoveInstance,
    Reload,
    /// A peer replica's new prefix placements (`prefix_sync`).
    SyncPrefixes,
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A client: with `api_keys` configured, `Authorization: Bearer <key>`.
    Client,
    /// Liveness and readiness probes (`/ping`, `/health`): always open.
    Probe,
    /// Operational endpoints: open, unless `protect_status` puts them behind the client keys.
    Status,
    /// The admin API: `X-API-Key` with the admin key.
    Admin,
}

/// The methods a route takes, as its `Allow` header lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Methods {
    Post,
    /// GET, and HEAD answered like GET without the body.
    Get,
    /// GET, HEAD and POST (`/ping`).
    GetOrPost,
    /// Every method: the answer is 404 whatever it is.
    Any,
}

impl Methods {
    pub fn allows(self, m: &Method) -> bool {
        match self {
            Methods::Post => m == Method::POST,
            Methods::Get => m == Method::GET || m == Method::HEAD,
            Methods::GetOrPost => m == Method::GET || m == Method::HEAD || m == Method::POST,
            Methods::Any => true,
        }
    }

    /// The `Allow` header of a 405.
    pub fn allow_header(self) -> &'static str {
        match self {
            Methods::Post => "POST",
            Methods::Get => "GET, HEAD",
            Methods::GetOrPost | Methods::Any => "GET, HEAD, POST",
        }
    }
}

impl Route {
    /// `path` without its query string.
    pub fn from_path(path: &str) -> Route {
        match path {
            "/v1/completions" => Route::Inference(Endpoint::Completions),
            "/v1/chat/completions" => Route::Inference(Endpoint::ChatCompletions),
            "/tokenize" | "/detokenize" | "/v1/embeddings" => Route::Forwarded,
            "/v1/models" => Route::Models,
            "/ping" => Route::Ping,
            "/health" => Route::Health,
            "/status" => Route::Status,
            "/status/instances" => Route::StatusInstances,
            "/version" => Route::Version,
            "/metrics" => Route::Metrics,
            "/instances/add" => Route::Admin(AdminAction::AddInstance),
            "/instances/remove" => Route::Admin(AdminAction::RemoveInstance),
            "/admin/reload" => Route::Admin(AdminAction::Reload),
            "/admin/prefixes" => Route::Admin(AdminAction::SyncPrefixes),
            _ => Route::Unknown,
        }
    }

    pub fn access(self) -> Access {
        match self {
            Route::Ping | Route::Health => Access::Probe,
            Route::Status | Route::StatusInstances | Route::Version | Route::Metrics => {
                Access::Status
            }
            Route::Admin(_) => Access::Admin,
            Route::Inference(_) | Route::Forwarded | Route::Models | Route::Unknown => {
                Access::Client
            }
        }
    }

    pub fn methods(self) -> Methods {
        match self {
            Route::Inference(_) | Route::Forwarded | Route::Admin(_) => Methods::Post,
            Route::Ping => Methods::GetOrPost,
            Route::Models
            | Route::Health
            | Route::Status
            | Route::StatusInstances
            | Route::Version
            | Route::Metrics => Methods::Get,
            Route::Unknown => Methods::Any,
        }
    }

    /// Inference and forwarded endpoints: every answer carries an `X-Request-Id`.
    pub fn is_business(self) -> bool {
        matches!(self, Route::Inference(_) | Route::Forwarded)
    }

    /// The `endpoint` label of `proxy_requests_total`.
    pub fn series(self) -> Series {
        match self {
            Route::Inference(Endpoint::Completions) => Series::Completions,
            Route::Inference(Endpoint::ChatCompletions) => Series::ChatCompletions,
            Route::Forwarded => Series::Forwarded,
            Route::Models => Series::Models,
            Route::Ping => Series::Ping,
            Route::Health => Series::Health,
            Route::Status | Route::StatusInstances | Route::Version => Series::Status,
            Route::Metrics => Series::Metrics,
            Route::Admin(_) => Series::Instances,
            Route::Unknown => Series::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_has_one_route() {
        let table = [
            ("/v1/completions", Route::Inference(Endpoint::Completions)),
            (
                "/v1/chat/completions",
                Route::Inference(Endpoint::ChatCompletions),
            ),
            ("/tokenize", Route::Forwarded),
            ("/detokenize", Route::Forwarded),
            ("/v1/embeddings", Route::Forwarded),
            ("/v1/models", Route::Models),
            ("/ping", Route::Ping),
            ("/health", Route::Health),
            ("/status", Route::Status),
            ("/status/instances", Route::StatusInstances),
            ("/version", Route::Version),
            ("/metrics", Route::Metrics),
            ("/instances/add", Route::Admin(AdminAction::AddInstance)),
            (
                "/instances/remove",
                Route::Admin(AdminAction::RemoveInstance),
            ),
            ("/admin/reload", Route::Admin(AdminAction::Reload)),
            ("/admin/prefixes", Route::Admin(AdminAction::SyncPrefixes)),
        ];
        for (path, route) in table {
            assert_eq!(Route::from_path(path), route, "{path}");
        }
        // Near misses are not endpoints: an unknown admin path is not a removal.
        for path in [
            "/instances/delete",
            "/instances",
            "/v1/completions/",
            "/V1/completions",
            "/status/",
            "",
            "*",
            "/../../etc/passwd",
        ] {
            assert_eq!(Route::from_path(path), Route::Unknown, "{path}");
        }
    }

    #[test]
    fn access_follows_the_kind_of_endpoint() {
        assert_eq!(Route::from_path("/v1/completions").access(), Access::Client);
        assert_eq!(Route::from_path("/v1/models").access(), Access::Client);
        assert_eq!(Route::from_path("/tokenize").access(), Access::Client);
        assert_eq!(Route::from_path("/nope").access(), Access::Client);
        assert_eq!(Route::from_path("/metrics").access(), Access::Status);
        assert_eq!(Route::from_path("/health").access(), Access::Probe);
        assert_eq!(Route::from_path("/ping").access(), Access::Probe);
        assert_eq!(
            Route::from_path("/status/instances").access(),
            Access::Status
        );
        assert_eq!(Route::from_path("/admin/reload").access(), Access::Admin);
        assert_eq!(Route::from_path("/instances/add").access(), Access::Admin);
    }

    #[test]
    fn methods_and_allow() {
        let post = Route::from_path("/v1/completions").methods();
        assert!(post.allows(&Method::POST));
        assert!(!post.allows(&Method::GET) && !post.allows(&Method::HEAD));
        assert_eq!(post.allow_header(), "POST");
        let get = Route::from_path("/health").methods();
        assert!(get.allows(&Method::GET) && get.allows(&Method::HEAD));
        assert!(!get.allows(&Method::POST) && !get.allows(&Method::DELETE));
        assert_eq!(get.allow_header(), "GET, HEAD");
        let ping = Route::from_path("/ping").methods();
        assert!(ping.allows(&Method::POST) && ping.allows(&Method::HEAD));
        assert!(!ping.allows(&Method::PUT));
        assert!(Route::Unknown.methods().allows(&Method::DELETE));
    }

    #[test]
    fn series_labels() {
        assert_eq!(
            Route::from_path("/status/instances").series(),
            Series::Status
        );
        assert_eq!(Route::from_path("/version").series(), Series::Status);
        assert_eq!(
            Route::from_path("/admin/reload").series(),
            Series::Instances
        );
        assert_eq!(
            Route::from_path("/v1/embeddings").series(),
            Series::Forwarded
        );
        assert_eq!(Route::from_path("/x").series(), Series::Other);
    }
}
