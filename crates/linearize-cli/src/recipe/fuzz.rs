//! Damaged and random recipes (the repository's recipes as seeds, their includes beside them):
//! reading, typing and checking one must end in `Ok` or `Err`, never a panic or an abort
//! (linearize_models::mutation). CI runs a bounded number of cases; docs/SECURITY.md records
//! longer runs.
use super::{read, validate, Check};
use linearize_models::mutation::{run, seeds};
use std::path::Path;

/// Copies `from` into `to` recursively.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_tree(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).unwrap();
        }
    }
}

#[test]
fn recipes() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    for sub in ["recipes", "configs"] {
        copy_tree(&repo.join(sub), &dir.path().join(sub));
    }
    let file = dir.path().join("recipes/fuzzed.yaml");
    run("recipe", &seeds(&repo.join("recipes")), 1500, |input| {
        std::fs::write(&file, input).unwrap();
        let Ok((tree, recipe)) = read(&file, &[], false) else {
            return false;
        };
        let mut unchecked = Vec::new();
        validate(&recipe, &tree, None, Check::Plan, &mut unchecked).is_ok()
    });
}
