//! HTTP(S) to one repository of one registry, authenticated.
//!
//! TLS is verified against the platform's roots plus the CAs of
//! `--cert-dir` (and `/etc/containers/certs.d/HOST:PORT`,
//! `/etc/docker/certs.d/HOST:PORT`, where docker and podman keep them);
//! a `*.cert`/`*.key` pair there is the client certificate.  Plain HTTP is
//! tried only for a loopback registry or with `--insecure`, which also turns
//! certificate checks off.  Authentication follows the registry's
//! challenge: Basic, or a Bearer token asked for with the push scope (and
//! pull on the `--mount-from` repositories) and asked for again when a
//! request comes back 401.  Redirects are not followed: the registry
//! protocol needs none for a push, and a blob `HEAD` answered 3xx already
//! says the blob exists.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ureq::http::{self, Method, Request, Response};
use ureq::tls::{Certificate, ClientCert, PemItem, RootCerts, TlsConfig};

use super::auth::{basic_header, parse_challenges, Challenge, Credentials, Secret};
use super::reference::Reference;
use super::RegistryError;

/// How to reach a registry.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Plain HTTP allowed and certificates not checked.
    pub insecure: bool,
    /// A directory of `*.crt` CAs (and a `*.cert`/`*.key` client pair), or
    /// one CA file.
    pub cert_dir: Option<PathBuf>,
    pub credentials: Option<Credentials>,
    /// Repositories of the same registry to ask pull access for (mounts).
    pub pull_repositories: Vec<String>,
    /// How long a `GET` or `HEAD` waits for each read of its answer
    /// (`None`: [`ANSWER_TIMEOUT`]).
    pub answer_timeout: Option<Duration>,
    /// What to do when the registry wants credentials and there are none
    /// (`None`: use --creds, or log in).
    pub no_credentials_hint: Option<String>,
    /// Where `credentials` came from (a file, or `--creds`), for the
    /// message when the registry refuses them.
    pub credentials_source: Option<String>,
}

/// A request body.
pub enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// Exactly `len` bytes, streamed (not replayable: a 401 on it refreshes
    /// the token and returns a retryable error for the caller to redo).
    Reader(&'a mut dyn Read, u64),
    /// Streamed with chunked transfer encoding, its length unknown (not
    /// replayable either).
    Unsized(&'a mut dyn Read),
}

/// A response, its body read (bounded).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

#[derive(Debug, Clone)]
enum AuthState {
    None,
    Basic(Secret),
    Bearer(Secret),
}

/// A connection to `registry/repository`.
pub struct Client {
    agent: ureq::Agent,
    /// `https://host:port` or `http://host:port`.
    base: String,
    registry: String,
    repository: String,
    credentials: Option<Credentials>,
    pull_repositories: Vec<String>,
    insecure: bool,
    loopback: bool,
    answer_timeout: Duration,
    no_credentials_hint: Option<String>,
    credentials_source: Option<String>,
    auth: Mutex<AuthState>,
    /// Bumped on every (re)authentication, so concurrent 401s refresh once.
    auth_generation: Mutex<u64>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).field("repository", &self.repository).finish_non_exhaustive()
    }
}

/// The most of a response body read: manifests and error documents are
/// small; the OCI spec lets registries refuse manifests over 4 MiB.
const BODY_LIMIT: u64 = 8 << 20;

/// How long a `GET` or `HEAD` waits for each read of its answer: these ask
/// for small documents, so a registry silent this long is down or hung,
/// and saying so beats waiting ([`RegistryError::NoAnswer`]).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The same for every other request: a registry may take minutes to
/// answer the `PUT` that completes a large blob (moving it into storage).
const SLOW_ANSWER: Duration = Duration::from_secs(300);

impl Client {
    /// Connects to the registry of `reference` (HTTPS, or plain HTTP where
    /// allowed and HTTPS fails to connect) and authenticates for a push.
    ///
    /// The first request is tried `tries` times with doubling waits from
    /// `backoff` on a dropped connection, a 408, 429 or 5xx.
    pub fn connect(
        reference: &Reference,
        opts: &ClientOptions,
        tries: u32,
        backoff: Duration,
    ) -> Result<Client, RegistryError> {
        let registry = reference.registry.clone();
        let tls = tls_config(reference, opts)?;
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .user_agent(concat!("nixstream/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_per_read(Some(SLOW_ANSWER))
            .timeout_per_write(Some(Duration::from_secs(300)))
            .tls_config(tls)
            .build();
        let agent: ureq::Agent = config.into();
        let mut client = Client {
            agent,
            base: format!("https://{}", reference.api_host()),
            registry,
            repository: reference.repository.clone(),
            credentials: opts.credentials.clone(),
            pull_repositories: opts.pull_repositories.clone(),
            insecure: opts.insecure,
            loopback: reference.is_loopback(),
            answer_timeout: opts.answer_timeout.unwrap_or(ANSWER_TIMEOUT),
            no_credentials_hint: opts.no_credentials_hint.clone(),
            credentials_source: opts.credentials_source.clone(),
            auth: Mutex::new(AuthState::None),
            auth_generation: Mutex::new(0),
        };
        let probe = client.probe(reference, tries, backoff)?;
        // The probe answers 2xx (no authentication) or 401.
        if probe.status == 401 {
            client.authenticate(&probe, 0)?;
            // Wrong credentials show here, before any work is done.
            let again = client.raw(Method::GET, "/v2/", &[], Body::Empty, "GET /v2/")?;
            if again.status == 401 {
                return Err(client.denied("GET /v2/", &again));
            }
        }
        Ok(client)
    }

    /// `GET /v2/` over HTTPS; where plain HTTP is allowed and HTTPS fails,
    /// over HTTP, kept if an HTTP server answers there (with anything but
    /// the 400 an HTTPS server gives plain HTTP, in which case the HTTPS
    /// error stands, such as an untrusted certificate).
    fn probe(&mut self, reference: &Reference, tries: u32, backoff: Duration) -> Result<Reply, RegistryError> {
        let what = "GET /v2/";
        let mut attempt = 0;
        loop {
            let r = match self.raw(Method::GET, "/v2/", &[], Body::Empty, what) {
                Ok(r) => Ok(r),
                Err(https_err) if self.insecure || self.loopback => {
                    let https = std::mem::replace(&mut self.base, format!("http://{}", reference.api_host()));
                    match self.raw(Method::GET, "/v2/", &[], Body::Empty, what) {
                        Ok(r) if r.status != 400 => Ok(r),
                        _ => {
                            self.base = https;
                            Err(https_err)
                        }
                    }
                }
                Err(e) => Err(e),
            };
            let r = r.and_then(|r| match r.status {
                200..=299 | 401 => Ok(r),
                _ => Err(self.status_error("GET /v2/ (is this a registry?)", &r)),
            });
            match r {
                // Silent on the first request: down or hung, not a stall.
                Err(e) if e.is_retryable() && !matches!(e, RegistryError::NoAnswer { .. }) && attempt + 1 < tries => {
                    std::thread::sleep(backoff * 2u32.pow(attempt));
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    pub fn registry(&self) -> &str {
        &self.registry
    }

    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// `/v2/<repository>/<rest>`.
    pub fn repo_path(&self, rest: &str) -> String {
        format!("/v2/{}/{rest}", self.repository)
    }

    /// Sends a request with the current authorization.  A 401 answer
    /// re-authenticates (a new token, for an expired one) and sends a
    /// replayable body again once; a streamed body comes back as a
    /// retryable error for the caller to regenerate.
    pub fn send(
        &self,
        method: Method,
        path_or_url: &str,
        headers: &[(&str, &str)],
        body: Body<'_>,
        what: &str,
    ) -> Result<Reply, RegistryError> {
        let generation = *lock(&self.auth_generation);
        let replay = match &body {
            Body::Empty => Some(None),
            Body::Bytes(b) => Some(Some(*b)),
            Body::Reader(..) | Body::Unsized(_) => None,
        };
        let reply = self.raw(method.clone(), path_or_url, headers, body, what)?;
        if reply.status != 401 {
            return Ok(reply);
        }
        self.authenticate(&reply, generation)?;
        match replay {
            Some(b) => {
                let body = b.map_or(Body::Empty, Body::Bytes);
                let again = self.raw(method, path_or_url, headers, body, what)?;
                if again.status == 401 {
                    return Err(self.denied(what, &again));
                }
                Ok(again)
            }
            None => Err(RegistryError::Transport {
                registry: self.registry.clone(),
                what: what.to_string(),
                why: "authorization expired mid-upload; renewed".into(),
                retryable: true,
            }),
        }
    }

    fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_string()
        } else {
            format!("{}{path_or_url}", self.base)
        }
    }

    /// Resolves a `Location` header against the registry's base URL.
    pub fn resolve(&self, location: &str) -> String {
        self.url(location)
    }

    fn raw(
        &self,
        method: Method,
        path_or_url: &str,
        headers: &[(&str, &str)],
        body: Body<'_>,
        what: &str,
    ) -> Result<Reply, RegistryError> {
        let url = self.url(path_or_url);
        // Credentials go to the registry's own host only (a Location may
        // point at storage elsewhere).
        let same_host = url.strip_prefix(&self.base).is_some_and(|rest| rest.starts_with('/'));
        let mut req = Request::builder().method(method.clone()).uri(&url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if same_host {
            match &*lock(&self.auth) {
                AuthState::None => {}
                AuthState::Basic(h) => req = req.header("Authorization", h.expose()),
                AuthState::Bearer(token) => req = req.header("Authorization", format!("Bearer {}", token.expose())),
            }
        }
        let quick = method == Method::GET || method == Method::HEAD;
        let transport = |e: ureq::Error| self.transport_error(what, quick, e);
        let result = match body {
            Body::Empty if quick => {
                let r = req.body(()).map_err(|e| self.protocol(what, e.to_string()))?;
                self.agent.run(self.agent.configure_request(r).timeout_per_read(Some(self.answer_timeout)).build())
            }
            Body::Empty => {
                let r = req.body(()).map_err(|e| self.protocol(what, e.to_string()))?;
                self.agent.run(r)
            }
            Body::Bytes(b) => {
                let r = req
                    .header("Content-Length", b.len().to_string())
                    .body(b)
                    .map_err(|e| self.protocol(what, e.to_string()))?;
                self.agent.run(r)
            }
            Body::Unsized(reader) => {
                let r = req
                    .header("Transfer-Encoding", "chunked")
                    .body(ureq::SendBody::from_reader(reader))
                    .map_err(|e| self.protocol(what, e.to_string()))?;
                self.agent.run(r)
            }
            Body::Reader(reader, len) => {
                let r = req
                    .header("Content-Length", len.to_string())
                    .body(ureq::SendBody::from_reader(reader))
                    .map_err(|e| self.protocol(what, e.to_string()))?;
                self.agent.run(r)
            }
        };
        let mut resp: Response<ureq::Body> = result.map_err(transport)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = if method == Method::HEAD {
            Vec::new()
        } else {
            resp.body_mut().with_config().limit(BODY_LIMIT).read_to_vec().map_err(transport)?
        };
        Ok(Reply { status, headers, body })
    }

    /// Answers a 401: picks the challenge and gets an authorization for it.
    /// `seen` is the generation the failed request was sent with: if
    /// another thread has renewed since, that renewal is used.
    fn authenticate(&self, reply: &Reply, seen: u64) -> Result<(), RegistryError> {
        let mut generation = lock(&self.auth_generation);
        if *generation != seen {
            return Ok(());
        }
        let challenges: Vec<Challenge> = reply
            .headers
            .get_all("www-authenticate")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_challenges)
            .collect();
        let bearer = challenges.iter().find_map(|c| match c {
            Challenge::Bearer { realm, service, .. } => Some((realm.clone(), service.clone())),
            _ => None,
        });
        let state = if let Some((realm, service)) = bearer {
            let token = self.fetch_token(&realm, service.as_deref())?;
            AuthState::Bearer(token)
        } else if challenges.contains(&Challenge::Basic) {
            match &self.credentials {
                Some(Credentials::Password { username, password }) => {
                    if self.base.starts_with("http://") && !self.loopback && !self.insecure {
                        return Err(self.unauthorized("refusing to send a password over plain HTTP".into()));
                    }
                    let previous = lock(&self.auth).clone();
                    if matches!(previous, AuthState::Basic(_)) {
                        // The same password again would be refused again.
                        return Err(self.denied("authentication failed", reply));
                    }
                    AuthState::Basic(Secret::new(basic_header(username, password)))
                }
                Some(Credentials::IdentityToken(_)) => {
                    return Err(self.unauthorized(
                        "it asks for Basic authentication, and the credentials found are an identity token".into(),
                    ))
                }
                None => {
                    let hint = self
                        .no_credentials_hint
                        .as_deref()
                        .unwrap_or("use --creds, or `docker login` / `podman login`");
                    return Err(self.unauthorized(format!("authentication required and no credentials found ({hint})")));
                }
            }
        } else {
            return Err(self.unauthorized("401 without a Basic or Bearer challenge".into()));
        };
        *lock(&self.auth) = state;
        *generation += 1;
        Ok(())
    }

    /// A bearer token for push (and pull on the mount sources), from the
    /// challenge's realm: a GET with Basic credentials, or an OAuth2
    /// refresh-token POST for an identity token.
    fn fetch_token(&self, realm: &str, service: Option<&str>) -> Result<Secret, RegistryError> {
        let realm_loopback = Reference::parse(&format!(
            "{}/x",
            realm.split("://").nth(1).unwrap_or(realm).split('/').next().unwrap_or("")
        ))
        .is_ok_and(|r| r.is_loopback());
        if !(realm.starts_with("https://") || self.insecure || realm_loopback) {
            return Err(self.unauthorized(format!("refusing a token realm that is not HTTPS: {realm}")));
        }
        let mut scopes = vec![format!("repository:{}:pull,push", self.repository)];
        scopes.extend(self.pull_repositories.iter().map(|r| format!("repository:{r}:pull")));
        let what = "token request";
        let map_t = |e: ureq::Error| self.transport_error(what, false, e);
        let mut resp = match &self.credentials {
            Some(Credentials::IdentityToken(t)) => {
                let mut form: Vec<(&str, &str)> =
                    vec![("grant_type", "refresh_token"), ("refresh_token", t.expose()), ("client_id", "nixstream")];
                if let Some(s) = service {
                    form.push(("service", s));
                }
                let scope = scopes.join(" ");
                form.push(("scope", &scope));
                self.agent.post(realm).send_form(form).map_err(map_t)?
            }
            creds => {
                let mut req = self.agent.get(realm);
                if let Some(s) = service {
                    req = req.query("service", s);
                }
                for s in &scopes {
                    req = req.query("scope", s);
                }
                if let Some(Credentials::Password { username, password }) = creds {
                    req = req.header("Authorization", basic_header(username, password));
                }
                req.call().map_err(map_t)?
            }
        };
        let status = resp.status().as_u16();
        let body = resp.body_mut().with_config().limit(BODY_LIMIT).read_to_vec().map_err(map_t)?;
        if status == 401 || status == 403 {
            return Err(self.unauthorized(format!("the token service refused the credentials (HTTP {status})")));
        }
        if !(200..300).contains(&status) {
            let reply = Reply { status, headers: http::HeaderMap::new(), body };
            return Err(self.status_error(what, &reply));
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = serde_json::from_slice(&body)
            .map_err(|_| self.protocol(what, "the token reply is not JSON with a token".into()))?;
        t.token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .map(Secret::new)
            .ok_or_else(|| self.protocol(what, "the token reply holds no token".into()))
    }

    fn unauthorized(&self, what: String) -> RegistryError {
        RegistryError::Unauthorized { registry: self.registry.clone(), what }
    }

    fn denied(&self, what: &str, reply: &Reply) -> RegistryError {
        let (code, message) = error_body(&reply.body);
        let who = match &self.credentials {
            Some(Credentials::Password { username, .. }) => format!(" as {username}"),
            Some(Credentials::IdentityToken(_)) => " with an identity token".into(),
            None => String::new(),
        };
        let from = self.credentials_source.as_deref().map(|s| format!(" from {s}")).unwrap_or_default();
        let says = super::registry_says(&code, &message);
        self.unauthorized(format!("{what}: credentials{from} refused{who} (HTTP {}{says})", reply.status))
    }

    fn protocol(&self, what: &str, why: String) -> RegistryError {
        RegistryError::Protocol { registry: self.registry.clone(), what: format!("{what}: {why}") }
    }

    /// A registry-side error, with the code and message of its error body.
    pub fn status_error(&self, what: &str, reply: &Reply) -> RegistryError {
        let (code, message) = error_body(&reply.body);
        RegistryError::Status {
            registry: self.registry.clone(),
            what: what.to_string(),
            status: reply.status,
            code,
            message,
        }
    }

    /// `quick`: the request waited `answer_timeout` for each read.
    fn transport_error(&self, what: &str, quick: bool, e: ureq::Error) -> RegistryError {
        let text = e.to_string();
        let timeout = matches!(e, ureq::Error::Timeout(_));
        if timeout && quick {
            let secs = self.answer_timeout.as_secs_f64();
            return RegistryError::NoAnswer { registry: self.registry.clone(), what: what.to_string(), secs };
        }
        // A name that does not resolve, or a certificate refused, is the
        // same on the next try.
        let lookup = matches!(e, ureq::Error::HostNotFound) || text.contains("failed to lookup address");
        let certificate = text.contains("certificate");
        let garbled = matches!(&e, ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData);
        let retryable = !lookup
            && !certificate
            && !garbled
            && matches!(
                e,
                ureq::Error::Io(_) | ureq::Error::Timeout(_) | ureq::Error::ConnectionFailed | ureq::Error::Protocol(_)
            );
        let why = if lookup {
            "host not found".to_string()
        } else if timeout {
            format!("{text} (no answer within {} s)", SLOW_ANSWER.as_secs())
        } else if certificate {
            format!("TLS: {} (a private CA goes in --cert-dir)", text.trim_start_matches("io: "))
        } else if matches!(e, ureq::Error::ConnectionFailed) {
            "connection failed".to_string()
        } else {
            text
        };
        RegistryError::Transport { registry: self.registry.clone(), what: what.to_string(), why, retryable }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The first error of a registry error document
/// (`{"errors":[{"code","message"}]}`).
pub fn error_body(body: &[u8]) -> (Option<String>, Option<String>) {
    #[derive(serde::Deserialize)]
    struct Doc {
        errors: Vec<E>,
    }
    #[derive(serde::Deserialize)]
    struct E {
        code: Option<String>,
        message: Option<String>,
    }
    match serde_json::from_slice::<Doc>(body) {
        Ok(d) => d.errors.into_iter().next().map(|e| (e.code, e.message)).unwrap_or((None, None)),
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let line = text.lines().next().unwrap_or("").trim();
            (None, (!line.is_empty()).then(|| line.chars().take(200).collect()))
        }
    }
}

/// Roots: the platform's plus the extra CAs; or no checks at all.
fn tls_config(reference: &Reference, opts: &ClientOptions) -> Result<TlsConfig, RegistryError> {
    let err = |why: String| RegistryError::TlsSetup { registry: reference.registry.clone(), why };
    let mut builder = TlsConfig::builder();
    if opts.insecure {
        return Ok(builder.disable_verification(true).build());
    }
    let native = rustls_native_certs::load_native_certs();
    let mut roots: Vec<Certificate<'static>> =
        native.certs.iter().map(|c| Certificate::from_der(c.as_ref()).to_owned()).collect();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for base in ["/etc/containers/certs.d", "/etc/docker/certs.d"] {
        let d = Path::new(base).join(&reference.registry);
        if d.is_dir() {
            dirs.push(d);
        }
    }
    let mut client_cert: Option<(PathBuf, PathBuf)> = None;
    let mut ca_files: Vec<PathBuf> = Vec::new();
    if let Some(p) = &opts.cert_dir {
        if p.is_file() {
            ca_files.push(p.clone());
        } else if p.is_dir() {
            dirs.push(p.clone());
        } else {
            return Err(err(format!("--cert-dir {}: no such file or directory", p.display())));
        }
    }
    for d in &dirs {
        let entries = std::fs::read_dir(d).map_err(|e| err(format!("{}: {e}", d.display())))?;
        let mut names: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        for f in names {
            match f.extension().and_then(|e| e.to_str()) {
                Some("crt") | Some("pem") => ca_files.push(f),
                Some("cert") => client_cert = Some((f.clone(), f.with_extension("key"))),
                _ => {}
            }
        }
    }
    for f in &ca_files {
        let pem = std::fs::read(f).map_err(|e| err(format!("{}: {e}", f.display())))?;
        let before = roots.len();
        for item in ureq::tls::parse_pem(&pem) {
            if let Ok(PemItem::Certificate(c)) = item {
                roots.push(c.to_owned());
            }
        }
        if roots.len() == before {
            return Err(err(format!("{}: no PEM certificate in it", f.display())));
        }
    }
    builder = builder.root_certs(RootCerts::Specific(Arc::new(roots)));
    if let Some((cert, key)) = client_cert {
        let read = |p: &Path| std::fs::read(p).map_err(|e| err(format!("{}: {e}", p.display())));
        let chain: Vec<Certificate<'static>> = ureq::tls::parse_pem(&read(&cert)?)
            .filter_map(|i| match i {
                Ok(PemItem::Certificate(c)) => Some(c.to_owned()),
                _ => None,
            })
            .collect();
        let key = ureq::tls::PrivateKey::from_pem(&read(&key)?)
            .map_err(|_| err(format!("{}: not a PEM private key", key.display())))?;
        builder = builder.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
    }
    Ok(builder.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_error_documents() {
        let (c, m) =
            error_body(br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry","detail":"x"}]}"#);
        assert_eq!((c.as_deref(), m.as_deref()), (Some("BLOB_UNKNOWN"), Some("blob unknown to registry")));
        let (c, m) = error_body(b"<html>503 Service Unavailable</html>\nmore");
        assert_eq!((c, m.as_deref()), (None, Some("<html>503 Service Unavailable</html>")));
        assert_eq!(error_body(b""), (None, None));
    }
}
