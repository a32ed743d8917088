//! Configuration read from the environment, each variable by one rule.
//!
//! The daemon and the helper must find the same socket without being told
//! twice, so the variable names, defaults and validation live here. Each
//! binary reads only what it uses — [`PlatformConfig`] the daemon (and its
//! `--fetch-once`), [`HelperConfig`] `credd` — so a value only one of them
//! needs can never stop the other. Values are looked up through a closure so
//! the daemon can layer its command-line flags over the environment and
//! tests can pass a map.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

/// Environment variable names, as documented in the README.
pub mod vars {
    /// Base URL of the platform (`http://platform:8080`).
    pub const PLATFORM_URL: &str = "PLATFORM_URL";
    /// Folder holding `.auth_token`, the workspace's bearer for the platform.
    pub const CONFIGS_DIR: &str = "CONFIGS_DIR";
    /// The workspace's id; selects the per-workspace route when set.
    pub const WORKSPACE_ID: &str = "WORKSPACE_ID";
    /// Path of the daemon's Unix socket.
    pub const CREDD_SOCKET: &str = "CREDD_SOCKET";
    /// Comma-separated hosts the helper answers for.
    pub const CREDD_HOSTS: &str = "CREDD_HOSTS";
    /// Per-user runtime folder (systemd's `/run/user/$UID`).
    pub const XDG_RUNTIME_DIR: &str = "XDG_RUNTIME_DIR";
    /// A uid `credd` trusts as the socket's listener besides its own and
    /// root's (a daemon running as its own user on a socket it was handed).
    pub const CREDD_DAEMON_UID: &str = "CREDD_DAEMON_UID";
}

/// Platform URL used when `PLATFORM_URL` is unset (the platform's in-cluster name).
pub const DEFAULT_PLATFORM_URL: &str = "http://platform:8080";
/// Configs folder used when `CONFIGS_DIR` is unset.
pub const DEFAULT_CONFIGS_DIR: &str = "/configs";
/// Hosts answered when `CREDD_HOSTS` is unset.
pub const DEFAULT_HOSTS: &str = "github.com";
/// File inside the configs folder that holds the platform bearer.
pub const AUTH_TOKEN_FILE: &str = ".auth_token";

/// Longest value accepted from any variable; paths and URLs are far shorter.
const MAX_VALUE_LEN: usize = 4096;
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH_LEN: usize = 107;
const MAX_HOSTS: usize = 64;
/// Longest workspace id.
pub const MAX_WORKSPACE_ID_LEN: usize = 128;

/// Where the platform is and which workspace asks: what every platform call
/// needs (the daemon's, and `molecule-credd --fetch-once`'s for `credd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformConfig {
    /// Platform base URL, without a trailing slash.
    pub platform_url: String,
    /// Folder holding [`AUTH_TOKEN_FILE`].
    pub configs_dir: PathBuf,
    /// Workspace id, when known.
    pub workspace_id: Option<String>,
}

/// What `credd` reads: the daemon's socket, the hosts it answers for, the
/// listener it trusts. Nothing about the platform: `credd` never calls it
/// itself (`molecule-credd --fetch-once` does, reading [`PlatformConfig`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperConfig {
    /// The daemon's socket ([`socket_path_from_lookup`]).
    pub socket_path: PathBuf,
    /// Hosts (lower case, optionally `host:port`) the helper answers for
    /// ([`hosts_from_lookup`]).
    pub hosts: Vec<String>,
    /// A listener uid to trust besides our own and root's ([`vars::CREDD_DAEMON_UID`]).
    pub daemon_uid: Option<u32>,
}

/// A configuration value that was present but unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct ConfigError {
    /// The variable (or flag) at fault.
    pub var: &'static str,
    /// What was wrong with it and what would be right.
    pub problem: String,
}

impl ConfigError {
    fn new(var: &'static str, problem: impl fmt::Display) -> Self {
        Self {
            var,
            problem: problem.to_string(),
        }
    }
}

/// Variables read through a lookup: an empty value counts as unset; one
/// that is not UTF-8 or longer than [`MAX_VALUE_LEN`] is an error.
struct Values<F>(F);

impl<F: Fn(&str) -> Option<OsString>> Values<F> {
    fn get(&self, var: &'static str) -> Result<Option<String>, ConfigError> {
        let Some(raw) = (self.0)(var) else {
            return Ok(None);
        };
        let value = raw.into_string().map_err(|_| {
            ConfigError::new(var, "is not valid UTF-8; set it to a plain text value")
        })?;
        if value.len() > MAX_VALUE_LEN {
            return Err(ConfigError::new(
                var,
                format_args!("is longer than {MAX_VALUE_LEN} bytes"),
            ));
        }
        let value = value.trim();
        Ok((!value.is_empty()).then(|| value.to_owned()))
    }
}

impl PlatformConfig {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    /// Reads `PLATFORM_URL`, `CONFIGS_DIR` and `WORKSPACE_ID` through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Result<Self, ConfigError> {
        let values = Values(lookup);
        Ok(Self {
            platform_url: parse_platform_url(
                values
                    .get(vars::PLATFORM_URL)?
                    .as_deref()
                    .unwrap_or(DEFAULT_PLATFORM_URL),
            )?,
            configs_dir: absolute_path(
                vars::CONFIGS_DIR,
                values
                    .get(vars::CONFIGS_DIR)?
                    .as_deref()
                    .unwrap_or(DEFAULT_CONFIGS_DIR),
            )?,
            workspace_id: values
                .get(vars::WORKSPACE_ID)?
                .map(|id| parse_workspace_id(&id))
                .transpose()?,
        })
    }

    /// Where the platform bearer is read from (on every platform call).
    pub fn auth_token_path(&self) -> PathBuf {
        self.configs_dir.join(AUTH_TOKEN_FILE)
    }

    /// The token endpoint: the workspace route when the id is known, else the admin route.
    pub fn token_endpoint(&self) -> String {
        use crate::platform_api::{ADMIN_TOKEN_ROUTE, token_path};
        match &self.workspace_id {
            Some(id) => format!("{}{}", self.platform_url, token_path(id)),
            None => format!("{}{ADMIN_TOKEN_ROUTE}", self.platform_url),
        }
    }
}

/// The daemon's socket: `CREDD_SOCKET`, else [`default_socket_path`] for
/// `XDG_RUNTIME_DIR`; absolute and short enough for `sun_path`. The one
/// rule for the daemon and the helper.
pub fn socket_path_from_lookup(
    lookup: impl Fn(&str) -> Option<OsString>,
) -> Result<PathBuf, ConfigError> {
    let values = Values(lookup);
    let socket_path = match values.get(vars::CREDD_SOCKET)? {
        Some(path) => absolute_path(vars::CREDD_SOCKET, &path)?,
        None => default_socket_path(values.get(vars::XDG_RUNTIME_DIR)?.as_deref()),
    };
    if socket_path.as_os_str().len() > MAX_SOCKET_PATH_LEN {
        return Err(ConfigError::new(
            vars::CREDD_SOCKET,
            format_args!(
                "socket path {} is longer than the {MAX_SOCKET_PATH_LEN} bytes a Unix socket allows; choose a shorter path",
                socket_path.display()
            ),
        ));
    }
    Ok(socket_path)
}

/// The hosts `CREDD_HOSTS` lists (default [`DEFAULT_HOSTS`]): what the
/// helper answers for and what the daemon's gateway tunnels.
pub fn hosts_from_lookup(
    lookup: impl Fn(&str) -> Option<OsString>,
) -> Result<Vec<String>, ConfigError> {
    let listed = Values(lookup).get(vars::CREDD_HOSTS)?;
    parse_hosts(listed.as_deref().unwrap_or(DEFAULT_HOSTS))
}

impl HelperConfig {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    /// Reads the socket, `CREDD_HOSTS` and `CREDD_DAEMON_UID` through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Result<Self, ConfigError> {
        let socket_path = socket_path_from_lookup(&lookup)?;
        let hosts = hosts_from_lookup(&lookup)?;
        let daemon_uid = Values(&lookup)
            .get(vars::CREDD_DAEMON_UID)?
            .map(|uid| {
                uid.parse::<u32>().map_err(|_| {
                    ConfigError::new(
                        vars::CREDD_DAEMON_UID,
                        format_args!("{uid:?} is not a numeric uid; set it to the daemon's uid, e.g. `id -u molecule-credd`"),
                    )
                })
            })
            .transpose()?;
        Ok(Self {
            socket_path,
            hosts,
            daemon_uid,
        })
    }

    /// The uids that may own the socket's folder: our own and root's (a
    /// private folder of anyone else could not even be entered).
    pub fn trusted_folder_owners(&self) -> [u32; 2] {
        [nix::unistd::geteuid().as_raw(), 0]
    }

    /// The uids a listener on the socket may have for `credd` to talk to it:
    /// its own; root (the system service manager listens on
    /// socket-activated sockets, and root can read this process's memory
    /// anyway); and [`Self::daemon_uid`]. `folder_owners` is what
    /// [`Self::trusted_folder_owners`] returned (taken, not asked again:
    /// `credd get` makes one `geteuid(2)`, not two).
    pub fn trusted_daemon_uids(&self, folder_owners: [u32; 2]) -> Vec<u32> {
        let mut uids = folder_owners.to_vec();
        uids.extend(self.daemon_uid);
        uids
    }

    /// Whether `host` (as git sends it, possibly with `:port`) is one we answer for.
    pub fn serves_host(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    }
}

/// [`default_socket_path`] for this process's `XDG_RUNTIME_DIR`.
pub fn default_socket_path_from_env() -> PathBuf {
    let xdg = std::env::var(vars::XDG_RUNTIME_DIR).ok();
    default_socket_path(xdg.as_deref())
}

/// `$XDG_RUNTIME_DIR/molecule-credd/credd.sock`, else `/tmp/molecule-credd-$UID/credd.sock`.
///
/// The home folder is not used: it is read-only in locked-down workspaces.
pub fn default_socket_path(xdg_runtime_dir: Option<&str>) -> PathBuf {
    match xdg_runtime_dir.filter(|d| d.starts_with('/')) {
        Some(dir) => Path::new(dir).join("molecule-credd").join("credd.sock"),
        None => PathBuf::from(format!(
            "/tmp/molecule-credd-{}/credd.sock",
            nix::unistd::getuid()
        )),
    }
}

fn parse_platform_url(value: &str) -> Result<String, ConfigError> {
    let bad = |why: &str| {
        ConfigError::new(
            vars::PLATFORM_URL,
            format_args!("{why}; expected something like {DEFAULT_PLATFORM_URL}"),
        )
    };
    let rest = value
        .strip_prefix("http://")
        .or_else(|| value.strip_prefix("https://"))
        .ok_or_else(|| bad("must start with http:// or https://"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(bad("has no host"));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("contains spaces or non-ASCII characters"));
    }
    if rest.contains(['?', '#', '@']) {
        return Err(bad(
            "must not contain a query, fragment or user info (the bearer comes from .auth_token)",
        ));
    }
    Ok(value.trim_end_matches('/').to_owned())
}

fn absolute_path(var: &'static str, value: &str) -> Result<PathBuf, ConfigError> {
    if !value.starts_with('/') {
        return Err(ConfigError::new(
            var,
            format_args!("{value:?} is not an absolute path"),
        ));
    }
    Ok(PathBuf::from(value))
}

/// Whether `id` is a workspace id: 1 to [`MAX_WORKSPACE_ID_LEN`] of
/// `A-Z a-z 0-9 - _ .`, not starting with `.`. It becomes a segment of a URL
/// path (`/workspaces/{id}/…`), so `.` and `..` must never pass. The one rule
/// for the daemon, the helper and the platform.
pub fn is_valid_workspace_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_WORKSPACE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !id.starts_with('.')
}

fn parse_workspace_id(value: &str) -> Result<String, ConfigError> {
    if is_valid_workspace_id(value) {
        Ok(value.to_owned())
    } else {
        Err(ConfigError::new(
            vars::WORKSPACE_ID,
            format_args!(
                "must be 1-{MAX_WORKSPACE_ID_LEN} characters of A-Z a-z 0-9 - _ . (it becomes part of a URL path)"
            ),
        ))
    }
}

fn parse_hosts(value: &str) -> Result<Vec<String>, ConfigError> {
    let mut hosts = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        // git writes IPv6 literals in brackets (`[::1]:8080`), as URLs do.
        let (name, port) = match entry.strip_prefix('[') {
            Some(rest) => match rest.split_once(']') {
                Some((ip, "")) => (ip, None),
                Some((ip, tail)) => (ip, Some(tail.strip_prefix(':').unwrap_or(tail))),
                None => ("", None),
            },
            None => match entry.rsplit_once(':') {
                Some((name, port)) => (name, Some(port)),
                None => (entry, None),
            },
        };
        let name_ok = if entry.starts_with('[') {
            name.parse::<std::net::Ipv6Addr>().is_ok()
        } else {
            !name.is_empty()
                && name.len() <= 253
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'))
        };
        let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p != 0));
        if !name_ok || !port_ok {
            return Err(ConfigError::new(
                vars::CREDD_HOSTS,
                format_args!(
                    "{entry:?} is not a host name (optionally with :port); list hosts like github.com,ghe.example.com"
                ),
            ));
        }
        let host = entry.to_ascii_lowercase();
        if !hosts.contains(&host) {
            hosts.push(host);
        }
    }
    if hosts.is_empty() {
        return Err(ConfigError::new(
            vars::CREDD_HOSTS,
            "lists no hosts; unset it for github.com",
        ));
    }
    if hosts.len() > MAX_HOSTS {
        return Err(ConfigError::new(
            vars::CREDD_HOSTS,
            format_args!("lists more than {MAX_HOSTS} hosts"),
        ));
    }
    Ok(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn config(pairs: &[(&str, &str)]) -> Result<HelperConfig, ConfigError> {
        HelperConfig::from_lookup(lookup(pairs))
    }

    fn platform(pairs: &[(&str, &str)]) -> Result<PlatformConfig, ConfigError> {
        PlatformConfig::from_lookup(lookup(pairs))
    }

    #[test]
    fn defaults_match_the_documented_contract() {
        let c = config(&[("XDG_RUNTIME_DIR", "/run/user/1000")]).expect("defaults are valid");
        assert_eq!(
            c.socket_path,
            Path::new("/run/user/1000/molecule-credd/credd.sock")
        );
        assert_eq!(c.hosts, ["github.com"]);
        let p = platform(&[]).expect("defaults are valid");
        assert_eq!(p.platform_url, "http://platform:8080");
        assert_eq!(p.auth_token_path(), Path::new("/configs/.auth_token"));
        assert_eq!(
            p.token_endpoint(),
            "http://platform:8080/admin/github-installation-token"
        );
        let tmp = config(&[]).expect("defaults are valid");
        assert_eq!(
            tmp.socket_path,
            PathBuf::from(format!(
                "/tmp/molecule-credd-{}/credd.sock",
                nix::unistd::getuid()
            ))
        );
    }

    #[test]
    fn each_reads_only_its_own_variables() {
        // credd never calls the platform, the platform client never needs
        // the helper's hosts: a bad value of the other's stops neither.
        let bad_platform = [("PLATFORM_URL", "nonsense"), ("WORKSPACE_ID", "../x")];
        assert!(config(&bad_platform).is_ok());
        let bad_helper = [("CREDD_HOSTS", " , "), ("CREDD_DAEMON_UID", "x")];
        assert!(platform(&bad_helper).is_ok());
    }

    #[test]
    fn workspace_id_selects_the_workspace_route() {
        let c = platform(&[
            ("PLATFORM_URL", "https://platform.internal:8443/"),
            ("WORKSPACE_ID", "ws-42"),
        ])
        .expect("valid");
        assert_eq!(
            c.token_endpoint(),
            "https://platform.internal:8443/workspaces/ws-42/github-installation-token"
        );
    }

    #[test]
    fn hosts_are_normalised_and_matched_case_insensitively() {
        let c = config(&[(
            "CREDD_HOSTS",
            " GitHub.com, ghe.example.com:8443 ,,github.com",
        )])
        .expect("valid");
        assert_eq!(c.hosts, ["github.com", "ghe.example.com:8443"]);
        assert!(c.serves_host("GITHUB.COM"));
        assert!(c.serves_host("ghe.example.com:8443"));
        assert!(!c.serves_host("ghe.example.com"));
        assert!(!c.serves_host("evil.com"));
        let v6 = config(&[("CREDD_HOSTS", "[::1]:8080,[::1]")]).expect("IPv6 literals");
        assert_eq!(v6.hosts, ["[::1]:8080", "[::1]"]);
        for bad in ["[::1", "[::g]", "[::1]x", "[::1]:0"] {
            config(&[("CREDD_HOSTS", bad)]).expect_err(bad);
        }
    }

    #[test]
    fn bad_values_name_the_variable_and_the_fix() {
        for (var, value) in [
            ("PLATFORM_URL", "platform:8080"),
            ("PLATFORM_URL", "http://"),
            ("PLATFORM_URL", "http://user:pw@platform"),
            ("CONFIGS_DIR", "relative/dir"),
            ("CREDD_SOCKET", "sock"),
            ("WORKSPACE_ID", "../../admin"),
            ("CREDD_HOSTS", "github.com/evil"),
            ("CREDD_HOSTS", "github.com:99999"),
            ("CREDD_HOSTS", " , "),
            ("CREDD_DAEMON_UID", "molecule-credd"),
        ] {
            let err = if var.starts_with("CREDD_") {
                config(&[(var, value)]).expect_err(value)
            } else {
                platform(&[(var, value)]).expect_err(value)
            };
            assert_eq!(err.var, var, "{err}");
            assert!(err.to_string().starts_with(var), "{err}");
        }
        let long = format!("/{}", "s".repeat(200));
        let err = config(&[("CREDD_SOCKET", &long)]).expect_err("too long");
        assert!(err.problem.contains("shorter"), "{err}");
    }

    #[test]
    fn the_daemon_uid_is_trusted_besides_our_own_and_roots() {
        let me = nix::unistd::geteuid().as_raw();
        let c = config(&[]).expect("valid");
        assert_eq!(c.daemon_uid, None);
        assert!(
            c.trusted_daemon_uids(c.trusted_folder_owners())
                .contains(&me)
        );
        assert!(
            c.trusted_daemon_uids(c.trusted_folder_owners())
                .contains(&0)
        );
        assert!(
            !c.trusted_daemon_uids(c.trusted_folder_owners())
                .contains(&65_534)
        );
        let c = config(&[("CREDD_DAEMON_UID", "998")]).expect("valid");
        assert!(
            c.trusted_daemon_uids(c.trusted_folder_owners())
                .contains(&998)
        );
        assert!(
            !c.trusted_folder_owners().contains(&998),
            "a listener, not a folder owner"
        );
    }

    #[test]
    fn empty_values_count_as_unset() {
        let c = platform(&[("WORKSPACE_ID", "  "), ("PLATFORM_URL", "")]).expect("valid");
        assert_eq!(c.workspace_id, None);
        assert_eq!(c.platform_url, DEFAULT_PLATFORM_URL);
    }
}
