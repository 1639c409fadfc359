//! `[mqtt.auth.jwt]`: the CONNECT's password is a JSON Web Token (RFC 7519) signed by the
//! fleet's key, and one of its claims (`sub` by default) names the client id. One key
//! lets a million devices in with no state per device: whoever holds a token signed by
//! the key for a client id may connect as that client id, until the token expires.
//!
//! The token is checked by the `jsonwebtoken` crate: its signature with the configured
//! algorithm only (a token naming another algorithm, `none` included, is refused), `exp`
//! and `nbf` when present (a claim of the wrong type is refused, never skipped), `iss`
//! and `aud` when configured; then the claim must be a string equal to the client id.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

/// `[mqtt.auth.jwt]`, as users write it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// `HS256` (HS384, HS512) with `secret_file`; `RS256` (RS384, RS512, PS256, PS384,
    /// PS512), `ES256` (ES384) or `EdDSA` with `public_key_file`. Unset: `HS256` with a
    /// secret; with a public key, any algorithm of the key's kind (RSA: RS* and PS*, EC:
    /// ES256 and ES384, Ed25519: EdDSA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<Algorithm>,
    /// The HMAC secret: the file's bytes, a final line break left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// PEM: the public key (or a certificate holding it) that verifies the signatures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_file: Option<PathBuf>,
    /// The claim that must equal the client id.
    #[serde(default = "JwtConfig::default_claim")]
    pub claim: String,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default, with = "humantime_serde")]
    pub leeway: Duration,
    /// Refuse tokens without an `exp` (by default a token without one never expires).
    #[serde(default)]
    pub require_exp: bool,
    /// When set, the token's `iss` must be this (and be present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// When set, the token's `aud` must be or contain this (and be present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
}

impl JwtConfig {
    fn default_claim() -> String {
        "sub".to_owned()
    }
}

/// Why a token was refused (logged; the client sees a CONNACK code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum JwtRefusal {
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token is not signed with {0:?}")]
    WrongAlgorithm(Vec<Algorithm>),
    #[error("the token's {claim:?} claim is not the client id")]
    OtherClient { claim: String },
    #[error("the token is invalid: {0}")]
    Invalid(String),
}

impl JwtRefusal {
    /// The token is genuine and current, but for another client.
    pub(crate) fn is_other_client(&self) -> bool {
        matches!(self, JwtRefusal::OtherClient { .. })
    }
}

/// A loaded key and the checks it goes with.
pub(crate) struct Jwt {
    key: DecodingKey,
    validation: Validation,
    claim: String,
}

impl std::fmt::Debug for Jwt {
    /// Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt")
            .field("algorithms", &self.validation.algorithms)
            .field("claim", &self.claim)
            .finish_non_exhaustive()
    }
}

impl Jwt {
    /// Reads the key file; the error names the file and what is wrong.
    pub(crate) fn load(config: &JwtConfig) -> Result<Jwt, super::AccessError> {
        let (path, text) = match (&config.secret_file, &config.public_key_file) {
            (Some(p), None) | (None, Some(p)) => (p, read(p)?),
            _ => {
                return Err(super::AccessError::Config(
                    "jwt needs exactly one of secret_file (HS256) and public_key_file (RS256, ES256, ...)".into(),
                ));
            }
        };
        let invalid = |why: String| super::AccessError::Invalid {
            path: path.clone(),
            why,
        };
        let (key, algorithms) = if config.secret_file.is_some() {
            let algorithm = config.algorithm.unwrap_or(Algorithm::HS256);
            if algorithm.family() != AlgorithmFamily::Hmac {
                return Err(super::AccessError::Config(format!(
                    "jwt algorithm {algorithm:?} needs public_key_file, not secret_file"
                )));
            }
            let secret = text
                .strip_suffix(b"\n")
                .map_or(&text[..], |s| s.strip_suffix(b"\r").unwrap_or(s));
            let key = DecodingKey::from_secret(secret)
                .map_err(|e| invalid(format!("not a usable secret ({e})")))?;
            (key, vec![algorithm])
        } else {
            public_key(&text, config.algorithm).map_err(invalid)?
        };
        let mut validation = Validation::new(Algorithm::default());
        validation.algorithms = algorithms;
        validation.leeway = config.leeway.as_secs();
        validation.validate_nbf = true;
        validation.required_spec_claims.clear();
        if config.require_exp {
            validation.required_spec_claims.insert("exp".into());
        }
        match &config.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                validation.required_spec_claims.insert("iss".into());
            }
            None => validation.iss = None,
        }
        match &config.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            // Without an expected audience, a token's `aud` is not sluice's to judge.
            None => validation.validate_aud = false,
        }
        Ok(Jwt {
            key,
            validation,
            claim: config.claim.clone(),
        })
    }

    /// The algorithms a token may be signed with (for the start's log line).
    pub(crate) fn algorithms(&self) -> &[Algorithm] {
        &self.validation.algorithms
    }

    /// Whether `password` has a JWT's shape: three base64url parts whose first is a JSON
    /// header naming an algorithm. Other passwords are for the password file.
    pub(crate) fn looks_like_token(password: &[u8]) -> bool {
        password.iter().filter(|&&b| b == b'.').count() == 2
            && jsonwebtoken::decode_header(password).is_ok()
    }

    /// Checks `token` for `client_id`; valid, it says until when (its `exp` and the
    /// leeway), if it ever expires.
    pub(crate) fn verify(
        &self,
        token: &[u8],
        client_id: &str,
    ) -> Result<Option<SystemTime>, JwtRefusal> {
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &self.key,
            &self.validation,
        )
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => JwtRefusal::Expired,
            ErrorKind::ImmatureSignature => JwtRefusal::NotYetValid,
            ErrorKind::InvalidSignature => JwtRefusal::BadSignature,
            ErrorKind::InvalidAlgorithm => {
                JwtRefusal::WrongAlgorithm(self.validation.algorithms.clone())
            }
            _ => JwtRefusal::Invalid(e.to_string()),
        })?;
        match data.claims.get(&self.claim) {
            Some(serde_json::Value::String(id)) if id == client_id => {}
            _ => {
                return Err(JwtRefusal::OtherClient {
                    claim: self.claim.clone(),
                });
            }
        }
        // Validated above: a number when present. One too far to represent never ends.
        Ok(data
            .claims
            .get("exp")
            .and_then(serde_json::Value::as_f64)
            .and_then(|exp| Duration::try_from_secs_f64(exp).ok())
            .and_then(|exp| exp.checked_add(Duration::from_secs(self.validation.leeway)))
            .and_then(|until| UNIX_EPOCH.checked_add(until)))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, super::AccessError> {
    std::fs::read(path).map_err(|source| super::AccessError::Read {
        path: path.to_owned(),
        source,
    })
}

/// A PEM public key and the algorithms it takes: the configured one, which must fit the
/// key, or every algorithm of the key's family (the token's header picks one; a key of
/// one family never verifies another's, so no token can switch families).
fn public_key(
    pem: &[u8],
    algorithm: Option<Algorithm>,
) -> Result<(DecodingKey, Vec<Algorithm>), String> {
    type Parse = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;
    let family = algorithm.map(|a| a.family());
    if family == Some(AlgorithmFamily::Hmac) {
        return Err("an HMAC algorithm takes secret_file, not a public key".into());
    }
    let kinds: [(AlgorithmFamily, Parse); 3] = [
        (AlgorithmFamily::Rsa, DecodingKey::from_rsa_pem),
        (AlgorithmFamily::Ec, DecodingKey::from_ec_pem),
        (AlgorithmFamily::Ed, DecodingKey::from_ed_pem),
    ];
    let mut errors = Vec::new();
    for (kind, parse) in kinds {
        if family.is_some_and(|f| f != kind) {
            continue;
        }
        match parse(pem) {
            Ok(key) => {
                let algorithms = match algorithm {
                    Some(a) => vec![a],
                    None => kind.algorithms().to_vec(),
                };
                return Ok((key, algorithms));
            }
            Err(e) => errors.push(format!("as {kind:?}: {e}")),
        }
    }
    Err(format!(
        "not a PEM public key that verifies JWTs ({})",
        errors.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &[u8] = b"fleet secret, thirty-two bytes..";

    fn now() -> i64 {
        jsonwebtoken::get_current_timestamp() as i64
    }

    fn jwt(config: impl FnOnce(&mut JwtConfig)) -> (Jwt, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        // As `echo` writes it: the final line break is not part of the secret.
        std::fs::write(&path, [SECRET, b"\n"].concat()).unwrap();
        let mut c = JwtConfig {
            algorithm: None,
            secret_file: Some(path),
            public_key_file: None,
            claim: JwtConfig::default_claim(),
            leeway: Duration::ZERO,
            require_exp: false,
            issuer: None,
            audience: None,
        };
        config(&mut c);
        (Jwt::load(&c).unwrap(), dir)
    }

    fn token(alg: Algorithm, secret: &[u8], claims: serde_json::Value) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret).unwrap(),
        )
        .unwrap()
    }

    fn hs256(claims: serde_json::Value) -> String {
        token(Algorithm::HS256, SECRET, claims)
    }

    #[test]
    fn a_signed_current_token_for_the_client_id_lets_it_in() {
        let (jwt, _dir) = jwt(|_| {});
        let exp = now() + 600;
        let t = hs256(json!({"sub": "device-1", "exp": exp}));
        assert!(Jwt::looks_like_token(t.as_bytes()));
        // Valid until its exp.
        let until = UNIX_EPOCH + Duration::from_secs(exp as u64);
        assert_eq!(jwt.verify(t.as_bytes(), "device-1"), Ok(Some(until)));
        // An exp too far to represent: never.
        let t = hs256(json!({"sub": "device-1", "exp": u64::MAX}));
        assert_eq!(jwt.verify(t.as_bytes(), "device-1"), Ok(None));
        // No exp: it never expires, unless require_exp.
        let t = hs256(json!({"sub": "device-1"}));
        assert_eq!(jwt.verify(t.as_bytes(), "device-1"), Ok(None));
        let (strict, _dir) = self::jwt(|c| c.require_exp = true);
        assert!(matches!(
            strict.verify(t.as_bytes(), "device-1"),
            Err(JwtRefusal::Invalid(_))
        ));
    }

    #[test]
    fn expired_early_forged_and_foreign_tokens_are_refused() {
        let (jwt, _dir) = jwt(|_| {});
        let expired = hs256(json!({"sub": "device-1", "exp": now() - 5}));
        assert_eq!(
            jwt.verify(expired.as_bytes(), "device-1"),
            Err(JwtRefusal::Expired)
        );
        let early = hs256(json!({"sub": "device-1", "nbf": now() + 600}));
        assert_eq!(
            jwt.verify(early.as_bytes(), "device-1"),
            Err(JwtRefusal::NotYetValid)
        );
        let forged = token(
            Algorithm::HS256,
            b"another secret",
            json!({"sub": "device-1"}),
        );
        assert_eq!(
            jwt.verify(forged.as_bytes(), "device-1"),
            Err(JwtRefusal::BadSignature)
        );
        let other = hs256(json!({"sub": "device-2", "exp": now() + 600}));
        let refusal = jwt.verify(other.as_bytes(), "device-1").unwrap_err();
        assert!(refusal.is_other_client(), "{refusal:?}");
        // The claim must be a string: a number or a list naming the id is not it.
        for sub in [json!(1), json!(["device-1"]), json!(null)] {
            let t = hs256(json!({"sub": sub}));
            assert!(jwt.verify(t.as_bytes(), "1").is_err(), "{sub}");
        }
        // Another HMAC strength than the one configured is refused too.
        let hs512 = token(Algorithm::HS512, SECRET, json!({"sub": "device-1"}));
        assert!(matches!(
            jwt.verify(hs512.as_bytes(), "device-1"),
            Err(JwtRefusal::WrongAlgorithm(_))
        ));
    }

    #[test]
    fn claims_of_the_wrong_type_are_refused_not_skipped() {
        let (jwt, _dir) = jwt(|_| {});
        for claims in [
            json!({"sub": "device-1", "exp": "99999999999"}),
            json!({"sub": "device-1", "exp": now() - 5, "nbf": "0"}),
            json!({"sub": "device-1", "nbf": "99999999999"}),
        ] {
            let t = hs256(claims.clone());
            assert!(jwt.verify(t.as_bytes(), "device-1").is_err(), "{claims}");
        }
    }

    #[test]
    fn an_unsigned_token_is_refused() {
        let (jwt, _dir) = jwt(|_| {});
        let b64 = |v: serde_json::Value| {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let none = format!(
            "{}.{}.",
            b64(json!({"alg": "none", "typ": "JWT"})),
            b64(json!({"sub": "device-1"}))
        );
        assert!(jwt.verify(none.as_bytes(), "device-1").is_err());
    }

    #[test]
    fn leeway_issuer_audience_and_another_claim() {
        let (jwt, _dir) = jwt(|c| {
            c.leeway = Duration::from_secs(60);
            c.issuer = Some("fleet".into());
            c.audience = Some("sluice".into());
            c.claim = "client_id".into();
        });
        let ok = hs256(json!({
            "client_id": "device-1", "exp": now() - 5, "iss": "fleet", "aud": ["x", "sluice"]
        }));
        // Valid until exp + leeway.
        let until = jwt.verify(ok.as_bytes(), "device-1").unwrap().unwrap();
        let left = until.duration_since(SystemTime::now()).unwrap();
        assert!(
            left > Duration::from_secs(50) && left <= Duration::from_secs(55),
            "{left:?}"
        );
        for claims in [
            json!({"client_id": "device-1", "iss": "other", "aud": "sluice"}),
            json!({"client_id": "device-1", "aud": "sluice"}),
            json!({"client_id": "device-1", "iss": "fleet", "aud": "other"}),
            json!({"sub": "device-1", "iss": "fleet", "aud": "sluice"}),
        ] {
            let t = hs256(claims.clone());
            assert!(jwt.verify(t.as_bytes(), "device-1").is_err(), "{claims}");
        }
        // Without an audience configured, a token's aud is accepted as it is.
        let (plain, _dir) = self::jwt(|_| {});
        let t = hs256(json!({"sub": "device-1", "aud": "anyone"}));
        assert_eq!(plain.verify(t.as_bytes(), "device-1"), Ok(None));
    }

    #[test]
    fn passwords_are_not_taken_for_tokens() {
        for password in [&b"pw-1"[..], b"a.b.c", b"", b"eyJ.eyJ.x", b"\xff.\xfe.\x00"] {
            assert!(!Jwt::looks_like_token(password), "{password:?}");
        }
    }

    #[test]
    fn a_wrong_configuration_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let base = JwtConfig {
            algorithm: None,
            secret_file: None,
            public_key_file: None,
            claim: JwtConfig::default_claim(),
            leeway: Duration::ZERO,
            require_exp: false,
            issuer: None,
            audience: None,
        };
        let err = Jwt::load(&base).unwrap_err().to_string();
        assert!(err.contains("secret_file"), "{err}");
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "not a key").unwrap();
        let err = Jwt::load(&JwtConfig {
            public_key_file: Some(key.clone()),
            ..base.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("key.pem") && err.contains("PEM"), "{err}");
        let err = Jwt::load(&JwtConfig {
            public_key_file: Some(key.clone()),
            algorithm: Some(Algorithm::HS256),
            ..base.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("secret_file"), "{err}");
        let err = Jwt::load(&JwtConfig {
            secret_file: Some(dir.path().join("missing")),
            ..base.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("missing"), "{err}");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let err = Jwt::load(&JwtConfig {
            secret_file: Some(empty),
            ..base
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("empty"), "{err}");
    }
}
