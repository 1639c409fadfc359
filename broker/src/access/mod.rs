//! Who may connect, publish and subscribe: `[mqtt.auth]`.
//!
//! - **Authentication**: a Mosquitto password file ([`passwords`]), JWTs signed by the
//!   fleet's key ([`jwt`]: the password is a token naming the client id), client
//!   certificates (verified by the TLS listener). With any of them configured, a client
//!   without credentials is refused (CONNACK 5 / 0x87) unless `allow_anonymous`; a wrong
//!   user name or password, or a token that does not verify or has expired, gets 4 /
//!   0x86; a valid token for another client id 5 / 0x87. After a failed
//!   attempt, every attempt from that address with that user name is answered later and
//!   later (0.1 s doubling to 5 s, forgotten a minute after the last failure), so a
//!   password cannot be guessed at wire speed, not even over many connections at once;
//!   other users behind the same address (a NAT) are not slowed.
//! - **Authorization**: a Mosquitto ACL file ([`acl`]), or, with authentication on and
//!   no ACL file, the safe default: a client may publish and subscribe under its own
//!   topics only (the owner's template with its identity: its user name, or its client
//!   id when it connected anonymously). Reserved topics (sluice's alerts) are refused to
//!   every client whatever the ACL says.
//!
//! The files are read again on [`AccessControl::reload`]; a file that does not parse
//! keeps the rules in force and is reported.

mod acl;
mod jwt;
mod passwords;

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::{AuthOutcome, Authenticator, BoxFuture, ConnectInfo, Identity};

pub(crate) use acl::{Acl, Who};
use jwt::Jwt;
pub use jwt::JwtConfig;
pub(crate) use passwords::Passwords;

/// `[mqtt.auth]`, as the broker takes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessConfig {
    /// Mosquitto's password file (`mosquitto_passwd`): turns authentication on.
    pub password_file: Option<PathBuf>,
    /// Tokens as passwords: turns authentication on.
    pub jwt: Option<JwtConfig>,
    /// Mosquitto's ACL file.
    pub acl_file: Option<PathBuf>,
    /// Lets clients without credentials in while authentication is on.
    pub allow_anonymous: bool,
    /// The TLS listener verifies client certificates: a client presenting one is the
    /// identity it names, without a password (and authentication is on).
    pub certificates: bool,
    /// The default policy's filter, `{identity}` standing for the client's identity
    /// (e.g. `devices/{identity}/#`): used when authentication is on and no ACL file is.
    pub own_topics: String,
    /// Filters no client may publish to while access control is on, whatever the ACL
    /// grants (e.g. `alerts/#`: only sluice publishes there).
    pub reserved: Vec<String>,
}

impl AccessConfig {
    /// Whether any access control is configured (otherwise every client may do anything).
    pub fn is_on(&self) -> bool {
        self.authenticates() || self.acl_file.is_some()
    }

    /// Whether clients must prove who they are (passwords, tokens or certificates).
    fn authenticates(&self) -> bool {
        self.password_file.is_some() || self.jwt.is_some() || self.certificates
    }
}

/// Errors reading the access files.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("{0}")]
    Config(String),
}

/// What the files say, swapped whole on a reload.
#[derive(Debug)]
struct Rules {
    passwords: Option<Passwords>,
    jwt: Option<Jwt>,
    acl: Option<Acl>,
}

/// Failed attempts from one address with one user name.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

/// A failure is forgotten this long after the last one.
const FORGET_FAILURES: Duration = Duration::from_secs(60);
/// The first delay after a failure; each further one doubles it, up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(5);
/// Addresses and user names remembered at most (the oldest failures go first beyond).
const MAX_ADDRESSES: usize = 100_000;
/// Refusals logged one by one per minute; the rest are counted in the next line.
const LOGGED_PER_MINUTE: u32 = 20;

/// Access control by Mosquitto's files: an [`Authenticator`] for [`crate::Broker`].
#[derive(Debug)]
pub struct AccessControl {
    config: AccessConfig,
    rules: RwLock<Arc<Rules>>,
    failures: Mutex<HashMap<(IpAddr, String), Failures>>,
    log: Mutex<(Instant, u32)>,
}

impl AccessControl {
    /// Reads the files; an unreadable or malformed one is an error naming the line.
    pub fn load(config: AccessConfig) -> Result<AccessControl, AccessError> {
        let rules = read_rules(&config)?;
        Ok(AccessControl {
            config,
            rules: RwLock::new(Arc::new(rules)),
            failures: Mutex::new(HashMap::new()),
            log: Mutex::new((Instant::now(), 0)),
        })
    }

    /// Reads the files again; on an error the rules in force stay.
    pub fn reload(&self) -> Result<(), AccessError> {
        let rules = read_rules(&self.config)?;
        *self.rules.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rules);
        Ok(())
    }

    /// What is in force, for a log line: `3 users, the ACL file` or `…, the default policy`.
    pub fn describe(&self) -> String {
        let rules = self.rules();
        let users = rules
            .passwords
            .as_ref()
            .map_or("no password file".to_owned(), |p| {
                format!("{} users", p.len())
            });
        let acl = match (&rules.acl, self.config.authenticates()) {
            (Some(_), _) => "the ACL file",
            (None, true) => "the default policy (own topics only)",
            (None, false) => "no ACL",
        };
        let jwt = rules
            .jwt
            .as_ref()
            .map_or(String::new(), |j| format!(", JWT ({:?})", j.algorithms()));
        let certificates = if self.config.certificates {
            ", client certificates"
        } else {
            ""
        };
        format!("{users}{jwt}{certificates}, {acl}")
    }

    fn rules(&self) -> Arc<Rules> {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The delay owed by an address and user name that failed before.
    fn delay(&self, key: &(IpAddr, String)) -> Duration {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match failures.get(key) {
            Some(f) if f.last.elapsed() < FORGET_FAILURES => FIRST_DELAY
                .saturating_mul(1 << (f.count - 1).min(6))
                .min(MAX_DELAY),
            _ => Duration::ZERO,
        }
    }

    fn failed(&self, key: (IpAddr, String), info: &ConnectInfo<'_>, why: &str) {
        {
            let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            if failures.len() >= MAX_ADDRESSES && !failures.contains_key(&key) {
                failures.retain(|_, f| f.last.elapsed() < FORGET_FAILURES);
                if failures.len() >= MAX_ADDRESSES
                    && let Some(oldest) = failures
                        .iter()
                        .min_by_key(|(_, f)| f.last)
                        .map(|(k, _)| k.clone())
                {
                    failures.remove(&oldest);
                }
            }
            let entry = failures.entry(key).or_insert(Failures {
                count: 0,
                last: Instant::now(),
            });
            if entry.last.elapsed() >= FORGET_FAILURES {
                entry.count = 0;
            }
            entry.count = entry.count.saturating_add(1);
            entry.last = Instant::now();
        }
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if log.0.elapsed() >= Duration::from_secs(60) {
            if log.1 > LOGGED_PER_MINUTE {
                tracing::warn!(
                    not_logged = log.1 - LOGGED_PER_MINUTE,
                    "more MQTT connections were refused in the last minute"
                );
            }
            *log = (Instant::now(), 0);
        }
        log.1 += 1;
        if log.1 <= LOGGED_PER_MINUTE {
            tracing::warn!(
                peer = %info.peer,
                client_id = info.client_id,
                username = info.username.unwrap_or(""),
                listener = info.listener,
                "MQTT connection refused: {why}"
            );
        }
    }

    fn succeeded(&self, key: &(IpAddr, String)) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(key);
    }

    /// Lets the client in (as whom) or says why not.
    fn decide(
        &self,
        info: &ConnectInfo<'_>,
    ) -> Result<AuthOutcome, (AuthOutcome, Cow<'static, str>)> {
        use AuthOutcome::{Allow, AllowAs, BadCredentials, NotAuthorized};
        if let Some(name) = info.certificate {
            // Verified by the TLS handshake against client_ca_file: the certificate says
            // who the client is, whatever user name it gives.
            return Ok(AllowAs {
                name: Some(name.into()),
                expires: None,
            });
        }
        let rules = self.rules();
        if let (Some(jwt), Some(password)) = (&rules.jwt, info.password)
            && Jwt::looks_like_token(password)
        {
            // The token names the client id: that is who the client is, whatever user
            // name it gave.
            return match jwt.verify(password, info.client_id) {
                Ok(expires) => Ok(AllowAs {
                    name: Some(info.client_id.into()),
                    expires,
                }),
                Err(refusal) if refusal.is_other_client() => {
                    Err((NotAuthorized, refusal.to_string().into()))
                }
                Err(refusal) => Err((BadCredentials, refusal.to_string().into())),
            };
        }
        if let (Some(passwords), Some(user)) = (&rules.passwords, info.username) {
            return if passwords.verify(user, info.password.unwrap_or_default()) {
                Ok(Allow)
            } else {
                Err((BadCredentials, "wrong user name or password".into()))
            };
        }
        if rules.jwt.is_some() && info.password.is_some() {
            return Err((BadCredentials, "the password is not a JWT".into()));
        }
        if !self.config.authenticates() {
            // An ACL alone: user names are taken as given (as Mosquitto does).
            Ok(Allow)
        } else if self.config.allow_anonymous {
            // Anonymous: a user name given without proof names no one.
            Ok(AllowAs {
                name: None,
                expires: None,
            })
        } else {
            Err((
                NotAuthorized,
                "no credentials, and anonymous clients are not allowed".into(),
            ))
        }
    }

    fn who<'a>(identity: &'a Identity) -> Who<'a> {
        Who {
            client_id: &identity.client_id,
            username: identity.username.as_deref(),
        }
    }

    fn reserved(&self, topic: &str) -> bool {
        self.config
            .reserved
            .iter()
            .any(|r| crate::frame::topic_matches(topic, r))
    }

    /// The default policy's filter for `identity`, if it can have one.
    fn own_filter(&self, identity: &Identity) -> Option<String> {
        let name = identity.username.as_deref().unwrap_or(&identity.client_id);
        (!name.is_empty() && !name.contains(['/', '+', '#']))
            .then(|| self.config.own_topics.replace("{identity}", name))
    }
}

impl Authenticator for AccessControl {
    fn authenticate(&self, info: &ConnectInfo<'_>) -> BoxFuture<AuthOutcome> {
        let key = (info.peer.ip(), info.username.unwrap_or_default().to_owned());
        let delay = self.delay(&key);
        let outcome = match self.decide(info) {
            Ok(allowed) => {
                self.succeeded(&key);
                allowed
            }
            Err((outcome, why)) => {
                self.failed(key, info, &why);
                outcome
            }
        };
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            outcome
        })
    }

    fn may_publish(&self, identity: &Identity, topic: &str) -> bool {
        if self.reserved(topic) {
            return false;
        }
        match &self.rules().acl {
            Some(acl) => acl.may_publish(Self::who(identity), topic),
            None if self.config.authenticates() => self
                .own_filter(identity)
                .is_some_and(|own| crate::frame::topic_matches(topic, &own)),
            None => true,
        }
    }

    fn may_subscribe(&self, identity: &Identity, filter: &str) -> bool {
        match &self.rules().acl {
            Some(acl) => acl.may_subscribe(Self::who(identity), filter),
            None if self.config.authenticates() => self
                .own_filter(identity)
                .is_some_and(|own| crate::frame::filter_covers(&own, filter)),
            None => true,
        }
    }
}

fn read_rules(config: &AccessConfig) -> Result<Rules, AccessError> {
    fn read<T>(path: &Path, parse: impl Fn(&str) -> Result<T, String>) -> Result<T, AccessError> {
        let text = std::fs::read_to_string(path).map_err(|source| AccessError::Read {
            path: path.to_owned(),
            source,
        })?;
        parse(&text).map_err(|why| AccessError::Invalid {
            path: path.to_owned(),
            why,
        })
    }
    Ok(Rules {
        passwords: config
            .password_file
            .as_deref()
            .map(|p| read(p, Passwords::parse))
            .transpose()?,
        jwt: config.jwt.as_ref().map(Jwt::load).transpose()?,
        acl: config
            .acl_file
            .as_deref()
            .map(|p| read(p, Acl::parse))
            .transpose()?,
    })
}
