//! `cargo xtask lint`: the rules a reader would otherwise have to check.
//!
//! * The daemon's rooms import one way (`docs/architecture.md`): `model` is
//!   a leaf; `ops` is read by all and imports only `model`; each stage of
//!   the request path imports only stages before it, and a few not even
//!   those; `config`, `daemon`, `doctor` and `cli` sit on top.
//! * No glob import (`use super::*`) outside tests: a file's first lines
//!   say what it depends on.
//! * Every test `docs/threat-model.md` names exists.
//!
//! Source is read with `syn`, so a path is a path wherever it is written
//! (a `use` block, or inline as `crate::x::y`), and test code (`#[cfg(test)]`
//! items, `tests.rs` files) is left out of the first two rules.

use std::{
    collections::BTreeSet,
    fmt,
    path::{Path, PathBuf},
};

use syn::visit::Visit;

/// The daemon's top-level modules, in the order a request meets them,
/// then those beside and above the path.
const STAGES: [&str; 7] = [
    "kernel",
    "attribution",
    "identity",
    "policy",
    "credentials",
    "surface",
    "server",
];

/// What each room may import (rooms of `metaproxy/src`).
fn allowed(room: &str) -> Option<Vec<&'static str>> {
    let before = |stage: &str| -> Vec<&'static str> {
        STAGES
            .iter()
            .take_while(|s| **s != stage)
            .copied()
            .chain(["model", "ops"])
            .collect()
    };
    let without = |mut list: Vec<&'static str>, not: &[&str]| {
        list.retain(|r| !not.contains(r));
        list
    };
    let all_but = |not: &[&str]| -> Vec<&'static str> {
        STAGES
            .iter()
            .copied()
            .chain(["model", "ops", "config", "daemon", "doctor", "cli"])
            .filter(|r| !not.contains(r))
            .collect()
    };
    Some(match room {
        "model" => vec![],
        "ops" => vec!["model"],
        // The kernel side knows nothing of containers' identities or the
        // answers they get.
        "kernel" => without(before("kernel"), &["identity", "surface"]),
        "attribution" => before("attribution"),
        "identity" => before("identity"),
        // Policy decides on a container it is handed.
        "policy" => without(before("policy"), &["identity"]),
        // Credentials know keys and owners, nothing of who they are.
        "credentials" => without(before("credentials"), &["identity", "policy"]),
        "surface" => before("surface"),
        "server" => before("server"),
        "config" => all_but(&["config", "daemon", "doctor", "cli"]),
        "daemon" => all_but(&["daemon", "doctor", "cli"]),
        "doctor" => all_but(&["doctor", "daemon", "cli"]),
        "cli" => all_but(&["cli"]),
        _ => return None,
    })
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    pub file: PathBuf,
    pub what: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.what)
    }
}

pub fn run() -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let mut findings = imports(&root.join("metaproxy/src"))?;
    findings.extend(threat_model_tests(&root)?);
    for f in &findings {
        println!("{f}");
    }
    anyhow::ensure!(findings.is_empty(), "lint: {} findings", findings.len());
    println!(
        "lint: imports run one way, no glob imports outside tests, every threat-model test exists"
    );
    Ok(())
}

/// The import rules over the daemon's source tree at `src`.
pub fn imports(src: &Path) -> anyhow::Result<Vec<Finding>> {
    let mut findings = Vec::new();
    for file in rust_files(src)? {
        let rel = file.strip_prefix(src)?;
        let Some(room) = room_of(rel) else { continue };
        let text = std::fs::read_to_string(&file)?;
        let parsed =
            syn::parse_file(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let mut seen = Uses::default();
        if !is_test_file(rel) {
            seen.visit_file(&parsed);
        }
        for glob in &seen.globs {
            findings.push(Finding {
                file: rel.to_path_buf(),
                what: format!("glob import `use {glob}::*` outside tests: name what the file uses"),
            });
        }
        let Some(may) = allowed(&room) else {
            continue;
        };
        for target in &seen.rooms {
            if *target != room && !may.contains(&target.as_str()) {
                findings.push(Finding {
                    file: rel.to_path_buf(),
                    what: format!(
                        "`{room}` imports `{target}`, which it may not (it may import: {})",
                        list(&may)
                    ),
                });
            }
        }
    }
    findings.sort();
    Ok(findings)
}

fn list(items: &[&str]) -> String {
    if items.is_empty() {
        "nothing of the crate".into()
    } else {
        items.join(", ")
    }
}

/// `metaproxy/src/<room>.rs` or `metaproxy/src/<room>/...`; `lib.rs` and
/// `main.rs` are no room.
fn room_of(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    let room = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(room, "lib" | "main")).then(|| room.to_string())
}

fn is_test_file(rel: &Path) -> bool {
    rel.file_stem()
        .and_then(|s| s.to_str())
        .is_some_and(|s| s == "tests" || s.ends_with("_tests"))
}

/// The rooms a file names (`crate::<room>`), and its glob imports, test
/// items left out.
#[derive(Default)]
struct Uses {
    rooms: BTreeSet<String>,
    globs: Vec<String>,
}

impl Uses {
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => self.path(
                prefix
                    .iter()
                    .map(String::as_str)
                    .chain([n.ident.to_string().as_str()]),
            ),
            syn::UseTree::Rename(r) => self.path(
                prefix
                    .iter()
                    .map(String::as_str)
                    .chain([r.ident.to_string().as_str()]),
            ),
            syn::UseTree::Glob(_) => {
                self.globs.push(prefix.join("::"));
                self.path(prefix.iter().map(String::as_str).chain(["*"]));
            }
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }

    fn path<'a>(&mut self, mut segments: impl Iterator<Item = &'a str>) {
        if segments.next() == Some("crate") {
            if let Some(room) = segments.next() {
                self.rooms.insert(room.to_string());
            }
        }
    }
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| m.path().is_ident("test"))
    })
}

impl<'ast> Visit<'ast> for Uses {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs = match item {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Use(u) => &u.attrs,
            syn::Item::Impl(i) => &i.attrs,
            _ => return syn::visit::visit_item(self, item),
        };
        if !is_cfg_test(attrs) {
            syn::visit::visit_item(self, item);
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &u.tree);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        self.path(segments.iter().map(String::as_str));
        syn::visit::visit_path(self, p);
    }
}

/// Every backticked test name (`suite::module::test_fn`) in the test column
/// of `docs/threat-model.md` names a test: a `#[test]` or `#[tokio::test]`
/// function of that name in a file whose path holds the other segments.
pub fn threat_model_tests(root: &Path) -> anyhow::Result<Vec<Finding>> {
    let doc = Path::new("docs/threat-model.md");
    let text = std::fs::read_to_string(root.join(doc))?;
    let names = test_names(&text);
    anyhow::ensure!(!names.is_empty(), "{}: no test names found", doc.display());
    let tests = test_functions(root)?;
    let mut findings = Vec::new();
    for name in names {
        let segments: Vec<&str> = name.split("::").collect();
        let (func, modules) = segments.split_last().expect("a name has segments");
        let found = tests.iter().any(|(path, f)| {
            f == func
                && modules
                    .iter()
                    .filter(|m| **m != "tests")
                    .all(|m| path_holds(path, m))
        });
        if !found {
            findings.push(Finding {
                file: doc.to_path_buf(),
                what: format!("names `{name}`, which is no test"),
            });
        }
    }
    Ok(findings)
}

/// The names in the last cell of each table row.
fn test_names(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter(|l| l.trim_start().starts_with('|'))
        .filter_map(|l| l.trim().trim_end_matches('|').rsplit('|').next())
        .flat_map(|cell| cell.split('`').skip(1).step_by(2))
        .filter(|n| {
            n.contains("::")
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        })
        .map(str::to_string)
        .collect()
}

fn path_holds(path: &Path, segment: &str) -> bool {
    path.components().any(|c| {
        let c = c.as_os_str().to_str().unwrap_or("");
        c == segment || c.strip_suffix(".rs") == Some(segment)
    })
}

/// (file, function) of every test function in the workspace's Rust files.
fn test_functions(root: &Path) -> anyhow::Result<Vec<(PathBuf, String)>> {
    struct Tests<'a> {
        file: &'a Path,
        out: &'a mut Vec<(PathBuf, String)>,
    }
    impl<'ast> Visit<'ast> for Tests<'_> {
        fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
            let is_test = f.attrs.iter().any(|a| {
                let p = a.path();
                p.is_ident("test") || p.segments.last().is_some_and(|s| s.ident == "test")
            });
            if is_test {
                self.out
                    .push((self.file.to_path_buf(), f.sig.ident.to_string()));
            }
            syn::visit::visit_item_fn(self, f);
        }
    }
    let mut out = Vec::new();
    for dir in ["metaproxy", "metaproxy-common", "tests", "xtask"] {
        let dir = root.join(dir);
        if !dir.is_dir() {
            continue;
        }
        for file in rust_files(&dir)? {
            let text = std::fs::read_to_string(&file)?;
            let Ok(parsed) = syn::parse_file(&text) else {
                continue;
            };
            let rel = file.strip_prefix(root)?;
            Tests {
                file: rel,
                out: &mut out,
            }
            .visit_file(&parsed);
        }
    }
    Ok(out)
}

fn rust_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                if path
                    .file_name()
                    .is_some_and(|n| n != "target" && n != "testdata")
                {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch source tree, removed on drop.
    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    #[test]
    fn imports_against_the_direction_and_globs_are_found_wherever_written() {
        let src = tree(&[
            ("model/ids.rs", "use crate::ops::metrics;\n"),
            ("policy/mod.rs", "mod explain;\nfn f() { let _ = crate::identity::docker::x(); }\n"),
            ("policy/explain.rs", "use super::*;\nuse crate::{model::ids::A, credentials::{B, C}};\n"),
            ("server/mod.rs", "use crate::{surface::Surface, kernel::addrs::AddrPair};\n#[cfg(test)]\nmod tests { use super::*; use crate::daemon::x; }\n"),
            ("server/tests.rs", "use super::*;\n"),
            ("daemon/mod.rs", "use crate::{config::RunConfig, server, doctor::x};\n"),
        ]);
        let found: Vec<String> = imports(src.path())
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        let expect = [
            "daemon/mod.rs: `daemon` imports `doctor`",
            "model/ids.rs: `model` imports `ops`",
            "policy/explain.rs: `policy` imports `credentials`",
            "policy/explain.rs: glob import `use super::*`",
            "policy/mod.rs: `policy` imports `identity`",
        ];
        assert_eq!(found.len(), expect.len(), "{found:#?}");
        for (f, e) in found.iter().zip(expect) {
            assert!(f.starts_with(e), "{f} should start with {e}");
        }
    }

    #[test]
    fn a_threat_model_naming_a_test_that_does_not_exist_is_found() {
        let root = tree(&[
            (
                "docs/threat-model.md",
                "| attack | why | test |\n| --- | --- | --- |\n\
                 | a | b | `e2e::roles::real_one`, `surface::gone` |\n\
                 | c | `not::a::test::column` here | `policy::tests::in_a_module` |\n",
            ),
            (
                "tests/tests/e2e/roles.rs",
                "#[tokio::test]\nasync fn real_one() {}\nfn gone() {}\n",
            ),
            (
                "metaproxy/src/policy/tests.rs",
                "#[test]\nfn in_a_module() {}\n",
            ),
            ("metaproxy/tests/surface.rs", "fn gone() {}\n"),
        ]);
        let found = threat_model_tests(root.path()).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].what.contains("`surface::gone`"), "{}", found[0]);
    }

    #[test]
    fn this_repository_passes_its_own_lint() {
        let root = crate::workspace_root();
        let mut findings = imports(&root.join("metaproxy/src")).unwrap();
        findings.extend(threat_model_tests(&root).unwrap());
        assert!(findings.is_empty(), "{findings:#?}");
    }
}
