//! Every shipped recipe validates (`rlrun check`) and runs 2 tiny steps end to end (tiny model,
//! tiny batches, via `--set`), with evaluation, checkpoints and metrics.

mod common;

use common::*;

fn recipes() -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(root().join("recipes"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    v
}

#[test]
fn every_recipe_starts_with_a_comment_and_passes_check() {
    let all = recipes();
    assert!(all.len() >= 9, "{all:?}");
    for r in &all {
        let text = std::fs::read_to_string(r).unwrap();
        assert!(
            text.starts_with("# "),
            "{} must start with a comment",
            r.display()
        );
        for word in ["Algorithm", "Model", "Expected", "Time"] {
            assert!(text.contains(word), "{} header lacks `{word}`", r.display());
        }
        let out = rlrun(&["check".into(), r.display().to_string()]);
        assert!(
            out.status.success(),
            "{}: {}",
            r.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let resolved = String::from_utf8_lossy(&out.stdout);
        assert!(
            resolved.contains("[trainer]") && resolved.contains("steps ="),
            "{resolved}"
        );
    }
}

#[test]
fn every_recipe_runs_two_tiny_steps() {
    for r in recipes() {
        let tmp = rlrun_testkit::tempdir();
        let mut args = vec![r.display().to_string()];
        args.extend(set_args(&tiny(tmp.path())));
        let out = rlrun(&args);
        assert!(
            out.status.success(),
            "{} failed:\n{}\n{}",
            r.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let run = run_dir(tmp.path());
        let m = metrics(&run);
        let train: Vec<_> = m.iter().filter(|l| l["kind"] == "train").collect();
        assert_eq!(train.len(), 2, "{}: {m:?}", r.display());
        // An update happened, or dynamic sampling found no informative group (random tiny model:
        // every reward equal) and said so.
        assert!(
            train.iter().all(|l| l["reward/mean"].is_number()
                && (l["actor/grad_norm"].is_number()
                    || l["dynamic_sampling/skipped_update"] == 1.0)),
            "{}: {train:?}",
            r.display()
        );
        assert!(
            m.iter().any(|l| l["kind"] == "eval"),
            "{}: no evaluation logged",
            r.display()
        );
        assert!(run
            .join("checkpoints/step-00000002/trainer/policy.safetensors")
            .exists());
        assert!(run.join("manifest.json").exists());
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("held-out accuracy after training")
                && stdout.contains("(95% interval "),
            "{stdout}"
        );
        // A before and an after evaluation of the same problems: the paired gain is printed.
        if stdout.contains("held-out accuracy before training") {
            assert!(stdout.contains("held-out gain: "), "{stdout}");
        }
    }
}

/// Every dotted key path of a TOML table (tables recursed into; arrays of tables by element).
fn key_paths(prefix: &str, t: &toml::Table, out: &mut std::collections::BTreeSet<String>) {
    for (k, v) in t {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(sub) => key_paths(&path, sub, out),
            toml::Value::Array(items)
                if items.iter().all(|i| i.is_table()) && !items.is_empty() =>
            {
                for i in items {
                    key_paths(&path, i.as_table().unwrap(), out);
                }
            }
            _ => {
                out.insert(path);
            }
        }
    }
}

#[test]
fn the_recipe_reference_lists_every_key_the_shipped_recipes_resolve_to() {
    // `rlrun check` prints a recipe resolved: every section with its defaults filled in. Each key
    // of it must be documented in docs/recipes.md (as `a.b.c`), so no key goes undocumented.
    let doc = std::fs::read_to_string(root().join("docs/recipes.md")).unwrap();
    let mut keys = std::collections::BTreeSet::new();
    for r in recipes() {
        let out = rlrun(&["check".into(), r.display().to_string()]);
        assert!(out.status.success(), "{}", r.display());
        let resolved: toml::Table = String::from_utf8_lossy(&out.stdout).parse().unwrap();
        key_paths("", &resolved, &mut keys);
    }
    assert!(keys.len() > 60, "{keys:?}");
    // Tagged enums resolve to their variant's keys under the same path.
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !doc.contains(&format!("`{k}`")))
        .collect();
    assert!(missing.is_empty(), "undocumented recipe keys: {missing:?}");
}

/// `rlrun eval` prints the held-out accuracy with its 95% interval.
#[test]
fn eval_prints_the_accuracy_with_its_interval() {
    let tmp = rlrun_testkit::tempdir();
    let mut args = vec!["eval".to_string(), "recipes/quickstart.toml".to_string()];
    args.extend(set_args(&tiny(tmp.path())));
    let out = rlrun(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("held-out accuracy: ") && stdout.contains("of 4 (95% interval "),
        "{stdout}"
    );
}

#[test]
fn shipped_eval_sets_are_distinct_problems_held_out_from_training() {
    use std::collections::HashSet;
    let model = rlrun_testkit::fixtures().join("tiny-llama3");
    let mut generated = 0;
    for path in recipes() {
        let r = rlrun::Recipe::load(&path, &[format!("model.path={}", model.display())])
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let eval = &r.built.eval;
        if eval.is_empty() {
            continue;
        }
        let keys: HashSet<String> = eval.iter().map(|s| s.problem_key()).collect();
        assert_eq!(
            keys.len(),
            eval.len(),
            "{}: repeated eval problems",
            path.display()
        );
        if let Some(n) = r.config.eval.size {
            assert_eq!(eval.len(), n, "{}", path.display());
        }
        // Generated tasks: no eval problem (in canonical form, so `b + a` counts as `a + b`)
        // is among the first 20,000 training problems.
        if eval[0].extra.get("problem").is_some() {
            let train: HashSet<String> = (0..20_000)
                .filter_map(|i| r.built.train.get(i))
                .map(|s| s.problem_key())
                .collect();
            let shared: Vec<_> = keys.intersection(&train).collect();
            assert!(shared.is_empty(), "{}: {shared:?}", path.display());
            generated += 1;
        }
    }
    assert!(generated >= 8, "{generated}");
}
