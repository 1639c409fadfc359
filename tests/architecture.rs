//! The code map's "must not"s (ARCHITECTURE.md), checked on the sources and manifests:
//! only `storage` touches files, the aggregator does no IO, and the library crates'
//! dependencies point the one way the code map draws.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The non-test part of every `.rs` file under `dir` (a file's `#[cfg(test)]` module
/// and what follows it is left out: tests make the files they need).
fn sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            let code = match text.find("#[cfg(test)]") {
                Some(at) => text[..at].to_owned(),
                None => text,
            };
            out.push((path, code));
        }
    }
    out
}

/// The `[dependencies]` table of a crate's manifest (dev-dependencies left out).
fn dependencies(krate: &str) -> Vec<String> {
    let manifest = std::fs::read_to_string(root().join(krate).join("Cargo.toml")).unwrap();
    let mut deps = Vec::new();
    let mut inside = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line == "[dependencies]";
        } else if inside && !line.is_empty() && !line.starts_with('#') {
            let name = line.split(['=', '.', ' ']).next().unwrap_or_default();
            deps.push(name.to_owned());
        }
    }
    deps
}

#[test]
fn only_storage_writes_files() {
    let writes = [
        "File::create",
        "OpenOptions",
        "fs::write",
        "fs::rename",
        "fs::remove",
        "fs::create_dir",
        "fs::copy",
        "tokio::fs",
    ];
    let mut found = Vec::new();
    for krate in ["broker", "ingest", "aggregator", "notify", "loadgen", "src"] {
        for (path, code) in sources(&root().join(krate)) {
            for w in writes {
                if code.contains(w) {
                    found.push(format!("{}: {w}", path.display()));
                }
            }
        }
    }
    assert!(found.is_empty(), "file writes outside storage/: {found:#?}");
}

#[test]
fn library_crates_depend_the_way_the_code_map_says() {
    let sluice_deps = |krate: &str| -> Vec<String> {
        dependencies(krate)
            .into_iter()
            .filter(|d| d.starts_with("sluice-"))
            .collect()
    };
    assert_eq!(sluice_deps("broker"), Vec::<String>::new());
    assert_eq!(sluice_deps("ingest"), Vec::<String>::new());
    assert_eq!(sluice_deps("storage"), Vec::<String>::new());
    assert_eq!(sluice_deps("aggregator"), ["sluice-ingest"]);
    assert_eq!(
        sluice_deps("notify"),
        ["sluice-ingest", "sluice-aggregator"]
    );
    // The aggregator is pure computation: no network, no runtime, no files.
    let aggregator = dependencies("aggregator");
    for io in ["reqwest", "rumqttc", "tokio", "rumqttd"] {
        assert!(
            !aggregator.iter().any(|d| d == io),
            "the aggregator depends on {io}"
        );
    }
    // Alerts reach the broker in-process, not as an MQTT client of sluice's own port.
    assert!(!dependencies("notify").iter().any(|d| d == "rumqttc"));
}
