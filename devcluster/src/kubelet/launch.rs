//! How a container becomes a local command: the image → directory mapping, volume mount paths
//! rewritten to the pod's host directories, environment (incl. `valueFrom`, `envFrom` and
//! `$(VAR)` references), working directory and memory limit. Everything here is pure except
//! [`container_env`], which reads Secrets and ConfigMaps through the API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::{Api, Client};

use super::ImageConfig;

/// Host environment variables a container inherits (a real container inherits none; local
/// processes need a few to find interpreters and shims).
const PASSTHROUGH_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "PYENV_ROOT",
    "PYENV_VERSION",
];

/// A volume as a container sees it: where it is mounted and the host directory behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `volumeMounts[].mountPath` inside the container.
    pub mount_path: String,
    /// The host directory (the volume's per-pod directory, plus `subPath`).
    pub host: PathBuf,
}

/// A container ready to start as a local process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The program, resolved to a host path when it could be.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its complete environment.
    pub env: Vec<(String, String)>,
    /// Its working directory on the host.
    pub cwd: PathBuf,
}

/// The image name without tag or digest: `ghcr.io/x/y:1.0@sha256:…` → `ghcr.io/x/y`.
pub fn image_name(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rfind(':') {
        Some(colon) if !image[colon..].contains('/') => &image[..colon],
        _ => image,
    }
}

/// The mounts of `container`: its `volumeMounts` resolved against the pod's volume directories,
/// longest mount path first so the most specific one wins.
pub fn mounts(container: &Container, volumes: &BTreeMap<String, PathBuf>) -> Vec<Mount> {
    let mut mounts: Vec<Mount> = container
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| {
            let dir = volumes.get(&m.name)?;
            let host = match m.sub_path.as_deref() {
                Some(sub) if !sub.is_empty() => dir.join(sub),
                _ => dir.clone(),
            };
            Some(Mount {
                mount_path: m.mount_path.trim_end_matches('/').to_owned(),
                host,
            })
        })
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.mount_path.len()));
    mounts
}

/// `value` with a leading volume mount path replaced by the volume's host directory.
pub fn rewrite(value: &str, mounts: &[Mount]) -> String {
    for m in mounts {
        if let Some(rest) = value.strip_prefix(m.mount_path.as_str())
            && (rest.is_empty() || rest.starts_with('/'))
        {
            return format!("{}{rest}", m.host.display());
        }
    }
    value.to_owned()
}

/// `value` with every mount path that starts a word — at the start, or after a space, `=`, `:`,
/// `;`, `>`, `<`, `(` or a quote, and ending at a `/` or a non-name character — replaced by the
/// volume's host directory, so shell scripts in `sh -c` reach their volumes too.
pub fn rewrite_embedded(value: &str, mounts: &[Mount]) -> String {
    let is_boundary_before = |c: char| c.is_whitespace() || "=:;<>(|&'\"`".contains(c);
    let is_name = |c: char| c.is_ascii_alphanumeric() || "_.-".contains(c);
    let mut out = String::with_capacity(value.len());
    let mut i = 0;
    'scan: while i < value.len() {
        let at_boundary = i == 0
            || value[..i]
                .chars()
                .next_back()
                .is_some_and(is_boundary_before);
        if at_boundary {
            for m in mounts {
                let rest = &value[i..];
                if let Some(after) = rest.strip_prefix(m.mount_path.as_str())
                    && !after.starts_with(is_name)
                {
                    out.push_str(&m.host.display().to_string());
                    i += m.mount_path.len();
                    continue 'scan;
                }
            }
        }
        let c = value[i..].chars().next().unwrap_or_default();
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// An argument or env value as the process sees it: mount paths rewritten where they start a
/// word ([`rewrite_embedded`]); failing that, a whole value that is an absolute path existing
/// under the image root (`/handler.sh`) points there, so programs handed a path of the image —
/// like the worker runtime's `run -- /handler.sh` — find it.
fn rewrite_value(value: &str, mounts: &[Mount], image: Option<&ImageConfig>) -> String {
    let rewritten = rewrite_embedded(value, mounts);
    if rewritten != value || value == "/" || !value.starts_with('/') {
        return rewritten;
    }
    match image.map(|i| i.root.join(value.trim_start_matches('/'))) {
        Some(in_image) if in_image.exists() => in_image.display().to_string(),
        _ => rewritten,
    }
}

/// Expands `$(NAME)` references to variables defined earlier; `$$(NAME)` escapes to `$(NAME)`;
/// unknown references stay as they are, like in Kubernetes.
pub fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Finds a bare program name on `path` (a `PATH` value).
fn which(program: &str, path: &str) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Resolves a program path: under a volume, then under the image root, then on the host; a bare
/// name on `PATH`.
fn resolve_program(
    program: &str,
    mounts: &[Mount],
    image: Option<&ImageConfig>,
    env: &[(String, String)],
) -> Result<PathBuf, String> {
    if program.starts_with('/') {
        let in_volume = PathBuf::from(rewrite(program, mounts));
        if in_volume.as_os_str() != program && in_volume.exists() {
            return Ok(in_volume);
        }
        if let Some(image) = image {
            let in_image = image.root.join(program.trim_start_matches('/'));
            if in_image.exists() {
                return Ok(in_image);
            }
        }
        if Path::new(program).exists() {
            return Ok(program.into());
        }
        return Err(format!("exec: \"{program}\": no such file or directory"));
    }
    if program.contains('/') {
        return Ok(program.into());
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    which(program, path)
        .ok_or_else(|| format!("exec: \"{program}\": executable file not found in $PATH"))
}

/// Turns a container into a command line, given its resolved environment.
pub fn launch(
    container: &Container,
    image: Option<&ImageConfig>,
    mounts: &[Mount],
    env: Vec<(String, String)>,
    pod_dir: &Path,
) -> Result<Launch, String> {
    let args = container.args.iter().flatten().map(|a| expand(a, &env));
    let mut argv: Vec<String> = match container.command.as_ref().filter(|c| !c.is_empty()) {
        Some(command) => command
            .iter()
            .map(|c| expand(c, &env))
            .chain(args)
            .collect(),
        None => image
            .map(|i| i.entrypoint.clone())
            .unwrap_or_default()
            .into_iter()
            .chain(args)
            .collect(),
    };
    if argv.is_empty() {
        return Err(format!(
            "no command specified and image {:?} has no entrypoint",
            container.image.as_deref().unwrap_or_default()
        ));
    }
    let program = resolve_program(&argv.remove(0), mounts, image, &env)?;
    let cwd = match container.working_dir.as_deref().filter(|d| !d.is_empty()) {
        None => pod_dir.to_owned(),
        Some(dir) => {
            let rewritten = PathBuf::from(rewrite(dir, mounts));
            let in_image = image.map(|i| i.root.join(dir.trim_start_matches('/')));
            if rewritten.as_os_str() != dir {
                rewritten
            } else if let Some(in_image) = in_image.filter(|p| p.is_dir()) {
                in_image
            } else {
                rewritten
            }
        }
    };
    if !cwd.is_dir() {
        return Err(format!(
            "working directory {:?} does not exist",
            cwd.display()
        ));
    }
    let env = env
        .into_iter()
        .map(|(k, v)| (k, rewrite_value(&v, mounts, image)))
        .collect();
    Ok(Launch {
        program,
        args: argv
            .iter()
            .map(|a| rewrite_value(a, mounts, image))
            .collect(),
        env,
        cwd,
    })
}

/// The value of a downward-API field reference.
pub fn field_ref(pod: &Pod, path: &str, pod_ip: &str) -> Result<String, String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let from_map = |map: Option<&BTreeMap<String, String>>, rest: &str| {
        let key = rest.trim_start_matches("['").trim_end_matches("']");
        map.and_then(|m| m.get(key)).cloned().unwrap_or_default()
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" => pod_ip.to_owned(),
        "status.hostIP" => "127.0.0.1".to_owned(),
        p if p.starts_with("metadata.labels[") => {
            from_map(meta.labels.as_ref(), &p["metadata.labels".len()..])
        }
        p if p.starts_with("metadata.annotations[") => from_map(
            meta.annotations.as_ref(),
            &p["metadata.annotations".len()..],
        ),
        other => return Err(format!("unsupported fieldRef {other:?}")),
    })
}

fn bytes_to_string(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn config_map(client: &Client, ns: &str, name: &str) -> Result<Option<ConfigMap>, String> {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| format!("configmap {name:?}: {e}"))
}

async fn secret(client: &Client, ns: &str, name: &str) -> Result<Option<Secret>, String> {
    Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| format!("secret {name:?}: {e}"))
}

fn secret_data(s: &Secret) -> BTreeMap<String, String> {
    let mut data: BTreeMap<String, String> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), bytes_to_string(&v.0)))
        .collect();
    data.extend(s.string_data.clone().unwrap_or_default());
    data
}

fn config_map_data(c: &ConfigMap) -> BTreeMap<String, String> {
    let mut data = c.data.clone().unwrap_or_default();
    data.extend(
        c.binary_data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), bytes_to_string(&v.0))),
    );
    data
}

/// The container's environment: passthrough host variables, `HOSTNAME`, `envFrom`, then `env`
/// (later entries win), with `valueFrom` resolved. An error is a `CreateContainerConfigError`.
pub async fn container_env(
    client: &Client,
    pod: &Pod,
    container: &Container,
    pod_ip: &str,
) -> Result<Vec<(String, String)>, String> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut env: Vec<(String, String)> = PASSTHROUGH_ENV
        .iter()
        .filter_map(|k| Some(((*k).to_owned(), std::env::var(k).ok()?)))
        .collect();
    env.push((
        "HOSTNAME".into(),
        pod.metadata.name.clone().unwrap_or_default(),
    ));
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &source.config_map_ref {
            match config_map(client, ns, &r.name).await? {
                Some(c) => config_map_data(&c),
                None if r.optional == Some(true) => BTreeMap::new(),
                None => return Err(format!("configmap \"{}\" not found", r.name)),
            }
        } else if let Some(r) = &source.secret_ref {
            match secret(client, ns, &r.name).await? {
                Some(s) => secret_data(&s),
                None if r.optional == Some(true) => BTreeMap::new(),
                None => return Err(format!("secret \"{}\" not found", r.name)),
            }
        } else {
            BTreeMap::new()
        };
        env.extend(data.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)));
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (_, Some(from)) => {
                if let Some(r) = &from.secret_key_ref {
                    let found = secret(client, ns, &r.name)
                        .await?
                        .and_then(|s| secret_data(&s).remove(&r.key));
                    match found {
                        Some(v) => v,
                        None if r.optional == Some(true) => continue,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in Secret {ns}/{}",
                                r.key, r.name
                            ));
                        }
                    }
                } else if let Some(r) = &from.config_map_key_ref {
                    let found = config_map(client, ns, &r.name)
                        .await?
                        .and_then(|c| config_map_data(&c).remove(&r.key));
                    match found {
                        Some(v) => v,
                        None if r.optional == Some(true) => continue,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in ConfigMap {ns}/{}",
                                r.key, r.name
                            ));
                        }
                    }
                } else if let Some(r) = &from.field_ref {
                    field_ref(pod, &r.field_path, pod_ip)?
                } else {
                    return Err(format!("unsupported valueFrom for env {:?}", var.name));
                }
            }
            (Some(v), None) => expand(v, &env),
            (None, None) => String::new(),
        };
        env.retain(|(k, _)| k != &var.name);
        env.push((var.name.clone(), value));
    }
    Ok(env)
}

/// A memory quantity (`64Mi`, `1G`, `500000`, `1e9`) in bytes.
pub fn parse_bytes(quantity: &str) -> Option<u64> {
    // Quantities are whole bytes once scaled; the cast saturates and rounds up like Kubernetes.
    parse_quantity(quantity).map(|value| value.ceil().max(0.0) as u64)
}

/// A resource quantity (`500m`, `2`, `64Mi`, `1G`, `1e9`) as a number of its unit (cores for
/// CPU, bytes for memory).
pub(crate) fn parse_quantity(quantity: &str) -> Option<f64> {
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
        ("m", 1e-3),
    ];
    let q = quantity.trim();
    let (number, factor) = SUFFIXES
        .iter()
        .find_map(|(s, f)| q.strip_suffix(s).map(|n| (n, *f)))
        .unwrap_or((q, 1.0));
    // Rust's float parser takes NaN, inf and negatives; a quantity is none of them.
    let value: f64 = number
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v >= 0.0)?;
    Some(value * factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::VolumeMount;

    #[test]
    fn quantities_that_are_no_numbers_are_refused() {
        assert_eq!(parse_quantity("2Gi"), Some(2_147_483_648.0));
        assert_eq!(parse_quantity("500m"), Some(0.5));
        for bad in ["NaN", "inf", "-1", "-1Gi", "NaNGi", "x"] {
            assert_eq!(parse_quantity(bad), None, "{bad}");
        }
    }

    fn mounted() -> Vec<Mount> {
        let volumes = BTreeMap::from([("rt".to_owned(), PathBuf::from("/tmp/pod/volumes/rt"))]);
        let c = Container {
            volume_mounts: Some(vec![VolumeMount {
                name: "rt".into(),
                mount_path: "/conveyor".into(),
                ..VolumeMount::default()
            }]),
            ..Container::default()
        };
        mounts(&c, &volumes)
    }

    #[test]
    fn image_names_lose_tag_and_digest() {
        assert_eq!(
            image_name("ghcr.io/conveyor-dev/hello:1.2"),
            "ghcr.io/conveyor-dev/hello"
        );
        assert_eq!(
            image_name("localhost:5000/x@sha256:abc"),
            "localhost:5000/x"
        );
        assert_eq!(image_name("localhost:5000/x"), "localhost:5000/x");
        assert_eq!(image_name("busybox"), "busybox");
    }

    #[test]
    fn mount_paths_are_rewritten_only_on_whole_components() {
        let m = mounted();
        assert_eq!(rewrite("/conveyor/bin/x", &m), "/tmp/pod/volumes/rt/bin/x");
        assert_eq!(rewrite("/conveyor", &m), "/tmp/pod/volumes/rt");
        assert_eq!(rewrite("/conveyorx", &m), "/conveyorx");
        assert_eq!(rewrite("relative", &m), "relative");
    }

    #[test]
    fn mount_paths_inside_shell_scripts_are_rewritten() {
        let m = mounted();
        assert_eq!(
            rewrite_embedded("echo hi > /conveyor/x; cat '/conveyor'", &m),
            "echo hi > /tmp/pod/volumes/rt/x; cat '/tmp/pod/volumes/rt'"
        );
        assert_eq!(
            rewrite_embedded("--dir=/conveyor/bin", &m),
            "--dir=/tmp/pod/volumes/rt/bin"
        );
        assert_eq!(
            rewrite_embedded("http://h/conveyor/x /conveyorx a/conveyor", &m),
            "http://h/conveyor/x /conveyorx a/conveyor"
        );
    }

    #[test]
    fn variable_references_expand_like_kubernetes() {
        let env = vec![("A".to_owned(), "1".to_owned())];
        assert_eq!(expand("x$(A)y", &env), "x1y");
        assert_eq!(expand("$(B)", &env), "$(B)");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("cost $5", &env), "cost $5");
    }

    #[test]
    fn commands_resolve_from_volume_then_image_then_host() {
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("vol");
        let root = dir.path().join("image");
        std::fs::create_dir_all(vol.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(vol.join("bin/tool"), "").unwrap();
        std::fs::write(root.join("usr/bin/app"), "").unwrap();
        let volumes = BTreeMap::from([("v".to_owned(), vol.clone())]);
        let image = ImageConfig {
            root: root.clone(),
            entrypoint: vec!["/usr/bin/app".into(), "--serve".into()],
        };
        let mut c = Container {
            volume_mounts: Some(vec![VolumeMount {
                name: "v".into(),
                mount_path: "/v".into(),
                ..VolumeMount::default()
            }]),
            args: Some(vec!["/v/data".into()]),
            ..Container::default()
        };
        let m = mounts(&c, &volumes);
        let env = vec![("PATH".to_owned(), "/usr/bin:/bin".to_owned())];
        let l = launch(&c, Some(&image), &m, env.clone(), dir.path()).unwrap();
        assert_eq!(l.program, root.join("usr/bin/app"));
        assert_eq!(
            l.args,
            vec!["--serve".to_owned(), format!("{}/data", vol.display())]
        );
        c.args = Some(vec!["/usr/bin/app".into(), "/".into(), "/missing".into()]);
        let l = launch(&c, Some(&image), &m, env.clone(), dir.path()).unwrap();
        let app = root.join("usr/bin/app").display().to_string();
        assert_eq!(
            l.args,
            vec!["--serve".to_owned(), app, "/".into(), "/missing".into()]
        );
        c.command = Some(vec!["/v/bin/tool".into()]);
        assert_eq!(
            launch(&c, Some(&image), &m, env.clone(), dir.path())
                .unwrap()
                .program,
            vol.join("bin/tool")
        );
        c.command = Some(vec!["sh".into()]);
        assert!(
            launch(&c, None, &m, env.clone(), dir.path())
                .unwrap()
                .program
                .ends_with("sh")
        );
        c.command = Some(vec!["/nope/missing".into()]);
        assert!(
            launch(&c, None, &m, env, dir.path())
                .unwrap_err()
                .contains("no such file")
        );
    }

    #[test]
    fn memory_quantities_parse() {
        assert_eq!(parse_bytes("64Mi"), Some(64 * 1024 * 1024));
        assert_eq!(parse_bytes("1G"), Some(1_000_000_000));
        assert_eq!(parse_bytes("1e3"), Some(1000));
        assert_eq!(parse_bytes("512"), Some(512));
        assert_eq!(parse_bytes("lots"), None);
    }
}
