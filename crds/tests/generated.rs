//! The committed CRD YAML (`crds/*.yaml` and the Helm chart's copy) must be exactly what the
//! types generate; run `make generate` after changing a type.

use std::path::Path;

#[test]
fn committed_yaml_matches_the_types() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dirs = [
        crate_dir.to_path_buf(),
        crate_dir.join("../charts/conveyor/crds"),
    ];
    for (file, crd) in conveyor_crds::all_crds() {
        let want = conveyor_crds::to_yaml(&crd).unwrap();
        for dir in &dirs {
            let path = dir.join(file);
            let have = std::fs::read_to_string(&path).unwrap_or_else(|err| {
                panic!("cannot read {}: {err}; run `make generate`", path.display())
            });
            assert!(
                have == want,
                "{} drifted from the Rust types: run `make generate`",
                path.display()
            );
        }
    }
}
