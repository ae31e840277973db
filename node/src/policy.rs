//! Path policies in Vault's HCL syntax, and the access decision they make.
//!
//! A policy is a list of `path "PATTERN" { capabilities = [...] }` blocks, as in Vault, so a
//! Vault KV policy can be pasted unchanged. A pattern is an exact path, or ends in `*` (any
//! suffix), and may hold `+` segments (any one segment). For a request path, the rules of all
//! of an identity's policies that name the same pattern are merged (a `deny` among them leaves
//! only `deny`), and then the single most specific matching pattern decides, by Vault's
//! priority rules ([`Pattern::lower_than`]). No matching pattern, or `deny`: nothing is allowed.
//!
//! Parse errors name the line and column. Attributes Vault has but Coffer does not support
//! (`allowed_parameters` and the like) are refused rather than ignored, so a pasted policy never
//! grants more than it says.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

/// What a rule may allow on a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    /// Write a path that does not exist yet.
    Create,
    /// Read.
    Read,
    /// Write a path that exists.
    Update,
    /// Change part of what a path holds.
    Patch,
    /// Delete.
    Delete,
    /// List the keys under a path.
    List,
    /// Operations reserved for administrators (on `sys/...` paths).
    Sudo,
    /// Grant others capabilities this identity holds on the path, until a time.
    Delegate,
    /// Nothing, whatever other rules say.
    Deny,
}

impl Capability {
    const ALL: [Capability; 9] = [
        Capability::Create,
        Capability::Read,
        Capability::Update,
        Capability::Patch,
        Capability::Delete,
        Capability::List,
        Capability::Sudo,
        Capability::Delegate,
        Capability::Deny,
    ];

    /// The name used in policies.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Create => "create",
            Capability::Read => "read",
            Capability::Update => "update",
            Capability::Patch => "patch",
            Capability::Delete => "delete",
            Capability::List => "list",
            Capability::Sudo => "sudo",
            Capability::Delegate => "delegate",
            Capability::Deny => "deny",
        }
    }

    /// The capability a policy names `s`.
    pub fn parse(s: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// A parse error, with where it is (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct PolicyError {
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
    /// What is wrong and what to write instead.
    pub message: String,
}

/// A path pattern: an exact path, or a prefix (trailing `*`), with optional `+` segments.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pattern(String);

impl Pattern {
    /// Checks a pattern's syntax: `*` only at the very end, `+` only as a whole segment.
    pub fn new(text: &str) -> Result<Pattern, String> {
        let body = text.strip_suffix('*').unwrap_or(text);
        if body.contains('*') {
            return Err(format!(
                "{text:?}: `*` is allowed only at the end of a path (a prefix match)"
            ));
        }
        for segment in body.split('/') {
            if segment.contains('+') && segment != "+" {
                return Err(format!(
                    "{text:?}: `+` must be a whole path segment, as in \"secret/data/+/db\""
                ));
            }
        }
        if text.is_empty() {
            return Err("the path must not be empty (use \"*\" for every path)".into());
        }
        Ok(Pattern(text.to_string()))
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn is_prefix(&self) -> bool {
        self.0.ends_with('*')
    }

    /// Whether `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        let (body, prefix) = match self.0.strip_suffix('*') {
            Some(b) => (b, true),
            None => (self.0.as_str(), false),
        };
        if !body.contains('+') {
            return if prefix {
                path.starts_with(body)
            } else {
                path == body
            };
        }
        // Segment by segment: `+` takes one whole segment of the path.
        let mut rest = path;
        let mut parts = body.split('/').peekable();
        while let Some(part) = parts.next() {
            let last = parts.peek().is_none();
            if last {
                return if part == "+" {
                    // One more segment, then (for a trailing `*`) anything.
                    prefix || !rest.contains('/')
                } else if prefix {
                    rest.starts_with(part)
                } else {
                    rest == part
                };
            }
            let (segment, after) = match rest.split_once('/') {
                Some(x) => x,
                None => return false,
            };
            if part != "+" && part != segment {
                return false;
            }
            rest = after;
        }
        false
    }

    /// Whether some path that starts with `prefix` matches.
    fn may_match_under(&self, prefix: &str) -> bool {
        let (body, glob) = match self.0.strip_suffix('*') {
            Some(b) => (b, true),
            None => (self.0.as_str(), false),
        };
        let mut rest = prefix;
        let mut parts = body.split('/').peekable();
        while let Some(part) = parts.next() {
            let last = parts.peek().is_none();
            match rest.split_once('/') {
                // Inside the prefix's last (partial) segment: the path can go on as needed.
                None => {
                    return part == "+"
                        || part.starts_with(rest)
                        || (last && glob && rest.starts_with(part));
                }
                Some((segment, after)) => {
                    if last {
                        return glob && (part == "+" || rest.starts_with(part));
                    }
                    if part != "+" && part != segment {
                        return false;
                    }
                    rest = after;
                }
            }
        }
        false
    }

    /// Where the first `+` or `*` is (the pattern's length if none).
    fn first_wildcard(&self) -> usize {
        self.0.find(['+', '*']).unwrap_or(self.0.len())
    }

    fn plus_segments(&self) -> usize {
        self.0.split('/').filter(|s| *s == "+").count()
    }

    /// Vault's priority order: whether this pattern loses to `other` when both match. In turn:
    /// the one whose first wildcard comes earlier loses; a trailing `*` loses to none; more `+`
    /// segments lose; the shorter loses; the lexicographically smaller loses.
    pub fn lower_than(&self, other: &Pattern) -> bool {
        self.priority_cmp(other) == Ordering::Less
    }

    fn priority_cmp(&self, other: &Pattern) -> Ordering {
        self.first_wildcard()
            .cmp(&other.first_wildcard())
            .then_with(|| other.is_prefix().cmp(&self.is_prefix()))
            .then_with(|| other.plus_segments().cmp(&self.plus_segments()))
            .then_with(|| self.0.len().cmp(&other.0.len()))
            .then_with(|| self.0.cmp(&other.0))
    }
}

/// One `path` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The path pattern.
    pub pattern: Pattern,
    /// What it allows.
    pub capabilities: BTreeSet<Capability>,
}

/// A parsed policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Its rules, in the order written.
    pub rules: Vec<Rule>,
}

/// The merged rules of an identity's policies, ready to answer access questions.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    rules: BTreeMap<Pattern, BTreeSet<Capability>>,
}

impl Acl {
    /// Merges `policies`: capabilities of rules with the same pattern are combined, and a
    /// `deny` among them leaves only `deny`.
    pub fn new<'a>(policies: impl IntoIterator<Item = &'a Policy>) -> Acl {
        let mut rules: BTreeMap<Pattern, BTreeSet<Capability>> = BTreeMap::new();
        for policy in policies {
            for rule in &policy.rules {
                rules
                    .entry(rule.pattern.clone())
                    .or_default()
                    .extend(rule.capabilities.iter().copied());
            }
        }
        for caps in rules.values_mut() {
            if caps.contains(&Capability::Deny) {
                *caps = BTreeSet::from([Capability::Deny]);
            }
        }
        Acl { rules }
    }

    /// The most specific matching pattern for `path`, and its capabilities.
    pub fn decide(&self, path: &str) -> Option<(&Pattern, &BTreeSet<Capability>)> {
        self.rules
            .iter()
            .filter(|(p, _)| p.matches(path))
            .max_by(|(a, _), (b, _)| a.priority_cmp(b))
    }

    /// Whether `capability` is allowed on every path that starts with `prefix` (for operations
    /// on a whole prefix, such as deleting every key under it). Conservative: a rule that might
    /// match somewhere under the prefix must allow it too, and a prefix rule must cover the
    /// whole prefix, so a `deny` deeper down is never bypassed.
    pub fn allows_all_under(&self, prefix: &str, capability: Capability) -> bool {
        let allows = |caps: &BTreeSet<Capability>| {
            !caps.contains(&Capability::Deny) && caps.contains(&capability)
        };
        let covered = self.rules.iter().any(|(p, caps)| {
            p.is_prefix()
                && !p.0.contains('+')
                && prefix.starts_with(&p.0[..p.0.len() - 1])
                && allows(caps)
        });
        covered
            && self
                .rules
                .iter()
                .all(|(p, caps)| !p.may_match_under(prefix) || allows(caps))
    }

    /// Whether `capability` is allowed on `path`.
    pub fn allows(&self, path: &str, capability: Capability) -> bool {
        match self.decide(path) {
            Some((_, caps)) => !caps.contains(&Capability::Deny) && caps.contains(&capability),
            None => false,
        }
    }
}

/// Where policies live in the replicated state (inside the barrier): this prefix, then the name.
pub const STORE_PREFIX: &[u8] = b"\0coffer/policy/";

/// The built-in administrator policy, held by the administrator key given at init.
pub const ADMIN: &str = "admin";

/// The built-in administrator policy's text.
pub const ADMIN_TEXT: &str = r#"# Built in: manages identities, policies, roles and settings. Cannot be changed.
path "sys/*" {
  capabilities = ["create", "read", "update", "patch", "delete", "list", "sudo"]
}
path "auth/*" {
  capabilities = ["create", "read", "update", "patch", "delete", "list", "sudo"]
}
"#;

/// The built-in administrator policy, parsed.
pub fn admin() -> &'static Policy {
    static ADMIN_POLICY: std::sync::OnceLock<Policy> = std::sync::OnceLock::new();
    ADMIN_POLICY.get_or_init(|| parse(ADMIN_TEXT).expect("the built-in admin policy parses"))
}

/// Checks a policy name: 1 to 128 of lowercase letters, digits, `-` and `_`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "policy name {name:?}: use 1 to 128 lowercase letters, digits, `-` and `_`"
        ))
    }
}

/// The stored key of policy `name`.
pub fn store_key(name: &str) -> Vec<u8> {
    let mut k = STORE_PREFIX.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

/// Likely mistakes in `policy`, given a way to ask whether any key exists under a prefix: an
/// exact path that has keys under it grants nothing on them (Vault's classic surprise:
/// `secret/data/app` does not cover `secret/data/app/db`).
pub fn warnings(policy: &Policy, has_keys_under: impl Fn(&str) -> bool) -> Vec<String> {
    policy
        .rules
        .iter()
        .filter(|r| !r.pattern.as_str().contains(['*', '+']))
        .filter(|r| has_keys_under(&format!("{}/", r.pattern.as_str().trim_end_matches('/'))))
        .map(|r| {
            let p = r.pattern.as_str().trim_end_matches('/');
            format!(
                "{p:?} is an exact path, but keys exist under {p}/: it does not cover them; write \"{p}/*\" to include them"
            )
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Punct(char),
}

struct Lexer<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    line: usize,
    column: usize,
}

impl Lexer<'_> {
    fn err(&self, line: usize, column: usize, message: impl Into<String>) -> PolicyError {
        PolicyError {
            line,
            column,
            message: message.into(),
        }
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.line += 1;
            self.column = 1;
        } else {
            self.column += 1;
        }
        Some(c)
    }

    /// The next token and where it starts, or `None` at the end.
    fn next(&mut self) -> Result<Option<(Token, usize, usize)>, PolicyError> {
        loop {
            let Some(&c) = self.chars.peek() else {
                return Ok(None);
            };
            let (line, column) = (self.line, self.column);
            match c {
                c if c.is_whitespace() => {
                    self.bump();
                }
                '#' => self.skip_line(),
                '/' => {
                    self.bump();
                    match self.chars.peek() {
                        Some('/') => self.skip_line(),
                        Some('*') => {
                            self.bump();
                            let mut prev = ' ';
                            loop {
                                match self.bump() {
                                    Some('/') if prev == '*' => break,
                                    Some(c) => prev = c,
                                    None => {
                                        return Err(self.err(
                                            line,
                                            column,
                                            "a /* comment is never closed with */",
                                        ));
                                    }
                                }
                            }
                        }
                        _ => return Err(self.err(line, column, "unexpected `/`")),
                    }
                }
                '"' => {
                    self.bump();
                    let mut s = String::new();
                    loop {
                        match self.bump() {
                            Some('"') => break,
                            Some('\\') => match self.bump() {
                                Some('"') => s.push('"'),
                                Some('\\') => s.push('\\'),
                                Some('n') => s.push('\n'),
                                Some('t') => s.push('\t'),
                                other => {
                                    return Err(self.err(
                                        self.line,
                                        self.column,
                                        format!("unknown escape `\\{}`", other.unwrap_or(' ')),
                                    ));
                                }
                            },
                            Some('\n') | None => {
                                return Err(self.err(
                                    line,
                                    column,
                                    "a string is not closed with `\"` on its line",
                                ));
                            }
                            Some(c) => s.push(c),
                        }
                    }
                    return Ok(Some((Token::Str(s), line, column)));
                }
                '{' | '}' | '[' | ']' | '=' | ',' => {
                    self.bump();
                    return Ok(Some((Token::Punct(c), line, column)));
                }
                c if c.is_ascii_alphabetic() || c == '_' => {
                    let mut s = String::new();
                    while let Some(&c) = self.chars.peek() {
                        if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                            s.push(c);
                            self.bump();
                        } else {
                            break;
                        }
                    }
                    return Ok(Some((Token::Ident(s), line, column)));
                }
                other => return Err(self.err(line, column, format!("unexpected `{other}`"))),
            }
        }
    }

    fn skip_line(&mut self) {
        while let Some(c) = self.bump() {
            if c == '\n' {
                break;
            }
        }
    }
}

/// Parses a policy written in Vault's HCL policy syntax.
pub fn parse(text: &str) -> Result<Policy, PolicyError> {
    let mut lex = Lexer {
        chars: text.chars().peekable(),
        line: 1,
        column: 1,
    };
    let mut tokens = Vec::new();
    while let Some(t) = lex.next()? {
        tokens.push(t);
    }
    let end = (lex.line, lex.column);
    let mut i = 0;
    let at = |i: usize| -> (usize, usize) { tokens.get(i).map_or(end, |(_, l, c)| (*l, *c)) };
    let fail = |i: usize, message: String| {
        let (line, column) = at(i);
        PolicyError {
            line,
            column,
            message,
        }
    };
    let mut rules = Vec::new();
    let mut seen = BTreeMap::new();
    while i < tokens.len() {
        match &tokens[i].0 {
            Token::Ident(k) if k == "path" => {}
            other => {
                return Err(fail(
                    i,
                    format!(
                        "expected `path \"...\" {{ ... }}`, found {}",
                        describe(other)
                    ),
                ));
            }
        }
        let Some((Token::Str(path), ..)) = tokens.get(i + 1) else {
            return Err(fail(
                i + 1,
                "expected the path in quotes after `path`".into(),
            ));
        };
        let pattern = Pattern::new(path).map_err(|m| fail(i + 1, m))?;
        if let Some(line) = seen.insert(pattern.clone(), at(i).0) {
            return Err(fail(
                i + 1,
                format!("{path:?} already has a block on line {line}: merge them into one"),
            ));
        }
        if tokens.get(i + 2).map(|t| &t.0) != Some(&Token::Punct('{')) {
            return Err(fail(i + 2, "expected `{` after the path".into()));
        }
        i += 3;
        let mut capabilities = None;
        loop {
            match tokens.get(i).map(|t| &t.0) {
                Some(Token::Punct('}')) => {
                    i += 1;
                    break;
                }
                Some(Token::Ident(attr)) if attr == "capabilities" => {
                    if tokens.get(i + 1).map(|t| &t.0) != Some(&Token::Punct('=')) {
                        return Err(fail(i + 1, "expected `=` after `capabilities`".into()));
                    }
                    if tokens.get(i + 2).map(|t| &t.0) != Some(&Token::Punct('[')) {
                        return Err(fail(
                            i + 2,
                            "expected a list like [\"read\", \"list\"]".into(),
                        ));
                    }
                    i += 3;
                    let mut caps = BTreeSet::new();
                    loop {
                        match tokens.get(i).map(|t| &t.0) {
                            Some(Token::Punct(']')) => {
                                i += 1;
                                break;
                            }
                            Some(Token::Str(name)) => {
                                let cap = Capability::parse(name).ok_or_else(|| {
                                    fail(
                                        i,
                                        format!(
                                            "unknown capability {name:?}; use {}",
                                            Capability::ALL.map(|c| c.as_str()).join(", ")
                                        ),
                                    )
                                })?;
                                caps.insert(cap);
                                i += 1;
                                match tokens.get(i).map(|t| &t.0) {
                                    Some(Token::Punct(',')) => i += 1,
                                    Some(Token::Punct(']')) => {}
                                    _ => {
                                        return Err(fail(
                                            i,
                                            "expected `,` or `]` in the capability list".into(),
                                        ));
                                    }
                                }
                            }
                            _ => {
                                return Err(fail(
                                    i,
                                    "expected a capability in quotes, or `]`".into(),
                                ));
                            }
                        }
                    }
                    if capabilities.replace(caps).is_some() {
                        return Err(fail(i - 1, "`capabilities` is given twice".into()));
                    }
                }
                Some(Token::Ident(attr)) => {
                    return Err(fail(
                        i,
                        format!(
                            "`{attr}` is not supported by Coffer (only `capabilities`); remove it: a rule must not grant more than it says"
                        ),
                    ));
                }
                Some(other) => {
                    return Err(fail(
                        i,
                        format!(
                            "expected `capabilities = [...]` or `}}`, found {}",
                            describe(other)
                        ),
                    ));
                }
                None => return Err(fail(i, "the block is not closed with `}`".into())),
            }
        }
        let capabilities = capabilities.ok_or_else(|| {
            fail(
                i - 1,
                format!("the block for {path:?} has no `capabilities = [...]`"),
            )
        })?;
        rules.push(Rule {
            pattern,
            capabilities,
        });
    }
    Ok(Policy { rules })
}

fn describe(t: &Token) -> String {
    match t {
        Token::Ident(s) => format!("`{s}`"),
        Token::Str(s) => format!("{s:?}"),
        Token::Punct(c) => format!("`{c}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::new(s).expect("pattern")
    }

    #[test]
    fn the_builtin_admin_policy_parses_and_names_are_checked() {
        let admin = parse(ADMIN_TEXT).expect("built-in policy");
        assert!(Acl::new([&admin]).allows("sys/policies/app", Capability::Sudo));
        assert!(!Acl::new([&admin]).allows("secret/data/x", Capability::Read));
        assert!(check_name("app-readers_2").is_ok());
        for bad in ["", "App", "a b", "a/b", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_exact_path_with_keys_under_it_gets_a_warning() {
        let policy = parse(
            r#"
path "app" { capabilities = ["read"] }
path "app/*" { capabilities = ["read"] }
path "other" { capabilities = ["read"] }
"#,
        )
        .expect("parses");
        let w = warnings(&policy, |prefix| prefix == "app/");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("write \"app/*\""), "{w:?}");
    }

    #[test]
    fn a_vault_kv_policy_parses_unchanged() {
        let text = r#"
# Read the app's secrets; manage its own path.
path "secret/data/app/*" {
  capabilities = ["read", "list"]
}
// metadata too
path "secret/metadata/app/*" { capabilities = ["list",] }
/* the team's own area */
path "secret/data/team/+/config" {
  capabilities = ["create", "update", "patch", "delete"]
}
path "secret/data/app/admin" { capabilities = ["deny"] }
"#;
        let policy = parse(text).expect("parses");
        assert_eq!(policy.rules.len(), 4);
        assert_eq!(
            policy.rules[0].capabilities,
            BTreeSet::from([Capability::Read, Capability::List])
        );
        assert_eq!(
            policy.rules[2].pattern.as_str(),
            "secret/data/team/+/config"
        );
    }

    #[test]
    fn errors_name_the_line_and_column() {
        let cases = [
            (
                "path \"a\" {\n  capabilities = [\"read\", \"fly\"]\n}",
                2,
                27,
                "unknown capability",
            ),
            (
                "path \"a\" {\n  allowed_parameters = {}\n}",
                2,
                3,
                "not supported",
            ),
            (
                "path \"a/*/b\" { capabilities = [] }",
                1,
                6,
                "only at the end",
            ),
            (
                "path \"a/b+/c\" { capabilities = [] }",
                1,
                6,
                "whole path segment",
            ),
            (
                "path \"a\" {\n  capabilities = [\"read\"]\n",
                3,
                1,
                "not closed",
            ),
            ("path \"a\" { }", 1, 12, "no `capabilities"),
            (
                "path \"a\" { capabilities = [\"read\"] }\npath \"a\" { capabilities = [] }",
                2,
                6,
                "already has a block on line 1",
            ),
            ("paths \"a\" {}", 1, 1, "expected `path"),
            ("path \"a {}", 1, 6, "not closed with `\"`"),
            ("/* open", 1, 1, "never closed"),
        ];
        for (text, line, column, needle) in cases {
            let e = parse(text).expect_err(text);
            assert!(e.message.contains(needle), "{text:?}: {e}");
            assert_eq!((e.line, e.column), (line, column), "{text:?}: {e}");
        }
    }

    #[test]
    fn patterns_match_exact_prefix_and_plus_segments() {
        assert!(p("secret/data/app").matches("secret/data/app"));
        assert!(!p("secret/data/app").matches("secret/data/app/db"));
        assert!(p("secret/data/app*").matches("secret/data/app/db"));
        assert!(p("secret/data/app*").matches("secret/data/apples"));
        assert!(p("secret/data/+/db").matches("secret/data/app/db"));
        assert!(!p("secret/data/+/db").matches("secret/data/a/b/db"));
        assert!(!p("secret/data/+/db").matches("secret/data/app/dbx"));
        assert!(p("secret/data/+/db*").matches("secret/data/app/dbx"));
        assert!(p("secret/+/+").matches("secret/a/b"));
        assert!(!p("secret/+/+").matches("secret/a/b/c"));
        assert!(p("secret/+/*").matches("secret/a/b/c"));
        assert!(!p("secret/+/*").matches("secret/a"));
        assert!(p("*").matches("anything/at/all"));
    }

    #[test]
    fn the_most_specific_pattern_decides_by_vaults_priority_rules() {
        // 1. The first wildcard earlier loses.
        assert!(p("secret/+/bar").lower_than(&p("secret/foo/*")));
        // 2. A trailing `*` loses to an exact path.
        assert!(p("secret/foo*").lower_than(&p("secret/foo")));
        assert!(p("secret/*").lower_than(&p("secret/foo/*")));
        // 3. More `+` segments lose.
        assert!(p("secret/a/+/+").lower_than(&p("secret/a/+/cc")));
        // 4. The shorter loses.
        assert!(p("secret/+/x").lower_than(&p("secret/+/xy")));
        // 5. Lexicographically smaller loses.
        assert!(p("secret/+/a").lower_than(&p("secret/+/b")));
        // An exact path beats every pattern that matches the same path.
        for other in ["secret/foo*", "secret/+", "secret/*", "*"] {
            assert!(p(other).lower_than(&p("secret/foo")), "{other}");
        }

        let policy = parse(
            r#"
path "secret/data/*" { capabilities = ["read"] }
path "secret/data/app/*" { capabilities = ["read", "update"] }
path "secret/data/app/admin" { capabilities = ["deny"] }
path "secret/data/+/public" { capabilities = ["read", "list"] }
"#,
        )
        .expect("parses");
        let acl = Acl::new([&policy]);
        assert!(acl.allows("secret/data/app/db", Capability::Update));
        assert!(!acl.allows("secret/data/other", Capability::Update));
        assert!(acl.allows("secret/data/other", Capability::Read));
        assert!(
            !acl.allows("secret/data/app/admin", Capability::Read),
            "deny"
        );
        // `secret/data/app/*` (first wildcard later) beats `secret/data/+/public`.
        assert!(!acl.allows("secret/data/app/public", Capability::List));
        assert!(acl.allows("secret/data/web/public", Capability::List));
        assert!(
            !acl.allows("sys/policies", Capability::Read),
            "no rule: nothing"
        );
    }

    #[test]
    fn rules_for_the_same_path_merge_across_policies_and_deny_wins() {
        let a = parse(r#"path "secret/data/x" { capabilities = ["read"] }"#).expect("a");
        let b = parse(r#"path "secret/data/x" { capabilities = ["update"] }"#).expect("b");
        let c = parse(r#"path "secret/data/x" { capabilities = ["deny"] }"#).expect("c");
        let merged = Acl::new([&a, &b]);
        assert!(merged.allows("secret/data/x", Capability::Read));
        assert!(merged.allows("secret/data/x", Capability::Update));
        let denied = Acl::new([&a, &b, &c]);
        assert!(!denied.allows("secret/data/x", Capability::Read));
        assert!(!denied.allows("secret/data/x", Capability::Update));
    }

    #[test]
    fn a_whole_prefix_is_allowed_only_when_no_rule_under_it_says_otherwise() {
        let policy = parse(
            r#"
path "secret/data/app/*" { capabilities = ["read", "delete"] }
path "secret/data/app/keep/*" { capabilities = ["read"] }
path "secret/data/+/vault" { capabilities = ["deny"] }
path "secret/data/tmp/*" { capabilities = ["delete"] }
"#,
        )
        .expect("parses");
        let acl = Acl::new([&policy]);
        assert!(acl.allows_all_under("secret/data/app/cache/", Capability::Delete));
        assert!(
            !acl.allows_all_under("secret/data/app/", Capability::Delete),
            "app/keep/* holds no delete"
        );
        assert!(
            !acl.allows_all_under("secret/data/tmp/", Capability::Delete),
            "+/vault might match tmp/vault"
        );
        assert!(
            !acl.allows_all_under("secret/data/", Capability::Delete),
            "nothing covers all of secret/data/"
        );
        assert!(!acl.allows_all_under("secret/data/app/cache/", Capability::List));
        assert!(p("secret/data/+/vault").may_match_under("secret/data/x"));
        assert!(p("secret/data/+/vault").may_match_under("secret/data/x/va"));
        assert!(!p("secret/data/+/vault").may_match_under("secret/data/x/vb"));
        assert!(!p("secret/data/+/vault").may_match_under("secret/data/x/vault/"));
        assert!(p("secret/data/+/vault*").may_match_under("secret/data/x/vault/"));
        assert!(p("*").may_match_under("anything"));
        assert!(!p("secret/data/a").may_match_under("secret/data/b"));
        assert!(p("secret/data/ab").may_match_under("secret/data/a"));
        assert!(!p("secret/data/ab").may_match_under("secret/data/abc"));
        assert!(p("secret/data/ab*").may_match_under("secret/data/abc"));
    }

    /// A reference matcher written differently from [`Pattern::matches`]: the pattern as tokens
    /// (a literal character, `+` = any run of characters without `/`, a final `*` = anything),
    /// matched by plain backtracking.
    fn reference_matches(pattern: &str, path: &str) -> bool {
        fn go(p: &[char], s: &[char]) -> bool {
            match p.split_first() {
                None => s.is_empty(),
                Some(('*', [])) => true,
                Some(('+', rest)) => (0..=s.len())
                    .take_while(|&n| n == 0 || s[n - 1] != '/')
                    .any(|n| go(rest, &s[n..])),
                Some((c, rest)) => s.first() == Some(c) && go(rest, &s[1..]),
            }
        }
        let p: Vec<char> = pattern.chars().collect();
        let s: Vec<char> = path.chars().collect();
        go(&p, &s)
    }

    fn random_pattern(rng: &mut impl rand::Rng) -> String {
        let segments = rng.random_range(1..=4);
        let mut parts = Vec::new();
        for _ in 0..segments {
            parts.push(match rng.random_range(0..6) {
                0 => "+".to_string(),
                1 => String::new(),
                _ => (0..rng.random_range(1..=2))
                    .map(|_| if rng.random_bool(0.5) { 'a' } else { 'b' })
                    .collect(),
            });
        }
        let mut p = parts.join("/");
        if rng.random_bool(0.4) {
            p.push('*');
        }
        p
    }

    fn random_path(rng: &mut impl rand::Rng, len: usize) -> String {
        (0..len)
            .map(|_| match rng.random_range(0..3) {
                0 => 'a',
                1 => 'b',
                _ => '/',
            })
            .collect()
    }

    #[test]
    fn the_matcher_agrees_with_a_reference_on_random_patterns_and_paths() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut checked = 0;
        for _ in 0..20_000 {
            let text = random_pattern(&mut rng);
            let Ok(pattern) = Pattern::new(&text) else {
                continue;
            };
            let len = rng.random_range(0..=8);
            let path = random_path(&mut rng, len);
            assert_eq!(
                pattern.matches(&path),
                reference_matches(&text, &path),
                "pattern {text:?} path {path:?} (seed {seed})"
            );
            // Whole-prefix decisions rely on this never being wrong in one direction: if some
            // path under the prefix matches, `may_match_under` must say so.
            let len = rng.random_range(0..=4);
            let suffix = random_path(&mut rng, len);
            if reference_matches(&text, &format!("{path}{suffix}")) {
                assert!(
                    pattern.may_match_under(&path),
                    "pattern {text:?} matches {path:?} + {suffix:?} (seed {seed})"
                );
            }
            checked += 1;
        }
        assert!(checked > 10_000, "only {checked} valid patterns");
    }

    #[test]
    fn the_parser_survives_random_mutations_of_a_policy() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let original = r#"
# comment
path "secret/data/app/*" {
  capabilities = ["read", "list"]
}
// metadata
path "secret/metadata/app/*" { capabilities = ["list",] }
/* block */ path "secret/data/+/db" { capabilities = ["deny"] }
"#;
        let alphabet: Vec<char> = "path{}[]=,\"#/*+ \n\tabcreadlist\\é".chars().collect();
        for round in 0..20_000 {
            let mut text: Vec<char> = original.chars().collect();
            for _ in 0..rng.random_range(1..=4) {
                let at = rng.random_range(0..=text.len());
                match rng.random_range(0..3) {
                    0 if at < text.len() => {
                        text.remove(at);
                    }
                    1 => text.insert(at, alphabet[rng.random_range(0..alphabet.len())]),
                    _ => text.truncate(at),
                }
            }
            let text: String = text.into_iter().collect();
            match parse(&text) {
                Ok(policy) => {
                    for rule in &policy.rules {
                        Pattern::new(rule.pattern.as_str()).unwrap_or_else(|e| {
                            panic!(
                                "round {round} (seed {seed}): an invalid pattern was accepted: {e}"
                            )
                        });
                    }
                }
                Err(e) => {
                    let lines = text.lines().count().max(1) + 1;
                    assert!(
                        e.line >= 1 && e.line <= lines && e.column >= 1,
                        "round {round} (seed {seed}): error at {}:{} for {text:?}",
                        e.line,
                        e.column
                    );
                }
            }
        }
    }
}
