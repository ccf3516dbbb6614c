//! NATS JWTs (decentralized authentication), as far as Conveyor signs them: user JWTs for
//! scoped identities, signed with an account signing key ([`user`], [`creds`]), and the
//! generic encoder ([`encode`]) that also signs account and operator JWTs for test servers.
//!
//! A NATS JWT is `base64url(header).base64url(claims).base64url(signature)` (no padding), the
//! header `{"typ":"JWT","alg":"ed25519-nkey"}`, the signature ed25519 over the first two parts
//! by the issuer's nkey. The claims carry `jti` (base32 of the SHA-512/256 of the claims
//! serialised without it, as the NATS tools make it), `iat`, `exp`, `iss` (the issuer's public
//! key), `sub`, `name` and `nats` (the type-specific part, `version: 2`).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::KeyPair;
use serde_json::{Value, json};
use sha2::Digest as _;

use crate::permissions::Permissions;

const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

/// A JWT that cannot be made or read.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// A key is not what it must be (a seed that does not parse, the wrong kind of key).
    #[error("{0}")]
    Key(String),
    /// The text is not a NATS JWT.
    #[error("not a NATS JWT: {0}")]
    Malformed(String),
}

fn key_error(error: &nkeys::error::Error) -> JwtError {
    JwtError::Key(error.to_string())
}

/// Signs `claims` (an object; `jti` and `iss` are set here) with `issuer`.
pub fn encode(issuer: &KeyPair, mut claims: Value) -> Result<String, JwtError> {
    let object = claims
        .as_object_mut()
        .ok_or_else(|| JwtError::Malformed("the claims are not an object".into()))?;
    object.insert("iss".into(), issuer.public_key().into());
    object.remove("jti");
    let hash = sha2::Sha512_256::digest(claims.to_string().as_bytes());
    let jti = data_encoding::BASE32_NOPAD.encode(&hash);
    if let Some(object) = claims.as_object_mut() {
        object.insert("jti".into(), jti.into());
    }
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(HEADER),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = issuer.sign(signed.as_bytes()).map_err(|e| key_error(&e))?;
    Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

/// The claims of `jwt`, after checking that its issuer (`iss`) signed it. Says nothing about
/// whether the server trusts that issuer.
pub fn decode(jwt: &str) -> Result<Value, JwtError> {
    let malformed = |what: &str| JwtError::Malformed(what.to_owned());
    let mut parts = jwt.trim().split('.');
    let (Some(header), Some(body), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("it does not have three parts"));
    };
    let bytes = |part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|e| JwtError::Malformed(e.to_string()))
    };
    let header: Value =
        serde_json::from_slice(&bytes(header)?).map_err(|e| malformed(&e.to_string()))?;
    if header.get("alg").and_then(Value::as_str) != Some("ed25519-nkey") {
        return Err(malformed("the algorithm is not ed25519-nkey"));
    }
    let claims: Value =
        serde_json::from_slice(&bytes(body)?).map_err(|e| malformed(&e.to_string()))?;
    let issuer = claims
        .get("iss")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("no issuer"))?;
    let key = KeyPair::from_public_key(issuer).map_err(|e| key_error(&e))?;
    let signed_len = jwt.trim().len() - signature.len() - 1;
    key.verify(&jwt.trim().as_bytes()[..signed_len], &bytes(signature)?)
        .map_err(|_| malformed("the signature is not the issuer's"))?;
    Ok(claims)
}

/// A user identity signed by an account signing key.
#[derive(Debug, Clone)]
pub struct User {
    /// The user JWT.
    pub jwt: String,
    /// The user's nkey seed (`SU…`): a secret.
    pub seed: crate::connect::Secret,
    /// The user's public key (`U…`).
    pub public_key: String,
    /// When the JWT expires (seconds since the Unix epoch).
    pub expires_at: i64,
}

impl User {
    /// The `.creds` file of this identity (JWT and seed), as `nsc` writes it and async-nats and
    /// the `nats` CLI read it.
    pub fn creds(&self) -> String {
        creds(&self.jwt, self.seed.expose())
    }
}

/// Makes a fresh user nkey and signs its user JWT with `signing_key` (an account signing key,
/// `SA…`, listed in the account JWT's `signing_keys`) for `account` (the account's public key,
/// `A…`): named `name`, allowed `permissions`, valid from `now` (Unix seconds) for
/// `lifetime_seconds`. Connection, subscription and payload limits are left unlimited.
pub fn user(
    signing_key: &KeyPair,
    account: &str,
    name: &str,
    permissions: &Permissions,
    now: i64,
    lifetime_seconds: i64,
) -> Result<User, JwtError> {
    if !account.starts_with('A') || KeyPair::from_public_key(account).is_err() {
        return Err(JwtError::Key(format!(
            "{account:?} is not an account public key (A…)"
        )));
    }
    if !signing_key.public_key().starts_with('A') {
        return Err(JwtError::Key(
            "the signing key is not an account key (its seed must start with SA)".into(),
        ));
    }
    let pair = KeyPair::new_user();
    let expires_at = now.saturating_add(lifetime_seconds);
    let claims = json!({
        "iat": now,
        "exp": expires_at,
        "sub": pair.public_key(),
        "name": name,
        "nats": {
            "pub": {"allow": permissions.publish_allow},
            "sub": {"allow": permissions.subscribe_allow},
            "subs": -1,
            "data": -1,
            "payload": -1,
            "issuer_account": account,
            "type": "user",
            "version": 2,
        },
    });
    let jwt = encode(signing_key, claims)?;
    let seed = pair.seed().map_err(|e| key_error(&e))?;
    Ok(User {
        jwt,
        seed: crate::connect::Secret::new(seed),
        public_key: pair.public_key(),
        expires_at,
    })
}

/// A `.creds` file: the user JWT and its nkey seed between the markers async-nats and the NATS
/// tools look for.
pub fn creds(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// The user JWT of a `.creds` file.
pub fn jwt_of_creds(creds: &str) -> Option<&str> {
    let mut lines = creds.lines();
    lines.find(|l| l.trim() == "-----BEGIN NATS USER JWT-----")?;
    lines.next().map(str::trim).filter(|l| !l.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn permissions() -> Permissions {
        Permissions {
            publish_allow: vec!["a.>".into()],
            subscribe_allow: vec!["_INBOX_x.>".into()],
        }
    }

    #[test]
    fn a_user_jwt_is_signed_by_the_signing_key_for_the_account() {
        let account = KeyPair::new_account();
        let signing = KeyPair::new_account();
        let user = user(
            &signing,
            &account.public_key(),
            "team/mail-worker",
            &permissions(),
            1_000,
            86_400,
        )
        .unwrap();
        let claims = decode(&user.jwt).unwrap();
        assert_eq!(claims["iss"], signing.public_key());
        assert_eq!(claims["sub"], user.public_key);
        assert_eq!(claims["iat"], 1_000);
        assert_eq!(claims["exp"], 87_400);
        assert_eq!(user.expires_at, 87_400);
        assert_eq!(claims["name"], "team/mail-worker");
        let nats = &claims["nats"];
        assert_eq!(nats["issuer_account"], account.public_key());
        assert_eq!(nats["type"], "user");
        assert_eq!(nats["version"], 2);
        assert_eq!(nats["pub"]["allow"], json!(["a.>"]));
        assert_eq!(nats["sub"]["allow"], json!(["_INBOX_x.>"]));
        let seed = KeyPair::from_seed(user.seed.expose()).unwrap();
        assert_eq!(seed.public_key(), user.public_key);
    }

    #[test]
    fn the_jti_is_the_hash_of_the_claims_without_it() {
        let signing = KeyPair::new_account();
        let jwt = encode(&signing, json!({"sub": "x", "iat": 1})).unwrap();
        let mut claims = decode(&jwt).unwrap();
        let jti = claims
            .as_object_mut()
            .unwrap()
            .remove("jti")
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned();
        let hash = sha2::Sha512_256::digest(claims.to_string().as_bytes());
        assert_eq!(jti, data_encoding::BASE32_NOPAD.encode(&hash));
        assert_eq!(jti.len(), 52);
    }

    #[test]
    fn a_tampered_jwt_or_a_wrong_key_is_refused() {
        let account = KeyPair::new_account();
        let signing = KeyPair::new_account();
        let user = user(&signing, &account.public_key(), "u", &permissions(), 0, 60).unwrap();
        let parts: Vec<&str> = user.jwt.split('.').collect();
        let forged_claims = URL_SAFE_NO_PAD.encode(
            String::from_utf8(URL_SAFE_NO_PAD.decode(parts[1]).unwrap())
                .unwrap()
                .replace("a.>", ">"),
        );
        let forged = format!("{}.{forged_claims}.{}", parts[0], parts[2]);
        assert!(decode(&forged).is_err(), "widened permissions are refused");
        assert!(decode("a.b").is_err());
        let not_an_account = user_with(&KeyPair::new_user(), &account.public_key());
        assert!(not_an_account.is_err(), "a user key cannot sign users");
        let not_an_account_key = user_with(&signing, &KeyPair::new_user().public_key());
        assert!(
            not_an_account_key.is_err(),
            "issuer_account must be an account"
        );
    }

    fn user_with(signing: &KeyPair, account: &str) -> Result<User, JwtError> {
        user(signing, account, "u", &permissions(), 0, 60)
    }

    #[test]
    fn creds_carry_the_jwt_and_the_seed() {
        let account = KeyPair::new_account();
        let user = user(&account, &account.public_key(), "u", &permissions(), 0, 60).unwrap();
        let creds = user.creds();
        assert_eq!(jwt_of_creds(&creds), Some(user.jwt.as_str()));
        assert!(creds.contains(user.seed.expose()));
        // async-nats accepts the file.
        assert!(
            async_nats::ConnectOptions::new()
                .credentials(&creds)
                .is_ok()
        );
    }
}
