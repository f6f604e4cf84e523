//! Reading an image back from a registry: its manifest and config, with
//! every digest checked.  `--cache-from` takes layer keys from them and
//! `--previous docker://...` the store paths of each layer (the config's
//! history).  A tag that names an index (a multi-platform image) resolves to
//! the entry for this machine's platform, as `docker pull` does.

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
    let mut r = c.send(Method::GET, path, headers, Body::Empty, what)?;
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

/// Fetches `from`'s manifest (through an index, for this machine's
/// platform) and config.  `what` names the option asking, for errors.
pub fn fetch_image(from: &Reference, opts: &ClientOptions, what: &str) -> Result<RemoteImage, RegistryError> {
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
    let mut body = get(&c, &path, &headers, &what_m)?.body;
    if let Some(d) = &from.digest {
        if &sha256_of(&body) != d {
            return Err(bad("the manifest's digest is not the one asked for".into()));
        }
    }
    if let Ok(index) = serde_json::from_slice::<Index>(&body) {
        let arch = manifest::host_architecture();
        let entry = index
            .manifests
            .iter()
            .find(|e| e.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == arch))
            .ok_or_else(|| bad(format!("an index with no linux/{arch} image")))?;
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
