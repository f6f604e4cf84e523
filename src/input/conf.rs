//! The configuration file nixpkgs' `streamLayeredImage` writes for its
//! streaming script, read into typed values.
//!
//! Every key is read the way `stream_layered_image.py` reads it, with two
//! deliberate differences: a bad value gets an error naming the key and what
//! was expected (never a Python traceback), and store paths are checked
//! syntactically here (absolute, no `.`/`..` games, under `store_dir`, each at
//! most once) before anything touches the file system.  `config` keeps its
//! keys in file order because the image ID depends on their order.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::input::isotime::DateTime;

#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    #[error("{0}")]
    Read(#[from] crate::input::limited::LimitedError),
    #[error("configuration {path} is not valid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("configuration: the top level must be a JSON object, found {found}")]
    NotObject { found: &'static str },
    #[error("configuration: missing key {key:?}")]
    Missing { key: &'static str },
    #[error("configuration: key {key:?} must be {expected}, found {found}")]
    Type { key: String, expected: &'static str, found: String },
    #[error("configuration: key {key:?}: {message}")]
    Invalid { key: String, message: String },
}

/// Where the top (customisation) layer comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomisationSource {
    /// nixpkgs' customisation layer: a directory holding `layer.tar` and its
    /// sha256 in `checksum` (`text` is the path as the configuration wrote it).
    Prebuilt { dir: PathBuf, text: String },
    /// `nixstream image --contents DIR`: files placed at `/`, archived by
    /// nixstream itself (sorted, fixed mtime, numeric owners 0:0); `None`
    /// gives an empty layer.
    Contents(Option<PathBuf>),
}

/// The configuration, typed.
#[derive(Debug, Clone)]
pub struct Conf {
    /// Printed back as-is into the image config.
    pub architecture: Value,
    pub created: DateTime,
    /// File and member mtime: `int(parse_time(conf["mtime"]).timestamp())`.
    pub mtime: i64,
    pub uid: u64,
    pub gid: u64,
    pub uname: String,
    pub gname: String,
    pub store_dir: PathBuf,
    pub from_image: Option<PathBuf>,
    /// Bottom layer first; each layer's paths in the given order.
    pub store_layers: Vec<Vec<PathBuf>>,
    /// The same paths as they were written in the file, for history comments.
    pub store_layers_text: Vec<Vec<String>>,
    pub customisation: CustomisationSource,
    pub repo_tag: String,
    /// The image `config` object, keys in file order.
    pub config: Map<String, Value>,
}

/// How a JSON value's type reads in an error message.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn type_err(key: impl Into<String>, expected: &'static str, found: &Value) -> ConfError {
    ConfError::Type { key: key.into(), expected, found: type_name(found).to_string() }
}

impl Conf {
    /// Reads and validates `path`. `repo_tag_override` is `--repo-tag`; when
    /// given, the file's `repo_tag` is not consulted (as in the reference).
    pub fn load(path: &Path, repo_tag_override: Option<&str>) -> Result<Conf, ConfError> {
        let text = crate::input::limited::read_capped(path, "configuration", crate::input::limited::MAX_CONF)?;
        let value: Value =
            serde_json::from_slice(&text).map_err(|source| ConfError::Json { path: path.to_path_buf(), source })?;
        Conf::from_value(value, repo_tag_override, DateTime::now_utc())
    }

    /// Validates a parsed configuration; `now` is what `"now"` means.
    pub fn from_value(value: Value, repo_tag_override: Option<&str>, now: DateTime) -> Result<Conf, ConfError> {
        let mut obj = match value {
            Value::Object(m) => m,
            other => return Err(ConfError::NotObject { found: type_name(&other) }),
        };
        let mut take = |key: &'static str| obj.remove(key).ok_or(ConfError::Missing { key });

        let architecture = take("architecture")?;
        let created_v = take("created")?;
        let created = parse_time("created", &created_v, now)?;
        // Older nixpkgs had no "mtime" and used "created" for it.
        let mtime = match take("mtime") {
            Ok(v) => parse_time("mtime", &v, now)?.timestamp_secs(),
            Err(_) => created.timestamp_secs(),
        };
        let uid = id_value("uid", &take("uid")?)?;
        let gid = id_value("gid", &take("gid")?)?;
        let uname = string_value("uname", take("uname")?)?;
        let gname = string_value("gname", take("gname")?)?;
        let store_dir_text = string_value("store_dir", take("store_dir")?)?;
        let store_dir = clean_absolute("store_dir", &store_dir_text)?;
        let from_image = match take("from_image")? {
            Value::Null => None,
            Value::String(s) if !s.is_empty() => Some(PathBuf::from(s)),
            other => return Err(type_err("from_image", "null or a path to a docker-archive", &other)),
        };
        let text = string_value("customisation_layer", take("customisation_layer")?)?;
        let customisation = CustomisationSource::Prebuilt { dir: PathBuf::from(&text), text };
        let repo_tag = match repo_tag_override {
            Some(t) if !t.is_empty() => t.to_string(),
            _ => string_value("repo_tag", take("repo_tag")?)?,
        };
        check_reference(&repo_tag)
            .map_err(|why| ConfError::Invalid { key: "repo_tag".into(), message: format!("{repo_tag:?} {why}") })?;
        let config = match take("config")? {
            Value::Object(m) => m,
            other => return Err(type_err("config", "an object", &other)),
        };
        let layers_v = match take("store_layers")? {
            Value::Array(a) => a,
            other => return Err(type_err("store_layers", "a list of lists of store paths", &other)),
        };

        let mut seen: HashSet<PathBuf> = HashSet::new();
        let mut store_layers = Vec::with_capacity(layers_v.len());
        let mut store_layers_text = Vec::with_capacity(layers_v.len());
        for (li, layer) in layers_v.into_iter().enumerate() {
            let key = format!("store_layers[{li}]");
            let items = match layer {
                Value::Array(a) => a,
                other => return Err(type_err(key, "a list of store paths", &other)),
            };
            if items.is_empty() {
                return Err(ConfError::Invalid { key, message: "a layer must hold at least one store path".into() });
            }
            let mut paths = Vec::with_capacity(items.len());
            let mut texts = Vec::with_capacity(items.len());
            for (pi, item) in items.into_iter().enumerate() {
                let key = format!("store_layers[{li}][{pi}]");
                let text = string_value_owned(&key, item)?;
                let path = clean_absolute(&key, &text)?;
                if path.parent().is_none() || !path.starts_with(&store_dir) || path == store_dir {
                    return Err(ConfError::Invalid {
                        key,
                        message: format!("{text} is not a path inside store_dir {}", store_dir.display()),
                    });
                }
                if !seen.insert(path.clone()) {
                    return Err(ConfError::Invalid {
                        key,
                        message: format!("{text} is listed more than once; each store path belongs to one layer"),
                    });
                }
                paths.push(path);
                texts.push(text);
            }
            store_layers.push(paths);
            store_layers_text.push(texts);
        }

        Ok(Conf {
            architecture,
            created,
            mtime,
            uid,
            gid,
            uname,
            gname,
            store_dir,
            from_image,
            store_layers,
            store_layers_text,
            customisation,
            repo_tag,
            config,
        })
    }
}

/// Checks `NAME[:TAG]` against the docker reference grammar (what `docker
/// load` accepts in `RepoTags`); the error says what is wrong.
pub fn check_reference(r: &str) -> Result<(), String> {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    // The tag follows the last ':' that comes after the last '/'.
    let slash = r.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match r[slash..].rfind(':') {
        Some(i) => (&r[..slash + i], Some(&r[slash + i + 1..])),
        None => (r, None),
    };
    if r.contains('@') {
        return Err("is not a valid image reference: a digest (@) cannot be a tag".into());
    }
    if let Some(c) = r.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("is not a valid image reference: it holds {c:?}"));
    }
    if name.is_empty() {
        return Err("is not a valid image reference: the name is empty".into());
    }
    if name.len() > 255 {
        return Err("is not a valid image reference: the name is longer than 255 characters".into());
    }
    if let Some(t) = tag {
        let ok = t.len() <= 128
            && t.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            && t.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !ok {
            return Err(format!(
                "is not a valid image reference: tag {t:?} must be 1-128 of [A-Za-z0-9_.-], not starting with . or -"
            ));
        }
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    // A first component with a '.' or ':', or "localhost", is a registry host.
    if parts.len() > 1 && (parts[0].contains(['.', ':']) || parts[0] == "localhost") {
        let host = parts.remove(0);
        let (h, port) = host.split_once(':').map_or((host, None), |(h, p)| (h, Some(p)));
        let host_ok = !h.is_empty()
            && h.split('.').all(|c| {
                !c.is_empty()
                    && c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-')
                    && !c.starts_with('-')
                    && !c.ends_with('-')
            });
        if !host_ok || port.is_some_and(|p| p.is_empty() || !p.chars().all(|c| c.is_ascii_digit())) {
            return Err(format!("is not a valid image reference: {host:?} is not a registry host[:port]"));
        }
    }
    for p in parts {
        // alnum (separator alnum)*, separator = '.', '_', '__' or '-'+.
        let ok = p.starts_with(alnum) && p.ends_with(alnum) && {
            let b = p.as_bytes();
            let mut i = 0;
            let mut good = true;
            while i < b.len() {
                if alnum(b[i] as char) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < b.len() && !alnum(b[i] as char) {
                    i += 1;
                }
                let sep = &p[start..i];
                good &= matches!(sep, "." | "_" | "__") || sep.chars().all(|c| c == '-');
            }
            good
        };
        if !ok {
            let why = if p.chars().any(|c| c.is_ascii_uppercase()) {
                "must be lowercase"
            } else {
                "must be lowercase letters and digits, separated by '.', '_', '__' or '-'"
            };
            return Err(format!("is not a valid image reference: repository component {p:?} {why}"));
        }
    }
    Ok(())
}

fn parse_time(key: &'static str, v: &Value, now: DateTime) -> Result<DateTime, ConfError> {
    match v {
        Value::String(s) if s == "now" => Ok(now),
        Value::String(s) => {
            DateTime::parse_iso(s).map_err(|e| ConfError::Invalid { key: key.into(), message: e.to_string() })
        }
        other => Err(type_err(key, "an ISO 8601 time string or \"now\"", other)),
    }
}

/// `int(conf[key])`: an integer or a string holding one; 0 ..= 2^32-1.
fn id_value(key: &'static str, v: &Value) -> Result<u64, ConfError> {
    let parsed: Option<i128> = match v {
        Value::Number(n) => n.to_string().parse().ok(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    match parsed {
        Some(n) if (0..=i128::from(u32::MAX)).contains(&n) => Ok(n as u64),
        Some(n) => Err(ConfError::Invalid { key: key.into(), message: format!("{n} is outside 0..=4294967295") }),
        None => Err(type_err(key, "a non-negative integer", v)),
    }
}

fn string_value(key: &'static str, v: Value) -> Result<String, ConfError> {
    string_value_owned(key, v)
}

fn string_value_owned(key: &str, v: Value) -> Result<String, ConfError> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(type_err(key, "a string", &other)),
    }
}

/// An absolute path, normalised as `pathlib.Path` would (repeated and
/// trailing slashes, `.` components); `..` is refused.
fn clean_absolute(key: &str, text: &str) -> Result<PathBuf, ConfError> {
    let invalid = |message: String| ConfError::Invalid { key: key.to_string(), message };
    if !text.starts_with('/') {
        return Err(invalid(format!("{text:?} is not an absolute path")));
    }
    if text.contains('\0') {
        return Err(invalid(format!("{text:?} contains a NUL byte")));
    }
    let mut out = String::with_capacity(text.len());
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(invalid(format!("{text:?} has a '..' component"))),
            p => {
                out.push('/');
                out.push_str(p);
            }
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(PathBuf::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "architecture": "amd64", "created": "1970-01-01T00:00:01Z", "mtime": "1970-01-01T00:00:01Z",
            "uid": 0, "gid": 0, "uname": "root", "gname": "root", "store_dir": "/nix/store",
            "from_image": null, "repo_tag": "a:b", "customisation_layer": "/nix/store/c-cust",
            "config": {"Cmd": ["x"]}, "store_layers": [["/nix/store/a-a"], ["/nix/store/b-b"]]
        })
    }

    fn with(key: &str, v: Value) -> Result<Conf, ConfError> {
        let mut c = base();
        c[key] = v;
        Conf::from_value(c, None, DateTime::now_utc())
    }

    #[test]
    fn reads_the_reference_keys() {
        let c = Conf::from_value(base(), None, DateTime::now_utc()).unwrap();
        assert_eq!(c.mtime, 1);
        assert_eq!(c.store_layers.len(), 2);
        assert_eq!(c.repo_tag, "a:b");
        let c = Conf::from_value(base(), Some("x:y"), DateTime::now_utc()).unwrap();
        assert_eq!(c.repo_tag, "x:y");
    }

    #[test]
    fn missing_key_is_named() {
        let mut c = base();
        c.as_object_mut().unwrap().remove("store_dir");
        let e = Conf::from_value(c, None, DateTime::now_utc()).unwrap_err();
        assert_eq!(e.to_string(), "configuration: missing key \"store_dir\"");
    }

    #[test]
    fn wrong_types_are_named() {
        assert!(with("uid", json!(-1)).unwrap_err().to_string().contains("\"uid\""));
        assert!(with("uid", json!(1u64 << 40)).unwrap_err().to_string().contains("outside"));
        assert!(with("uid", json!("12")).is_ok());
        assert!(with("store_layers", json!("x")).unwrap_err().to_string().contains("store_layers"));
        assert!(with("created", json!("yesterday")).unwrap_err().to_string().contains("\"created\""));
        assert!(with("config", json!([])).unwrap_err().to_string().contains("\"config\""));
    }

    #[test]
    fn store_paths_are_checked() {
        for (paths, needle) in [
            (json!([["nix/store/a"]]), "not an absolute path"),
            (json!([["/nix/store/../etc"]]), "'..'"),
            (json!([["/nix/store-evil/a"]]), "not a path inside store_dir"),
            (json!([["/nix/store"]]), "not a path inside store_dir"),
            (json!([["/nix/store/a"], ["/nix/store//a/"]]), "more than once"),
            (json!([[]]), "at least one"),
        ] {
            let e = with("store_layers", paths).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn repo_tags_are_docker_references() {
        for good in ["a:b", "hello", "library/hello-world:1.0", "localhost:5000/x/y:latest", "reg.io/a__b/c.d-e:v_1"] {
            assert_eq!(check_reference(good), Ok(()), "{good}");
        }
        for (bad, needle) in [
            ("Hello:1", "must be lowercase"),
            ("a:b\n", "'\\n'"),
            ("a b:1", "' '"),
            ("a:", "tag \"\""),
            ("a:-x", "tag"),
            ("a..b:1", "separated"),
            ("/a:1", "repository component"),
            ("a@sha256:00", "digest"),
            (":1", "name is empty"),
        ] {
            let e = check_reference(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
        let e = with("repo_tag", json!("Bad:1")).unwrap_err().to_string();
        assert_eq!(e, "configuration: key \"repo_tag\": \"Bad:1\" is not a valid image reference: repository component \"Bad\" must be lowercase");
    }

    #[test]
    fn mtime_falls_back_to_created() {
        let mut c = base();
        c.as_object_mut().unwrap().remove("mtime");
        c["created"] = json!("2024-05-01T12:34:56Z");
        assert_eq!(Conf::from_value(c, None, DateTime::now_utc()).unwrap().mtime, 1_714_566_896);
    }
}
