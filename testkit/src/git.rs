//! git's own smart-HTTP backend behind token auth.
//!
//! Why: the point of the whole project is that git keeps working as tokens
//! rotate. This server runs `git http-backend` (real clones, fetches and
//! pushes) and accepts only Basic auth `x-access-token:<token>` with a token
//! the platform double issued, that has not expired or been revoked and
//! whose stated scope reaches the repository (`OWNER/NAME.git`), as GitHub
//! would — or the one personal access token a test sets
//! ([`GitServer::accept_pat`]), for every repository; it counts what it
//! refused and which tokens it accepted.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::http::HttpServer;
use crate::platform::TokenAuthority;
use crate::{WAIT, lock};

struct GitShared {
    root: PathBuf,
    authority: TokenAuthority,
    /// 401s to requests without credentials (git's first, anonymous try).
    anonymous: Mutex<usize>,
    /// 401s to requests that carried a token that was not current.
    rejected: Mutex<usize>,
    accepted: Mutex<Vec<String>>,
    /// A personal access token `(username, token)` accepted everywhere.
    pat: Mutex<Option<(String, String)>>,
    /// Every request that arrived, in order: `(method, path)`.
    requests: Mutex<Vec<(String, String)>>,
}

/// `git http-backend` behind Basic auth `x-access-token:<current token>`.
pub struct GitServer {
    shared: Arc<GitShared>,
    server: HttpServer,
}

impl GitServer {
    /// Serves bare repositories under `root`, accepting tokens `authority`
    /// considers current.
    pub fn start(root: &Path, authority: TokenAuthority) -> Self {
        Self::start_with(root, authority, None)
    }

    /// [`Self::start`] over TLS with `tls` (a [`crate::TestCa`] leaf for
    /// the host names the clients use, `github.com` say).
    pub fn start_tls(
        root: &Path,
        authority: TokenAuthority,
        tls: Arc<rustls::ServerConfig>,
    ) -> Self {
        Self::start_with(root, authority, Some(tls))
    }

    fn start_with(
        root: &Path,
        authority: TokenAuthority,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let shared = Arc::new(GitShared {
            root: root.to_owned(),
            authority,
            anonymous: Mutex::new(0),
            rejected: Mutex::new(0),
            accepted: Mutex::default(),
            pat: Mutex::default(),
            requests: Mutex::default(),
        });
        let app = Router::new()
            .fallback(git_cgi)
            .with_state(Arc::clone(&shared));
        let server = match tls {
            Some(tls) => HttpServer::start_tls(app, tls),
            None => HttpServer::start(app),
        };
        Self { shared, server }
    }

    /// `127.0.0.1:PORT`, the address it listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.addr()
    }

    /// Every request that reached the server: `(method, path)`.
    pub fn requests(&self) -> Vec<(String, String)> {
        lock(&self.shared.requests).clone()
    }

    /// `http://127.0.0.1:PORT` (the credential context for git config).
    pub fn base_url(&self) -> String {
        self.server.url()
    }

    /// `127.0.0.1:PORT` (for `CREDD_HOSTS`).
    pub fn host(&self) -> String {
        self.server.addr().to_string()
    }

    /// Creates a bare repository `name.git` that accepts pushes; returns its URL.
    pub fn create_repo(&self, name: &str) -> String {
        let path = self.shared.root.join(format!("{name}.git"));
        let git = |cwd: &Path, args: &[&OsStr]| {
            let out = Command::new("git")
                .args(args)
                .current_dir(cwd)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("HOME", &self.shared.root)
                .output()
                .expect("run git");
            assert!(out.status.success(), "git {args:?} failed: {out:?}");
        };
        git(
            &self.shared.root,
            &["init", "--bare", "--quiet", "--initial-branch=main"]
                .map(OsStr::new)
                .into_iter()
                .chain([path.as_os_str()])
                .collect::<Vec<_>>(),
        );
        git(
            &path,
            &["config", "http.receivepack", "true"].map(OsStr::new),
        );
        format!("{}/{name}.git", self.base_url())
    }

    /// How many requests were refused with 401 (anonymous or not).
    pub fn unauthorized(&self) -> usize {
        *lock(&self.shared.anonymous) + *lock(&self.shared.rejected)
    }

    /// How many requests carried a token that was not (or no longer) current.
    pub fn rejected_credentials(&self) -> usize {
        *lock(&self.shared.rejected)
    }

    /// Accepts Basic auth `username:pat` for every repository from now on
    /// (`None`: no longer), as GitHub accepts a personal access token.
    pub fn accept_pat(&self, credential: Option<(&str, &str)>) {
        *lock(&self.shared.pat) = credential.map(|(u, p)| (u.to_owned(), p.to_owned()));
    }

    /// Distinct tokens accepted so far, in first-seen order.
    pub fn accepted_tokens(&self) -> Vec<String> {
        lock(&self.shared.accepted).clone()
    }
}

/// `(username, password)` of `Authorization: Basic base64(USER:PASSWORD)`.
fn basic_credential(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let decoded = base64_decode(value.strip_prefix("Basic ")?.trim())?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, token) = text.split_once(':')?;
    Some((user.to_owned(), token.to_owned()))
}

fn base64_decode(input: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in input.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// `(OWNER, NAME)` of a `/OWNER/NAME.git/...` request path.
fn repository_of(path: &str) -> Option<(String, String)> {
    let mut segments = path.trim_start_matches('/').split('/');
    let owner = segments.next()?;
    let name = segments.next()?.strip_suffix(".git")?;
    Some((owner.to_owned(), name.to_owned()))
}

async fn git_cgi(State(shared): State<Arc<GitShared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    lock(&shared.requests).push((parts.method.to_string(), parts.uri.path().to_owned()));
    let offered = basic_credential(&parts.headers);
    // A token must be current and, for an `OWNER/NAME.git` path, scoped to
    // reach that repository (GitHub refuses an installation token outside
    // its account and repositories); the PAT reaches every repository.
    let repository = repository_of(parts.uri.path());
    let pat = lock(&shared.pat).clone();
    let token = offered.clone().and_then(|(user, t)| {
        let installation = user == "x-access-token"
            && shared.authority.is_current(&t)
            && repository
                .as_ref()
                .is_none_or(|(owner, name)| shared.authority.may_access(&t, owner, name));
        let personal = pat.as_ref().is_some_and(|(u, p)| *u == user && *p == t);
        (installation || personal).then_some(t)
    });
    let Some(token) = token else {
        match offered {
            Some(_) => *lock(&shared.rejected) += 1,
            None => *lock(&shared.anonymous) += 1,
        }
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"credd-test-git\"")],
            "authentication required\n",
        )
            .into_response();
    };
    {
        let mut accepted = lock(&shared.accepted);
        if !accepted.contains(&token) {
            accepted.push(token);
        }
    }
    let body = match axum::body::to_bytes(body, 256 << 20).await {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let mut env: HashMap<&str, String> = HashMap::new();
    env.insert("GIT_PROJECT_ROOT", shared.root.display().to_string());
    env.insert("GIT_HTTP_EXPORT_ALL", "1".into());
    env.insert("REQUEST_METHOD", parts.method.to_string());
    env.insert("PATH_INFO", parts.uri.path().to_owned());
    env.insert("QUERY_STRING", parts.uri.query().unwrap_or("").to_owned());
    env.insert("REMOTE_USER", "x-access-token".into());
    env.insert("REMOTE_ADDR", "127.0.0.1".into());
    env.insert("CONTENT_LENGTH", body.len().to_string());
    for (name, var) in [
        (header::CONTENT_TYPE, "CONTENT_TYPE"),
        (header::CONTENT_ENCODING, "HTTP_CONTENT_ENCODING"),
    ] {
        if let Some(v) = parts.headers.get(name).and_then(|v| v.to_str().ok()) {
            env.insert(var, v.to_owned());
        }
    }
    if let Some(v) = parts
        .headers
        .get("git-protocol")
        .and_then(|v| v.to_str().ok())
    {
        env.insert("GIT_PROTOCOL", v.to_owned());
    }
    let output = async {
        let mut child = tokio::process::Command::new("git")
            .arg("http-backend")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", &shared.root)
            .envs(&env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut stdin = child.stdin.take().expect("piped");
        let writer = async move {
            use tokio::io::AsyncWriteExt;
            let _ = stdin.write_all(&body).await;
        };
        let (_, output) = tokio::join!(writer, child.wait_with_output());
        output
    };
    let output = match tokio::time::timeout(WAIT, output).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("http-backend: {e}\n"),
            )
                .into_response();
        }
        Err(_) => {
            return (StatusCode::GATEWAY_TIMEOUT, "http-backend timed out\n").into_response();
        }
    };
    cgi_response(&output.stdout)
}

/// Turns CGI output (headers, blank line, body) into an HTTP response.
fn cgi_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4))
        .or_else(|| {
            raw.windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, i + 2))
        });
    let Some((head_end, body_start)) = split else {
        return (StatusCode::BAD_GATEWAY, "malformed CGI output\n").into_response();
    };
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let mut response = Response::new(Body::from(raw[body_start..].to_vec()));
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split(' ').next().and_then(|c| c.parse().ok());
            *response.status_mut() = code
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        } else if let (Ok(name), Ok(value)) = (
            header::HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    response
}
