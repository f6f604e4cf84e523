//! From the command line to planned layers, for `layers`, `plan` and
//! `image`: reading the closure (a graph file or store paths asked of the
//! local Nix) and `--exclude-paths`, reading `--previous` (a plan, an image
//! archive or a registry image), and choosing the planner the options name.
//! The planners themselves are in `crate::planner`.

use std::collections::HashSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::args::{json_arg, ClosureArgs, ImageArgs, LayeringChoice, RegistryAccess};
use crate::input::closure::ClosureGraph;
use crate::planner::autolayer::auto_layer;
use crate::planner::previous::Previous;
use crate::planner::{pipeline, stable};

/// The closure the inputs name (a graph file, or store paths asked of the
/// local Nix), and the paths `--exclude-paths` leaves out.
pub(super) fn load_closure(c: &ClosureArgs) -> anyhow::Result<(ClosureGraph, HashSet<String>)> {
    Ok((load_graph(&c.input)?, load_exclude(c.exclude_paths.as_deref())?))
}

/// The paths an `--exclude-paths` file names: a JSON list, or a path a line.
fn load_exclude(file: Option<&Path>) -> anyhow::Result<HashSet<String>> {
    use crate::input::limited::{read_capped_text, MAX_EXCLUDE};
    let Some(f) = file else { return Ok(HashSet::new()) };
    let text = read_capped_text(f, "--exclude-paths file", MAX_EXCLUDE)?;
    Ok(match serde_json::from_str::<Vec<String>>(&text) {
        Ok(list) => list.into_iter().collect(),
        Err(_) => text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect(),
    })
}

/// The closure `inputs` name.  One regular file (or `-`) is a graph,
/// unless it is itself a store path (a file right in a store directory);
/// anything else names store paths.
fn load_graph(inputs: &[String]) -> anyhow::Result<ClosureGraph> {
    if let [one] = inputs {
        let p = Path::new(one);
        let in_store = p.parent().and_then(Path::file_name).is_some_and(|d| d == "store");
        if (p.is_file() && !in_store) || one == "-" {
            return Ok(ClosureGraph::load(p)?);
        }
    }
    Ok(ClosureGraph::from_store(inputs)?)
}

/// A plan, with what the previous release (if given) let it keep.
pub(super) struct Chosen {
    pub(super) planned: crate::planner::stable::Planned,
    pub(super) previous: Option<Previous>,
    /// The `--from-image` base's layers, below the plan's.
    pub(super) base_layers: usize,
    /// The store layers the budget allows (`None` for `--auto-layer N` and
    /// `--pipeline`, which bring their own).
    pub(super) allowed: Option<usize>,
}

/// Reads every `--previous` (a JSON list of plans gives several), checked
/// against the closure's store directory; says on stderr when nothing in
/// one can be reused.
fn load_previous(
    files: &[PathBuf],
    closure: &ClosureGraph,
    registry: &PreviousRegistry,
) -> anyhow::Result<Vec<Previous>> {
    let store = crate::planner::previous::store_dir_of(closure.nodes.iter().map(|n| n.path.as_str()));
    let arch = registry.architecture.unwrap_or(crate::dest::manifest::host_architecture());
    let mut out = Vec::new();
    for file in files {
        let prevs = match file.to_str().filter(|f| f.starts_with("docker://")) {
            Some(reference) => vec![previous_from_registry(reference, registry, arch)?],
            None => crate::planner::previous::load(file, arch)?,
        };
        for prev in prevs {
            if let Some(store) = &store {
                prev.check_store(store)?;
            }
            if let Some(note) = prev.note() {
                let _ = writeln!(io::stderr(), "nixstream: {note}");
            }
            out.push(prev);
        }
    }
    Ok(out)
}

/// Errs when more than one of the options would read standard input
/// (`-` as a closure, `--joint-with -`, `--previous -` or `-:NAME`,
/// `--password-stdin`): it holds one thing, and the second reader would
/// find it empty and blame what it expected.
pub(super) fn one_stdin_reader(
    closure: &[String],
    joint_with: &[String],
    previous: &[PathBuf],
    password_stdin: bool,
) -> anyhow::Result<()> {
    let previous_stdin = |p: &PathBuf| p.to_str().is_some_and(|p| p == "-" || p.starts_with("-:"));
    let readers: Vec<&str> = std::iter::empty()
        .chain(closure.iter().filter(|c| *c == "-").map(|_| "a closure graph -"))
        .chain(joint_with.iter().filter(|c| *c == "-").map(|_| "--joint-with -"))
        .chain(previous.iter().filter(|p| previous_stdin(p)).map(|_| "--previous -"))
        .chain(password_stdin.then_some("--password-stdin"))
        .collect();
    match readers.as_slice() {
        [] | [_] => Ok(()),
        [a, b, ..] if a == b => anyhow::bail!("{a} is given {} times: standard input holds one thing", readers.len()),
        [a, b, ..] => anyhow::bail!("{a} and {b} both read standard input: give one of them as a file"),
    }
}

/// The one previous plan of a single image.
fn single(mut previous: Vec<Previous>) -> anyhow::Result<Option<Previous>> {
    anyhow::ensure!(
        previous.len() <= 1,
        "--previous names {} plans: one image builds on one (several are for --joint or --joint-with)",
        previous.len()
    );
    Ok(previous.pop())
}

/// Errs when two of the closures planned jointly are the same closure (an
/// input named twice, or two names of one store path): an image planned
/// jointly with itself is a mistake, not a plan.  `names[i]` names
/// `graphs[i]`.
fn distinct(graphs: &[ClosureGraph], names: &[String]) -> anyhow::Result<()> {
    let sets: Vec<HashSet<&str>> = graphs.iter().map(|g| g.nodes.iter().map(|n| n.path.as_str()).collect()).collect();
    for (i, a) in sets.iter().enumerate() {
        if let Some(j) = sets[i + 1..].iter().position(|b| b == a) {
            anyhow::bail!(
                "{} and {} are the same closure: name each image once to plan them jointly",
                names[i],
                names[i + 1 + j]
            );
        }
    }
    Ok(())
}

/// Each image's previous plan, in the order of the images.
type Assigned = Vec<Vec<Vec<String>>>;

/// Plans `graphs` jointly, each on the previous plan (of `previous`) it
/// shares the most paths with; and that plan, per image.
fn joint(
    graphs: &[ClosureGraph],
    exclude: &HashSet<String>,
    budget: usize,
    previous: &[Previous],
) -> anyhow::Result<(Vec<stable::Planned>, Option<Assigned>)> {
    anyhow::ensure!(
        budget >= 2,
        "--max-layers leaves {budget} layer for the store paths, and planning jointly needs two (the shared paths' and each image's own): raise --max-layers by {}",
        2 - budget
    );
    if previous.is_empty() {
        return Ok((stable::plan_joint(graphs, exclude, budget, None)?, None));
    }
    // The same file twice (two plans with the same layers may be two
    // images' whose own paths --exclude-paths took).
    let same = |a: &Path, b: &Path| {
        a == b || std::fs::canonicalize(a).is_ok_and(|x| std::fs::canonicalize(b).is_ok_and(|y| x == y))
    };
    for (i, a) in previous.iter().enumerate() {
        if let Some(b) = previous[i + 1..].iter().find(|b| same(&a.source, &b.source)) {
            anyhow::bail!(
                "--previous {} and {} are the same plan: give each image's previous plan once",
                a.source.display(),
                b.source.display()
            );
        }
    }
    let paths: Vec<HashSet<&str>> = graphs.iter().map(|g| g.nodes.iter().map(|n| n.path.as_str()).collect()).collect();
    let plans: Vec<Vec<Vec<String>>> = previous.iter().map(|p| p.layers.clone()).collect();
    let to = crate::planner::previous::assign(&paths, &plans);
    for (_, p) in previous.iter().enumerate().filter(|(j, _)| !to.contains(&Some(*j))) {
        let _ = writeln!(
            io::stderr(),
            "nixstream: previous plan {} left out: it shares no paths with an image that has no plan yet (given twice, or one too many?)",
            p.source.display()
        );
    }
    for (i, _) in to.iter().enumerate().filter(|(_, j)| j.is_none()) {
        let _ = writeln!(
            io::stderr(),
            "nixstream: image {} has no previous plan: its own layers are planned afresh",
            i + 1
        );
    }
    let assigned: Assigned = to.iter().map(|j| j.map(|j| plans[j].clone()).unwrap_or_default()).collect();
    Ok((stable::plan_joint(graphs, exclude, budget, Some(&assigned))?, Some(assigned)))
}

/// `--previous docker://...`: the image's config, read from the registry
/// with the registry options (TLS, and `--creds` when the previous image is
/// on the registry `--creds` is for: the `--push` one, or the only one
/// named), else the credentials docker and podman keep.  A tag that is not
/// there yet (a first release) is said, and is an empty previous plan:
/// everything is new.  Anything else missing is an error.
fn previous_from_registry(reference: &str, registry: &PreviousRegistry, arch: &str) -> anyhow::Result<Previous> {
    use crate::dest::registry::{pull, Reference, RegistryError};
    let from = Reference::parse(reference)?;
    let say = |line: &str| {
        if !registry.quiet {
            let _ = writeln!(io::stderr(), "nixstream: --previous: {line}");
        }
    };
    let opts = registry.args.client_options(&from, registry.push.as_deref(), &say)?;
    match pull::fetch_image(&from, &opts, "--previous", arch) {
        Ok(image) => Ok(crate::planner::previous::from_config(reference, &image.config)?),
        Err(RegistryError::NoSuchImage { .. }) => {
            let _ = writeln!(
                io::stderr(),
                "nixstream: previous image docker://{from} does not exist (yet): planning afresh"
            );
            Ok(Previous { source: PathBuf::from(reference), ..Previous::default() })
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("--previous {reference}"))),
    }
}

/// What `image` knows about registries, for `--previous docker://...`.
struct PreviousRegistry<'a> {
    args: &'a RegistryAccess,
    /// The `--push` destination's registry.
    push: Option<String>,
    /// The image's `--architecture`, to pick from an image index.
    architecture: Option<&'a str>,
    /// `-q`: not even where the credentials came from.
    quiet: bool,
}

fn note(planned: &crate::planner::stable::Planned) {
    for n in &planned.notes {
        let _ = writeln!(io::stderr(), "nixstream: {n}");
    }
}

/// What the store layers of an image may take: nixpkgs' budget,
/// `--max-layers` less one for the customisation layer and less the base
/// image's layers.  `image`, `layers` and `plan` all count it here, so that
/// `layers --from-image BASE` plans what `image --from-image BASE` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Budget {
    /// The base image's layers, below the store layers (0 without one).
    pub(super) base_layers: usize,
    /// The store layers' budget.
    pub(super) store: usize,
}

/// The layers of the base image `from_image` (none without one).
fn base_layer_count(from_image: Option<&Path>) -> anyhow::Result<usize> {
    Ok(match from_image {
        Some(f) => crate::read::baseimage::BaseImage::open(f)?.layers.len(),
        None => 0,
    })
}

/// The budget `max_layers` leaves on the base image `from_image` (opened
/// to count its layers), or an error saying what took the layers.
pub(super) fn budget(max_layers: usize, from_image: Option<&Path>) -> anyhow::Result<Budget> {
    let base_layers = base_layer_count(from_image)?;
    let used = 1 + base_layers;
    if used >= max_layers {
        let why = match from_image {
            None => "the customisation layer takes one".to_string(),
            Some(_) => format!(
                "the base image has {base_layers} layer{} and the customisation layer takes one",
                if base_layers == 1 { "" } else { "s" }
            ),
        };
        anyhow::bail!("--max-layers {max_layers} leaves no layer for the store paths: {why}");
    }
    Ok(Budget { base_layers, store: max_layers - used })
}

/// The planner the options name.
enum How<'a> {
    /// nixpkgs' auto-layer with at most this many layers.
    AutoLayer(usize),
    Pipeline(&'a str),
    Popularity,
    /// Planned jointly with these other closures (`image --joint-with`),
    /// on the previous plans given.
    JointWith(&'a [String], &'a [Previous]),
    /// The stable planner, the default, on `--previous` when given.
    Stable,
}

impl<'a> How<'a> {
    /// The planner the options name, for `image`, `layers` and `plan`
    /// alike (clap refuses two at once).
    fn of(
        pipeline: Option<&'a str>,
        popularity: bool,
        auto_layer: Option<usize>,
        joint_with: Option<(&'a [String], &'a [Previous])>,
    ) -> How<'a> {
        match (pipeline, auto_layer, joint_with) {
            (Some(text), _, _) => How::Pipeline(text),
            _ if popularity => How::Popularity,
            (None, Some(n), _) => How::AutoLayer(n),
            (None, None, Some((others, previous))) => How::JointWith(others, previous),
            (None, None, None) => How::Stable,
        }
    }
}

/// Plans `closure` with `how` within `budget` store layers (the budget of
/// every planner but `--auto-layer N` and `--pipeline`).
fn choose(
    closure: &ClosureGraph,
    exclude: &HashSet<String>,
    how: How,
    budget: usize,
    previous: Option<&Previous>,
) -> anyhow::Result<stable::Planned> {
    let plain = |layers: Vec<Vec<String>>| stable::Planned { layers, ..Default::default() };
    let planned = match how {
        How::AutoLayer(n) => {
            anyhow::ensure!(n > 0, "--auto-layer needs at least 1 layer");
            plain(auto_layer(closure, exclude, n))
        }
        How::Pipeline(text) => {
            let steps = pipeline::parse(&json_arg("pipeline", text, crate::input::limited::MAX_PIPELINE)?)?;
            plain(pipeline::plan_layers(closure, &steps, exclude)?)
        }
        How::Popularity => {
            let steps = pipeline::parse(&serde_json::json!([["popularity_contest"], ["limit_layers", budget]]))?;
            plain(pipeline::plan_layers(closure, &steps, exclude)?)
        }
        How::JointWith(others, previous) => {
            let mut graphs = vec![closure.clone()];
            for other in others {
                graphs.push(load_graph(std::slice::from_ref(other))?);
            }
            let names: Vec<String> = std::iter::once("the image".to_string())
                .chain(others.iter().map(|o| format!("--joint-with {o}")))
                .collect();
            distinct(&graphs, &names)?;
            joint(&graphs, exclude, budget, previous)?.0.swap_remove(0)
        }
        How::Stable => stable::plan(closure, exclude, budget, previous.map(|p| p.layers.as_slice()))?,
    };
    note(&planned);
    Ok(planned)
}

/// The layers of `layers` and `plan`: the planner `l` names, else the
/// stable planner within `--max-layers` (less `--from-image`'s layers), as
/// `image` plans.
pub(super) fn plan_with(
    closure: &ClosureGraph,
    exclude: &HashSet<String>,
    l: &LayeringChoice,
) -> anyhow::Result<Chosen> {
    let from_image = l.base.from_image.as_deref();
    let how = How::of(l.pipeline.as_deref(), l.popularity, l.auto_layer, None);
    let budget = match (&how, from_image) {
        // `--auto-layer N` is a count of its own: a base would not change
        // it, and `image` has no such form to match.
        (How::AutoLayer(n), Some(_)) => {
            let k = base_layer_count(from_image)?;
            anyhow::bail!(
                "--auto-layer {n} is a layer count of its own, which --from-image does not lower: leave out --from-image (what `image --auto-layer --max-layers M --from-image` plans is --auto-layer M-{}: the base image's {k} layer{} and the customisation layer come off)",
                k + 1,
                if k == 1 { "" } else { "s" }
            )
        }
        // A pipeline's limit is its own, as for `image --pipeline`: the
        // base changes nothing but the count `image` checks.
        (How::AutoLayer(_), None) | (How::Pipeline(_), None) => Budget { base_layers: 0, store: 0 },
        _ => budget(l.max_layers, from_image)?,
    };
    let registry = PreviousRegistry { args: &l.access, push: None, architecture: None, quiet: false };
    let previous = single(load_previous(&l.previous, closure, &registry)?)?;
    let allowed = Some(budget.store).filter(|_| !matches!(how, How::AutoLayer(_) | How::Pipeline(_)));
    let planned = choose(closure, exclude, how, budget.store, previous.as_ref())?;
    Ok(Chosen { planned, previous, base_layers: budget.base_layers, allowed })
}

/// Joint plans, one per input in order, and the budget they share.
pub(super) struct Joint {
    pub(super) plans: Vec<(ClosureGraph, stable::Planned)>,
    pub(super) budget: Budget,
    /// With `--previous`, each image's previous plan.
    pub(super) previous: Option<Assigned>,
}

/// `--joint`: one closure per input, planned together, each image on the
/// same `--from-image` base when given.
pub(super) fn joint_plans(c: &ClosureArgs, l: &LayeringChoice) -> anyhow::Result<Joint> {
    let budget = budget(l.max_layers, l.base.from_image.as_deref())?;
    let mut graphs = Vec::new();
    for input in &c.input {
        graphs.push(load_graph(std::slice::from_ref(input))?);
    }
    let exclude = load_exclude(c.exclude_paths.as_deref())?;
    distinct(&graphs, &c.input)?;
    let registry = PreviousRegistry { args: &l.access, push: None, architecture: None, quiet: false };
    let previous = match graphs.first() {
        Some(g) => load_previous(&l.previous, g, &registry)?,
        None => Vec::new(),
    };
    let (plans, previous) = joint(&graphs, &exclude, budget.store, &previous)?;
    for p in &plans {
        note(p);
    }
    Ok(Joint { plans: graphs.into_iter().zip(plans).collect(), budget, previous })
}

/// The store layers of `image`: the planner its options name, within
/// nixpkgs' budget; empty layers left out.  And the `--previous
/// docker://` images that were there (a push may mount from them).
pub(super) fn image_layers(
    a: &ImageArgs,
    closure: &ClosureGraph,
    exclude: &HashSet<String>,
) -> anyhow::Result<(Vec<Vec<String>>, Vec<String>)> {
    let budget = budget(a.max_layers, a.base.from_image.as_deref())?.store;
    let previous = if a.previous.is_empty() {
        Vec::new()
    } else {
        let push = match &a.push {
            Some(p) => Some(crate::dest::registry::Reference::parse(p)?.registry),
            None => None,
        };
        let registry = PreviousRegistry {
            args: &a.registry.access,
            push,
            architecture: a.architecture.as_deref(),
            quiet: a.output.run.quiet,
        };
        load_previous(&a.previous, closure, &registry)?
    };
    let joint_with = Some(&a.joint_with[..]).filter(|j| !j.is_empty()).map(|j| (j, &previous[..]));
    let how = How::of(a.pipeline.as_deref(), a.popularity, a.auto_layer.then_some(budget), joint_with);
    let single_previous = if matches!(how, How::Stable) { single(previous.clone())? } else { None };
    let layers = choose(closure, exclude, how, budget, single_previous.as_ref())?.layers;
    let found = previous.iter().filter(|p| p.from_image).filter_map(|p| p.source.to_str());
    let in_registries = found.filter(|s| s.starts_with("docker://")).map(str::to_string).collect();
    Ok((layers.into_iter().filter(|l| !l.is_empty()).collect(), in_registries))
}
