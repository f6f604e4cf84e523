//! The previous release's layers (`--previous`): a plan as `nixstream
//! layers` prints it (a JSON list of lists of store paths), or an image — a
//! docker-archive, an oci-archive (plain or compressed) or an OCI layout
//! directory, or a registry's
//! (whose config the CLI fetches and hands to [`from_config`]) — whose config
//! history names each layer's store paths, as the reference writes it
//! (`store paths: ['/nix/store/...', ...]`, Python's list repr).
//!
//! An image's layers that name no store paths (a base image's, the
//! customisation layer) are left out and counted; an image none of whose
//! layers names store paths (one made by another tool) gives an empty plan
//! and a note saying nothing can be reused.  A plan whose paths all lie
//! outside the new closure's store directory is an error: it was made for
//! another store.  The archive is read once, as a stream; only members that
//! look like JSON and are at most [`MAX_JSON`] bytes are kept.

use std::collections::{HashMap, HashSet};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::read::tarread::{read_full, Compression, TarError, TarReader};

/// Largest JSON member (index, manifest, config) read from an image.
pub const MAX_JSON: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PreviousError {
    #[error("previous plan {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("previous plan {path}: {what}")]
    Plan { path: PathBuf, what: String },
    #[error("previous image {path}: {what}")]
    Image { path: PathBuf, what: String },
    #[error("previous plan {path} names store paths under {found}, but the closure is under {store}")]
    OtherStore { path: PathBuf, found: String, store: String },
}

/// The previous release's store layers, bottom first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Previous {
    pub source: PathBuf,
    pub layers: Vec<Vec<String>>,
    /// Image layers that named no store paths (base, customisation).
    pub other_layers: usize,
    /// Whether it came from an image (not a JSON plan).
    pub from_image: bool,
}

impl Previous {
    /// What to tell the user before planning, if anything.
    pub fn note(&self) -> Option<String> {
        if self.layers.is_empty() && self.from_image {
            let why = if self.other_layers == 0 {
                "its config has no layer history".to_string()
            } else {
                format!("none of its {} layers names store paths in its history", self.other_layers)
            };
            Some(format!(
                "previous image {}: {why} (made by another tool?): nothing can be reused, planning afresh",
                self.source.display()
            ))
        } else {
            None
        }
    }

    /// Errs when the plan is for another store (it has paths, and none lies
    /// directly under `store_dir`), or when a JSON plan names something that
    /// is not a store path (a file inside one, the store directory itself).
    pub fn check_store(&self, store_dir: &str) -> Result<(), PreviousError> {
        let under = |p: &str| {
            p.strip_prefix(store_dir)
                .and_then(|r| r.strip_prefix('/'))
                .is_some_and(|name| !name.is_empty() && !name.contains('/'))
        };
        let mut paths = self.layers.iter().flatten();
        let Some(first) = paths.clone().next() else { return Ok(()) };
        let any_under = self.layers.iter().flatten().any(|p| under(p));
        match paths.find(|p| !under(p)) {
            None => Ok(()),
            // An image's customisation layer may name a directory outside
            // the store (`stream` of a conf whose customisation layer is).
            Some(_) if self.from_image && any_under => Ok(()),
            Some(bad) if bad.starts_with(store_dir) || any_under => Err(PreviousError::Plan {
                path: self.source.clone(),
                what: format!("{bad} is not a store path (a name right under {store_dir})"),
            }),
            Some(_) => {
                let found = Path::new(first).parent().map(|d| d.display().to_string()).unwrap_or_else(|| first.clone());
                Err(PreviousError::OtherStore { path: self.source.clone(), found, store: store_dir.to_string() })
            }
        }
    }
}

/// The store directory of a closure's paths (`/nix/store` for
/// `/nix/store/HASH-name`); `None` for an empty closure.
pub fn store_dir_of<'a>(mut paths: impl Iterator<Item = &'a str>) -> Option<String> {
    paths.next().and_then(|p| Path::new(p).parent()).map(|d| d.display().to_string())
}

/// Reads a previous plan or image: one, or several from a JSON list of
/// plans (what `layers --joint` prints).
pub fn load(path: &Path, arch: &str) -> Result<Vec<Previous>, PreviousError> {
    // `PATH:NAME` picks one image of an archive or layout holding several.
    let (path, name) = split_name(path);
    let path = path.as_path();
    let io_err = |source| PreviousError::Io { path: path.to_path_buf(), source };
    let f: Box<dyn Read> = if is_stdin(path) {
        Box::new(io::stdin().lock())
    } else if path.is_dir() {
        return Ok(vec![from_layout(path, name.as_deref(), arch)?]);
    } else {
        Box::new(std::fs::File::open(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => PreviousError::Plan { path: path.to_path_buf(), what: not_found(path) },
            _ => io_err(e),
        })?)
    };
    // A pipe may give fewer bytes at a time than the checks need: the
    // first block is read whole, then put back in front.
    let (head, f) = peek(f, 512).map_err(io_err)?;
    let compression = Compression::sniff(&head);
    let outer = BufReader::with_capacity(1 << 20, io::Cursor::new(head).chain(f));
    let (head, decoded) = peek(compression.decoder(outer).map_err(io_err)?, 512).map_err(io_err)?;
    let r = io::Cursor::new(head.clone()).chain(decoded);
    // JSON of any kind (or nothing at all) is taken for a plan, so that its
    // error is about the plan; a tar archive starts with a member's name.
    let first = head.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let json = first.is_none_or(|b| b"[{\"-0123456789tfn".contains(&b));
    if json && !looks_like_tar(&head) {
        if let Some(name) = name {
            let what = format!("a JSON plan holds no images to pick {name:?} from");
            return Err(PreviousError::Plan { path: path.to_path_buf(), what });
        }
        let limit = crate::input::limited::MAX_GRAPH;
        let mut text = Vec::new();
        r.take(limit + 1).read_to_end(&mut text).map_err(io_err)?;
        if text.len() as u64 > limit {
            return Err(PreviousError::Plan {
                path: path.to_path_buf(),
                what: format!("larger than the {limit}-byte limit"),
            });
        }
        let v: Value = serde_json::from_slice(&text).map_err(|e| PreviousError::Plan {
            path: path.to_path_buf(),
            what: format!("not valid JSON ({e}); expected a list of lists of store paths, or an image archive"),
        })?;
        let plan = |v: &Value, source: PathBuf| {
            let layers = plan_from_json(v).map_err(|what| PreviousError::Plan { path: source.clone(), what })?;
            Ok(Previous { source, layers, other_layers: 0, from_image: false })
        };
        // A list of plans: an item holds a list (an image's plan may be
        // empty, when --exclude-paths left it nothing).
        let items = v.as_array().into_iter().flatten();
        let joint = items.filter_map(Value::as_array).flatten().any(Value::is_array);
        if joint {
            let plans = v.as_array().into_iter().flatten().enumerate();
            return plans.map(|(i, p)| plan(p, PathBuf::from(format!("{}#{}", path.display(), i + 1)))).collect();
        }
        return Ok(vec![plan(&v, path.to_path_buf())?]);
    }
    Ok(vec![from_archive(r, path, name.as_deref(), arch)?])
}

/// The first `n` bytes of `r` (fewer only at its end), and `r` after them.
fn peek<R: Read>(mut r: R, n: u64) -> io::Result<(Vec<u8>, R)> {
    let mut head = Vec::new();
    r.by_ref().take(n).read_to_end(&mut head)?;
    Ok((head, r))
}

/// What to say of a `--previous` that names no file: skopeo's transports
/// (`oci-archive:FILE`) are not needed here.
fn not_found(path: &Path) -> String {
    let text = path.to_string_lossy();
    let transports = ["docker-archive:", "oci-archive:", "oci:", "dir:"];
    match transports.iter().find_map(|t| text.strip_prefix(t).map(|rest| (t, rest))) {
        Some((t, rest)) => format!("no such file: give the path without skopeo's {t} prefix ({rest})"),
        None => "no such file (a registry image is docker://HOST/REPO:TAG; an OCI layout is its directory)".into(),
    }
}

/// `-`: the plan or image comes on standard input.
pub fn is_stdin(path: &Path) -> bool {
    path == Path::new("-")
}

/// `PATH:NAME` when `PATH` exists (or is `-`) and the whole does not; else
/// the path.
fn split_name(path: &Path) -> (PathBuf, Option<String>) {
    if path.exists() || is_stdin(path) {
        return (path.to_path_buf(), None);
    }
    let text = path.to_string_lossy();
    for (at, _) in text.match_indices(':') {
        let (file, name) = (&text[..at], &text[at + 1..]);
        if !file.is_empty() && !name.is_empty() && (Path::new(file).exists() || file == "-") {
            return (PathBuf::from(file), Some(name.to_string()));
        }
    }
    (path.to_path_buf(), None)
}

/// Which of an archive's or layout's images to read: `names[i]` are the
/// names image `i` goes by (RepoTags, or the ref.name annotation).  One
/// image needs no name; several do (the newest is not knowable from the
/// archive), and `name` matches a name whole or its tag.
fn pick(path: &Path, names: &[Vec<String>], name: Option<&str>) -> Result<usize, PreviousError> {
    let bad = |what: String| PreviousError::Image { path: path.to_path_buf(), what };
    let listed = || {
        let all: Vec<String> = names.iter().map(|n| n.first().cloned().unwrap_or_else(|| "(unnamed)".into())).collect();
        all.join(", ")
    };
    match name {
        None if names.len() == 1 => Ok(0),
        None if names.is_empty() => Err(bad("it lists no image".into())),
        None => Err(bad(format!(
            "it holds {} images ({}): name the previous one as {}:NAME",
            names.len(),
            listed(),
            path.display()
        ))),
        Some(want) => {
            // `repo:tag` splits at its last colon unless that one is a
            // registry's port (`host:5000/repo`).
            fn split(n: &str) -> Option<(&str, &str)> {
                n.rsplit_once(':').filter(|(_, t)| !t.contains('/'))
            }
            let matching = |hit: &dyn Fn(&str) -> bool| -> Vec<usize> {
                (0..names.len()).filter(|&i| names[i].iter().any(|n| hit(n))).collect()
            };
            // The whole name, else the tag, else the repository alone.
            let whole = matching(&|n| n == want);
            let tag = matching(&|n| split(n).is_some_and(|(_, t)| t == want));
            let repo = matching(&|n| split(n).is_some_and(|(r, _)| r == want));
            match [whole, tag, repo].into_iter().find(|m| !m.is_empty()) {
                Some(m) if m.len() == 1 => Ok(m[0]),
                Some(m) => {
                    let these: Vec<String> = m.iter().map(|&i| names[i].join(" ")).collect();
                    Err(bad(format!(
                        "{want:?} names {} of its images ({}): give the whole name",
                        m.len(),
                        these.join(", ")
                    )))
                }
                None => Err(bad(format!("it has no image named {want:?} (it has: {})", listed()))),
            }
        }
    }
}

/// Gives each image (its set of store paths) the previous plan it shares
/// the most paths with, each plan to one image at most (an image none fits
/// gets none): so `--previous` may name each image's previous plan in any
/// order.  Returns, per image, the index of its plan.
pub fn assign(images: &[HashSet<&str>], plans: &[Vec<Vec<String>>]) -> Vec<Option<usize>> {
    let mut pairs: Vec<(usize, usize, usize)> = Vec::new();
    for (i, paths) in images.iter().enumerate() {
        for (j, plan) in plans.iter().enumerate() {
            let overlap = plan.iter().flatten().filter(|p| paths.contains(p.as_str())).count();
            if overlap > 0 {
                pairs.push((overlap, i, j));
            }
        }
    }
    // Most shared paths first; ties to the earlier image, then plan.
    pairs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut out: Vec<Option<usize>> = vec![None; images.len()];
    let mut used = vec![false; plans.len()];
    for (_, i, j) in pairs {
        if out[i].is_none() && !used[j] {
            out[i] = Some(j);
            used[j] = true;
        }
    }
    out
}

/// A 512-byte tar header has "ustar" at offset 257.
fn looks_like_tar(head: &[u8]) -> bool {
    head.len() >= 262 && &head[257..262] == b"ustar"
}

/// A list of lists of store paths, each path once.
pub fn plan_from_json(v: &Value) -> Result<Vec<Vec<String>>, String> {
    let outer = v.as_array().ok_or("expected a list of layers (lists of store paths)")?;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut layers = Vec::with_capacity(outer.len());
    for (i, l) in outer.iter().enumerate() {
        let items = l.as_array().ok_or_else(|| format!("layer {}: expected a list of store paths", i + 1))?;
        let mut layer = Vec::with_capacity(items.len());
        for p in items {
            let p = p.as_str().ok_or_else(|| format!("layer {}: {p} is not a string", i + 1))?;
            if !p.starts_with('/') {
                return Err(format!("layer {}: {p:?} is not an absolute store path", i + 1));
            }
            // `/nix/store/...-app/`, as a shell completes it, is the store path.
            let p = if p.len() > 1 { p.trim_end_matches('/') } else { p };
            if let Some(j) = seen.insert(p.to_string(), i) {
                let where_ =
                    if j == i { "twice in this layer".to_string() } else { format!("already in layer {}", j + 1) };
                return Err(format!("layer {}: {p} is {where_}", i + 1));
            }
            layer.push(p.to_string());
        }
        layers.push(layer);
    }
    Ok(layers)
}

/// Which entry of an OCI index to read: without a name, of several
/// entries the one for linux/`arch` when they are one image's platforms
/// (exactly one matches); else as [`pick`] chooses.
fn pick_entry(path: &Path, entries: &[Value], name: Option<&str>, arch: &str) -> Result<usize, PreviousError> {
    let matching: Vec<usize> = (0..entries.len()).filter(|&i| for_linux(&entries[i], arch)).collect();
    let platforms = entries.iter().all(|e| e.get("platform").is_some());
    match (name, matching.as_slice()) {
        (None, [one]) if entries.len() > 1 => Ok(*one),
        (None, []) if entries.len() > 1 && platforms => Err(PreviousError::Image {
            path: path.to_path_buf(),
            what: format!("its index lists no linux/{arch} image (--architecture picks another)"),
        }),
        _ => pick(path, &ref_names(entries), name),
    }
}

/// Whether an index entry's platform is linux/`arch`.
fn for_linux(entry: &Value, arch: &str) -> bool {
    let field = |key: &str| entry.pointer(&format!("/platform/{key}")).and_then(Value::as_str);
    field("os") == Some("linux") && field("architecture") == Some(arch)
}

/// An image index (a multi-platform image) resolves to its entry for
/// linux/`arch`, as `docker pull --platform` picks; an image manifest is
/// itself.  `read` reads the blob a descriptor names.
fn for_platform(
    manifest: Value,
    arch: &str,
    read: impl Fn(&Value) -> Result<Value, PreviousError>,
    bad: impl Fn(String) -> PreviousError,
) -> Result<Value, PreviousError> {
    let Some(entries) = manifest.get("manifests").and_then(Value::as_array) else { return Ok(manifest) };
    let entry = entries
        .iter()
        .find(|e| for_linux(e, arch))
        .ok_or_else(|| bad(format!("its image index has no linux/{arch} image (--architecture picks another)")))?;
    let inner = read(entry)?;
    if inner.get("manifests").is_some() {
        return Err(bad("its image index names another index: give the platform's image itself".into()));
    }
    Ok(inner)
}

fn from_archive(r: impl Read, path: &Path, name: Option<&str>, arch: &str) -> Result<Previous, PreviousError> {
    let bad = |what: String| PreviousError::Image { path: path.to_path_buf(), what };
    let tar_err = |e: TarError| match e {
        TarError::Io(source) => PreviousError::Io { path: path.to_path_buf(), source },
        e => bad(format!("neither a JSON plan nor a readable image archive: {e}")),
    };
    let mut t = TarReader::new(r);
    let mut json: HashMap<String, Vec<u8>> = HashMap::new();
    let mut kept = 0u64;
    while let Some(m) = t.next_member().map_err(tar_err)? {
        if !m.is_file() || m.size > MAX_JSON || kept + m.size > 4 * MAX_JSON {
            continue;
        }
        let mut first = [0u8; 1];
        if m.size == 0 || read_full(&mut t, &mut first).map_err(|e| tar_err(TarError::Io(e)))? == 0 {
            continue;
        }
        if first[0] != b'{' && first[0] != b'[' {
            continue;
        }
        let mut data = first.to_vec();
        t.read_to_end(&mut data).map_err(|e| tar_err(TarError::Io(e)))?;
        kept += m.size;
        json.insert(m.name_lossy().trim_start_matches("./").to_string(), data);
    }
    let parse = |name: &str| -> Result<Value, PreviousError> {
        let data = json.get(name).ok_or_else(|| bad(format!("it has no {name}")))?;
        serde_json::from_slice(data).map_err(|e| bad(format!("{name} is not valid JSON: {e}")))
    };
    let blob = |digest: &str| -> String { format!("blobs/{}", digest.replacen(':', "/", 1)) };
    let config = if json.contains_key("manifest.json") {
        let m = parse("manifest.json")?;
        let entries = m.as_array().cloned().unwrap_or_default();
        let names: Vec<Vec<String>> = entries.iter().map(|e| strings(e.get("RepoTags"))).collect();
        let at = pick(path, &names, name)?;
        let config = entries[at]
            .get("Config")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("manifest.json names no Config".into()))?;
        parse(config)?
    } else if json.contains_key("index.json") {
        let index = parse("index.json")?;
        let entries = index.get("manifests").and_then(Value::as_array).cloned().unwrap_or_default();
        let at = pick_entry(path, &entries, name, arch)?;
        let digest = entries[at]
            .get("digest")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("index.json lists no manifest".into()))?;
        let read = |d: &Value| match d.get("digest").and_then(Value::as_str) {
            Some(digest) => parse(&blob(digest)),
            None => Err(bad("its image index lists a manifest without a digest".into())),
        };
        let manifest = for_platform(parse(&blob(digest))?, arch, read, bad)?;
        let config = manifest
            .get("config")
            .and_then(|c| c.get("digest"))
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("manifest {digest} names no config")))?;
        parse(&blob(config))?
    } else {
        return Err(bad("it has neither manifest.json (docker-archive) nor index.json (oci-archive)".into()));
    };
    Ok(from_history(&config, path))
}

/// The strings of a JSON list (none for anything else).
fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).map(str::to_string).collect()
}

/// Each index entry's ref.name annotation, as its names.
fn ref_names(entries: &[Value]) -> Vec<Vec<String>> {
    let name = |m: &Value| -> Option<String> {
        m.pointer("/annotations/org.opencontainers.image.ref.name").and_then(Value::as_str).map(str::to_string)
    };
    entries.iter().map(|m| name(m).into_iter().collect()).collect()
}

/// An OCI layout directory (`image --oci-layout DIR`): the config of its
/// one image, or of the one `name` picks.
fn from_layout(dir: &Path, name: Option<&str>, arch: &str) -> Result<Previous, PreviousError> {
    use crate::input::limited::read_capped;
    let bad = |what: String| PreviousError::Image { path: dir.to_path_buf(), what };
    let read = |name: &str| -> Result<Value, PreviousError> {
        let data = read_capped(&dir.join(name), "OCI layout file", MAX_JSON).map_err(|e| bad(e.to_string()))?;
        serde_json::from_slice(&data).map_err(|e| bad(format!("{name} is not valid JSON: {e}")))
    };
    let blob = |v: &Value, what: &str| -> Result<String, PreviousError> {
        let d = v.get("digest").and_then(Value::as_str).ok_or_else(|| bad(format!("{what} has no digest")))?;
        let hex = d.strip_prefix("sha256:").filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        hex.map(|h| format!("blobs/sha256/{h}")).ok_or_else(|| bad(format!("{what}: {d} is not a sha256 digest")))
    };
    if !dir.join("index.json").is_file() {
        return Err(bad("a directory without index.json (not an OCI layout)".into()));
    }
    let index = read("index.json")?;
    let entries = index.get("manifests").and_then(Value::as_array).cloned().unwrap_or_default();
    let at = pick_entry(dir, &entries, name, arch)?;
    let manifest = read(&blob(&entries[at], "index.json's manifest")?)?;
    let manifest = for_platform(manifest, arch, |d| read(&blob(d, "the image index's manifest")?), bad)?;
    let config = manifest.get("config").ok_or_else(|| bad("its manifest names no config".into()))?;
    Ok(from_history(&read(&blob(config, "the manifest's config")?)?, dir))
}

/// An image's config (as a registry serves it): its history's store paths.
pub fn from_config(source: &str, config: &[u8]) -> Result<Previous, PreviousError> {
    let path = Path::new(source);
    let config: Value = serde_json::from_slice(config).map_err(|e| PreviousError::Image {
        path: path.to_path_buf(),
        what: format!("its config is not valid JSON: {e}"),
    })?;
    Ok(from_history(&config, path))
}

/// The store layers named by a config's history, bottom first.
fn from_history(config: &Value, path: &Path) -> Previous {
    let history = config.get("history").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut layers = Vec::new();
    let mut other = 0;
    let mut seen = HashSet::new();
    for h in history.iter().filter(|h| !h.get("empty_layer").and_then(Value::as_bool).unwrap_or(false)) {
        let paths = h
            .get("comment")
            .and_then(Value::as_str)
            .and_then(|c| c.strip_prefix("store paths: "))
            .and_then(parse_py_str_list)
            .filter(|ps| !ps.is_empty() && ps.iter().all(|p| p.starts_with('/')));
        match paths {
            // A store layer's paths are in no other layer: one naming a
            // path again is not a store layer.
            Some(ps) if ps.iter().all(|p| seen.insert(p.clone())) => layers.push(ps),
            _ => other += 1,
        }
    }
    // nixpkgs names its customisation layer as the store path it was built
    // in (`...-NAME-customisation-layer`), last: no closure path.
    if layers.last().is_some_and(|l| matches!(&l[..], [p] if p.ends_with("-customisation-layer"))) {
        layers.pop();
        other += 1;
    }
    Previous { source: path.to_path_buf(), layers, other_layers: other, from_image: true }
}

/// Parses Python's repr of a list of str: `['a', "b'c", 'd\\n']`.
pub fn parse_py_str_list(s: &str) -> Option<Vec<String>> {
    let mut chars = s.trim().chars().peekable();
    if chars.next()? != '[' {
        return None;
    }
    let mut out = Vec::new();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next()? {
            ']' if out.is_empty() => break,
            q @ ('\'' | '"') => {
                let mut item = String::new();
                loop {
                    match chars.next()? {
                        c if c == q => break,
                        '\\' => match chars.next()? {
                            'n' => item.push('\n'),
                            't' => item.push('\t'),
                            'r' => item.push('\r'),
                            'x' => item.push(hex_char(&mut chars, 2)?),
                            'u' => item.push(hex_char(&mut chars, 4)?),
                            'U' => item.push(hex_char(&mut chars, 8)?),
                            c => item.push(c),
                        },
                        c => item.push(c),
                    }
                }
                out.push(item);
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
                match chars.next()? {
                    ',' => continue,
                    ']' => break,
                    _ => return None,
                }
            }
            _ => return None,
        }
    }
    chars.next().is_none().then_some(out)
}

fn hex_char(chars: &mut impl Iterator<Item = char>, n: usize) -> Option<char> {
    let digits: String = chars.take(n).collect();
    if digits.len() != n {
        return None;
    }
    char::from_u32(u32::from_str_radix(&digits, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compat::pyjson::repr_str_list;
    use serde_json::json;

    #[test]
    fn python_list_reprs_read_back() {
        for items in [
            vec![],
            vec!["/nix/store/abc-x".to_string()],
            vec![
                "/s/it's".into(),
                "/s/tab\there".into(),
                "/s/héllo".into(),
                "/s/q\"uo'te\\".into(),
                "/s/\u{7f}".into(),
            ],
        ] {
            assert_eq!(parse_py_str_list(&repr_str_list(&items)), Some(items.clone()), "{}", repr_str_list(&items));
        }
        assert_eq!(parse_py_str_list("['/a' '/b']"), None);
        assert_eq!(parse_py_str_list("['/a'] extra"), None);
        assert_eq!(parse_py_str_list("not a list"), None);
    }

    #[test]
    fn json_plans_are_checked() {
        assert_eq!(plan_from_json(&json!([["/s/a"], ["/s/b", "/s/c"]])).unwrap().len(), 2);
        let e = plan_from_json(&json!({"a": 1})).unwrap_err();
        assert!(e.contains("expected a list of layers"), "{e}");
        let e = plan_from_json(&json!([["/s/a"], ["/s/a"]])).unwrap_err();
        assert!(e.contains("layer 2: /s/a is already in layer 1"), "{e}");
        let e = plan_from_json(&json!([["/s/a", "/s/a"]])).unwrap_err();
        assert!(e.contains("layer 1: /s/a is twice in this layer"), "{e}");
        let e = plan_from_json(&json!([["/s/a", 3]])).unwrap_err();
        assert!(e.contains("layer 1: 3 is not a string"), "{e}");
        let e = plan_from_json(&json!([["rel"]])).unwrap_err();
        assert!(e.contains("not an absolute store path"), "{e}");
    }

    #[test]
    fn a_list_of_plans_gives_one_previous_plan_each() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("plans.json");
        std::fs::write(&f, r#"[[["/s/a"], ["/s/b"]], [["/s/a"], ["/s/c"]]]"#).unwrap();
        let plans = load(&f, "amd64").unwrap();
        assert_eq!(plans.len(), 2);
        assert_eq!(plans[1].layers, [vec!["/s/a".to_string()], vec!["/s/c".to_string()]]);
        assert!(plans[1].source.display().to_string().ends_with("plans.json#2"));
        std::fs::write(&f, r#"[[["/s/a"]], [["/s/a"], "x"]]"#).unwrap();
        let e = load(&f, "amd64").unwrap_err().to_string();
        assert!(e.contains("plans.json#2: layer 2: expected a list of store paths"), "{e}");
        std::fs::write(&f, r#"[["/s/a"], ["/s/b"]]"#).unwrap();
        assert_eq!(load(&f, "amd64").unwrap().len(), 1, "one plan");
        std::fs::write(&f, r#"[[], [["/s/a"]]]"#).unwrap();
        assert_eq!(load(&f, "amd64").unwrap().len(), 2, "a list of plans whose first is empty");
        // JSON that is no list is a plan's error, not an archive's.
        for text in ["null", "42", "\"x\"", "  ", ""] {
            std::fs::write(&f, text).unwrap();
            let e = load(&f, "amd64").unwrap_err().to_string();
            assert!(e.contains("expected a list of") && !e.contains("archive:"), "{text:?}: {e}");
        }
        // A trailing slash is the store path's; the store directory itself
        // or a file inside a store path is no store path.
        std::fs::write(&f, r#"[["/s/a/"]]"#).unwrap();
        assert_eq!(load(&f, "amd64").unwrap()[0].layers, vec![vec!["/s/a".to_string()]]);
        for text in [r#"[["/s/a", "/s/"]]"#, r#"[["/s/a/bin"]]"#] {
            std::fs::write(&f, text).unwrap();
            let e = load(&f, "amd64").unwrap()[0].check_store("/s").unwrap_err().to_string();
            assert!(e.contains("is not a store path (a name right under /s)"), "{text}: {e}");
        }
    }

    #[test]
    fn nixpkgs_customisation_layer_is_no_store_layer() {
        let config = json!({"history": [
            {"comment": "store paths: ['/nix/store/a-lib']"},
            {"comment": "store paths: ['/nix/store/b-app']"},
            {"comment": "store paths: ['/nix/store/c-app-customisation-layer']"},
        ]});
        let p = from_config("old.tar", config.to_string().as_bytes()).unwrap();
        assert_eq!(p.layers, vec![vec!["/nix/store/a-lib".to_string()], vec!["/nix/store/b-app".to_string()]]);
        assert_eq!(p.other_layers, 1);
    }

    /// A multi-platform image in an OCI layout: index.json names an image
    /// index, whose linux/`arch` entry is the image.
    #[test]
    fn an_image_index_resolves_to_the_platform() {
        use sha2::{Digest, Sha256};
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
        let put = |bytes: &[u8]| -> String {
            let hex = crate::engine::digest::hex(&Sha256::digest(bytes));
            std::fs::write(dir.path().join("blobs/sha256").join(&hex), bytes).unwrap();
            format!("sha256:{hex}")
        };
        let config =
            |p: &str| put(json!({"history": [{"comment": format!("store paths: ['{p}']")}]}).to_string().as_bytes());
        let image = |p: &str| {
            put(json!({"schemaVersion": 2, "config": {"digest": config(p)}, "layers": []}).to_string().as_bytes())
        };
        let entry =
            |arch: &str, digest: String| json!({"digest": digest, "platform": {"os": "linux", "architecture": arch}});
        let index = json!({"manifests": [entry("arm64", image("/s/arm")), entry("amd64", image("/s/amd"))]});
        let index = put(index.to_string().as_bytes());
        std::fs::write(dir.path().join("index.json"), json!({"manifests": [{"digest": index}]}).to_string()).unwrap();
        let layers = |arch: &str| load(dir.path(), arch).map(|p| p[0].layers.clone()).map_err(|e| e.to_string());
        assert_eq!(layers("amd64"), Ok(vec![vec!["/s/amd".to_string()]]));
        assert_eq!(layers("arm64"), Ok(vec![vec!["/s/arm".to_string()]]));
        let e = layers("s390x").unwrap_err();
        assert!(e.contains("its image index has no linux/s390x image"), "{e}");
        // The platforms listed in index.json itself.
        let flat = json!({"manifests": [entry("arm64", image("/s/arm")), entry("amd64", image("/s/amd"))]});
        std::fs::write(dir.path().join("index.json"), flat.to_string()).unwrap();
        assert_eq!(layers("amd64"), Ok(vec![vec!["/s/amd".to_string()]]));
        assert_eq!(layers("arm64"), Ok(vec![vec!["/s/arm".to_string()]]));
        let e = layers("s390x").unwrap_err();
        assert!(e.contains("its index lists no linux/s390x image"), "{e}");
    }

    #[test]
    fn one_image_of_several_is_named() {
        let names = vec![vec!["app:1".to_string()], vec!["app:2".to_string()], Vec::new()];
        let p = Path::new("rel");
        assert_eq!(pick(p, &names[..1], None).unwrap(), 0);
        assert_eq!(pick(p, &names, Some("app:2")).unwrap(), 1);
        assert_eq!(pick(p, &names, Some("2")).unwrap(), 1, "the tag alone");
        let e = pick(p, &names, None).unwrap_err().to_string();
        assert_eq!(
            e,
            "previous image rel: it holds 3 images (app:1, app:2, (unnamed)): name the previous one as rel:NAME"
        );
        let e = pick(p, &names, Some("3")).unwrap_err().to_string();
        assert!(e.contains("it has no image named \"3\""), "{e}");
        // The repository alone, when one image has it; a registry's port is
        // no tag.
        let more = vec![vec!["app:1".to_string()], vec!["localhost:5000/web:1".to_string()]];
        assert_eq!(pick(p, &more, Some("app")).unwrap(), 0);
        assert_eq!(pick(p, &more, Some("localhost:5000/web")).unwrap(), 1);
        let e = pick(p, &names, Some("app")).unwrap_err().to_string();
        assert!(e.contains("\"app\" names 2 of its images (app:1, app:2): give the whole name"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("old.tar");
        std::fs::write(&f, b"x").unwrap();
        let named = PathBuf::from(format!("{}:app:2", f.display()));
        assert_eq!(split_name(&named), (f.clone(), Some("app:2".to_string())));
        assert_eq!(split_name(&f), (f.clone(), None));
        let nothing = dir.path().join("none:x");
        assert_eq!(split_name(&nothing), (nothing.clone(), None));
    }

    #[test]
    fn each_image_gets_the_previous_plan_it_shares_most_with() {
        let image = |ps: &[&'static str]| ps.iter().copied().collect::<HashSet<&str>>();
        let plan = |ps: &[&str]| vec![ps.iter().map(|p| p.to_string()).collect::<Vec<_>>()];
        let images = [image(&["/s/lib", "/s/a", "/s/a-dep"]), image(&["/s/lib", "/s/b"]), image(&["/s/new"])];
        // Given in the other order; the third image has none.
        let plans = [plan(&["/s/lib", "/s/b"]), plan(&["/s/lib", "/s/a", "/s/a-dep"])];
        assert_eq!(assign(&images, &plans), [Some(1), Some(0), None]);
        // One plan goes to one image only: the one it shares most with.
        assert_eq!(assign(&images[..2], &plans[1..]), [Some(0), None]);
    }

    #[test]
    fn another_store_is_refused() {
        let p =
            Previous { source: "old.json".into(), layers: vec![vec!["/gnu/store/abc-x".into()]], ..Default::default() };
        let e = p.check_store("/nix/store").unwrap_err().to_string();
        assert_eq!(e, "previous plan old.json names store paths under /gnu/store, but the closure is under /nix/store");
        assert!(p.check_store("/gnu/store").is_ok());
        assert!(Previous::default().check_store("/nix/store").is_ok());
    }
}
