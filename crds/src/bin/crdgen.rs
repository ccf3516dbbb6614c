//! `crdgen --out DIR [--out DIR…]`: writes `jobqueues.yaml`, `workers.yaml`, `jobschedules.yaml` and `workflows.yaml` into each
//! directory (`make generate` calls it for `crds/` and the Helm chart).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut outs = Vec::new();
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--out", Some(dir)) => outs.push(PathBuf::from(dir)),
            _ => {
                eprintln!("usage: crdgen --out DIR [--out DIR…]");
                return ExitCode::from(2);
            }
        }
    }
    if outs.is_empty() {
        eprintln!("usage: crdgen --out DIR [--out DIR…]");
        return ExitCode::from(2);
    }
    for (file, crd) in conveyor_crds::all_crds() {
        let yaml = match conveyor_crds::to_yaml(&crd) {
            Ok(yaml) => yaml,
            Err(err) => {
                eprintln!("crdgen: cannot render {file}: {err}");
                return ExitCode::FAILURE;
            }
        };
        for dir in &outs {
            let path = dir.join(file);
            if let Err(err) =
                std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, &yaml))
            {
                eprintln!("crdgen: cannot write {}: {err}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
