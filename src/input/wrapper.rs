//! What `nix-build` hands a `dockerTools.streamLayeredImage` user: not the
//! configuration but a small shell script that nixpkgs writes with
//! `makeWrapper <streamer> $out --add-flags <conf>`, ending in a line like
//!
//! ```text
//! exec -a "$0" "/nix/store/…-stream" /nix/store/…-conf.json "${extraFlagsArray[@]}" "$@"
//! ```
//!
//! This module finds the configuration such a script names, so that
//! `nixstream stream ./result` takes the script as well as the
//! configuration itself (and a directory holding `conf.json`, as
//! `nixstream image --emit-conf` writes).  Anything else that starts with `#!`, or any other
//! executable, is refused with one line saying why: guessing at scripts
//! written some other way could stream the wrong image.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum WrapperError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is a script but not a streamLayeredImage wrapper: {why}")]
    NotAWrapper { path: PathBuf, why: String },
    #[error("{path} is a binary executable, not a streamLayeredImage configuration or its makeWrapper script")]
    Binary { path: PathBuf },
}

/// Where the configuration is, and the `--repo_tag` the wrapper adds, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub conf: PathBuf,
    pub repo_tag: Option<String>,
}

/// Scripts bigger than this are not makeWrapper's (a few hundred bytes).
const MAX_SCRIPT: u64 = 64 * 1024;

/// `path` itself when it is not a script (the configuration, read and
/// checked later), else the configuration its `exec` line names.
pub fn resolve(path: &Path) -> Result<Resolved, WrapperError> {
    let read_err = |source| WrapperError::Read { path: path.to_path_buf(), source };
    let plain = Resolved { conf: path.to_path_buf(), repo_tag: None };
    let md = match std::fs::metadata(path) {
        Ok(md) => md,
        // Conf::load reports what is wrong with it.
        Err(_) => return Ok(plain),
    };
    if md.is_dir() {
        // What `nixstream image --emit-conf DIR` (the Nix library's
        // streamImage) writes.
        let inside = path.join(crate::output::confdir::CONF);
        return Ok(if inside.is_file() { Resolved { conf: inside, repo_tag: None } } else { plain });
    }
    if !md.is_file() {
        return Ok(plain);
    }
    let mut head = [0u8; 4];
    let n = {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(read_err)?;
        let mut n = 0;
        while n < head.len() {
            match f.read(&mut head[n..]).map_err(read_err)? {
                0 => break,
                k => n += k,
            }
        }
        n
    };
    if head[..n].starts_with(b"\x7fELF") {
        return Err(WrapperError::Binary { path: path.to_path_buf() });
    }
    if !head[..n].starts_with(b"#!") {
        return Ok(plain);
    }
    let not = |why: String| WrapperError::NotAWrapper { path: path.to_path_buf(), why };
    if md.len() > MAX_SCRIPT {
        return Err(not(format!("{} bytes is too big for a makeWrapper script", md.len())));
    }
    let text = std::fs::read(path).map_err(read_err)?;
    let text = String::from_utf8(text).map_err(|_| not("it is not UTF-8 text".into()))?;
    let found = conf_of_script(&text).map_err(not)?;
    let conf = PathBuf::from(&found.conf);
    match std::fs::metadata(&conf) {
        Ok(m) if m.is_file() => Ok(Resolved { conf, repo_tag: found.repo_tag }),
        Ok(_) => Err(not(format!("the configuration it names, {}, is not a file", found.conf))),
        Err(e) => Err(not(format!("the configuration it names, {}, cannot be read ({e})", found.conf))),
    }
}

/// What the last `exec` line of a makeWrapper script passes to the
/// streamer, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Found {
    conf: String,
    repo_tag: Option<String>,
}

fn conf_of_script(text: &str) -> Result<Found, String> {
    let line = text
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with("exec ") || l.starts_with("exec\t"))
        .ok_or("it has no `exec` line")?;
    let words = shell_words(line).ok_or("its `exec` line has unbalanced quotes")?;
    let mut rest = words.iter().skip(1).peekable(); // "exec"
                                                    // `exec -a NAME`: makeWrapper's --argv0.
    if rest.peek().map(|w| w.text.as_str()) == Some("-a") {
        rest.next();
        rest.next().ok_or("`exec -a` without a name")?;
    }
    let streamer = rest.next().ok_or("`exec` runs nothing")?;
    if !streamer.text.starts_with('/') {
        return Err(format!("it runs {:?}, not a program by absolute path", streamer.text));
    }
    let mut conf = None;
    let mut repo_tag = None;
    while let Some(w) = rest.next() {
        // The arguments the wrapper forwards: its own and --run's.
        if w.quoted && (w.text == "$@" || w.text == "${extraFlagsArray[@]}") {
            continue;
        }
        if w.text.contains('$') && !w.single_quoted {
            return Err(format!("its `exec` line passes {:?}, which only the shell can expand", w.text));
        }
        match w.text.as_str() {
            "--repo_tag" | "--repo-tag" => {
                let v = rest.next().ok_or("--repo_tag without a value")?;
                repo_tag = Some(v.text.clone());
            }
            t if t.starts_with('/') && conf.is_none() => conf = Some(t.to_string()),
            t => return Err(format!("the streamer is given {t:?}, which nixstream does not take")),
        }
    }
    let conf = conf.ok_or("its `exec` line names no configuration file")?;
    Ok(Found { conf, repo_tag })
}

/// One word of a shell command line, with its quoting removed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Word {
    text: String,
    /// Some part of it was in quotes.
    quoted: bool,
    /// All of it was in single quotes (a `$` in it is literal).
    single_quoted: bool,
}

/// Splits a line into words as the shell does for the quoting makeWrapper
/// writes: blanks separate words, `'…'` is literal, `"…"` keeps `\"`, `\\`,
/// `\$` and `` \` `` escapes, a backslash outside quotes escapes the next
/// character; a `#` starting a word begins a comment.  `None` when a quote
/// is not closed.
fn shell_words(line: &str) -> Option<Vec<Word>> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
            chars.next();
        }
        match chars.peek() {
            None | Some('#') => return Some(words),
            _ => {}
        }
        let mut w = Word { text: String::new(), quoted: false, single_quoted: true };
        while let Some(&c) = chars.peek() {
            match c {
                ' ' | '\t' => break,
                '\'' => {
                    chars.next();
                    w.quoted = true;
                    loop {
                        match chars.next()? {
                            '\'' => break,
                            c => w.text.push(c),
                        }
                    }
                }
                '"' => {
                    chars.next();
                    w.quoted = true;
                    w.single_quoted = false;
                    loop {
                        match chars.next()? {
                            '"' => break,
                            '\\' => match chars.next()? {
                                e @ ('"' | '\\' | '$' | '`') => w.text.push(e),
                                e => {
                                    w.text.push('\\');
                                    w.text.push(e);
                                }
                            },
                            c => w.text.push(c),
                        }
                    }
                }
                '\\' => {
                    chars.next();
                    w.single_quoted = false;
                    w.text.push(chars.next()?);
                }
                c => {
                    chars.next();
                    w.single_quoted = false;
                    w.text.push(c);
                }
            }
        }
        if !w.quoted {
            w.single_quoted = false;
        }
        words.push(w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(script: &str) -> Result<Found, String> {
        conf_of_script(script)
    }

    #[test]
    fn makewrapper_scripts_old_and_new() {
        // makeWrapper with `${original@Q}` quoting (nixpkgs 21.x).
        let old = "#! /nix/store/b-bash/bin/bash -eu\ndeclare -a extraFlagsArray=()\nset +u\nexec '/nix/store/s-stream' /nix/store/c-conf.json \"${extraFlagsArray[@]}\" \"$@\"\n";
        assert_eq!(found(old).unwrap(), Found { conf: "/nix/store/c-conf.json".into(), repo_tag: None });
        // makeShellWrapper (nixpkgs 22.05 on): double quotes, exec -a.
        let new = "#! /nix/store/b-bash/bin/bash -e\nexec -a \"$0\" \"/nix/store/s-stream\"  /nix/store/c-conf.json \"$@\" \n";
        assert_eq!(found(new).unwrap().conf, "/nix/store/c-conf.json");
        let plain = "#!/bin/sh\nexec \"/nix/store/s-stream\" /nix/store/c-conf.json \"$@\"\n";
        assert_eq!(found(plain).unwrap().conf, "/nix/store/c-conf.json");
        let tagged = "#!/bin/sh\nexec /nix/store/s-stream /nix/store/c-conf.json --repo_tag 'a:b' \"$@\"\n";
        assert_eq!(found(tagged).unwrap().repo_tag.as_deref(), Some("a:b"));
    }

    #[test]
    fn other_scripts_are_refused_with_a_reason() {
        for (script, why) in [
            ("#!/bin/sh\necho hi\n", "no `exec` line"),
            ("#!/bin/sh\nexec stream conf.json\n", "not a program by absolute path"),
            ("#!/bin/sh\nexec /s/stream\n", "names no configuration"),
            ("#!/bin/sh\nexec /s/stream $CONF\n", "only the shell can expand"),
            ("#!/bin/sh\nexec /s/stream /c.json --verbose\n", "\"--verbose\""),
            ("#!/bin/sh\nexec /s/stream /c.json /d.json\n", "\"/d.json\""),
            ("#!/bin/sh\nexec '/s/stream /c.json\n", "unbalanced quotes"),
        ] {
            let e = found(script).unwrap_err();
            assert!(e.contains(why), "{script:?}: {e}");
        }
    }

    #[test]
    fn shell_quoting() {
        let w = shell_words(r#"exec 'a b' "c\"d" e\ f '$x' # comment"#).unwrap();
        let t: Vec<&str> = w.iter().map(|w| w.text.as_str()).collect();
        assert_eq!(t, ["exec", "a b", "c\"d", "e f", "$x"]);
        assert!(w[4].single_quoted && !w[2].single_quoted && !w[0].quoted);
    }

    #[test]
    fn resolve_follows_a_script_and_passes_anything_else_on() {
        let d = tempfile::tempdir().unwrap();
        let conf = d.path().join("conf.json");
        std::fs::write(&conf, "{}").unwrap();
        assert_eq!(resolve(&conf).unwrap().conf, conf);
        assert_eq!(resolve(d.path()).unwrap().conf, conf, "a directory holding conf.json");
        let script = d.path().join("result");
        std::fs::write(&script, format!("#! /bin/bash -e\nexec \"/s/stream\" {} \"$@\"\n", conf.display())).unwrap();
        assert_eq!(resolve(&script).unwrap().conf, conf);
        let missing = d.path().join("gone");
        std::fs::write(&script, format!("#! /bin/bash -e\nexec \"/s/stream\" {} \"$@\"\n", missing.display())).unwrap();
        let e = resolve(&script).unwrap_err().to_string();
        assert!(e.contains("cannot be read") && e.contains("gone"), "{e}");
        let elf = d.path().join("elf");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01").unwrap();
        assert!(matches!(resolve(&elf), Err(WrapperError::Binary { .. })));
    }
}
