//! Tessera's router: the HTTP front door, validation and streams, the continuous batching loop
//! with its queue and KV blocks, and the gRPC clients of the shards.
//!
//! - `api`: TGI's request and response types, shared by `http/` and `infer/`.
//! - `http/`: routes (TGI and OpenAI shapes, the OpenAI types), the accept loop, health.
//! - `infer/`: validation, chat templates, detokenization and stop sequences, the per-request
//!   streams (`Infer`).
//! - `engine/`: the batching loop (`scheduler`), the waiting queue, the KV blocks and prefix
//!   cache (`kv`), LoRA adapter residency.
//! - `shard/`: the shards' protocol (`pb`, generated) and clients.
//! - `serve`: the `text-generation-router` program (arguments, start-up, shutdown).
//! - `metrics`, `telemetry`, `logging`, `args`, `error`: shared by all of them; `metrics` takes
//!   plain values and depends on none of the others.

pub mod api;
pub mod args;
pub mod engine;
pub mod error;
pub mod http;
pub mod infer;
pub mod logging;
pub mod metrics;
pub mod serve;
pub mod shard;
pub mod telemetry;

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// `crate::x` references in the files under `path`, by top-level module `x`.
    fn uses(path: &Path, out: &mut BTreeSet<String>) {
        if path.is_dir() {
            for e in std::fs::read_dir(path).unwrap() {
                uses(&e.unwrap().path(), out);
            }
            return;
        }
        let text = std::fs::read_to_string(path).unwrap();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            out.insert(name);
        }
    }

    #[test]
    fn top_level_modules_depend_on_each_other_without_cycles() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for e in std::fs::read_dir(&src).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_stem().unwrap().to_string_lossy().to_string();
            if name == "lib" {
                continue;
            }
            let mut deps = BTreeSet::new();
            uses(&p, &mut deps);
            deps.remove(&name);
            graph.insert(name, deps);
        }
        assert!(graph.contains_key("engine") && graph.contains_key("http"), "{graph:?}");
        // Depth-first search for a back edge.
        fn visit<'a>(n: &'a str, g: &'a BTreeMap<String, BTreeSet<String>>, path: &mut Vec<&'a str>, done: &mut BTreeSet<&'a str>) {
            if done.contains(n) {
                return;
            }
            assert!(!path.contains(&n), "import cycle: {} -> {n}", path.join(" -> "));
            path.push(n);
            for d in g.get(n).into_iter().flatten() {
                visit(d, g, path, done);
            }
            path.pop();
            done.insert(n);
        }
        let mut done = BTreeSet::new();
        for n in graph.keys() {
            visit(n, &graph, &mut Vec::new(), &mut done);
        }
        assert!(graph["metrics"].is_empty(), "metrics takes plain values: {:?}", graph["metrics"]);
    }
}
