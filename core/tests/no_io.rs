//! `guildhall-core` stays free of IO: its manifest names none of the crates
//! that do networking, async runtimes, HTTP, metrics registries or command
//! lines, in any dependency table (so the "no IO, no clock" rule is the
//! compiler's: code that needs one of them does not build here).

/// Crates the core must never depend on.
const FORBIDDEN: [&str; 12] = [
    "tokio",
    "tokio-util",
    "lapin",
    "axum",
    "hyper",
    "hyper-util",
    "reqwest",
    "prometheus",
    "clap",
    "tracing-subscriber",
    "sysinfo",
    "guildhall",
];

/// The dependency names of every `[..dependencies]` table of a manifest
/// (`[dependencies]`, `[dev-dependencies]`, `[build-dependencies]`,
/// `[target.'..'.dependencies]`), as written on the left of `=` or in a
/// `[dependencies.NAME]` header.
fn dependencies(manifest: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_table = false;
    for line in manifest.lines().map(str::trim) {
        if let Some(header) = line.strip_prefix('[') {
            let header = header.trim_end_matches(']');
            in_table = header.ends_with("dependencies");
            if let Some((table, name)) = header.rsplit_once('.')
                && table.ends_with("dependencies")
            {
                names.push(name.trim_matches('"').to_owned());
            }
            continue;
        }
        if in_table && let Some((name, _)) = line.split_once('=') {
            let name = name.trim();
            if !name.is_empty() && !name.starts_with('#') {
                names.push(name.split('.').next().unwrap_or(name).to_owned());
            }
        }
    }
    names
}

#[test]
fn the_core_depends_on_no_io_crate() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let manifest = std::fs::read_to_string(path).expect("the crate's manifest reads");
    let deps = dependencies(&manifest);
    assert!(
        deps.iter().any(|d| d == "guildhall-proto"),
        "the parser sees the dependencies: {deps:?}"
    );
    let bad: Vec<&String> = deps
        .iter()
        .filter(|d| FORBIDDEN.contains(&d.as_str()))
        .collect();
    assert!(
        bad.is_empty(),
        "guildhall-core must stay free of IO; it depends on {bad:?} (core/Cargo.toml). Put IO in the coordinator (the `guildhall` crate) and hand data across."
    );
}

#[test]
fn the_parser_finds_every_kind_of_table() {
    let toml = "[package]\nname = \"x\"\n[dependencies]\ntokio.workspace = true\n\
                [dev-dependencies]\nclap = \"4\"\n[target.'cfg(unix)'.dependencies]\nlapin = \"1\"\n\
                [dependencies.hyper]\nversion = \"1\"\n[features]\naxum = []\n";
    assert_eq!(dependencies(toml), ["tokio", "clap", "lapin", "hyper"]);
}
