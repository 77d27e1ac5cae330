//! The module map docs/architecture.md describes, checked on the sources: the top-level modules of `src/`
//! import each other without cycles, and `report/` (rendering) is a leaf that imports only the domain's plain
//! data types, never the engine (`run`, `evaluate`, `explain`, `session`, `cache`, `remote`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module of `src/` and the top-level modules its non-test code names as `crate::X`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in walkdir::WalkDir::new(&src).into_iter().map(Result::unwrap) {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "rs") {
            continue;
        }
        let rel = p.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        let top = rel.split('/').next().unwrap().trim_end_matches(".rs").to_string();
        if top == "main" || top == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(p).unwrap();
        // Unit tests may use anything; comments name modules without importing them.
        let code: String = text
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let deps = map.entry(top.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + 7..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            if !name.is_empty() && name != top {
                deps.insert(name);
            }
        }
    }
    map
}

/// A cycle through `from`, if there is one: the path back to it.
fn cycle_from(map: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<Vec<String>> {
    let mut stack = vec![(from.to_string(), vec![from.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in map.get(&at).into_iter().flatten() {
            if next == from {
                return Some([path.clone(), vec![from.to_string()]].concat());
            }
            if map.contains_key(next) && seen.insert(next.clone()) {
                stack.push((next.clone(), [path.clone(), vec![next.clone()]].concat()));
            }
        }
    }
    None
}

#[test]
fn the_top_level_modules_import_each_other_without_cycles() {
    let map = imports();
    assert!(map.len() > 15, "the sources were found: {map:?}");
    let cycles: Vec<String> = map.keys().filter_map(|m| cycle_from(&map, m)).map(|c| c.join(" -> ")).collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn report_is_a_leaf_that_imports_no_engine_module() {
    let map = imports();
    let allowed = ["clock", "fresh", "graph", "pipeline", "relpath", "tfplan"];
    let report = &map["report"];
    let wrong: Vec<&String> = report.iter().filter(|m| !allowed.contains(&m.as_str())).collect();
    assert!(wrong.is_empty(), "report/ imports {wrong:?}; it may import only {allowed:?}");
}

/// The diagrams in docs/architecture.md parse with the Mermaid that GitHub renders them with.
#[test]
fn the_architecture_diagrams_are_valid_mermaid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
    let blocks: Vec<&str> = doc.split("```mermaid\n").skip(1).map(|b| b.split("```").next().unwrap()).collect();
    assert!(!blocks.is_empty(), "the state machine diagram is there");
    for block in blocks {
        if let Err(why) = crate::harness::mermaid_parse(block) {
            panic!("mermaid rejects:\n{block}\n{why}");
        }
    }
}
