//! Mosquitto's ACL file, read as Mosquitto 2 reads it:
//!
//! ```text
//! # topic lines before any `user` line are for anonymous clients
//! topic read $SYS/#
//! user alice
//! topic readwrite sensors/#
//! topic deny sensors/secret/#
//! # pattern lines apply to every client, wherever they are: %c its client id, %u its user name
//! pattern write devices/%u/#
//! ```
//!
//! The access word is `read`, `write`, `readwrite` or `deny`; without one a line grants
//! `readwrite`. A `deny` that matches wins over every grant.
//!
//! Mosquitto checks `read` on every message it delivers; sluice's router delivers to
//! subscribers without asking, so `read` is checked when the client subscribes, as
//! strictly as that requires: a filter is granted only if one `read` filter covers all
//! it could match (`devices/%u/#` grants `devices/alice/+/telemetry`, not `devices/#`),
//! and refused if any `deny` filter could match something it matches.
//!
//! A `%c` or `%u` that would put `/`, `+` or `#` into a filter (a client id or user name
//! holding one) leaves its line unmatched, so no one widens a pattern by their name;
//! a `%u` line never matches a client without a user name.

use crate::frame::{filter_covers, filters_overlap, topic_matches, valid_filter};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }

    fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

#[derive(Debug, Clone)]
struct Rule {
    access: Access,
    filter: String,
}

/// A client as the ACL sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Who<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
}

/// An ACL file, parsed.
#[derive(Debug, Clone, Default)]
pub(crate) struct Acl {
    /// `topic` lines before any `user` line.
    anonymous: Vec<Rule>,
    /// `topic` lines after `user NAME`.
    users: std::collections::HashMap<String, Vec<Rule>>,
    /// `pattern` lines, unsubstituted.
    patterns: Vec<Rule>,
}

impl Acl {
    /// Parses a file's text; an error names the line (1-based) and what is wrong with it.
    pub(crate) fn parse(text: &str) -> Result<Acl, String> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |why: String| format!("line {}: {why}", n + 1);
            let (word, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
            let rest = rest.trim_start();
            match word {
                "user" => {
                    if rest.is_empty() {
                        return Err(at("`user` needs a user name".into()));
                    }
                    acl.users.entry(rest.to_owned()).or_default();
                    user = Some(rest.to_owned());
                }
                "topic" | "pattern" => {
                    let rule = Rule::parse(rest).map_err(at)?;
                    if word == "pattern" {
                        acl.patterns.push(rule);
                    } else if let Some(user) = &user {
                        acl.users.entry(user.clone()).or_default().push(rule);
                    } else {
                        acl.anonymous.push(rule);
                    }
                }
                other => {
                    return Err(at(format!(
                        "unknown keyword {other:?} (expected user, topic or pattern)"
                    )));
                }
            }
        }
        Ok(acl)
    }

    /// The rules that apply to `who`, patterns substituted.
    fn rules<'a>(
        &'a self,
        who: Who<'a>,
    ) -> impl Iterator<Item = (Access, std::borrow::Cow<'a, str>)> {
        let own = match who.username {
            Some(user) => self.users.get(user).map_or(&[][..], Vec::as_slice),
            None => &self.anonymous,
        };
        let own = own
            .iter()
            .map(|r| (r.access, std::borrow::Cow::Borrowed(r.filter.as_str())));
        let patterns = self
            .patterns
            .iter()
            .filter_map(move |r| substitute(&r.filter, who).map(|f| (r.access, f)));
        own.chain(patterns)
    }

    /// Whether `who` may publish to `topic`.
    pub(crate) fn may_publish(&self, who: Who<'_>, topic: &str) -> bool {
        let mut granted = false;
        for (access, filter) in self.rules(who) {
            if topic_matches(topic, &filter) {
                if access == Access::Deny {
                    return false;
                }
                granted |= access.writes();
            }
        }
        granted
    }

    /// Whether `who` may subscribe to `filter`: covered by a `read` rule, touching no
    /// `deny` rule.
    pub(crate) fn may_subscribe(&self, who: Who<'_>, filter: &str) -> bool {
        let mut granted = false;
        for (access, rule) in self.rules(who) {
            if access == Access::Deny {
                if filters_overlap(&rule, filter) {
                    return false;
                }
            } else if access.reads() && filter_covers(&rule, filter) {
                granted = true;
            }
        }
        granted
    }
}

impl Rule {
    /// `[read|write|readwrite|deny] FILTER` (the filter may hold spaces).
    fn parse(text: &str) -> Result<Rule, String> {
        let (first, rest) = text.split_once([' ', '\t']).unwrap_or((text, ""));
        let (access, filter) = match first {
            "read" => (Access::Read, rest.trim_start()),
            "write" => (Access::Write, rest.trim_start()),
            "readwrite" => (Access::ReadWrite, rest.trim_start()),
            "deny" => (Access::Deny, rest.trim_start()),
            _ => (Access::ReadWrite, text),
        };
        if filter.is_empty() {
            return Err("a topic filter is missing".into());
        }
        if !valid_filter(filter) {
            return Err(format!("{filter:?} is not a valid topic filter"));
        }
        Ok(Rule {
            access,
            filter: filter.to_owned(),
        })
    }
}

/// `filter` with `%c` and `%u` replaced; `None` if the line cannot apply to `who`.
fn substitute<'a>(filter: &'a str, who: Who<'_>) -> Option<std::borrow::Cow<'a, str>> {
    if !filter.contains('%') {
        return Some(std::borrow::Cow::Borrowed(filter));
    }
    let safe = |s: &str| !s.is_empty() && !s.contains(['/', '+', '#']);
    if filter.contains("%c") && !safe(who.client_id) {
        return None;
    }
    let user = if filter.contains("%u") {
        who.username.filter(|u| safe(u))?
    } else {
        ""
    };
    // Each piece between `%u`s gets `%c` on its own: a client id holding `%u` is not
    // substituted again.
    let out = filter
        .split("%u")
        .map(|part| part.replace("%c", who.client_id))
        .collect::<Vec<_>>()
        .join(user);
    Some(std::borrow::Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# anonymous
topic read $SYS/#
topic read public/#

user alice
topic readwrite sensors/#
topic deny sensors/secret/#
topic write logs/alice

user bob
topic read sensors/room1/+

# everyone
pattern write devices/%u/telemetry
pattern readwrite clients/%c/#
";

    fn who<'a>(client_id: &'a str, username: Option<&'a str>) -> Who<'a> {
        Who {
            client_id,
            username,
        }
    }

    #[test]
    fn users_get_their_section_and_the_patterns_anonymous_clients_the_top() {
        let acl = Acl::parse(FILE).unwrap();
        let alice = who("c1", Some("alice"));
        assert!(acl.may_publish(alice, "sensors/room1/temp"));
        assert!(!acl.may_publish(alice, "sensors/secret/x"), "deny wins");
        assert!(acl.may_publish(alice, "logs/alice"));
        assert!(acl.may_publish(alice, "devices/alice/telemetry"));
        assert!(!acl.may_publish(alice, "devices/bob/telemetry"));
        assert!(acl.may_publish(alice, "clients/c1/x"));
        assert!(!acl.may_publish(alice, "clients/c2/x"));
        assert!(
            !acl.may_publish(alice, "public/news"),
            "the anonymous section is not hers"
        );

        let bob = who("c2", Some("bob"));
        assert!(!acl.may_publish(bob, "sensors/room1/temp"), "read only");
        assert!(acl.may_subscribe(bob, "sensors/room1/+"));
        assert!(acl.may_subscribe(bob, "sensors/room1/temp"));
        assert!(!acl.may_subscribe(bob, "sensors/#"), "wider than granted");

        let anonymous = who("c3", None);
        assert!(acl.may_subscribe(anonymous, "$SYS/broker/uptime"));
        assert!(acl.may_subscribe(anonymous, "public/#"));
        assert!(!acl.may_publish(anonymous, "public/x"));
        assert!(
            !acl.may_publish(anonymous, "devices/%u/telemetry"),
            "a %u line never matches a client without a user name"
        );
        assert!(acl.may_publish(anonymous, "clients/c3/x"));

        let stranger = who("c4", Some("mallory"));
        assert!(!acl.may_publish(stranger, "sensors/room1/temp"));
        assert!(acl.may_publish(stranger, "devices/mallory/telemetry"));
    }

    #[test]
    fn a_subscription_is_refused_where_it_could_see_a_denied_topic() {
        let acl = Acl::parse(FILE).unwrap();
        let alice = who("c1", Some("alice"));
        assert!(acl.may_subscribe(alice, "sensors/room1/#"));
        assert!(!acl.may_subscribe(alice, "sensors/#"), "overlaps the deny");
        assert!(
            !acl.may_subscribe(alice, "sensors/+/x"),
            "overlaps the deny"
        );
        assert!(!acl.may_subscribe(alice, "logs/alice"), "write only");
    }

    #[test]
    fn a_name_holding_a_wildcard_or_a_slash_does_not_widen_a_pattern() {
        let acl = Acl::parse(FILE).unwrap();
        for name in ["#", "+", "a/b", ""] {
            let w = who(name, Some(name));
            assert!(!acl.may_subscribe(w, "clients/#"), "{name:?}");
            assert!(!acl.may_publish(w, "devices/a/b/telemetry"), "{name:?}");
        }
    }

    #[test]
    fn a_malformed_line_is_an_error_naming_it() {
        for (text, want) in [
            ("topic read a/#\nuser\n", "line 2: `user` needs a user name"),
            ("topic read\n", "line 1: a topic filter is missing"),
            (
                "topic read a/#/b\n",
                "line 1: \"a/#/b\" is not a valid topic filter",
            ),
            ("allow all\n", "line 1: unknown keyword \"allow\""),
        ] {
            let error = Acl::parse(text).unwrap_err();
            assert!(error.contains(want), "{text:?}: {error}");
        }
    }
}
