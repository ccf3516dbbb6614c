//! How every Conveyor part connects to NATS: one options type, [`NatsOptions`], that the
//! producer [`crate::Client`], the worker runtime, the CLI and the operator all build their
//! connection from, so credentials, TLS and redaction exist once.
//!
//! Credentials come from one of: user and password, a token, an nkey seed, or a `.creds` file
//! (JWT + seed). On Kubernetes they are the files of a mounted Secret volume
//! ([`NatsOptions::credentials_dir`], keys in [`keys`]); TLS material likewise
//! ([`NatsOptions::tls_dir`]). A URL with userinfo (`nats://user:pass@host`, `nats://token@host`)
//! works: the userinfo is taken out of the URL into the matching options, so async-nats (which
//! ignores userinfo) still authenticates, and the URL that is logged or reported never carries
//! it ([`redact`]).

use std::fmt;
use std::path::{Path, PathBuf};

/// Environment variables of the mounted Secret volumes (set by the operator in worker pods,
/// by the chart in the operator's pod).
pub mod env {
    /// Directory of a mounted credentials Secret (keys in [`super::keys`]).
    pub const NATS_CREDENTIALS_DIR: &str = "CONVEYOR_NATS_CREDENTIALS_DIR";
    /// Directory of a mounted TLS Secret (keys in [`super::keys`]).
    pub const NATS_TLS_DIR: &str = "CONVEYOR_NATS_TLS_DIR";
    /// Prefix of the client's inboxes (set by the operator in worker pods with minted
    /// identities, which may subscribe under it only).
    pub const NATS_INBOX_PREFIX: &str = "CONVEYOR_NATS_INBOX_PREFIX";
}

/// Keys of the credentials Secret and the TLS Secret (file names in their mounted volumes).
pub mod keys {
    /// User name, with [`PASSWORD`].
    pub const USER: &str = "user";
    /// Password, with [`USER`].
    pub const PASSWORD: &str = "password";
    /// Authentication token.
    pub const TOKEN: &str = "token";
    /// nkey seed (`SU…`).
    pub const NKEY: &str = "nkey";
    /// A `.creds` file: user JWT and nkey seed.
    pub const CREDS: &str = "creds";
    /// CA bundle (PEM) the server's certificate is verified against.
    pub const CA: &str = "ca.crt";
    /// Client certificate (PEM), with [`KEY`]; the `kubernetes.io/tls` key names.
    pub const CERT: &str = "tls.crt";
    /// Client private key (PEM), with [`CERT`].
    pub const KEY: &str = "tls.key";
}

/// A secret string: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How the client proves who it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Auth {
    /// No credentials (an open server).
    #[default]
    None,
    /// User name and password.
    UserPassword {
        /// User name.
        user: String,
        /// Password.
        password: Secret,
    },
    /// A token.
    Token(Secret),
    /// An nkey seed.
    Nkey(Secret),
    /// The contents of a `.creds` file (user JWT and seed).
    Creds(Secret),
}

impl Auth {
    /// A short name of the kind, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::UserPassword { .. } => "user/password",
            Self::Token(_) => "token",
            Self::Nkey(_) => "nkey",
            Self::Creds(_) => "creds",
        }
    }
}

/// TLS settings; files in PEM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    /// Insist on TLS even if the server does not ask for it (also implied by `tls://` URLs).
    pub required: bool,
    /// CA bundle to verify the server against (the system roots when unset).
    pub ca: Option<PathBuf>,
    /// Client certificate and key, for servers that verify clients.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Everything needed to open a NATS connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsOptions {
    url: String,
    /// Name the connection reports to the server.
    pub name: Option<String>,
    /// Credentials.
    pub auth: Auth,
    /// TLS.
    pub tls: Tls,
    /// Prefix of the client's inboxes (`_INBOX` when unset): an identity that may subscribe
    /// only under its own prefix needs it ([`crate::permissions::worker_inbox_prefix`]).
    pub inbox_prefix: Option<String>,
}

/// Options that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    /// A credentials or TLS file could not be read.
    #[error("reading NATS {what} from {path}: {source}")]
    Read {
        /// Which setting.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A credentials Secret holds none of the known keys, or only half of a pair.
    #[error("NATS credentials in {dir}: {problem}")]
    Credentials {
        /// The directory (mounted Secret).
        dir: PathBuf,
        /// What is missing.
        problem: String,
    },
    /// The URLs carry different userinfo, or userinfo besides explicit credentials.
    #[error(
        "NATS URL {url}: {problem}; pass credentials with a credentials Secret or the --nats-user/--nats-password-file, --nats-token-file, --nats-nkey-file or --nats-creds options instead"
    )]
    Userinfo {
        /// The URL, redacted.
        url: String,
        /// What is wrong.
        problem: String,
    },
    /// async-nats refused the credentials (e.g. a malformed `.creds` file).
    #[error("NATS credentials: {0}")]
    Invalid(String),
}

/// Why a connection could not be made, sorted for conditions and exit messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The server refused the credentials (or there were none where it needs some).
    Auth,
    /// The TLS handshake or TLS setup failed (unknown CA, name mismatch, TLS required …).
    Tls,
    /// Anything else: the server is unreachable, DNS, timeouts.
    Unreachable,
}

/// Failure to connect to NATS; its message carries the redacted URL and the server's own words.
#[derive(Debug, thiserror::Error)]
#[error("connecting to NATS at {url}: {message}")]
pub struct ConnectError {
    /// The server URL(s), redacted.
    pub url: String,
    /// The cause, classified.
    pub kind: FailureKind,
    /// What the client library and the server said.
    pub message: String,
}

impl ConnectError {
    /// Sorts an async-nats connect error (TLS handshake errors arrive as IO errors wrapping a
    /// rustls error).
    pub fn from_nats(url: &str, error: &async_nats::ConnectError) -> Self {
        use async_nats::ConnectErrorKind as K;
        let message = error_chain(error);
        let kind = match error.kind() {
            K::AuthorizationViolation | K::Authentication => FailureKind::Auth,
            K::Tls => FailureKind::Tls,
            _ if is_tls_error(error) => FailureKind::Tls,
            _ => FailureKind::Unreachable,
        };
        Self {
            url: redact(url),
            kind,
            message: redact_text(&message),
        }
    }

    pub(crate) fn options(url: &str, error: &OptionsError) -> Self {
        Self {
            url: redact(url),
            kind: FailureKind::Auth,
            message: redact_text(&error.to_string()),
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

fn is_tls_error(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(cause) = current {
        if cause.is::<async_nats::rustls::Error>() {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<async_nats::rustls::Error>())
        {
            return true;
        }
        current = cause.source();
    }
    false
}

impl NatsOptions {
    /// Options for the server(s) at `url` (comma-separated). Userinfo in the URL becomes
    /// credentials: `user:password@` a user and password, `token@` a token (percent-encoding is
    /// decoded); every URL of a list must then carry the same.
    pub fn new(url: &str) -> Result<Self, OptionsError> {
        let mut found: Option<Auth> = None;
        let mut clean = Vec::new();
        for part in url.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (stripped, auth) = split_userinfo(part);
            clean.push(stripped);
            match (&found, auth) {
                (_, None) => {}
                (None, Some(auth)) => found = Some(auth),
                (Some(seen), Some(auth)) if *seen == auth => {}
                (Some(_), Some(_)) => {
                    return Err(OptionsError::Userinfo {
                        url: redact(url),
                        problem: "the URLs carry different credentials".into(),
                    });
                }
            }
        }
        let mut options = Self {
            url: clean.join(","),
            ..Self::default()
        };
        if let Some(auth) = found {
            options.auth = auth;
        }
        options.tls.required = options
            .url
            .split(',')
            .any(|u| u.trim().starts_with("tls://"));
        Ok(options)
    }

    /// The server URL(s) without userinfo: safe to log and to report.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sets the connection name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the prefix of the client's inboxes.
    pub fn inbox_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.inbox_prefix = Some(prefix.into());
        self
    }

    /// Sets credentials, refusing to silently replace the URL's userinfo with others.
    pub fn auth(mut self, auth: Auth) -> Result<Self, OptionsError> {
        if auth == Auth::None {
            return Ok(self);
        }
        if self.auth != Auth::None && self.auth != auth {
            return Err(OptionsError::Userinfo {
                url: self.url.clone(),
                problem: format!(
                    "the URL carries credentials and {} credentials are given too",
                    auth.kind()
                ),
            });
        }
        self.auth = auth;
        Ok(self)
    }

    /// Reads credentials from a directory holding a credentials Secret's keys: `creds`, else
    /// `nkey`, else `token`, else `user` and `password`.
    pub fn credentials_dir(self, dir: &Path) -> Result<Self, OptionsError> {
        let auth = read_credentials_dir(dir)?;
        self.auth(auth)
    }

    /// Uses the TLS material in a directory holding a TLS Secret's keys (`ca.crt`, `tls.crt` +
    /// `tls.key`, each optional); TLS is then required.
    pub fn tls_dir(mut self, dir: &Path) -> Self {
        let ca = dir.join(keys::CA);
        let cert = dir.join(keys::CERT);
        let key = dir.join(keys::KEY);
        if ca.exists() {
            self.tls.ca = Some(ca);
        }
        if cert.exists() && key.exists() {
            self.tls.client_cert = Some((cert, key));
        }
        self.tls.required = true;
        self
    }

    /// Reads the mounted Secret volumes named by [`env::NATS_CREDENTIALS_DIR`] and
    /// [`env::NATS_TLS_DIR`], when set.
    pub fn from_env_dirs(mut self) -> Result<Self, OptionsError> {
        if let Some(dir) = std::env::var_os(env::NATS_CREDENTIALS_DIR).filter(|d| !d.is_empty()) {
            self = self.credentials_dir(Path::new(&dir))?;
        }
        if let Some(dir) = std::env::var_os(env::NATS_TLS_DIR).filter(|d| !d.is_empty()) {
            self = self.tls_dir(Path::new(&dir));
        }
        Ok(self)
    }

    /// async-nats options with these credentials and TLS settings; callers add their own
    /// reconnect policy and event callback, then connect to [`NatsOptions::url`].
    pub fn connect_options(&self) -> Result<async_nats::ConnectOptions, OptionsError> {
        let mut options = async_nats::ConnectOptions::new();
        if let Some(name) = &self.name {
            options = options.name(name);
        }
        options = match &self.auth {
            Auth::None => options,
            Auth::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.expose().to_owned())
            }
            Auth::Token(token) => options.token(token.expose().to_owned()),
            Auth::Nkey(seed) => options.nkey(seed.expose().trim().to_owned()),
            Auth::Creds(creds) => options
                .credentials(creds.expose())
                .map_err(|e| OptionsError::Invalid(e.to_string()))?,
        };
        if let Some(prefix) = &self.inbox_prefix {
            options = options.custom_inbox_prefix(prefix);
        }
        if self.tls.required {
            options = options.require_tls(true);
        }
        if let Some(ca) = &self.tls.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.tls.client_cert {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(options)
    }

    /// Connects once (no retry of the first connection).
    pub async fn connect(&self) -> Result<async_nats::Client, ConnectError> {
        let options = self
            .connect_options()
            .map_err(|e| ConnectError::options(&self.url, &e))?;
        self.connect_with(options).await
    }

    /// Connects with `options` (from [`NatsOptions::connect_options`], extended by the caller),
    /// to any of the comma-separated servers of the URL (async-nats parses a `&str` as one).
    pub async fn connect_with(
        &self,
        options: async_nats::ConnectOptions,
    ) -> Result<async_nats::Client, ConnectError> {
        let servers: Vec<&str> = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|server| !server.is_empty())
            .collect();
        options
            .connect(servers)
            .await
            .map_err(|e| ConnectError::from_nats(&self.url, &e))
    }
}

fn read_credentials_dir(dir: &Path) -> Result<Auth, OptionsError> {
    let read = |key: &'static str| -> Result<Option<String>, OptionsError> {
        let path = dir.join(key);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(OptionsError::Read {
                what: key,
                path,
                source,
            }),
        }
    };
    if let Some(creds) = read(keys::CREDS)? {
        return Ok(Auth::Creds(Secret::new(creds)));
    }
    if let Some(seed) = read(keys::NKEY)? {
        return Ok(Auth::Nkey(Secret::new(seed.trim())));
    }
    if let Some(token) = read(keys::TOKEN)? {
        return Ok(Auth::Token(Secret::new(
            token.trim_end_matches(['\r', '\n']),
        )));
    }
    match (read(keys::USER)?, read(keys::PASSWORD)?) {
        (Some(user), Some(password)) => Ok(Auth::UserPassword {
            user: user.trim().to_owned(),
            password: Secret::new(password.trim_end_matches(['\r', '\n'])),
        }),
        (Some(_), None) | (None, Some(_)) => Err(OptionsError::Credentials {
            dir: dir.to_owned(),
            problem: format!("`{}` and `{}` go together", keys::USER, keys::PASSWORD),
        }),
        (None, None) => Err(OptionsError::Credentials {
            dir: dir.to_owned(),
            problem: format!(
                "none of the keys `{}`, `{}`, `{}` or `{}` + `{}`",
                keys::CREDS,
                keys::NKEY,
                keys::TOKEN,
                keys::USER,
                keys::PASSWORD
            ),
        }),
    }
}

/// Reads a secret from a file, trimming one trailing newline (files written by `echo`).
pub fn read_secret_file(what: &'static str, path: &Path) -> Result<Secret, OptionsError> {
    std::fs::read_to_string(path)
        .map(|text| Secret::new(text.trim_end_matches(['\r', '\n'])))
        .map_err(|source| OptionsError::Read {
            what,
            path: path.to_owned(),
            source,
        })
}

/// Where the authority (`user:pass@host:port`) of one URL starts and ends.
fn authority(url: &str) -> (usize, usize) {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    (start, end)
}

fn split_userinfo(url: &str) -> (String, Option<Auth>) {
    let (start, end) = authority(url);
    let Some(at) = url[start..end].rfind('@').map(|i| start + i) else {
        return (url.to_owned(), None);
    };
    let userinfo = &url[start..at];
    let stripped = format!("{}{}", &url[..start], &url[at + 1..]);
    let auth = match userinfo.split_once(':') {
        Some((user, password)) => Auth::UserPassword {
            user: percent_decode(user),
            password: Secret::new(percent_decode(password)),
        },
        None if userinfo.is_empty() => return (stripped, None),
        None => Auth::Token(Secret::new(percent_decode(userinfo))),
    };
    (stripped, Some(auth))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = text.get(i + 1..i + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The URL(s) with any userinfo replaced by `***`: what logs, errors and status may show.
pub fn redact(url: &str) -> String {
    url.split(',')
        .map(|part| {
            let (start, end) = authority(part);
            match part[start..end].rfind('@') {
                Some(at) => format!("{}***@{}", &part[..start], &part[start + at + 1..]),
                None => part.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `text` with the userinfo of every URL in it replaced by `***` (for error messages that
/// quote a URL).
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '/' | '"' | '\'' | ',' | ')' | '>'))
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("***@");
                out.push_str(&tail[at + 1..end]);
            }
            None => out.push_str(&tail[..end]),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_becomes_credentials_and_leaves_the_url() {
        let options = NatsOptions::new("nats://alice:s%40cret@127.0.0.1:4222").unwrap();
        assert_eq!(options.url(), "nats://127.0.0.1:4222");
        assert_eq!(
            options.auth,
            Auth::UserPassword {
                user: "alice".into(),
                password: Secret::new("s@cret"),
            }
        );
        let token = NatsOptions::new("tok3n@localhost:4222").unwrap();
        assert_eq!(token.url(), "localhost:4222");
        assert_eq!(token.auth, Auth::Token(Secret::new("tok3n")));
    }

    #[test]
    fn different_userinfo_in_a_list_is_refused_without_echoing_it() {
        let error = NatsOptions::new("nats://a:one@h1:4222,nats://a:two@h2:4222").unwrap_err();
        let text = error.to_string();
        assert!(!text.contains("one") && !text.contains("two"), "{text}");
        assert!(text.contains("--nats-user"), "{text}");
    }

    #[test]
    fn tls_urls_require_tls() {
        assert!(NatsOptions::new("tls://h:4222").unwrap().tls.required);
        assert!(!NatsOptions::new("nats://h:4222").unwrap().tls.required);
    }

    #[test]
    fn redaction_hides_userinfo_and_tokens() {
        assert_eq!(
            redact("nats://u:p@h:1,tls://tok@h2:2/x"),
            "nats://***@h:1,tls://***@h2:2/x"
        );
        assert_eq!(redact("nats://h:1"), "nats://h:1");
        assert_eq!(
            redact_text("cannot use \"nats://u:hunter2@h:1\": bad"),
            "cannot use \"nats://***@h:1\": bad"
        );
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let options = NatsOptions::new("nats://u:hunter2@h:1").unwrap();
        assert!(!format!("{options:?}").contains("hunter2"));
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let path = std::env::temp_dir().join(format!(
                "conveyor-connect-test-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn credentials_dir_prefers_creds_then_nkey_then_token_then_user() {
        let dir = TempDir::new();
        std::fs::write(dir.path().join(keys::USER), "bob\n").unwrap();
        let half = NatsOptions::new("h:1")
            .unwrap()
            .credentials_dir(dir.path())
            .unwrap_err();
        assert!(half.to_string().contains("go together"), "{half}");
        std::fs::write(dir.path().join(keys::PASSWORD), "pw\n").unwrap();
        let options = NatsOptions::new("h:1")
            .unwrap()
            .credentials_dir(dir.path())
            .unwrap();
        assert_eq!(
            options.auth,
            Auth::UserPassword {
                user: "bob".into(),
                password: Secret::new("pw")
            }
        );
        std::fs::write(dir.path().join(keys::TOKEN), "t").unwrap();
        let options = NatsOptions::new("h:1")
            .unwrap()
            .credentials_dir(dir.path())
            .unwrap();
        assert_eq!(options.auth, Auth::Token(Secret::new("t")));
    }
}
