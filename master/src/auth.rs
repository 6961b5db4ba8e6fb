//! Who is calling the REST API and what they may do: API tokens (stored as SHA-256 hashes,
//! compared in constant time), their roles, and what a request without a token gets. It
//! decides identities only; which endpoint needs which role is the endpoint table's business
//! (`crate::http::endpoints`).

use rbb_schema::config::{Access, MasterConfig};
use sha2::{Digest, Sha256};

/// One configured token: its holder, its role, and the SHA-256 of the token.
#[derive(Debug, Clone)]
struct Token {
    name: String,
    role: Access,
    hash: [u8; 32],
}

/// The tokens a master accepts and the role of an anonymous caller.
#[derive(Debug, Clone)]
pub struct Tokens {
    tokens: Vec<Token>,
    anonymous: Access,
}

/// A caller the API recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name, or `anonymous`.
    pub name: String,
    pub role: Access,
    /// Whether the request carried a valid token.
    pub authenticated: bool,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// An `Authorization` header with a token no configured hash matches.
    WrongToken,
    /// An `Authorization` header that is not `Bearer <token>`.
    Malformed,
}

impl Tokens {
    /// Everything open to everyone: a master whose config sets no token at all.
    pub fn open() -> Tokens {
        Tokens { tokens: Vec::new(), anonymous: Access::Admin }
    }

    /// The tokens of a master config: `tokens`, plus `api_token` as an `admin` token named
    /// `api_token`. A malformed hash is an error naming the token.
    pub fn from_config(cfg: &MasterConfig) -> Result<Tokens, String> {
        let mut tokens = Vec::new();
        for (i, t) in cfg.tokens.iter().enumerate() {
            let hash = parse_hash(&t.hash).map_err(|why| format!("tokens[{i}] (`{}`): hash: {why}", t.name))?;
            if t.name.trim().is_empty() {
                return Err(format!("tokens[{i}]: name: it is empty"));
            }
            if tokens.iter().any(|o: &Token| o.name == t.name) {
                return Err(format!(
                    "tokens[{i}]: name: `{}` is used twice (the audit log names actions by it)",
                    t.name
                ));
            }
            if t.role == Access::None {
                return Err(format!("tokens[{i}] (`{}`): role: a token is read, control or admin", t.name));
            }
            tokens.push(Token { name: t.name.clone(), role: t.role, hash });
        }
        if let Some(plain) = &cfg.api_token {
            tokens.push(Token { name: "api_token".into(), role: Access::Admin, hash: sha256(plain.as_bytes()) });
        }
        let anonymous = match cfg.anonymous {
            Some(a) => a,
            None if tokens.is_empty() => Access::Admin,
            None if cfg.tokens.is_empty() => Access::Read,
            None => Access::None,
        };
        Ok(Tokens { tokens, anonymous })
    }

    /// What a caller without a token may do.
    pub fn anonymous(&self) -> Access {
        self.anonymous
    }

    /// Whether any token is configured (without one, everything is open).
    pub fn any(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The caller of a request with this `Authorization` header value (if any).
    pub fn caller(&self, authorization: Option<&str>) -> Result<Caller, Rejected> {
        let Some(value) = authorization else {
            return Ok(Caller { name: "anonymous".into(), role: self.anonymous, authenticated: false });
        };
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or(Rejected::Malformed)?;
        self.by_token(token).ok_or(Rejected::WrongToken)
    }

    /// The caller holding `token`, if it is configured. Every configured hash is compared,
    /// each in constant time.
    pub fn by_token(&self, token: &str) -> Option<Caller> {
        let given = sha256(token.as_bytes());
        let mut found = None;
        for t in &self.tokens {
            if constant_eq(&given, &t.hash) && found.is_none() {
                found = Some(Caller { name: t.name.clone(), role: t.role, authenticated: true });
            }
        }
        found
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// `sha256:<64 hex digits>` as bytes.
fn parse_hash(text: &str) -> Result<[u8; 32], String> {
    let hex = text.strip_prefix("sha256:").ok_or_else(|| {
        format!("`{text}` does not start with `sha256:` (run `rbb token new <name>` for a token and its hash)")
    })?;
    if hex.len() != 64 {
        return Err(format!("expected 64 hex digits after `sha256:`, found {}", hex.len()));
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16).ok_or_else(|| format!("`{}` is not a hex digit", c as char));
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Ok(out)
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

use rbb_schema::hex;

/// A fresh token (`rbb_` and 64 hex digits from the system's random source) and its
/// `sha256:` hash for the config.
pub fn new_token() -> std::io::Result<(String, String)> {
    use std::io::Read;
    let mut raw = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    let token = format!("rbb_{}", hex(&raw));
    let hash = format!("sha256:{}", hex(&sha256(token.as_bytes())));
    Ok((token, hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rbb_schema::config::ApiTokenConfig;

    fn config(tokens: &[(&str, &str, Access)], api_token: Option<&str>, anonymous: Option<Access>) -> MasterConfig {
        MasterConfig {
            tokens: tokens
                .iter()
                .map(|(name, token, role)| ApiTokenConfig {
                    name: (*name).into(),
                    hash: format!("sha256:{}", hex(&sha256(token.as_bytes()))),
                    role: *role,
                })
                .collect(),
            api_token: api_token.map(Into::into),
            anonymous,
            ..MasterConfig::default()
        }
    }

    #[test]
    fn tokens_name_their_holder_and_role() {
        let t =
            Tokens::from_config(&config(&[("ci-bot", "s3cret", Access::Control)], Some("old"), None)).expect("valid");
        assert_eq!(t.caller(Some("Bearer s3cret")).expect("known").name, "ci-bot");
        assert_eq!(t.caller(Some("Bearer s3cret")).expect("known").role, Access::Control);
        assert_eq!(t.caller(Some("Bearer old")).expect("known").role, Access::Admin);
        assert_eq!(t.caller(Some("Bearer nope")), Err(Rejected::WrongToken));
        assert_eq!(t.caller(Some("Basic abc")), Err(Rejected::Malformed));
        assert_eq!(t.caller(None).expect("anonymous").role, Access::None);
    }

    #[test]
    fn anonymous_defaults_follow_what_the_config_declares() {
        let open = Tokens::from_config(&config(&[], None, None)).expect("valid");
        assert_eq!(open.anonymous(), Access::Admin);
        let legacy = Tokens::from_config(&config(&[], Some("x"), None)).expect("valid");
        assert_eq!(legacy.anonymous(), Access::Read);
        let declared = Tokens::from_config(&config(&[("a", "b", Access::Read)], None, None)).expect("valid");
        assert_eq!(declared.anonymous(), Access::None);
        let explicit = Tokens::from_config(&config(&[("a", "b", Access::Read)], None, Some(Access::Read))).expect("ok");
        assert_eq!(explicit.anonymous(), Access::Read);
    }

    #[test]
    fn bad_hashes_are_explained() {
        let mut cfg = config(&[("a", "b", Access::Read)], None, None);
        cfg.tokens[0].hash = "md5:abc".into();
        let err = Tokens::from_config(&cfg).expect_err("bad");
        assert!(err.contains("tokens[0] (`a`): hash") && err.contains("rbb token new"), "{err}");
        cfg.tokens[0].hash = format!("sha256:{}", "z".repeat(64));
        assert!(Tokens::from_config(&cfg).expect_err("bad").contains("hex digit"));
    }

    #[test]
    fn new_tokens_verify_against_their_printed_hash() {
        let (token, hash) = new_token().expect("random");
        assert!(token.starts_with("rbb_") && token.len() == 68, "{token}");
        let mut cfg = config(&[], None, None);
        cfg.tokens.push(ApiTokenConfig { name: "n".into(), hash, role: Access::Admin });
        let t = Tokens::from_config(&cfg).expect("valid");
        assert_eq!(t.by_token(&token).expect("matches").name, "n");
        assert_ne!(new_token().expect("random").0, token);
    }
}
