//! Credentials for a registry, found where users already keep them, and the
//! parsing of the registry's authentication challenge.
//!
//! Sources, first match wins: `--creds USER:PASS` or a password on stdin
//! (given by the caller); `$REGISTRY_AUTH_FILE`; podman's
//! `$XDG_RUNTIME_DIR/containers/auth.json` and
//! `$XDG_CONFIG_HOME/containers/auth.json`; docker's
//! `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.  In each file a
//! per-registry `credHelpers` entry, then an `auths` entry (the most
//! specific `host/repo` prefix first, as podman allows), then the file's
//! `credsStore`, decide; helpers are run as `docker-credential-NAME get`.
//! Secrets live in [`Secret`], whose `Debug` and `Display` print nothing of
//! them, so no error, log or progress line can carry one.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("credentials file {path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("credential helper docker-credential-{helper} for {registry}: {why}")]
    Helper { helper: String, registry: String, why: String },
    #[error("--creds must be USER:PASSWORD (or USER with the password on stdin)")]
    BadCreds,
    #[error(
        "--creds USER:PASSWORD and --password-stdin both give a password: give --creds USER with --password-stdin"
    )]
    PasswordTwice,
    #[error("--password-stdin: standard input has no password (an empty first line)")]
    NoPassword,
}

/// A password or token.  Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }
    /// The secret itself, for an `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// What to authenticate with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A user name and password (Basic, or a token request with Basic).
    Password { username: String, password: Secret },
    /// An identity token (docker's `identitytoken`, a helper's `<token>`
    /// user): exchanged for a bearer token as an OAuth2 refresh token.
    IdentityToken(Secret),
}

/// Credentials and where they came from (for a progress line: the source,
/// never the secret).
#[derive(Debug, Clone)]
pub struct Found {
    pub credentials: Credentials,
    pub source: String,
}

/// `USER:PASSWORD` as given to `--creds`; with `stdin_password`, `USER`
/// alone and the password read by the caller.
pub fn parse_creds(arg: &str, stdin_password: Option<String>) -> Result<Credentials, AuthError> {
    let (user, pass) = match (arg.split_once(':'), stdin_password) {
        (None, Some(p)) if p.is_empty() => return Err(AuthError::NoPassword),
        (None, Some(p)) => (arg.to_string(), p),
        (Some((u, p)), None) => (u.to_string(), p.to_string()),
        (Some(_), Some(_)) => return Err(AuthError::PasswordTwice),
        (None, None) => return Err(AuthError::BadCreds),
    };
    if user.is_empty() {
        return Err(AuthError::BadCreds);
    }
    Ok(Credentials::Password { username: user, password: Secret(pass) })
}

/// The credential files to look in, in order, from the environment.
pub fn default_auth_files() -> Vec<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let mut files = Vec::new();
    if let Some(f) = env("REGISTRY_AUTH_FILE") {
        files.push(f);
    }
    if let Some(d) = env("XDG_RUNTIME_DIR") {
        files.push(d.join("containers/auth.json"));
    }
    let home = env("HOME");
    if let Some(d) = env("XDG_CONFIG_HOME").or_else(|| home.as_ref().map(|h| h.join(".config"))) {
        files.push(d.join("containers/auth.json"));
    }
    if let Some(d) = env("DOCKER_CONFIG").or_else(|| home.as_ref().map(|h| h.join(".docker"))) {
        files.push(d.join("config.json"));
    }
    files
}

#[derive(serde::Deserialize, Default)]
struct AuthFile {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: std::collections::BTreeMap<String, String>,
}

#[derive(serde::Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// Finds credentials for `registry` (`HOST[:PORT]` as the user wrote it)
/// and `repository` in `files` (missing files are skipped; unreadable or
/// malformed ones are errors, as a silent anonymous push would be).
pub fn lookup(registry: &str, repository: &str, files: &[PathBuf]) -> Result<Option<Found>, AuthError> {
    for path in files {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(AuthError::File { path: path.clone(), why: e.to_string() }),
        };
        let file: AuthFile = serde_json::from_slice(&text)
            // serde's message holds a position, not the text around it.
            .map_err(|e| AuthError::File { path: path.clone(), why: format!("not a credentials file: {e}") })?;
        if let Some(found) = lookup_in(&file, path, registry, repository)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

fn lookup_in(file: &AuthFile, path: &Path, registry: &str, repository: &str) -> Result<Option<Found>, AuthError> {
    let keys = registry_keys(registry);
    if let Some(helper) = keys.iter().find_map(|k| file.cred_helpers.get(k)) {
        return run_helper(helper, registry);
    }
    // Most specific first: host/a/b, host/a, host.
    let parts: Vec<&str> = repository.split('/').collect();
    let mut candidates: Vec<String> =
        (1..=parts.len()).rev().map(|n| format!("{registry}/{}", parts[..n].join("/"))).collect();
    candidates.extend(keys.iter().cloned());
    for want in &candidates {
        let hit = file.auths.iter().find(|(k, _)| normalise_key(k) == *want);
        if let Some((k, entry)) = hit {
            if let Some(c) = entry_credentials(entry, path, k)? {
                return Ok(Some(Found { credentials: c, source: format!("{} ({k})", path.display()) }));
            }
        }
    }
    if let Some(store) = &file.creds_store {
        return run_helper(store, registry);
    }
    Ok(None)
}

/// The spellings a registry goes by in credential files: as written, and
/// Docker Hub's legacy index URL.
fn registry_keys(registry: &str) -> Vec<String> {
    let mut keys = vec![registry.to_string()];
    if registry == "docker.io" {
        keys.extend([
            "index.docker.io".to_string(),
            "registry-1.docker.io".to_string(),
            "https://index.docker.io/v1/".to_string(),
        ]);
    }
    keys
}

/// `https://host/v1/` → `host`; `host/repo` stays.
fn normalise_key(key: &str) -> String {
    let k = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    if key.contains("://") {
        // A URL names a host only (docker's old spelling, path /v1/ or /v2/).
        let host = k.split('/').next().unwrap_or(k);
        if host == "index.docker.io" {
            return "docker.io".into();
        }
        return host.to_string();
    }
    k.trim_end_matches('/').to_string()
}

fn entry_credentials(entry: &AuthEntry, path: &Path, key: &str) -> Result<Option<Credentials>, AuthError> {
    if let Some(t) = entry.identitytoken.as_ref().filter(|t| !t.is_empty()) {
        return Ok(Some(Credentials::IdentityToken(Secret(t.clone()))));
    }
    if let Some(a) = entry.auth.as_ref().filter(|a| !a.is_empty()) {
        let bad = || AuthError::File {
            path: path.to_path_buf(),
            why: format!("the `auth` of `{key}` is not base64 of USER:PASSWORD"),
        };
        let raw = base64::engine::general_purpose::STANDARD.decode(a.trim()).map_err(|_| bad())?;
        let text = String::from_utf8(raw).map_err(|_| bad())?;
        let (u, p) = text.split_once(':').ok_or_else(bad)?;
        return Ok(Some(Credentials::Password { username: u.to_string(), password: Secret(p.to_string()) }));
    }
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(Some(Credentials::Password { username: u.clone(), password: Secret(p.clone()) }));
    }
    Ok(None)
}

/// Runs `docker-credential-HELPER get` with the registry on stdin, as the
/// credential-helper protocol says.  "Not found" is no credentials.
fn run_helper(helper: &str, registry: &str) -> Result<Option<Found>, AuthError> {
    let err = |why: String| AuthError::Helper { helper: helper.to_string(), registry: registry.to_string(), why };
    if helper.is_empty() || helper.contains('/') {
        return Err(err("not a helper name".into()));
    }
    let program = format!("docker-credential-{helper}");
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("cannot run it: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading is judged by its status.
        let _ = stdin.write_all(registry.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        if text.to_ascii_lowercase().contains("credentials not found") {
            return Ok(None);
        }
        // The helper's own words are not echoed: they might hold a secret.
        return Err(err(format!("it failed ({})", out.status)));
    }
    #[derive(serde::Deserialize)]
    struct Reply {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let reply: Reply =
        serde_json::from_slice(&out.stdout).map_err(|_| err("its reply is not {\"Username\", \"Secret\"}".into()))?;
    let credentials = if reply.username == "<token>" {
        Credentials::IdentityToken(Secret(reply.secret))
    } else {
        Credentials::Password { username: reply.username, password: Secret(reply.secret) }
    };
    Ok(Some(Found { credentials, source: program }))
}

/// An authentication challenge from `WWW-Authenticate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
}

/// Parses the challenges of one `WWW-Authenticate` value (RFC 7235:
/// `Scheme k=v, k="v", Scheme2 ...`); unknown schemes are dropped.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out = Vec::new();
    let mut scheme: Option<String> = None;
    let mut params: Vec<(String, String)> = Vec::new();
    let s = header.as_bytes();
    let mut i = 0;
    let flush = |scheme: &mut Option<String>, params: &mut Vec<(String, String)>, out: &mut Vec<Challenge>| {
        if let Some(sc) = scheme.take() {
            let get = |k: &str| params.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone());
            if sc.eq_ignore_ascii_case("basic") {
                out.push(Challenge::Basic);
            } else if sc.eq_ignore_ascii_case("bearer") {
                if let Some(realm) = get("realm") {
                    out.push(Challenge::Bearer { realm, service: get("service"), scope: get("scope") });
                }
            }
        }
        params.clear();
    };
    while i < s.len() {
        while i < s.len() && (s[i] == b' ' || s[i] == b',' || s[i] == b'\t') {
            i += 1;
        }
        let start = i;
        while i < s.len() && !matches!(s[i], b' ' | b'=' | b',' | b'\t') {
            i += 1;
        }
        if start == i {
            break;
        }
        let token = &header[start..i];
        let mut j = i;
        while j < s.len() && s[j] == b' ' {
            j += 1;
        }
        if j < s.len() && s[j] == b'=' {
            // A parameter of the current scheme.
            j += 1;
            while j < s.len() && s[j] == b' ' {
                j += 1;
            }
            let mut value = String::new();
            if j < s.len() && s[j] == b'"' {
                j += 1;
                while j < s.len() && s[j] != b'"' {
                    if s[j] == b'\\' && j + 1 < s.len() {
                        j += 1;
                    }
                    let ch_len = utf8_len(s[j]);
                    value.push_str(&header[j..(j + ch_len).min(s.len())]);
                    j += ch_len;
                }
                j += 1;
            } else {
                let vs = j;
                while j < s.len() && s[j] != b',' && s[j] != b' ' {
                    j += 1;
                }
                value.push_str(&header[vs..j]);
            }
            params.push((token.to_string(), value));
            i = j;
        } else {
            flush(&mut scheme, &mut params, &mut out);
            scheme = Some(token.to_string());
        }
    }
    flush(&mut scheme, &mut params, &mut out);
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

/// `Authorization: Basic ...` for a user and password.
pub fn basic_header(username: &str, password: &Secret) -> String {
    let raw = format!("{username}:{}", password.expose());
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(parse_challenges(r#"Basic realm="Registry Realm""#), vec![Challenge::Basic]);
        let c = parse_challenges(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(
            c,
            vec![Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }]
        );
        let c = parse_challenges(r#"Negotiate, Bearer realm=https://t.example/tok, Basic realm="x""#);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[1], Challenge::Basic);
    }

    #[test]
    fn secrets_never_print() {
        let c = parse_creds("alice:s3cr3t-pw", None).unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t"), "{c:?}");
        let c = parse_creds("alice", Some("from-stdin".into())).unwrap();
        assert!(!format!("{c:?}").contains("from-stdin"));
        assert!(parse_creds("alice", None).is_err());
        assert!(parse_creds(":x", None).is_err());
        let e = parse_creds("alice:pw", Some("pw".into())).unwrap_err().to_string();
        assert!(e.contains("both give a password: give --creds USER with --password-stdin"), "{e}");
        let e = parse_creds("alice", Some(String::new())).unwrap_err().to_string();
        assert!(e.contains("standard input has no password"), "{e}");
    }

    #[test]
    fn files_in_order_and_most_specific_entry() {
        let dir = tempfile::tempdir().unwrap();
        let podman = dir.path().join("auth.json");
        let docker = dir.path().join("config.json");
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        std::fs::write(
            &podman,
            format!(
                r#"{{"auths":{{"reg.example:5000/team/app":{{"auth":"{}"}},"reg.example:5000":{{"auth":"{}"}}}}}}"#,
                b64("app:one"),
                b64("host:two")
            ),
        )
        .unwrap();
        std::fs::write(
            &docker,
            format!(r#"{{"auths":{{"https://other.example/v1/":{{"auth":"{}"}}}}}}"#, b64("o:three")),
        )
        .unwrap();
        let files = [dir.path().join("missing.json"), podman.clone(), docker.clone()];
        let user = |f: Option<Found>| match f.unwrap().credentials {
            Credentials::Password { username, .. } => username,
            Credentials::IdentityToken(_) => "token".into(),
        };
        assert_eq!(user(lookup("reg.example:5000", "team/app", &files).unwrap()), "app");
        assert_eq!(user(lookup("reg.example:5000", "team/other", &files).unwrap()), "host");
        assert_eq!(user(lookup("other.example", "x", &files).unwrap()), "o");
        assert!(lookup("nowhere.example", "x", &files).unwrap().is_none());
        std::fs::write(&docker, r#"{"auths":{"bad.example":{"auth":"%%%"}}}"#).unwrap();
        let e = lookup("bad.example", "x", &files).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("bad.example"), "{e}");
    }

    #[test]
    fn a_missing_helper_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.json");
        std::fs::write(&f, r#"{"credHelpers":{"reg.example":"nixstream-test-absent"}}"#).unwrap();
        let e = lookup("reg.example", "x", &[f]).unwrap_err().to_string();
        assert!(e.contains("docker-credential-nixstream-test-absent"), "{e}");
    }
}
