//! The one way out for what the provider sends back.
//!
//! The rule: a client gets no byte and no header from the provider that the gateway did not
//! decode, check and write itself. An answer is decoded (as JSON, or as text when it is not
//! JSON); every string in it (keys and values, at any depth, and the text of every number and
//! literal) and every header of its head is searched for every secret the gateway holds, through
//! the layers a string can still carry one in (see `Scan::text`); then the gateway writes the
//! answer anew: the provider's JSON values unchanged (numbers as written, keys in order, a
//! refusal with the gateway's `code` added), and its own head (`Content-Type:
//! application/json`, its own headers; nothing of the provider's). An answer that carries a
//! secret is withheld: the client gets `502 upstream_secret_echo`, it is counted
//! (`upstream_secret_echo_total`) and logged (where and which kind of secret, never the secret),
//! and nothing is cached.
//!
//! `ProviderAnswer` is the only form in which a provider answer reaches the reply, the local
//! cache and the fleet's store, and only `Egress` makes one. A verdict read from the fleet's
//! store (another replica's, an older version's, or anything else under the key prefix) is
//! checked again before it is served; one in the local cache is checked again when a reload
//! changed the secrets, and not otherwise: a cache hit costs no check.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::BuildHasher;

use base64::Engine;
use bytes::Bytes;
use prometheus::IntCounter;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::config::{Config, TenantConfig};
use crate::error::GatewayError;
use crate::keys::OrgKeys;
use crate::secret::AdminToken;
use crate::verdict::UpstreamAnswer;

/// The media type of every answer the gateway writes.
pub const CONTENT_TYPE: &str = "application/json";

/// A provider answer that passed the egress check, as the gateway wrote it: the only form in
/// which one reaches a client, the cache or the fleet's store. Only `Egress` makes one.
#[derive(Debug, Clone)]
pub struct ProviderAnswer {
    status: u16,
    /// JSON the gateway wrote (`Content-Type: application/json`).
    body: Bytes,
    /// The secrets it was checked against (`Egress::id`).
    checked_by: u64,
}

impl ProviderAnswer {
    pub fn status(&self) -> u16 {
        self.status
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    #[cfg(test)]
    pub(crate) fn for_test(status: u16, body: &'static [u8]) -> ProviderAnswer {
        ProviderAnswer {
            status,
            body: Bytes::from_static(body),
            checked_by: 0,
        }
    }
}

/// Why an answer was withheld.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withheld {
    /// It carries a secret of the gateway's.
    SecretEcho,
    /// It is too deep, or holds too many layers, to be checked in bounded time: not passed on
    /// unchecked.
    Unchecked,
}

impl From<Withheld> for GatewayError {
    fn from(w: Withheld) -> Self {
        match w {
            Withheld::SecretEcho => GatewayError::UpstreamSecretEcho,
            Withheld::Unchecked => GatewayError::UpstreamInvalid,
        }
    }
}

/// Where an answer being checked comes from (for the log line).
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// The provider, just now, with this status.
    Provider(u16),
    /// The fleet's store.
    Store,
    /// An answer checked before a reload changed the secrets (in the cache, or shared by a
    /// call that was under way).
    Cache,
}

/// A secret the gateway holds, as a log line may name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// An organization key, by its id.
    OrgKey(String),
    /// A key of this tenant.
    TenantKey(String),
    AdminToken,
}

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Held::OrgKey(id) => write!(f, "organization key {id}"),
            Held::TenantKey(t) => write!(f, "a key of tenant {t}"),
            Held::AdminToken => f.write_str("the admin token"),
        }
    }
}

/// The egress check with the secrets of one config: the organization keys as they are, tenant
/// keys and the admin token as the SHA-256 digests the gateway holds of them.
pub struct Egress {
    keys: Vec<(String, memchr::memmem::Finder<'static>)>,
    digests: HashMap<[u8; 32], Held>,
    /// Names this set of secrets: an answer checked under another set is checked again.
    id: u64,
    echoes: IntCounter,
}

impl fmt::Debug for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Egress")
            .field("keys", &self.keys.len())
            .field("digests", &self.digests.len())
            .finish()
    }
}

impl Egress {
    /// The check with every secret of `config`; `echoes` counts the answers withheld for one.
    pub fn of(config: &Config, echoes: IntCounter) -> Egress {
        Egress::new(
            &config.upstream.keys,
            &config.tenants,
            config.admin_token.as_ref(),
            echoes,
        )
    }

    pub fn new(
        keys: &OrgKeys,
        tenants: &[TenantConfig],
        admin: Option<&AdminToken>,
        echoes: IntCounter,
    ) -> Egress {
        let mut digests = HashMap::new();
        for t in tenants {
            for d in &t.key_digests {
                digests.insert(*d, Held::TenantKey(t.id.clone()));
            }
        }
        if let Some(a) = admin {
            digests.insert(a.digest(), Held::AdminToken);
        }
        let keys: Vec<_> = keys
            .keys
            .iter()
            .filter(|k| !k.key.expose().is_empty())
            .map(|k| {
                let finder = memchr::memmem::Finder::new(k.key.expose().as_bytes()).into_owned();
                (k.id.clone(), finder)
            })
            .collect();
        let mut material: Vec<Vec<u8>> = keys
            .iter()
            .map(|(_, f)| [b"k:", f.needle()].concat())
            .chain(digests.keys().map(|d| [&b"d:"[..], d].concat()))
            .collect();
        material.sort();
        let mut h = blake3::Hasher::new();
        for m in &material {
            h.update(&(m.len() as u64).to_le_bytes());
            h.update(m);
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&h.finalize().as_bytes()[..8]);
        Egress {
            keys,
            digests,
            id: u64::from_le_bytes(id),
            echoes,
        }
    }

    /// Decode and check a fresh answer of the provider, its head and its body.
    pub fn check(&self, raw: &UpstreamAnswer) -> Result<Checked, Withheld> {
        let doc = Doc::decode(&raw.body);
        let mut scan = Scan::new(self, raw.body.len());
        let head = raw.head.iter().try_for_each(|(name, value)| {
            scan.trail.push("header");
            scan.text(name.as_str().as_bytes(), 0)?;
            scan.text(value.as_bytes(), 0)?;
            scan.trail.pop();
            Ok(())
        });
        let result = head.and_then(|()| scan.doc(&doc));
        self.verdict(scan, result, Source::Provider(raw.status))?;
        Ok(Checked {
            status: raw.status,
            doc: doc.map_err(|_| Withheld::Unchecked)?,
            checked_by: self.id,
        })
    }

    /// Check an answer the gateway stored (in the fleet's store, or in this process's cache
    /// under other secrets) as it checks a fresh one.
    pub fn check_stored(
        &self,
        status: u16,
        body: &[u8],
        source: Source,
    ) -> Result<ProviderAnswer, Withheld> {
        let doc = Doc::decode(body);
        let mut scan = Scan::new(self, body.len());
        let result = scan.doc(&doc);
        self.verdict(scan, result, source)?;
        let checked = Checked {
            status,
            doc: doc.map_err(|_| Withheld::Unchecked)?,
            checked_by: self.id,
        };
        Ok(checked.into_answer(None))
    }

    /// `None` when `answer` was checked against these very secrets (no work: the cache hit's
    /// path); otherwise the answer checked against them.
    pub fn recheck(&self, answer: &ProviderAnswer) -> Result<Option<ProviderAnswer>, Withheld> {
        if answer.checked_by == self.id {
            return Ok(None);
        }
        self.check_stored(answer.status, &answer.body, Source::Cache)
            .map(Some)
    }

    /// What a scan found, counted and logged once, in one place.
    fn verdict(
        &self,
        scan: Scan<'_>,
        result: Result<(), Stop>,
        source: Source,
    ) -> Result<(), Withheld> {
        match result {
            Ok(()) => Ok(()),
            Err(Stop::Found) => {
                self.echoes.inc();
                let (held, trail) = scan.found.unwrap_or((Held::AdminToken, String::new()));
                let place = if trail.is_empty() {
                    "body".to_string()
                } else {
                    trail
                };
                match source {
                    Source::Provider(status) => tracing::error!(
                        upstream_status = status,
                        secret = %held,
                        place = %place,
                        "the provider's answer contained a secret of the gateway's; it was withheld (the client got 502 upstream_secret_echo) and nothing was cached"
                    ),
                    Source::Store => tracing::error!(
                        secret = %held,
                        place = %place,
                        "a verdict in the shared store contained a secret of the gateway's; it was not served, and this call replaces it"
                    ),
                    Source::Cache => tracing::error!(
                        secret = %held,
                        place = %place,
                        "an answer checked before a reload contains a secret the config now holds; it was withheld (the client got 502 upstream_secret_echo) and dropped from the cache"
                    ),
                }
                Err(Withheld::SecretEcho)
            }
            Err(Stop::TooMuch) => {
                tracing::warn!(
                    bytes = scan.size,
                    "a provider answer nests too deep, or holds too many encodings, to be checked; it was not passed on (502 upstream_invalid_response)"
                );
                Err(Withheld::Unchecked)
            }
        }
    }
}

/// An answer that passed the check, before the gateway writes it.
pub struct Checked {
    status: u16,
    doc: Doc,
    checked_by: u64,
}

impl Checked {
    /// The answer as the client gets it: the provider's JSON as it was (its values unchanged),
    /// with `code` added when given (a refusal the gateway passes on); text, or JSON that is not
    /// an object, becomes `{"detail": …, "code": …}`.
    pub fn into_answer(self, code: Option<&str>) -> ProviderAnswer {
        let node = match (self.doc, code) {
            (Doc::Json(Node::Obj(mut pairs)), Some(code)) => {
                let mut named = false;
                for (_, v) in pairs.iter_mut().filter(|(k, _)| k == "code") {
                    *v = Node::Str(code.to_string());
                    named = true;
                }
                if !named {
                    pairs.push(("code".into(), Node::Str(code.into())));
                }
                Node::Obj(pairs)
            }
            (Doc::Json(node), None) => node,
            (Doc::Json(node), Some(code)) => detail(node, Some(code)),
            (Doc::Text(text), code) => detail(Node::Str(text), code),
        };
        // Writing a tree of strings and raw JSON into memory cannot fail.
        let body = serde_json::to_vec(&node).unwrap_or_default();
        ProviderAnswer {
            status: self.status,
            body: Bytes::from(body),
            checked_by: self.checked_by,
        }
    }
}

fn detail(value: Node, code: Option<&str>) -> Node {
    let mut pairs = vec![("detail".to_string(), value)];
    if let Some(code) = code {
        pairs.push(("code".into(), Node::Str(code.into())));
    }
    Node::Obj(pairs)
}

/// An answer body as decoded: JSON, or text (a body that is not JSON).
enum Doc {
    Json(Node),
    Text(String),
}

impl Doc {
    /// `Err` for JSON nested deeper than the gateway checks.
    fn decode(body: &[u8]) -> Result<Doc, TooDeep> {
        let text = String::from_utf8_lossy(body);
        match serde_json::from_str::<&RawValue>(&text) {
            Ok(raw) => Node::parse(raw.get(), 0).map(Doc::Json),
            Err(_) => Ok(Doc::Text(text.trim().to_string())),
        }
    }
}

/// A JSON value as the gateway holds a provider's: strings decoded (so they can be checked),
/// numbers and literals exactly as written (`1.50`, `1e3` stay so; serde_json's
/// `arbitrary_precision` would do the same for numbers, but it changes how every crate of the
/// build reads JSON numbers, and breaks the app tokens' `exp` check), object members in order,
/// duplicates kept.
#[derive(Debug, Clone)]
enum Node {
    Literal(Box<RawValue>),
    Str(String),
    Arr(Vec<Node>),
    Obj(Vec<(String, Node)>),
}

/// JSON nested deeper than `MAX_DEPTH`.
#[derive(Debug)]
struct TooDeep;

/// How deep a provider answer may nest (a verdict nests two levels).
const MAX_DEPTH: usize = 32;

impl Node {
    /// Each level is read as raw JSON first, so that a number keeps its text; a level costs one
    /// pass over its own text, and levels are at most `MAX_DEPTH`.
    fn parse(text: &str, depth: usize) -> Result<Node, TooDeep> {
        if depth > MAX_DEPTH {
            return Err(TooDeep);
        }
        let bad = |_| TooDeep;
        Ok(match text.as_bytes().first() {
            Some(b'{') => {
                let Members(members) = serde_json::from_str(text).map_err(bad)?;
                let mut pairs = Vec::with_capacity(members.len());
                for (k, v) in members {
                    pairs.push((k, Node::parse(v.get(), depth + 1)?));
                }
                Node::Obj(pairs)
            }
            Some(b'[') => {
                let items: Vec<&RawValue> = serde_json::from_str(text).map_err(bad)?;
                let mut nodes = Vec::with_capacity(items.len());
                for v in items {
                    nodes.push(Node::parse(v.get(), depth + 1)?);
                }
                Node::Arr(nodes)
            }
            Some(b'"') => Node::Str(serde_json::from_str(text).map_err(bad)?),
            _ => Node::Literal(serde_json::from_str(text).map_err(bad)?),
        })
    }
}

/// An object's members in order, duplicates kept, values raw.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, &'de RawValue>()? {
                    members.push((k, v));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

impl Serialize for Node {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Node::Literal(raw) => raw.serialize(s),
            Node::Str(text) => s.serialize_str(text),
            Node::Arr(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for i in items {
                    seq.serialize_element(i)?;
                }
                seq.end()
            }
            Node::Obj(pairs) => {
                let mut map = s.serialize_map(Some(pairs.len()))?;
                for (k, v) in pairs {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

/// How many layers deep a string is decoded (a base64 of a percent-encoded key is two).
const MAX_LAYERS: usize = 3;
/// Tokens shorter than this are not hashed against the digests.
const MIN_TOKEN: usize = 6;
/// Nor longer than this.
const MAX_TOKEN: usize = 1024;
/// The shortest run of base64 (or hex) worth decoding: it carries at least 6 bytes.
const MIN_ENCODED: usize = 8;

enum Stop {
    Found,
    /// The work budget ran out.
    TooMuch,
}

/// One check of one answer.
struct Scan<'a> {
    egress: &'a Egress,
    /// Bytes left to look at: decoding layers multiply the text, so a hostile answer is bounded.
    budget: usize,
    size: usize,
    /// The layers the string being looked at came through, for the log line.
    trail: Vec<&'static str>,
    found: Option<(Held, String)>,
    /// Decodings looked at already (by a keyed hash): `\/` then `%2B`, or `%2B` then `\/`,
    /// give the same text once.
    decoded: HashSet<u64>,
    /// Tokens hashed already (by a keyed hash of their bytes): a word that comes back in many
    /// strings and decodings costs one SHA-256.
    hashed: HashSet<u64>,
    seed: std::collections::hash_map::RandomState,
}

impl<'a> Scan<'a> {
    fn new(egress: &'a Egress, size: usize) -> Scan<'a> {
        Scan {
            egress,
            budget: size.saturating_mul(64).saturating_add(1 << 20),
            size,
            trail: Vec::new(),
            found: None,
            decoded: HashSet::new(),
            hashed: HashSet::new(),
            seed: Default::default(),
        }
    }

    fn doc(&mut self, doc: &Result<Doc, TooDeep>) -> Result<(), Stop> {
        match doc {
            Ok(Doc::Json(node)) => self.node(node, 0),
            Ok(Doc::Text(text)) => {
                self.trail.push("text");
                self.text(text.as_bytes(), 0)?;
                self.trail.pop();
                Ok(())
            }
            Err(TooDeep) => Err(Stop::TooMuch),
        }
    }

    fn node(&mut self, node: &Node, layer: usize) -> Result<(), Stop> {
        match node {
            // A number or literal is not decoded further; its text is still a string to match.
            Node::Literal(raw) => self.search(raw.get().as_bytes(), true),
            Node::Str(s) => self.text(s.as_bytes(), layer),
            Node::Arr(items) => items.iter().try_for_each(|n| self.node(n, layer)),
            Node::Obj(pairs) => pairs.iter().try_for_each(|(k, v)| {
                self.text(k.as_bytes(), layer)?;
                self.node(v, layer)
            }),
        }
    }

    fn found(&mut self, held: Held) -> Stop {
        self.found = Some((held, self.trail.join(" > ")));
        Stop::Found
    }

    /// Look for every secret in a decoded string: the organization keys anywhere in it, the
    /// digests against its key-shaped tokens. Then, up to `MAX_LAYERS` deep, the same in what
    /// the string still encodes: JSON (a string that is itself a document), backslash escapes
    /// (`\/`, `\uXXXX`, `\xHH`: JSON or JavaScript text that was not decoded as such, a
    /// fragment of it in plain text), percent-encoding (`%XX` in either case, `+` as a space or
    /// not), HTML character references, base64 (standard and URL-safe alphabets, each run of
    /// its characters read at all four alignments, since a key may sit at any byte of what was
    /// encoded) and hex (both alignments). Bytes that a decoding yields that are not text (a
    /// wrong alignment's noise, an image) are searched, not decoded further.
    fn text(&mut self, s: &[u8], layer: usize) -> Result<(), Stop> {
        self.search(s, true)?;
        if layer >= MAX_LAYERS {
            return Ok(());
        }
        let next = layer + 1;
        let as_text = std::str::from_utf8(s).ok();
        if let Some(t) = as_text.map(str::trim) {
            if t.len() > 1 && t.starts_with(['{', '[', '"']) {
                if let Ok(Doc::Json(node)) = Doc::decode(t.as_bytes()) {
                    self.budget = self.budget.checked_sub(t.len()).ok_or(Stop::TooMuch)?;
                    self.trail.push("JSON");
                    self.node(&node, next)?;
                    self.trail.pop();
                }
            }
        }
        if memchr::memchr(b'\\', s).is_some() {
            self.layer("backslash escapes", &unescape(s), s, next)?;
        }
        if memchr::memchr(b'%', s).is_some() {
            let decoded: Cow<[u8]> = percent_encoding::percent_decode(s).into();
            self.layer("percent-encoding", &decoded, s, next)?;
            if memchr::memchr(b'+', s).is_some() {
                let spaced: Vec<u8> = s
                    .iter()
                    .map(|&b| if b == b'+' { b' ' } else { b })
                    .collect();
                let decoded: Cow<[u8]> = percent_encoding::percent_decode(&spaced).into();
                self.layer("percent-encoding", &decoded, s, next)?;
            }
        }
        if memchr::memchr(b'&', s).is_some() {
            self.layer("HTML references", &html_unescape(s), s, next)?;
        }
        for run in runs(s, is_base64) {
            let run = trim_padding(run);
            if run.len() < MIN_ENCODED {
                continue;
            }
            for start in 0..4.min(run.len()) {
                if let Some(bytes) = base64_at(&run[start..]) {
                    self.layer("base64", &bytes, s, next)?;
                }
            }
        }
        for run in runs(s, |b| b.is_ascii_hexdigit()) {
            if run.len() < 2 * MIN_ENCODED {
                continue;
            }
            for start in 0..2 {
                let even = &run[start..start + (run.len() - start) / 2 * 2];
                if let Ok(bytes) = hex::decode(even) {
                    self.layer("hex", &bytes, s, next)?;
                }
            }
        }
        Ok(())
    }

    /// A decoding of `from`, when it changed anything: checked as text, or only searched when
    /// it is not text.
    fn layer(
        &mut self,
        name: &'static str,
        decoded: &[u8],
        from: &[u8],
        layer: usize,
    ) -> Result<(), Stop> {
        if decoded == from
            || decoded.is_empty()
            || !self.decoded.insert(self.seed.hash_one(decoded))
        {
            return Ok(());
        }
        self.trail.push(name);
        if std::str::from_utf8(decoded).is_ok() {
            self.text(decoded, layer)?;
        } else {
            self.search(decoded, false)?;
        }
        self.trail.pop();
        Ok(())
    }

    /// Look for every secret in `s` as it stands: the organization keys anywhere in it, the
    /// digests against its key-shaped tokens (in bytes that are not text, runs of key
    /// characters and generated keys only).
    fn search(&mut self, s: &[u8], text: bool) -> Result<(), Stop> {
        self.budget = self.budget.checked_sub(s.len()).ok_or(Stop::TooMuch)?;
        let egress = self.egress;
        for (id, finder) in &egress.keys {
            if finder.find(s).is_some() {
                let held = Held::OrgKey(id.clone());
                return Err(self.found(held));
            }
        }
        match self.tokens(s, text) {
            Some(held) => Err(self.found(held)),
            None => Ok(()),
        }
    }

    /// The secret whose digest matches a key-shaped token of `s`: the whole (trimmed) string,
    /// its maximal runs of key characters (`[A-Za-z0-9_-]`), of bearer-token characters (those
    /// and `.~+/=`), and of printable ASCII but quotes and brackets (in text only); and every
    /// `lgk_` followed by 64 hex digits (a key `keys new` made), wherever it sits.
    fn tokens(&mut self, s: &[u8], text: bool) -> Option<Held> {
        if self.egress.digests.is_empty() {
            return None;
        }
        let whole = s.trim_ascii();
        let wider = |class: fn(u8) -> bool| runs(s, class).filter(move |_| text);
        let candidates = std::iter::once(whole)
            .chain(runs(s, is_key_char))
            .chain(wider(|b| is_key_char(b) || b".~+/=".contains(&b)))
            .chain(wider(|b| {
                b.is_ascii_graphic() && !b"\"'`()<>[]{},;".contains(&b)
            }))
            .chain(generated_keys(s));
        for t in candidates {
            if t.len() < MIN_TOKEN
                || t.len() > MAX_TOKEN
                || !self.hashed.insert(self.seed.hash_one(t))
            {
                continue;
            }
            let d: [u8; 32] = Sha256::digest(t).into();
            if let Some(held) = self.egress.digests.get(&d) {
                return Some(held.clone());
            }
        }
        None
    }
}

fn is_key_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

fn is_base64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"+/-_".contains(&b)
}

/// The maximal runs of bytes that `class` accepts.
fn runs(s: &[u8], class: impl Fn(u8) -> bool) -> impl Iterator<Item = &[u8]> {
    s.split(move |&b| !class(b)).filter(|r| !r.is_empty())
}

fn trim_padding(run: &[u8]) -> &[u8] {
    let end = run.iter().rposition(|&b| b != b'=').map_or(0, |p| p + 1);
    &run[..end]
}

/// `lgk_` and 64 hex digits, wherever they are (see `tenant::new_key`).
fn generated_keys(s: &[u8]) -> impl Iterator<Item = &[u8]> {
    const LEN: usize = 4 + 64;
    memchr::memmem::find_iter(s, b"lgk_").filter_map(move |at| {
        let t = s.get(at..at + LEN)?;
        t[4..].iter().all(u8::is_ascii_hexdigit).then_some(t)
    })
}

/// Base64 (either alphabet) read from the start of `run`, whatever padding it lacks.
fn base64_at(run: &[u8]) -> Option<Vec<u8>> {
    const LENIENT: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let mut norm: Vec<u8> = run
        .iter()
        .map(|&b| match b {
            b'-' => b'+',
            b'_' => b'/',
            b => b,
        })
        .collect();
    // A length of 4n+1 has one character too many for any alignment.
    if norm.len() % 4 == 1 {
        norm.pop();
    }
    LENIENT.decode(&norm).ok()
}

/// Backslash escapes as JSON and JavaScript write them (`\/`, `\"`, `\n`, `\uXXXX` with
/// surrogate pairs, `\u{…}`, `\xHH`), read leniently: text that was not, or not wholly, decoded
/// as a JSON string. Hand-written: the JSON parsers refuse a fragment or a JavaScript escape.
fn unescape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    let hex_at = |at: usize, n: usize| -> Option<u32> {
        let digits = std::str::from_utf8(s.get(at..at + n)?).ok()?;
        u32::from_str_radix(digits, 16).ok()
    };
    let push_char = |out: &mut Vec<u8>, c: u32| {
        let c = char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER);
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    };
    while i < s.len() {
        if s[i] != b'\\' || i + 1 == s.len() {
            out.push(s[i]);
            i += 1;
            continue;
        }
        let e = s[i + 1];
        i += 2;
        match e {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'x' => match hex_at(i, 2) {
                Some(c) => {
                    push_char(&mut out, c);
                    i += 2;
                }
                None => out.push(e),
            },
            b'u' if s.get(i) == Some(&b'{') => {
                let end = s[i..].iter().position(|&b| b == b'}').map(|p| i + p);
                match end.and_then(|end| hex_at(i + 1, end - i - 1).map(|c| (c, end))) {
                    Some((c, end)) => {
                        push_char(&mut out, c);
                        i = end + 1;
                    }
                    None => out.push(e),
                }
            }
            b'u' => match hex_at(i, 4) {
                Some(hi @ 0xD800..=0xDBFF)
                    if s.get(i + 4..i + 6) == Some(b"\\u")
                        && hex_at(i + 6, 4).is_some_and(|lo| (0xDC00..=0xDFFF).contains(&lo)) =>
                {
                    let lo = hex_at(i + 6, 4).unwrap_or(0xDC00);
                    push_char(&mut out, 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00));
                    i += 10;
                }
                Some(c) => {
                    push_char(&mut out, c);
                    i += 4;
                }
                None => out.push(e),
            },
            other => out.push(other),
        }
    }
    out
}

/// HTML character references: numeric (`&#43;`, `&#x2B;`) and the named ones a key's
/// characters get (`&amp;`, `&lt;`, `&gt;`, `&quot;`, `&apos;`, `&sol;`, `&plus;`, `&equals;`).
fn html_unescape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let end = (s[i] == b'&')
            .then(|| s[i..s.len().min(i + 12)].iter().position(|&b| b == b';'))
            .flatten()
            .map(|p| i + p);
        let decoded = end.and_then(|end| {
            let name = std::str::from_utf8(&s[i + 1..end]).ok()?;
            let c = match name {
                "amp" => '&',
                "lt" => '<',
                "gt" => '>',
                "quot" => '"',
                "apos" => '\'',
                "sol" => '/',
                "plus" => '+',
                "equals" => '=',
                n => {
                    let n = n.strip_prefix('#')?;
                    let code = match n.strip_prefix(['x', 'X']) {
                        Some(h) => u32::from_str_radix(h, 16).ok()?,
                        None => n.parse().ok()?,
                    };
                    char::from_u32(code)?
                }
            };
            Some((c, end))
        });
        match decoded {
            Some((c, end)) => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                i = end + 1;
            }
            None => {
                out.push(s[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::NamedKey;
    use crate::secret::OrgApiKey;

    const KEY: &str = "Org/Secret+Key=42";
    const TENANT_KEY: &str = "lgk_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn egress_with(keys: &[&str], tenant_keys: &[&str], admin: Option<&str>) -> Egress {
        let keys = OrgKeys {
            keys: keys
                .iter()
                .enumerate()
                .map(|(n, k)| NamedKey {
                    id: format!("k{n}"),
                    key: OrgApiKey::new(*k),
                    file: None,
                })
                .collect(),
            default: None,
        };
        let tenant = TenantConfig {
            id: "t".into(),
            key_digests: tenant_keys
                .iter()
                .map(|k| Sha256::digest(k.as_bytes()).into())
                .collect(),
            disabled: false,
            rate: crate::limits::Rate::per_second(1),
            burst: 1,
            daily_budget: None,
            monthly_budget: None,
            require_header_credentials: false,
            price_per_call: None,
            allowed_origins: Vec::new(),
            org_keys: Vec::new(),
            allow_static_keys: true,
            require_tokens: Vec::new(),
            per_subject: None,
        };
        let admin = admin.map(AdminToken::new);
        Egress::new(
            &keys,
            &[tenant],
            admin.as_ref(),
            IntCounter::new("echoes", "echoes").expect("counter"),
        )
    }

    fn egress() -> Egress {
        egress_with(
            &[KEY],
            &[TENANT_KEY, "alpha-key"],
            Some("admin-token-never-print"),
        )
    }

    fn answer(status: u16, body: &str) -> UpstreamAnswer {
        UpstreamAnswer {
            status,
            head: http::HeaderMap::new(),
            body: Bytes::from(body.to_string()),
        }
    }

    fn withheld(e: &Egress, body: &str) -> bool {
        e.check(&answer(200, body)).is_err()
    }

    #[test]
    fn the_key_is_found_however_a_json_encoder_escaped_it() {
        let e = egress();
        let unicode: String = KEY
            .chars()
            .map(|c| format!("\\u{:04x}", c as u32))
            .collect();
        for body in [
            r#"{"api_key": "Org/Secret+Key=42"}"#.to_string(),
            r#"{"api_key": "Org\/Secret\u002BKey=42"}"#.to_string(),
            r#"{"api_key": "Org\/Secret+Key\u003d42"}"#.to_string(),
            format!(r#"{{"api_key": "{unicode}"}}"#),
            format!(r#"{{"{unicode}": 1}}"#),
            r#"{"detail": [{"loc": ["body"], "input": "Org/Secret+Key=42"}]}"#.to_string(),
            r#"[[[["x", {"deep": "Org\/Secret+Key=42"}]]]]"#.to_string(),
            // Plain text: a fragment of escaped JSON, percent-encoding, HTML references.
            r#"error: {"api_key": "Org\/Secret\u002bKey=42"#.to_string(),
            "api_key=Org%2FSecret%2BKey%3D42&x=1".to_string(),
            "api_key=Org%2fsecret".to_string() + "%2bKey%3d42 (lower case hex)",
            "<p>Org&#x2F;Secret&#43;Key&equals;42</p>".to_string(),
        ] {
            // The one with `secret` in lower case is not the key.
            let expected = !body.contains("Org%2fsecret");
            assert_eq!(withheld(&e, &body), expected, "{body}");
        }
    }

    #[test]
    fn layers_within_strings_are_decoded() {
        let e = egress();
        let b64 = base64::engine::general_purpose::STANDARD;
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut bodies = vec![
            // A string that is a JSON document itself, escaped once more.
            serde_json::json!({"debug": serde_json::json!({"api_key": KEY}).to_string()})
                .to_string(),
            serde_json::json!({"debug": r#"{"api_key":"Org\/Secret\u002bKey=42"}"#}).to_string(),
            // Percent-encoding, with `+` for a space beside it.
            serde_json::json!({"q": "a+b&api_key=Org%2FSecret%2BKey%3D42"}).to_string(),
        ];
        // Base64 of text with the key at each byte offset, in both alphabets, with and without
        // the padding and in a longer run of base64 characters.
        for prefix in ["", "a", "ab", "abc"] {
            let text = format!("{prefix}api_key={KEY};");
            bodies.push(serde_json::json!({"blob": b64.encode(&text)}).to_string());
            bodies
                .push(serde_json::json!({"blob": format!("xyz{}", url.encode(&text))}).to_string());
            bodies.push(serde_json::json!({"blob": format!("data:{}", b64.encode(format!("k={}", url.encode(&text))))}).to_string());
        }
        // Hex, and base64 of percent-encoding.
        bodies.push(serde_json::json!({"hex": hex::encode(format!("x{KEY}"))}).to_string());
        bodies.push(serde_json::json!({"b": b64.encode("Org%2FSecret%2BKey%3D42")}).to_string());
        for body in &bodies {
            assert!(withheld(&e, body), "{body}");
        }
    }

    #[test]
    fn tenant_keys_and_the_admin_token_are_found_by_their_digests() {
        let e = egress();
        let b64 = base64::engine::general_purpose::STANDARD;
        for body in [
            r#"{"x": "alpha-key"}"#.to_string(),
            r#"{"x": "Bearer alpha-key"}"#.to_string(),
            r#"{"x": "k=alpha-key&y=1"}"#.to_string(),
            r#"{"x": "\u0061lpha-key"}"#.to_string(),
            format!(r#"{{"x": "{}"}}"#, b64.encode("alpha-key")),
            format!(r#"{{"x": "prefix{TENANT_KEY}suffix"}}"#),
            format!(
                r#"{{"x": "{}"}}"#,
                b64.encode(format!("token={TENANT_KEY}"))
            ),
            r#"{"x": "admin-token-never-print"}"#.to_string(),
            "text: Authorization: Bearer admin-token-never-print".to_string(),
        ] {
            assert!(withheld(&e, &body), "{body}");
        }
        assert!(!withheld(&e, r#"{"x": "alpha-keys", "y": "alpha"}"#));
    }

    #[test]
    fn a_header_with_a_secret_withholds_the_answer() {
        let e = egress();
        let mut raw = answer(200, r#"{"result": true}"#);
        raw.head.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json; x=Org/Secret+Key=42"),
        );
        assert_eq!(e.check(&raw).err(), Some(Withheld::SecretEcho));
        raw.head.clear();
        raw.head
            .insert("x-debug", http::HeaderValue::from_static("YWxwaGEta2V5"));
        assert_eq!(e.check(&raw).err(), Some(Withheld::SecretEcho));
        assert_eq!(e.echoes.get(), 2);
    }

    #[test]
    fn clean_answers_pass_with_their_values_as_written() {
        let e = egress();
        let body = r#"{"backend_session_id": "3f2a9c1e-7b4d-4e5f-8a9b-0c1d2e3f4a5b", "result": true,
            "prediction": "0.982312", "score": 0.98231200, "big": 123456789012345678901234567890,
            "exp": 1E+2, "created_at": "2026-11-25T10:00:00.000Z", "failure_reason": null,
            "dup": 1, "dup": 2, "unicode": "\u00e9\ud83d\ude00", "list": [true, false, -0.0]}"#;
        let checked = e.check(&answer(200, body)).expect("clean");
        let out = checked.into_answer(None);
        let text = std::str::from_utf8(out.body()).expect("utf8");
        assert_eq!(
            text,
            r#"{"backend_session_id":"3f2a9c1e-7b4d-4e5f-8a9b-0c1d2e3f4a5b","result":true,"prediction":"0.982312","score":0.98231200,"big":123456789012345678901234567890,"exp":1E+2,"created_at":"2026-11-25T10:00:00.000Z","failure_reason":null,"dup":1,"dup":2,"unicode":"é😀","list":[true,false,-0.0]}"#
        );
        assert_eq!(out.status(), 200);
        assert_eq!(e.echoes.get(), 0);
    }

    #[test]
    fn refusals_get_the_code_and_text_is_wrapped() {
        let e = egress();
        let code = Some("upstream_no_subscription");
        let write = |status, body: &str| {
            let a = e
                .check(&answer(status, body))
                .expect("clean")
                .into_answer(code);
            String::from_utf8(a.body().to_vec()).expect("utf8")
        };
        assert_eq!(
            write(
                400,
                r#"{"detail": "Client does not have subscription", "n": 1.0}"#
            ),
            r#"{"detail":"Client does not have subscription","n":1.0,"code":"upstream_no_subscription"}"#
        );
        assert_eq!(
            write(400, r#"{"code": 7, "detail": "x"}"#),
            r#"{"code":"upstream_no_subscription","detail":"x"}"#
        );
        assert_eq!(
            write(400, "  Client does not have subscription\n"),
            r#"{"detail":"Client does not have subscription","code":"upstream_no_subscription"}"#
        );
        assert_eq!(
            write(400, r#"["Client does not have subscription"]"#),
            r#"{"detail":["Client does not have subscription"],"code":"upstream_no_subscription"}"#
        );
    }

    #[test]
    fn hostile_answers_are_bounded() {
        let e = egress();
        let deep = "[".repeat(40) + &"]".repeat(40);
        assert_eq!(
            e.check(&answer(200, &deep)).err(),
            Some(Withheld::Unchecked)
        );
        // Layer upon layer of base64 in a large answer: checked in bounded work, or withheld.
        let mut s = String::from("x");
        for _ in 0..6 {
            s = base64::engine::general_purpose::STANDARD.encode(s.repeat(3));
        }
        let body = serde_json::json!({ "blob": s }).to_string();
        let started = std::time::Instant::now();
        let _ = e.check(&answer(200, &body));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn a_stored_answer_is_checked_again_only_under_other_secrets() {
        let before = egress_with(&[KEY], &[], None);
        let a = before
            .check(&answer(
                200,
                r#"{"result": true, "note": "gamma-key-1234"}"#,
            ))
            .expect("clean")
            .into_answer(None);
        assert!(
            before.recheck(&a).expect("same").is_none(),
            "no work on a hit"
        );
        let same_secrets = egress_with(&[KEY], &[], None);
        assert!(same_secrets.recheck(&a).expect("same").is_none());
        let after = egress_with(&[KEY], &["gamma-key-1234"], None);
        assert_eq!(after.recheck(&a).err(), Some(Withheld::SecretEcho));
        let other = egress_with(&[KEY], &["delta-key-1234"], None);
        let again = other.recheck(&a).expect("clean").expect("checked again");
        assert_eq!(again.body(), a.body());
        assert!(other.recheck(&again).expect("same").is_none());
    }

    proptest::proptest! {
        /// Any key, in any of the encodings, anywhere in a string of a verdict or in a plain
        /// text, is found; and the same answers without it pass.
        #[test]
        fn a_key_is_found_in_any_encoding_anywhere(
            key in "[A-Za-z0-9/+=_.~-]{12,40}",
            before in "[ -~]{0,20}",
            after in "[ -~]{0,20}",
            how in 0usize..8,
            in_text: bool,
        ) {
            let e = egress_with(&[key.as_str()], &[], None);
            let b64 = base64::engine::general_purpose::STANDARD;
            let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            let unicode: String = key.chars().map(|c| format!("\\u{:04X}", c as u32)).collect();
            let percent: String = key
                .bytes()
                .map(|b| match b.is_ascii_alphanumeric() {
                    true => (b as char).to_string(),
                    false => format!("%{b:02x}"),
                })
                .collect();
            let plain = format!("{before}{key}{after}");
            let encoded = match how {
                0 => plain.clone(),
                1 => format!("{before}{}{after}", key.replace('/', "\\/")),
                2 => format!("{before}{unicode}{after}"),
                3 => format!("{before}{percent}{after}"),
                4 => b64.encode(&plain),
                5 => format!("{before}{}", url.encode(format!("x={key}&{after}"))),
                6 => hex::encode(&plain),
                _ => serde_json::json!({ "nested": plain }).to_string(),
            };
            let wrap = |s: &str| {
                if in_text {
                    s.to_string()
                } else {
                    serde_json::json!({ "result": true, "debug": s }).to_string()
                }
            };
            let (body, clean) = (wrap(&encoded), wrap(&format!("{before}nothing to see{after}")));
            proptest::prop_assert_eq!(
                e.check(&answer(200, &body)).err(),
                Some(Withheld::SecretEcho)
            );
            proptest::prop_assert!(e.check(&answer(200, &clean)).is_ok());
        }
    }

    #[test]
    fn unescaping_is_lenient() {
        assert_eq!(
            unescape(br"a\/b\u002Bc\x3d\u{1F600}\q\"),
            "a/b+c=😀q\\".as_bytes()
        );
        assert_eq!(unescape(br"\ud83d\ude00 \ud83d"), "😀 \u{fffd}".as_bytes());
        assert_eq!(
            html_unescape(b"a&amp;b&#47;&#x2b;&bogus;&"),
            b"a&b/+&bogus;&"
        );
    }
}
