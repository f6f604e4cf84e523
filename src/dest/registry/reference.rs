//! Image references as users write them for a registry:
//! `docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX]` (the `docker://` prefix is
//! optional).  This module owns the grammar (the distribution project's
//! reference grammar, the subset a push needs), the Docker Hub spelling
//! (`docker.io/x` is `registry-1.docker.io/library/x`), and what counts as a
//! loopback host (the only hosts spoken to over plain HTTP without
//! `--insecure`).

use std::fmt;
use std::net::IpAddr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("image reference `{reference}`: {why}")]
    Invalid { reference: String, why: &'static str },
}

/// `text` with what looks like `user:password@` before the host masked: a
/// reference is no place for credentials, and errors must not show them.
fn redacted(text: &str) -> String {
    let (scheme, rest) = match text.strip_prefix("docker://") {
        Some(r) => ("docker://", r),
        None => ("", text),
    };
    let host_end = rest.find('/').unwrap_or(rest.len());
    match rest[..host_end].rfind('@') {
        Some(at) => format!("{scheme}***@{}", &rest[at + 1..]),
        None => text.to_string(),
    }
}

/// A parsed reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `HOST[:PORT]` as written (`docker.io` for Docker Hub).
    pub registry: String,
    /// The repository path (`library/` added for a one-part Docker Hub name).
    pub repository: String,
    /// The tag, if given (a push needs one or a digest).
    pub tag: Option<String>,
    /// `sha256:<hex>`, if given.
    pub digest: Option<String>,
}

const HUB: &str = "docker.io";

impl Reference {
    /// Parses `docker://HOST[:PORT]/REPO[:TAG][@DIGEST]`.  A name without a
    /// host part (no `.` or `:` in its first component, and not
    /// `localhost`) is on Docker Hub, as `docker` reads it.  Without a tag
    /// or digest, the tag is `latest`.
    pub fn parse(text: &str) -> Result<Reference, ReferenceError> {
        let bad = |why| ReferenceError::Invalid { reference: redacted(text), why };
        let s = text.strip_prefix("docker://").unwrap_or(text);
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.contains("://") {
            return Err(bad("only the docker:// transport is a registry"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let hex = d.strip_prefix("sha256:").ok_or_else(|| bad("a digest must be sha256:<64 hex digits>"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                    return Err(bad("a digest must be sha256:<64 hex digits>"));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        // A tag is after the last `:` that follows the last `/` (a `:` before
        // it is the port).
        let last_slash = rest.rfind('/');
        let (name, tag) = match rest.rfind(':') {
            Some(c) if last_slash.is_none_or(|sl| c > sl) => (&rest[..c], Some(rest[c + 1..].to_string())),
            _ => (rest, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
                && t.as_bytes()[0] != b'.'
                && t.as_bytes()[0] != b'-';
            if !ok {
                return Err(bad("a tag is 1 to 128 of [A-Za-z0-9_.-], not starting with . or -"));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                (first.to_string(), path.to_string())
            }
            _ => (HUB.to_string(), name.to_string()),
        };
        if !valid_host(&registry) {
            return Err(bad("the registry host is not HOST[:PORT]"));
        }
        if repository.is_empty() || !repository.split('/').all(valid_component) {
            return Err(bad(
                "a repository is lowercase path components of [a-z0-9] joined by `.`, `_`, `__` or dashes",
            ));
        }
        let repository =
            if registry == HUB && !repository.contains('/') { format!("library/{repository}") } else { repository };
        let tag = if tag.is_none() && digest.is_none() { Some("latest".to_string()) } else { tag };
        Ok(Reference { registry, repository, tag, digest })
    }

    /// The host (and port) the registry API answers on.
    pub fn api_host(&self) -> &str {
        if self.registry == HUB {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// The host without its port, brackets removed.
    pub fn hostname(&self) -> &str {
        host_part(&self.registry)
    }

    /// What goes after `/manifests/`: the digest if given, else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// Whether the registry is on this machine (`localhost`, 127.0.0.0/8,
    /// `::1`): the only hosts where plain HTTP is tried without
    /// `--insecure`, as docker does.
    pub fn is_loopback(&self) -> bool {
        let h = self.hostname();
        h == "localhost" || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn host_part(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.split(':').next().unwrap_or(registry)
}

fn valid_host(registry: &str) -> bool {
    let (host, port) = if registry.starts_with('[') {
        match registry.split_once(']') {
            Some((h, p)) => (&h[1..], p.strip_prefix(':')),
            None => return false,
        }
    } else {
        match registry.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (registry, None),
        }
    };
    let host_ok = if registry.starts_with('[') {
        host.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok_and(|n| n > 0));
    host_ok && port_ok
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let x = b[i];
        if x.is_ascii_lowercase() || x.is_ascii_digit() {
            i += 1;
            continue;
        }
        // A separator: `.`, `_`, `__` or a run of `-`, then an alphanumeric.
        let start = i;
        match x {
            b'.' => i += 1,
            b'_' => i += if b.get(i + 1) == Some(&b'_') { 2 } else { 1 },
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1
                }
            }
            _ => return false,
        }
        if i == start || !b.get(i).is_some_and(|n| n.is_ascii_lowercase() || n.is_ascii_digit()) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_a_reference_are_not_echoed() {
        let e = Reference::parse("docker://bob:s3cret@host.example/r:t").unwrap_err().to_string();
        assert!(!e.contains("s3cret") && !e.contains("bob"), "{e}");
        assert!(e.contains("***@host.example/r:t"), "{e}");
        let e = Reference::parse("bob:s3cret@host.example").unwrap_err().to_string();
        assert!(!e.contains("s3cret"), "{e}");
    }

    fn p(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn host_port_repo_tag() {
        let r = p("docker://127.0.0.1:5000/team/app:v1.2");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "team/app", Some("v1.2"))
        );
        assert_eq!(r.hostname(), "127.0.0.1");
        assert!(r.is_loopback());
        assert_eq!(r.to_string(), "127.0.0.1:5000/team/app:v1.2");
        assert_eq!(r.manifest_reference(), "v1.2");
    }

    #[test]
    fn defaults_and_hub() {
        let r = p("localhost:5000/app");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert!(r.is_loopback());
        let r = p("docker://busybox:1");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.api_host()),
            ("docker.io", "library/busybox", "registry-1.docker.io")
        );
        assert!(!r.is_loopback());
        let r = p(&format!("ghcr.io/o/r@sha256:{}", "ab".repeat(32)));
        assert_eq!(r.tag, None);
        assert!(r.digest.is_some());
        let r = p("[::1]:5000/a/b:t");
        assert_eq!(r.hostname(), "::1");
        assert!(r.is_loopback());
    }

    #[test]
    fn rejects_bad_names() {
        for bad in [
            "",
            "docker://",
            "oci:dir:tag",
            "https://host/app",
            "host.example/App:1",
            "host.example/a//b:1",
            "host.example/a:",
            "host.example/a:-x",
            "host.example/a@sha256:xyz",
            "host.example:99999/a:1",
            "host.example/-a:1",
            "host.example/a..b:1",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad} parsed");
        }
        for good in ["host.example/a__b/c-d/e.f:1", "host.example/a---b:1", "localhost/x:y"] {
            p(good);
        }
    }
}
