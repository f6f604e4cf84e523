//! How the commands reach a registry, for a push, `--cache-from` and
//! `--previous docker://...`: the TLS options, `--creds` (with
//! `--password-stdin`) on the registry they are for, else the logins docker
//! and podman keep.

use std::io;

use super::args::RegistryAccess;
use crate::dest::registry::auth::{self, Credentials};
use crate::dest::registry::client::ClientOptions;
use crate::dest::registry::Reference;

impl RegistryAccess {
    /// How to reach `r`: these TLS options, and `--creds` when `r` is on
    /// the registry they are for (`creds_for`; any when `None`), else the
    /// credentials docker and podman keep for it (`say` names their file).
    pub(super) fn client_options(
        &self,
        r: &Reference,
        creds_for: Option<&str>,
        say: &dyn Fn(&str),
    ) -> anyhow::Result<ClientOptions> {
        let ours = creds_for.is_none_or(|reg| reg == r.registry);
        let explicit = if ours { explicit_credentials(self)? } else { None };
        // --creds given for the push's registry, and this one is another.
        let no_credentials_hint = match creds_for {
            Some(push) if !ours && self.creds.is_some() => Some(format!(
                "--creds is for the push's registry {push}: log in to {} with `docker login` / `podman login`, or name an auth file in $REGISTRY_AUTH_FILE",
                r.registry
            )),
            _ => None,
        };
        let (credentials, credentials_source) = match explicit {
            Some(c) => (Some(c), Some("--creds".to_string())),
            None => match auth::lookup(&r.registry, &r.repository, &auth::default_auth_files())? {
                Some(found) => {
                    say(&format!("credentials for {} from {}", r.registry, found.source));
                    (Some(found.credentials), Some(found.source.to_string()))
                }
                None => (None, None),
            },
        };
        Ok(ClientOptions {
            insecure: self.insecure || !self.tls_verify,
            cert_dir: self.cert_dir.clone(),
            credentials,
            pull_repositories: Vec::new(),
            answer_timeout: None,
            no_credentials_hint,
            credentials_source,
        })
    }
}

/// `--creds` (with `--password-stdin`, whose line is read once, whoever
/// asks first: the push and `--previous` may both need it).
fn explicit_credentials(a: &RegistryAccess) -> anyhow::Result<Option<Credentials>> {
    static PASSWORD: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    let Some(c) = &a.creds else {
        anyhow::ensure!(!a.password_stdin, "--password-stdin reads the password of --creds USER: give --creds");
        return Ok(None);
    };
    let password = if a.password_stdin {
        let line = PASSWORD.get_or_init(|| {
            let mut line = String::new();
            io::stdin()
                .read_line(&mut line)
                .map(|_| line.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| e.to_string())
        });
        Some(line.clone().map_err(|e| anyhow::anyhow!("reading the password from stdin: {e}"))?)
    } else {
        None
    };
    Ok(Some(auth::parse_creds(c, password)?))
}
