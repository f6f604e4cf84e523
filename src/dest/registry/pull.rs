//! Reading an image back from a registry: its manifest and config, with
//! every digest checked.  `--cache-from` takes layer keys from them and
//! `--previous docker://...` the store paths of each layer (the config's
//! history).  A tag that names an index (a multi-platform image) resolves to
//! the entry for the platform asked for, as `docker pull --platform` does.

use std::time::Duration;

use sha2::Digest;
use ureq::http::Method;

use super::client::{Body, Client, ClientOptions, Reply};
use super::reference::Reference;
use super::RegistryError;
use crate::dest::manifest;
use crate::engine::digest::hex;

/// A layer or config as a manifest lists it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RemoteDescriptor {
    pub digest: String,
    pub size: u64,
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// An image manifest and the bytes of its config, both checked against
/// their digests.
#[derive(Debug, Clone)]
pub struct RemoteImage {
    pub layers: Vec<RemoteDescriptor>,
    pub config: Vec<u8>,
}

#[derive(serde::Deserialize)]
struct Manifest {
    config: RemoteDescriptor,
    layers: Vec<RemoteDescriptor>,
}

#[derive(serde::Deserialize)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
}

#[derive(serde::Deserialize)]
struct IndexEntry {
    digest: String,
    platform: Option<Platform>,
}

#[derive(serde::Deserialize)]
struct Index {
    manifests: Vec<IndexEntry>,
}

fn sha256_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&sha2::Sha256::digest(bytes)))
}

/// GETs `path`, following a redirect to blob storage elsewhere (without our
/// credentials: the client drops them for another host).
fn get(c: &Client, path: &str, headers: &[(&str, &str)], what: &str) -> Result<Reply, RegistryError> {
    let r = c.send(Method::GET, path, headers, Body::Empty, what)?;
    followed(c, r, headers, what)
}

/// `r`, or where its redirect leads; an error unless that succeeded.
fn followed(c: &Client, mut r: Reply, headers: &[(&str, &str)], what: &str) -> Result<Reply, RegistryError> {
    if (300..400).contains(&r.status) {
        let bad = || RegistryError::Protocol {
            registry: c.registry().into(),
            what: format!("{what}: a redirect without Location"),
        };
        let loc = r.header("location").ok_or_else(bad)?.to_string();
        r = c.send(Method::GET, &c.resolve(&loc), headers, Body::Empty, what)?;
    }
    if !r.ok() {
        return Err(c.status_error(what, &r));
    }
    Ok(r)
}

/// Fetches `from`'s manifest (through an index, the entry for linux/`arch`)
/// and config.  `what` names the option asking, for errors.  A tag that
/// names nothing (404 to its manifest) is [`RegistryError::NoSuchImage`];
/// anything missing after that, or a digest that is not there, is another
/// error.
pub fn fetch_image(
    from: &Reference,
    opts: &ClientOptions,
    what: &str,
    arch: &str,
) -> Result<RemoteImage, RegistryError> {
    let c = Client::connect(from, opts, 3, Duration::from_millis(500))?;
    let bad = |why: String| RegistryError::Protocol { registry: c.registry().into(), what: format!("{what}: {why}") };
    let accept = format!(
        "{}, {}, {}, application/vnd.docker.distribution.manifest.list.v2+json",
        manifest::OCI_MANIFEST,
        manifest::DOCKER_MANIFEST,
        manifest::OCI_INDEX
    );
    let headers = [("Accept", accept.as_str())];
    let what_m = format!("GET {what} manifest");
    let path = c.repo_path(&format!("manifests/{}", from.manifest_reference()));
    let first = c.send(Method::GET, &path, &headers, Body::Empty, &what_m)?;
    if first.status == 404 && from.digest.is_none() {
        let (code, message) = super::client::error_body(&first.body);
        return Err(RegistryError::NoSuchImage {
            registry: c.registry().into(),
            what: format!("{what} {from}"),
            code,
            message,
        });
    }
    let mut body = followed(&c, first, &headers, &what_m)?.body;
    if let Some(d) = &from.digest {
        if &sha256_of(&body) != d {
            return Err(bad("the manifest's digest is not the one asked for".into()));
        }
    }
    if let Ok(index) = serde_json::from_slice::<Index>(&body) {
        let entry = index
            .manifests
            .iter()
            .find(|e| e.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == arch))
            .ok_or_else(|| RegistryError::Protocol {
                registry: c.registry().into(),
                what: format!("its image index has no linux/{arch} image (--architecture picks another)"),
            })?;
        let digest = entry.digest.clone();
        body = get(&c, &c.repo_path(&format!("manifests/{digest}")), &headers, &what_m)?.body;
        if sha256_of(&body) != digest {
            return Err(bad(format!("manifest {digest}: its bytes do not match its digest")));
        }
    }
    let m: Manifest = serde_json::from_slice(&body).map_err(|_| bad("not an image manifest".into()))?;
    let config = get(&c, &c.repo_path(&format!("blobs/{}", m.config.digest)), &[], &format!("GET {what} config"))?.body;
    if sha256_of(&config) != m.config.digest {
        return Err(bad("the config's bytes do not match its digest".into()));
    }
    Ok(RemoteImage { layers: m.layers, config })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    type Routes = HashMap<String, (u16, Vec<(String, String)>, Vec<u8>)>;

    /// A registry of fixed answers on a loopback port (plain HTTP, which the
    /// client allows on loopback after HTTPS fails).
    fn serve(routes: Routes) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                    // A TLS handshake (the client tries HTTPS first): hang up.
                    if req.first() == Some(&0x16) {
                        break;
                    }
                }
                let text = String::from_utf8_lossy(&req);
                let Some(path) = text.strip_prefix("GET ").and_then(|r| r.split(' ').next()) else { continue };
                let (status, headers, body) = routes.get(path).cloned().unwrap_or((
                    404,
                    vec![],
                    br#"{"errors":[{"code":"NOT_FOUND"}]}"#.to_vec(),
                ));
                let mut head =
                    format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
                for (k, v) in headers {
                    head += &format!("{k}: {v}\r\n");
                }
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(b"\r\n");
                let _ = s.write_all(&body);
            }
        });
        port
    }

    #[test]
    fn an_index_resolves_to_the_platform_asked_for_through_a_redirect() {
        let config = br#"{"history":[{"comment":"store paths: ['/nix/store/a-x']"}]}"#.to_vec();
        let config_digest = sha256_of(&config);
        let manifest = format!(r#"{{"config":{{"digest":"{config_digest}","size":{}}},"layers":[]}}"#, config.len());
        let manifest_digest = sha256_of(manifest.as_bytes());
        let missing_config = r#"{"config":{"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1},"layers":[]}"#;
        let index = format!(
            r#"{{"manifests":[{{"digest":"sha256:{}","platform":{{"os":"linux","architecture":"other"}}}},{{"digest":"{manifest_digest}","platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            "1".repeat(64)
        );
        let ok = |body: Vec<u8>| (200, vec![], body);
        let mut routes: Routes = HashMap::new();
        routes.insert("/v2/".into(), ok(b"{}".to_vec()));
        routes.insert("/v2/r/manifests/multi".into(), ok(index.into_bytes()));
        routes.insert(format!("/v2/r/manifests/{manifest_digest}"), ok(manifest.into_bytes()));
        routes.insert(
            format!("/v2/r/blobs/{config_digest}"),
            (307, vec![("Location".into(), "/elsewhere/config".into())], vec![]),
        );
        routes.insert("/elsewhere/config".into(), ok(config.clone()));
        routes.insert("/v2/r/manifests/no-config".into(), ok(missing_config.as_bytes().to_vec()));
        let port = serve(routes);
        let at = |r: &str| Reference::parse(&format!("docker://127.0.0.1:{port}/r{r}")).unwrap();
        let opts = ClientOptions::default();

        let got = fetch_image(&at(":multi"), &opts, "--previous", "amd64").unwrap();
        assert_eq!(got.config, config);
        let e = fetch_image(&at(":multi"), &opts, "--previous", "arm64").unwrap_err().to_string();
        assert!(e.ends_with(": its image index has no linux/arm64 image (--architecture picks another)"), "{e}");
        // A tag that names nothing is no error; anything else missing is.
        let e = fetch_image(&at(":nothing"), &opts, "--previous", "amd64").unwrap_err();
        assert!(matches!(e, RegistryError::NoSuchImage { .. }), "{e}");
        assert!(e.to_string().contains("NOT_FOUND"), "the registry's words are kept: {e}");
        let e = fetch_image(&at(":no-config"), &opts, "--previous", "amd64").unwrap_err();
        assert!(matches!(e, RegistryError::Status { status: 404, .. }), "{e}");
        let absent = format!("@sha256:{}", "2".repeat(64));
        let e = fetch_image(&at(&absent), &opts, "--previous", "amd64").unwrap_err();
        assert!(matches!(e, RegistryError::Status { status: 404, .. }), "{e}");
    }

    /// A registry that takes the connection and never answers: an error
    /// within the answer timeout (twice: HTTPS, then plain HTTP on
    /// loopback), not a wait of minutes.
    #[test]
    fn a_registry_that_never_answers_is_an_error_soon() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in listener.incoming() {
                held.push(s);
            }
        });
        let from = Reference::parse(&format!("docker://127.0.0.1:{port}/r:1")).unwrap();
        let opts = ClientOptions { answer_timeout: Some(Duration::from_millis(500)), ..Default::default() };
        let started = std::time::Instant::now();
        let e = fetch_image(&from, &opts, "--previous", "amd64").unwrap_err().to_string();
        assert!(e.contains("GET /v2/: no answer within 0.5 s (is the registry up?)"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    }
}
