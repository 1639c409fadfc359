//! Mosquitto's password file, as `mosquitto_passwd` writes it: one `user:hash` a line,
//! the hash `$7$iterations$salt$hash` (PBKDF2-HMAC-SHA512, Mosquitto 2's default) or
//! `$6$salt$hash` (salted SHA-512: SHA-512 of the password then the salt, Mosquitto 1.6
//! and earlier), salts and hashes in standard base64. Blank lines and lines starting
//! with `#` are skipped, as Mosquitto does.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

/// A user's stored hash.
#[derive(Clone)]
enum Hash {
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

impl std::fmt::Debug for Hash {
    /// Never the salt or the hash.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hash::Pbkdf2 { iterations, .. } => write!(f, "$7$ ({iterations} iterations)"),
            Hash::Sha512 { .. } => f.write_str("$6$"),
        }
    }
}

/// The most PBKDF2 iterations a line may ask for: a verification runs on a connection's
/// task, and a file is not a way to make one connection cost seconds of CPU.
const MAX_ITERATIONS: u32 = 1_000_000;

impl Hash {
    fn parse(text: &str) -> Result<Hash, String> {
        let parts: Vec<&str> = text.split('$').collect();
        let b64 = |what: &str, s: &str| {
            STANDARD
                .decode(s)
                .map_err(|e| format!("its {what} is not base64 ({e})"))
        };
        match parts.as_slice() {
            ["", "7", iterations, salt, hash] => {
                let iterations: u32 = iterations
                    .parse()
                    .map_err(|_| format!("{iterations:?} is not a number of iterations"))?;
                if !(1..=MAX_ITERATIONS).contains(&iterations) {
                    return Err(format!(
                        "{iterations} iterations is out of range (1 to {MAX_ITERATIONS})"
                    ));
                }
                let hash = b64("hash", hash)?;
                if hash.is_empty() {
                    return Err("its hash is empty".into());
                }
                Ok(Hash::Pbkdf2 {
                    iterations,
                    salt: b64("salt", salt)?,
                    hash,
                })
            }
            ["", "6", salt, hash] => {
                let hash = b64("hash", hash)?;
                if hash.len() != 64 {
                    return Err(format!("a $6$ hash has 64 bytes, not {}", hash.len()));
                }
                Ok(Hash::Sha512 {
                    salt: b64("salt", salt)?,
                    hash,
                })
            }
            ["", kind, ..] => Err(format!(
                "hash type ${kind}$ is not supported (mosquitto_passwd's $7$ and $6$ are)"
            )),
            _ => Err("the password is not hashed (run mosquitto_passwd -U on the file)".into()),
        }
    }

    /// In constant time for a given stored hash.
    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => {
                let mut derived = vec![0u8; hash.len()];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut derived);
                derived.ct_eq(hash).into()
            }
            Hash::Sha512 { salt, hash } => {
                let mut digest = Sha512::new();
                digest.update(password);
                digest.update(salt);
                digest.finalize().as_slice().ct_eq(hash).into()
            }
        }
    }
}

/// The users of a password file.
#[derive(Debug, Clone, Default)]
pub(crate) struct Passwords {
    users: HashMap<String, Hash>,
}

impl Passwords {
    /// Parses a file's text; an error names the line (1-based) and what is wrong with it.
    pub(crate) fn parse(text: &str) -> Result<Passwords, String> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |why: String| format!("line {}: {why}", n + 1);
            let Some((user, hash)) = line.split_once(':') else {
                return Err(at("expected user:hash".into()));
            };
            if user.is_empty() {
                return Err(at("the user name is empty".into()));
            }
            let hash = Hash::parse(hash).map_err(|why| at(format!("user {user:?}: {why}")))?;
            if users.insert(user.to_owned(), hash).is_some() {
                return Err(at(format!("user {user:?} is listed twice")));
            }
        }
        Ok(Passwords { users })
    }

    /// Whether `user` is listed with `password`. An unknown user costs a verification
    /// too, so the time taken does not tell which user names exist.
    pub(crate) fn verify(&self, user: &str, password: &[u8]) -> bool {
        static DECOY: std::sync::LazyLock<Hash> = std::sync::LazyLock::new(|| Hash::Pbkdf2 {
            iterations: 101,
            salt: vec![0; 12],
            hash: vec![0; 64],
        });
        match self.users.get(user) {
            Some(hash) => hash.verify(password),
            None => {
                let _ = DECOY.verify(password);
                false
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.users.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Written by mosquitto_passwd 2.0.11 (`-b`, and `-H sha512 -b` for the $6$ line).
    const FILE: &str = "\
# made by mosquitto_passwd
alice:$7$101$1GA5viZHNGsfIF87$4mk5tv8MN078CNrjPvN80K1gdJARM5th3+oxL3ValKADgphAH85Chl3BBuYKeb8SCXIC6hMr47703sLXQ0vOZg==

device-1:$7$101$c6JO8LCaHYcgmfax$m12YzaX8bEwFmh1Nu+pNS7iIbuUg2PLezFrR1KSZh2044Q+wsxGfcBzHucUqCiYImObudQ1iUFyN00yc4V4QQw==
";

    #[test]
    fn mosquitto_passwd_hashes_verify_and_nothing_else_does() {
        let passwords = Passwords::parse(FILE).unwrap();
        assert_eq!(passwords.len(), 2);
        assert!(passwords.verify("alice", b"secret1"));
        assert!(passwords.verify("device-1", b"p@ss"));
        assert!(!passwords.verify("alice", b"secret2"));
        assert!(!passwords.verify("alice", b""));
        assert!(
            !passwords.verify("device-1", b"secret1"),
            "another user's password"
        );
        assert!(!passwords.verify("bob", b"secret1"), "an unknown user");
    }

    #[test]
    fn a_salted_sha512_hash_verifies() {
        // $6$: base64(SHA-512(password ‖ salt)), here made for "pw" and salt "salt".
        let mut digest = Sha512::new();
        digest.update(b"pw");
        digest.update(b"salt");
        let line = format!(
            "old:$6${}${}\n",
            STANDARD.encode(b"salt"),
            STANDARD.encode(digest.finalize())
        );
        let passwords = Passwords::parse(&line).unwrap();
        assert!(passwords.verify("old", b"pw"));
        assert!(!passwords.verify("old", b"pw2"));
    }

    #[test]
    fn a_malformed_line_is_an_error_naming_it() {
        for (text, want) in [
            (
                "a:$7$101$AAAA$AAAA\nnocolon\n",
                "line 2: expected user:hash",
            ),
            (
                "plain:secret\n",
                "line 1: user \"plain\": the password is not hashed",
            ),
            (
                "a:$5$x$y\n",
                "line 1: user \"a\": hash type $5$ is not supported",
            ),
            ("a:$7$many$AAAA$AAAA\n", "\"many\" is not a number"),
            ("a:$7$0$AAAA$AAAA\n", "0 iterations is out of range"),
            ("a:$7$101$AAAA$!!!!\n", "its hash is not base64"),
            ("a:$6$AAAA$AAAA\n", "a $6$ hash has 64 bytes, not 3"),
            (
                "a:$7$101$AAAA$AAAA\na:$7$101$AAAA$AAAA\n",
                "line 2: user \"a\" is listed twice",
            ),
            (":$7$101$AAAA$AAAA\n", "line 1: the user name is empty"),
        ] {
            let error = Passwords::parse(text).unwrap_err();
            assert!(error.contains(want), "{text:?}: {error}");
        }
    }
}
