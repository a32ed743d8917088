//! What the gateway may do with a request: pure decisions, no I/O.
//!
//! Why a module of its own: every refusal the sealed mode promises (another
//! host, a token-management route, a path that is not a repository's, a
//! request-line trick that would make GitHub see another repository than
//! the one whose token was chosen, a credential the client sent) is decided
//! here, once, on plain strings, and unit-tested without a network.
//!
//! The rule for paths is strict on purpose: the owner whose token is
//! stamped is read from the path, and GitHub must route the request to that
//! same owner. So a path is refused unless it is canonical — no `.` or `..`
//! segment, no empty segment, no backslash and no percent-encoded `.`, `/`
//! or `\` — because any of those could be read one way here and another way
//! upstream.

use credd_core::repository::RepositoryRef;
use http::{HeaderMap, HeaderName, Method, StatusCode, header};

use credd_core::protocol::Which;

/// What kind of GitHub host a tunnel reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SiteKind {
    /// `github.com`: git smart-HTTP and LFS only.
    DotCom,
    /// `api.github.com` (and `uploads.github.com`): the REST and GraphQL API.
    DotComApi,
    /// A GitHub Enterprise Server host: git, and the API under `/api/v3`,
    /// `/api/graphql` and `/api/uploads`.
    Enterprise,
}

/// A host the gateway serves: its authority (`host` or `host:port`, lower
/// case, `:443` left out) and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Site {
    /// What the client names in `CONNECT` and `Host`, and what the gateway
    /// connects to upstream.
    pub(crate) authority: String,
    /// How its paths are read.
    pub(crate) kind: SiteKind,
}

impl Site {
    /// The host without its port (for the certificate and TLS name).
    pub(crate) fn host(&self) -> &str {
        split_authority(&self.authority).map_or(self.authority.as_str(), |(host, _)| host)
    }
}

/// The API hosts of github.com.
const DOTCOM_API_HOSTS: [&str; 2] = ["api.github.com", "uploads.github.com"];

/// Every site `CREDD_HOSTS` implies: each host itself, and for `github.com`
/// its API hosts.
pub(crate) fn sites(hosts: &[String]) -> Vec<Site> {
    let mut sites: Vec<Site> = Vec::new();
    let mut add = |authority: String, kind| {
        if !sites.iter().any(|s| s.authority == authority) {
            sites.push(Site { authority, kind });
        }
    };
    for host in hosts {
        let authority = normalise_authority(host);
        if authority == "github.com" {
            add(authority, SiteKind::DotCom);
            for api in DOTCOM_API_HOSTS {
                add(api.to_owned(), SiteKind::DotComApi);
            }
        } else {
            add(authority, SiteKind::Enterprise);
        }
    }
    sites
}

/// `Host:443` → `host`; other ports kept; lower case.
pub(crate) fn normalise_authority(authority: &str) -> String {
    let lower = authority.to_ascii_lowercase();
    match lower.strip_suffix(":443") {
        Some(host) if !host.is_empty() => host.to_owned(),
        _ => lower,
    }
}

/// `(host, port)` of `host:port` (brackets kept for IPv6), if it has a port.
fn split_authority(authority: &str) -> Option<(&str, &str)> {
    let (host, port) = authority.rsplit_once(':')?;
    (!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':'))
        .then_some((host, port))
}

/// A request the gateway answers itself, with the reason for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The HTTP status of the answer.
    pub(crate) status: StatusCode,
    /// One line for the client (and the audit line's `refused`).
    pub(crate) reason: String,
}

impl Refusal {
    pub(crate) fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }

    fn forbidden(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, reason)
    }
}

/// How the credential is stamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stamp {
    /// `Authorization: Basic base64(x-access-token:TOKEN)`: git smart-HTTP
    /// and LFS, where GitHub accepts only Basic.
    Basic,
    /// `Authorization: token TOKEN`: the API.
    Token,
}

impl Stamp {
    /// The `Authorization` value for `token`.
    pub(crate) fn header_value(self, token: &str) -> String {
        match self {
            Self::Basic => format!(
                "Basic {}",
                base64(format!("{}:{token}", credd_core::secret::GITHUB_TOKEN_USERNAME).as_bytes())
            ),
            Self::Token => format!("token {token}"),
        }
    }
}

/// What to do with a request the gateway forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    /// Whose token.
    pub(crate) want: Which,
    /// How it is stamped.
    pub(crate) stamp: Stamp,
}

impl Route {
    /// The repository for the audit line (`-` when none).
    pub(crate) fn repository(&self) -> String {
        match &self.want {
            Which::Repository(repository) => repository.to_string(),
            Which::Owner(owner) => format!("{owner}/*"),
            Which::Default => "-".to_owned(),
        }
    }
}

/// Token-management and App-level API routes, refused whatever the method:
/// one workspace must not revoke a token other workspaces of the same grant
/// hold (`DELETE /installation/token`), and the App's own routes take the
/// App's JWT, never an installation token.
const REFUSED_API_PREFIXES: [&str; 5] = [
    "/installation/token",
    "/applications/",
    "/app/",
    "/authorizations",
    "/credentials/revoke",
];
const REFUSED_API_EXACT: [&str; 1] = ["/app"];

/// git smart-HTTP and LFS paths below `/OWNER/NAME(.git)`.
fn is_git_tail(tail: &[&str]) -> bool {
    matches!(
        tail,
        ["info", "refs"] | ["git-upload-pack"] | ["git-receive-pack"] | ["info", "lfs", ..]
    )
}

/// Decides what happens to `method path?query` on `site`.
pub(crate) fn classify(kind: SiteKind, method: &Method, path: &str) -> Result<Route, Refusal> {
    check_canonical(path)?;
    match kind {
        SiteKind::DotComApi => api_route(method, path),
        SiteKind::DotCom => git_route(path),
        SiteKind::Enterprise => {
            if path == "/api/graphql" {
                return Ok(Route {
                    want: Which::Default,
                    stamp: Stamp::Token,
                });
            }
            for prefix in ["/api/v3", "/api/uploads"] {
                if let Some(rest) = path.strip_prefix(prefix)
                    && (rest.is_empty() || rest.starts_with('/'))
                {
                    let rest = if rest.is_empty() { "/" } else { rest };
                    return api_route(method, rest);
                }
            }
            if path.starts_with("/api/") {
                return Err(Refusal::forbidden(format!(
                    "{path} is not an API route this gateway forwards (/api/v3, /api/graphql, /api/uploads)"
                )));
            }
            git_route(path)
        }
    }
}

fn api_route(_method: &Method, path: &str) -> Result<Route, Refusal> {
    let lower = path.to_ascii_lowercase();
    if REFUSED_API_EXACT.contains(&lower.as_str())
        || REFUSED_API_PREFIXES.iter().any(|p| lower.starts_with(p))
    {
        return Err(Refusal::forbidden(format!(
            "{path} manages tokens or the App itself; the sealed gateway never forwards it"
        )));
    }
    let segments: Vec<&str> = path[1..].split('/').collect();
    let want = match segments.as_slice() {
        ["repos", owner, name, ..] => Which::Repository(repository(owner, name)?),
        _ => Which::Default,
    };
    Ok(Route {
        want,
        stamp: Stamp::Token,
    })
}

fn git_route(path: &str) -> Result<Route, Refusal> {
    let segments: Vec<&str> = path[1..].split('/').collect();
    match segments.as_slice() {
        [owner, name, tail @ ..] if is_git_tail(tail) => {
            let name = name.strip_suffix(".git").unwrap_or(name);
            Ok(Route {
                want: Which::Repository(repository(owner, name)?),
                stamp: Stamp::Basic,
            })
        }
        _ => Err(Refusal::forbidden(format!(
            "{path} is not a git smart-HTTP or LFS path (/OWNER/REPO.git/info/refs, git-upload-pack, git-receive-pack, info/lfs/…)"
        ))),
    }
}

fn repository(owner: &str, name: &str) -> Result<RepositoryRef, Refusal> {
    RepositoryRef::parse(&format!("{owner}/{name}")).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("not a repository name: {e}"),
        )
    })
}

/// Refuses a path that GitHub could resolve to another repository than the
/// one read here (see the module docs).
fn check_canonical(path: &str) -> Result<(), Refusal> {
    let trick = |what: &str| {
        Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("the request path {what}; the gateway forwards canonical paths only"),
        ))
    };
    if !path.starts_with('/') {
        return trick("is not absolute");
    }
    if path.contains('\\') {
        return trick("has a backslash");
    }
    let lower = path.to_ascii_lowercase();
    if ["%2e", "%2f", "%5c", "%00"]
        .iter()
        .any(|e| lower.contains(e))
    {
        return trick("has a percent-encoded dot, slash, backslash or NUL");
    }
    let body = path.strip_suffix('/').unwrap_or(path);
    if body.len() > 1
        && body[1..]
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return trick("has an empty, `.` or `..` segment");
    }
    Ok(())
}

/// Headers never forwarded upstream: every credential the client sent (the
/// gateway's stamp is the only one), hop-by-hop headers (RFC 9110 §7.6.1),
/// and the proxy's own.
const DROPPED_REQUEST_HEADERS: [HeaderName; 10] = [
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::COOKIE,
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::HOST,
];

/// Headers with these names (lower case) are dropped as well: the
/// non-standard hop-by-hop ones and anything that could carry a credential
/// under another name GitHub might read.
const DROPPED_REQUEST_NAMES: [&str; 4] = [
    "keep-alive",
    "proxy-connection",
    "x-github-otp",
    "private-token",
];

/// The client's headers as forwarded: credentials, hop-by-hop headers and
/// the headers named in `Connection` removed (the gateway sets `Host` and
/// `Authorization` itself).
pub(crate) fn forwarded_headers(client: &HeaderMap) -> HeaderMap {
    let named_by_connection: Vec<String> = client
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    let mut out = HeaderMap::with_capacity(client.len());
    for (name, value) in client {
        let lower = name.as_str();
        if DROPPED_REQUEST_HEADERS.contains(name)
            || DROPPED_REQUEST_NAMES.contains(&lower)
            || named_by_connection.iter().any(|n| n == lower)
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Headers dropped from upstream responses (hop-by-hop).
pub(crate) fn strip_response_headers(headers: &mut HeaderMap) {
    for name in [
        header::CONNECTION,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
}

/// The site a request's `Host` header (exactly one) or absolute-form
/// authority names must be the tunnel's.
pub(crate) fn check_target(
    site: &Site,
    absolute: Option<&http::uri::Authority>,
    scheme: Option<&str>,
    headers: &HeaderMap,
) -> Result<(), Refusal> {
    if let Some(authority) = absolute
        && (normalise_authority(authority.as_str()) != site.authority || scheme != Some("https"))
    {
        return Err(Refusal::forbidden(format!(
            "this tunnel reaches {} only; an absolute-form request for another host or scheme is refused",
            site.authority
        )));
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "a request needs exactly one Host header",
        ));
    };
    match host.to_str() {
        Ok(host) if normalise_authority(host.trim()) == site.authority => Ok(()),
        _ => Err(Refusal::forbidden(format!(
            "this tunnel reaches {} only; the Host header names another",
            site.authority
        ))),
    }
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(list: &[&str]) -> Vec<String> {
        list.iter().map(|h| (*h).to_owned()).collect()
    }

    fn repo(text: &str) -> Which {
        Which::Repository(RepositoryRef::parse(text).expect("valid"))
    }

    #[test]
    fn github_com_brings_its_api_hosts_and_enterprise_hosts_stand_alone() {
        let sites = sites(&hosts(&["github.com", "GHE.example.com:443", "ghe2:8443"]));
        let names: Vec<(&str, SiteKind)> = sites
            .iter()
            .map(|s| (s.authority.as_str(), s.kind))
            .collect();
        assert_eq!(
            names,
            [
                ("github.com", SiteKind::DotCom),
                ("api.github.com", SiteKind::DotComApi),
                ("uploads.github.com", SiteKind::DotComApi),
                ("ghe.example.com", SiteKind::Enterprise),
                ("ghe2:8443", SiteKind::Enterprise),
            ]
        );
        assert_eq!(sites[4].host(), "ghe2");
    }

    #[test]
    fn git_paths_pick_the_repository_and_basic_auth() {
        let get = Method::GET;
        for path in [
            "/acme/api.git/info/refs",
            "/acme/api/info/refs",
            "/acme/api.git/git-upload-pack",
            "/acme/api.git/git-receive-pack",
            "/acme/api.git/info/lfs/objects/batch",
        ] {
            let route = classify(SiteKind::DotCom, &get, path).expect(path);
            assert_eq!(route.want, repo("acme/api"), "{path}");
            assert_eq!(route.stamp, Stamp::Basic);
        }
        for path in [
            "/",
            "/login",
            "/acme/api",
            "/acme/api.git/objects/info/packs",
            "/settings/tokens",
        ] {
            let refused = classify(SiteKind::DotCom, &get, path).expect_err(path);
            assert_eq!(refused.status, StatusCode::FORBIDDEN, "{path}");
        }
    }

    #[test]
    fn api_paths_pick_the_repository_or_the_default_token() {
        let get = Method::GET;
        let route = classify(SiteKind::DotComApi, &get, "/repos/acme/api/pulls").expect("ok");
        assert_eq!(route.want, repo("acme/api"));
        assert_eq!(route.stamp, Stamp::Token);
        assert_eq!(
            classify(SiteKind::DotComApi, &get, "/user")
                .expect("ok")
                .want,
            Which::Default
        );
        assert_eq!(
            classify(SiteKind::DotComApi, &Method::POST, "/graphql")
                .expect("ok")
                .want,
            Which::Default
        );
        let ghe = |path| classify(SiteKind::Enterprise, &get, path);
        assert_eq!(
            ghe("/api/v3/repos/labs/tool").expect("ok").want,
            repo("labs/tool")
        );
        assert_eq!(ghe("/api/graphql").expect("ok").stamp, Stamp::Token);
        assert_eq!(
            ghe("/labs/tool.git/info/refs").expect("ok").stamp,
            Stamp::Basic
        );
        assert!(ghe("/api/v4/x").is_err());
    }

    #[test]
    fn token_management_routes_are_refused_whatever_the_method() {
        for (kind, path) in [
            (SiteKind::DotComApi, "/installation/token"),
            (SiteKind::DotComApi, "/Installation/Token"),
            (SiteKind::DotComApi, "/app/installations/1/access_tokens"),
            (SiteKind::DotComApi, "/app"),
            (SiteKind::DotComApi, "/applications/abc/token"),
            (SiteKind::DotComApi, "/credentials/revoke"),
            (SiteKind::Enterprise, "/api/v3/installation/token"),
        ] {
            for method in [Method::DELETE, Method::GET, Method::POST] {
                let refused = classify(kind, &method, path).expect_err(path);
                assert_eq!(refused.status, StatusCode::FORBIDDEN, "{method} {path}");
            }
        }
        assert!(classify(SiteKind::DotComApi, &Method::GET, "/apps/some-app").is_ok());
    }

    #[test]
    fn request_line_tricks_are_refused() {
        for path in [
            "/acme/api.git/../../evil/x.git/info/refs",
            "/acme/api.git/./info/refs",
            "/acme//api.git/info/refs",
            "/acme%2fapi.git/info/refs",
            "/acme/api.git/%2e%2e/x/info/refs",
            "/acme\\api.git/info/refs",
            "acme/api.git/info/refs",
            "/repos/acme/api/%2E%2E/%2E%2E/evil/x",
        ] {
            for kind in [SiteKind::DotCom, SiteKind::DotComApi] {
                let refused = classify(kind, &Method::GET, path).expect_err(path);
                assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{path}");
            }
        }
        assert!(classify(SiteKind::DotCom, &Method::GET, "/bad owner/x/info/refs").is_err());
    }

    #[test]
    fn client_credentials_and_hop_by_hop_headers_never_go_upstream() {
        let mut client = HeaderMap::new();
        client.append("authorization", "token attacker".parse().unwrap());
        client.append("Authorization", "Basic b3RoZXI=".parse().unwrap());
        client.append("proxy-authorization", "Basic eA==".parse().unwrap());
        client.append("cookie", "user_session=1".parse().unwrap());
        client.append("connection", "close, x-secret-hop".parse().unwrap());
        client.append("x-secret-hop", "1".parse().unwrap());
        client.append("keep-alive", "timeout=5".parse().unwrap());
        client.append("host", "github.com".parse().unwrap());
        client.append("git-protocol", "version=2".parse().unwrap());
        client.append(
            "content-type",
            "application/x-git-upload-pack-request".parse().unwrap(),
        );
        let out = forwarded_headers(&client);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["git-protocol", "content-type"]);
    }

    #[test]
    fn the_target_must_be_the_tunnels_host() {
        let site = Site {
            authority: "github.com".into(),
            kind: SiteKind::DotCom,
        };
        let headers = |hosts: &[&str]| {
            let mut h = HeaderMap::new();
            for host in hosts {
                h.append(header::HOST, host.parse().unwrap());
            }
            h
        };
        assert!(check_target(&site, None, None, &headers(&["github.com"])).is_ok());
        assert!(check_target(&site, None, None, &headers(&["GitHub.com:443"])).is_ok());
        assert!(check_target(&site, None, None, &headers(&["evil.example"])).is_err());
        assert!(
            check_target(&site, None, None, &headers(&["github.com", "evil.example"])).is_err()
        );
        assert!(check_target(&site, None, None, &headers(&[])).is_err());
        let evil: http::uri::Authority = "evil.example".parse().unwrap();
        assert!(
            check_target(&site, Some(&evil), Some("https"), &headers(&["github.com"])).is_err()
        );
        let same: http::uri::Authority = "github.com".parse().unwrap();
        assert!(check_target(&site, Some(&same), Some("http"), &headers(&["github.com"])).is_err());
        assert!(check_target(&site, Some(&same), Some("https"), &headers(&["github.com"])).is_ok());
    }

    #[test]
    fn stamps_are_what_github_expects() {
        assert_eq!(Stamp::Token.header_value("ghs_x"), "token ghs_x");
        // base64("x-access-token:ghs_abc")
        assert_eq!(
            Stamp::Basic.header_value("ghs_abc"),
            "Basic eC1hY2Nlc3MtdG9rZW46Z2hzX2FiYw=="
        );
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
    }
}
