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
//! changed the secrets (or this process learnt a secret's probe, see `Seen`), and not otherwise:
//! a cache hit costs no check.
//!
//! Where the line is. A provider that means to hide a secret can always do so (a cipher, a
//! compression or an alphabet of its own, a transformation of its own). The check is built to
//! catch every way a secret is *echoed* by software: debug dumps of the request, validation
//! errors, logs embedded in answers, and what the serializers of common languages write. So a
//! secret is found as it is, in each string, and in the concatenation of all the strings of a
//! document in order (a value split over adjacent fields, object keys or array items); an array
//! of numbers is read as the bytes or characters it lists; a text is also searched with white
//! space, NULs (UTF-16 text), zero-width, bidirectional and replacement characters dropped and
//! fullwidth forms folded; and every text is decoded, up to `MAX_LAYERS` deep, through JSON in
//! a string, backslash escapes (JSON, JavaScript, C: `\/`, `\uXXXX`, `\xHH`, octal), percent
//! encoding (`%XX`, `%uXXXX`, `+`), HTML references (named, decimal and hex, with or without
//! `;`), quoted-printable, UTF-16, base64 (both alphabets, every alignment, wrapped in lines or
//! broken by spaces), base32, hex (with or without separators), lists of byte values (`0x5a,`,
//! `90, 107`), and gzip or zlib streams inside a decoded blob. An organization key is also
//! found reversed and in rot13. Not caught: other compressions (raw deflate, brotli, zstd),
//! base85, ciphers and hashes, case changes, and any encoding not listed here. Tenant keys and
//! the admin token are held only as digests: a piece of text can only be hashed and compared.
//! Each is found as a key-shaped token (split at every delimiter: quotes, white space,
//! `=&?;:,` and the like, and at every `-_./+~` inside a word), and, once this process had it
//! in hand (the admin token when the config is read, a tenant key when it authenticates a
//! request), anywhere at all (see `Probe`).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::BuildHasher;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use base64::Engine;
use bytes::Bytes;
use prometheus::IntCounter;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::config::{
    print_of, print_seeds, AdminToken, Config, OrgKeys, Probe, TenantConfig, TenantKey,
};
use crate::error::GatewayError;
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
    /// The secrets it was checked against.
    checked_by: Stamp,
}

/// What an answer was checked against: the secrets of a config (`Egress::id`) and the probes
/// this process had learnt then (`Probes::generation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    secrets: u64,
    probes: u64,
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
            checked_by: Stamp {
                secrets: 0,
                probes: 0,
            },
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
    /// A header value the gateway sends its trace collector (`tracing.headers_env`).
    CollectorHeader,
}

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Held::OrgKey(id) => write!(f, "organization key {id}"),
            Held::TenantKey(t) => write!(f, "a key of tenant {t}"),
            Held::AdminToken => f.write_str("the admin token"),
            Held::CollectorHeader => f.write_str("a header of the trace collector"),
        }
    }
}

/// The egress check with the secrets of one config: the organization keys as they are, tenant
/// keys and the admin token as the SHA-256 digests the gateway holds of them (and the probes of
/// those this process has had in hand).
pub struct Egress {
    /// Every organization key, reversed and in rot13 too: one pass over a text finds them all.
    needles: Option<aho_corasick::AhoCorasick>,
    /// The id of the key each needle is a form of.
    needle_keys: Vec<Held>,
    digests: HashMap<[u8; 32], Held>,
    seen: Seen,
    /// `(generation << 1) | 1` when every digest had a probe at that generation of `seen`,
    /// `generation << 1` when not (and `u64::MAX` before the first check): then no token needs
    /// hashing.
    probed: AtomicU64,
    /// Names this set of secrets: an answer checked under another set is checked again.
    id: u64,
    echoes: IntCounter,
}

impl fmt::Debug for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Egress")
            .field("keys", &self.needle_keys.len())
            .field("digests", &self.digests.len())
            .finish()
    }
}

impl Egress {
    /// The check with every secret of `config`; `echoes` counts the answers withheld for one;
    /// `seen` holds the probes learnt so far (kept across reloads).
    pub fn of(config: &Config, echoes: IntCounter, seen: &Seen) -> Egress {
        // The collector's header values (a vendor's API key) are held as the organization keys
        // are: known as they are, looked for as they are; 8 characters or more, as shorter ones
        // are names (a dataset), not credentials.
        let collector: Vec<&[u8]> = (config.tracing.iter())
            .flat_map(|t| t.headers.iter())
            .map(|(_, v)| v.as_bytes())
            .filter(|v| v.len() >= 8)
            .collect();
        Egress::sharing(
            &config.upstream.keys,
            &collector,
            &config.tenants,
            config.admin_token.as_ref(),
            echoes,
            seen.clone(),
        )
    }

    /// A check that has learnt no probe yet.
    pub fn new(
        keys: &OrgKeys,
        tenants: &[TenantConfig],
        admin: Option<&AdminToken>,
        echoes: IntCounter,
    ) -> Egress {
        Egress::sharing(keys, &[], tenants, admin, echoes, Seen::default())
    }

    fn sharing(
        keys: &OrgKeys,
        collector: &[&[u8]],
        tenants: &[TenantConfig],
        admin: Option<&AdminToken>,
        echoes: IntCounter,
        seen: Seen,
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
        // Probes of secrets no longer held are dropped; the admin token's is known from the
        // config.
        seen.retain(&digests);
        if let Some(a) = admin {
            seen.learn(a.digest(), a.probe());
        }
        let keys: Vec<(Held, &[u8])> = (keys.keys.iter())
            .filter(|k| !k.key.expose().is_empty())
            .map(|k| (Held::OrgKey(k.id.clone()), k.key.expose().as_bytes()))
            .chain(collector.iter().map(|v| (Held::CollectorHeader, *v)))
            .collect();
        let (mut patterns, mut needle_keys) = (Vec::new(), Vec::new());
        for (held, key) in &keys {
            let reversed: Vec<u8> = key.iter().rev().copied().collect();
            let rot13: Vec<u8> = key.iter().map(|&b| rot13(b)).collect();
            for form in [key.to_vec(), reversed, rot13] {
                if !patterns.contains(&form) {
                    patterns.push(form);
                    needle_keys.push(held.clone());
                }
            }
        }
        // Building the automaton of a few dozen bytes cannot fail; without one, no key is held.
        let needles = (!patterns.is_empty())
            .then(|| aho_corasick::AhoCorasick::new(&patterns).ok())
            .flatten();
        let mut material: Vec<Vec<u8>> = keys
            .iter()
            .map(|(_, k)| [b"k:", *k].concat())
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
            needles,
            needle_keys,
            digests,
            seen,
            probed: AtomicU64::new(u64::MAX),
            id: u64::from_le_bytes(id),
            echoes,
        }
    }

    /// A tenant key that just authenticated a request: its probe is learnt (once), so that it is
    /// found anywhere in an answer from now on.
    pub fn learn(&self, key: &TenantKey) {
        let digest = key.digest();
        if self.digests.contains_key(&digest) && !self.seen.knows(&digest) {
            self.seen.learn(digest, Probe::of(key.as_str().as_bytes()));
        }
    }

    /// Whether `text` carries a secret of the gateway's, in any form the check decodes (for a
    /// value a client sent that the gateway would repeat, such as its request id). Not counted.
    pub fn holds_secret(&self, text: &[u8]) -> bool {
        let probes = self.seen.snapshot();
        let mut scan = Scan::new(self, &probes, text.len());
        // A text too costly to check is taken as one that holds a secret.
        scan.text(text, 0).is_err()
    }

    fn stamp(&self, generation: u64) -> Stamp {
        Stamp {
            secrets: self.id,
            probes: generation,
        }
    }

    /// Whether some digest has no probe (then the key-shaped tokens of a text are hashed).
    fn needs_tokens(&self, probes: &Probes) -> bool {
        let g = probes.generation << 1;
        match self.probed.load(Ordering::Relaxed) {
            v if v == g | 1 => return false,
            v if v == g => return true,
            _ => {}
        }
        let all = self.digests.keys().all(|d| probes.probed(d));
        self.probed.store(g | u64::from(all), Ordering::Relaxed);
        !all
    }

    /// Decode and check a fresh answer of the provider, its head and its body.
    pub fn check(&self, raw: &UpstreamAnswer) -> Result<Checked, Withheld> {
        let doc = Doc::decode(&raw.body);
        let probes = self.seen.snapshot();
        let mut scan = Scan::new(self, &probes, raw.body.len());
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
            checked_by: self.stamp(probes.generation),
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
        let probes = self.seen.snapshot();
        let mut scan = Scan::new(self, &probes, body.len());
        let result = scan.doc(&doc);
        self.verdict(scan, result, source)?;
        let checked = Checked {
            status,
            doc: doc.map_err(|_| Withheld::Unchecked)?,
            checked_by: self.stamp(probes.generation),
        };
        Ok(checked.into_answer(None))
    }

    /// `None` when `answer` was checked against these very secrets and probes (no work: the
    /// cache hit's path); otherwise the answer checked against them.
    pub fn recheck(&self, answer: &ProviderAnswer) -> Result<Option<ProviderAnswer>, Withheld> {
        if answer.checked_by == self.stamp(self.seen.generation()) {
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
    checked_by: Stamp,
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

/// How many layers deep a string is decoded (a base64 of a percent-encoded key is two; a
/// debug dump of a debug dump, base64 four times over, is four).
const MAX_LAYERS: usize = 5;
/// Tokens shorter than this are not hashed against the digests.
const MIN_TOKEN: usize = 6;
/// Nor longer than this.
const MAX_TOKEN: usize = 1024;
/// The shortest run of base64 (or hex) worth decoding: it carries at least 6 bytes.
const MIN_ENCODED: usize = 8;
/// A key-shaped word is hashed whole and in every span of at most this many of its pieces
/// between `-_./+~` (a UUID has five): linear in the word, whatever its length.
const MAX_PIECES: usize = 8;
/// The most a gzip or zlib stream inside an answer is inflated to.
const MAX_INFLATED: u64 = 1 << 20;
/// The least budget one SHA-256 of a token costs (a block): a text of many short tokens is
/// bounded by the budget too.
const HASH_COST: usize = 64;

enum Stop {
    Found,
    /// The work budget ran out.
    TooMuch,
}

/// How a text is searched.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Decoded text: every kind of token.
    Text,
    /// Bytes that are not text (a wrong alignment's noise, an image): runs of key characters
    /// and generated keys only.
    Bytes,
    /// A text with white space and invisible characters dropped: no tokens (its words are
    /// glued), the keys and the probes only.
    Normalised,
}

/// The strings of a JSON document in order, one a line: all of them, the values alone, the
/// object keys alone.
#[derive(Default)]
struct Joined {
    all: Vec<u8>,
    values: Vec<u8>,
    names: Vec<u8>,
}

impl Joined {
    fn line(to: &mut Vec<u8>, s: &[u8]) {
        if !to.is_empty() {
            to.push(b'\n');
        }
        to.extend_from_slice(s);
    }

    fn value(&mut self, s: &[u8]) {
        Joined::line(&mut self.all, s);
        Joined::line(&mut self.values, s);
    }

    fn name(&mut self, s: &[u8]) {
        Joined::line(&mut self.all, s);
        Joined::line(&mut self.names, s);
    }
}

/// One check of one answer.
struct Scan<'a> {
    egress: &'a Egress,
    probes: &'a Probes,
    /// Whether key-shaped tokens are hashed (some digest has no probe).
    tokens: bool,
    /// Bytes left to look at: decoding layers multiply the text, so a hostile answer is bounded.
    budget: usize,
    size: usize,
    /// The layers the string being looked at came through, for the log line.
    trail: Vec<&'static str>,
    found: Option<(Held, String)>,
    /// Decodings looked at already (by a keyed hash): `\/` then `%2B`, or `%2B` then `\/`,
    /// give the same text once.
    decoded: HashSet<u64, foldhash::fast::RandomState>,
    /// Tokens hashed already (by a keyed hash of their bytes): a word that comes back in many
    /// strings and decodings costs one SHA-256.
    hashed: HashSet<u64, foldhash::fast::RandomState>,
    seed: foldhash::fast::RandomState,
}

impl<'a> Scan<'a> {
    fn new(egress: &'a Egress, probes: &'a Probes, size: usize) -> Scan<'a> {
        Scan {
            egress,
            probes,
            tokens: egress.needs_tokens(probes),
            budget: size.saturating_mul(64).saturating_add(1 << 20),
            size,
            trail: Vec::new(),
            found: None,
            decoded: HashSet::with_capacity_and_hasher(16, Default::default()),
            hashed: HashSet::with_capacity_and_hasher(64, Default::default()),
            seed: Default::default(),
        }
    }

    fn charge(&mut self, n: usize) -> Result<(), Stop> {
        self.budget = self.budget.checked_sub(n).ok_or(Stop::TooMuch)?;
        Ok(())
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

    /// A JSON document is checked as one text: every string in it (keys and values, at any
    /// depth, and the text of every number and literal), in document order, one a line. So a
    /// secret split over adjacent strings (two fields, two keys, an array of characters) is
    /// whole in it once the line breaks are dropped (see `normalise`), and every decoding runs
    /// once over the document rather than once per string.
    ///
    /// The values alone, and the object keys alone, joined, are searched too (with the line
    /// breaks dropped): a secret split over two fields has their names between its pieces in
    /// the whole text, one split over two keys their values.
    fn node(&mut self, node: &Node, layer: usize) -> Result<(), Stop> {
        let mut lines = Joined::default();
        self.collect(node, layer, &mut lines)?;
        self.examine(&lines.all, layer, false)?;
        for part in [&lines.values, &lines.names] {
            if part.len() != lines.all.len() {
                if let Some(joined) = normalise(part) {
                    self.trail.push("strings joined");
                    self.search(&joined, Kind::Normalised)?;
                    self.trail.pop();
                }
            }
        }
        Ok(())
    }

    fn collect(&mut self, node: &Node, layer: usize, lines: &mut Joined) -> Result<(), Stop> {
        match node {
            Node::Literal(raw) => lines.value(raw.get().as_bytes()),
            Node::Str(s) => {
                lines.value(s.as_bytes());
                self.json_in(s.as_bytes(), layer)?;
            }
            Node::Arr(items) => {
                // An array of numbers is the bytes (or UTF-16 units) it lists: a serialized
                // `Vec<u8>`, `list(bytes)`, a `char[]`.
                if let Some(listed) = numbers(items) {
                    if std::str::from_utf8(&listed).is_ok() {
                        lines.value(&listed);
                    } else if layer < MAX_LAYERS {
                        self.layer("array of numbers", &listed, b"", layer + 1)?;
                    }
                }
                for n in items {
                    self.collect(n, layer, lines)?;
                }
            }
            Node::Obj(pairs) => {
                for (k, v) in pairs {
                    lines.name(k.as_bytes());
                    self.json_in(k.as_bytes(), layer)?;
                    self.collect(v, layer, lines)?;
                }
            }
        }
        Ok(())
    }

    fn found(&mut self, held: Held) -> Stop {
        self.found = Some((held, self.trail.join(" > ")));
        Stop::Found
    }

    /// Look for every secret in a decoded string, then in what it still encodes (see `examine`).
    fn text(&mut self, s: &[u8], layer: usize) -> Result<(), Stop> {
        self.examine(s, layer, true)
    }

    /// A string that is a JSON document itself, checked as one.
    fn json_in(&mut self, s: &[u8], layer: usize) -> Result<(), Stop> {
        if layer >= MAX_LAYERS {
            return Ok(());
        }
        let t = s.trim_ascii();
        if t.len() > 1 && matches!(t[0], b'{' | b'[' | b'"') {
            if let Ok(Doc::Json(node)) = Doc::decode(t) {
                self.charge(t.len())?;
                self.trail.push("JSON");
                self.node(&node, layer + 1)?;
                self.trail.pop();
            }
        }
        Ok(())
    }

    /// Look for every secret in a decoded string: the organization keys anywhere in it, the
    /// digests against its key-shaped tokens and probes; the same with white space and
    /// invisible characters dropped. Then, up to `MAX_LAYERS` deep, the same in what the string
    /// still encodes (see the module's documentation for the list). Bytes that a decoding
    /// yields that are not text (a wrong alignment's noise, an image) are searched, and inflated
    /// when they are a gzip or zlib stream, not decoded further.
    fn examine(&mut self, s: &[u8], layer: usize, json: bool) -> Result<(), Stop> {
        self.search(s, Kind::Text)?;
        if let Some(n) = normalise(s) {
            self.trail.push("white space dropped");
            self.search(&n, Kind::Normalised)?;
            self.trail.pop();
        }
        if layer >= MAX_LAYERS {
            return Ok(());
        }
        let next = layer + 1;
        if json {
            self.json_in(s, layer)?;
        }
        if memchr::memchr(b'\\', s).is_some() {
            self.layer("backslash escapes", &unescape(s), s, next)?;
            // What a client that only strips backslashes reads (PHP's `stripslashes`, a
            // `replace("\\/", "/")`): `\r` there is `r`, not a carriage return.
            self.layer("backslashes dropped", &strip_slashes(s), s, next)?;
        }
        if memchr::memchr(b'%', s).is_some() {
            self.layer("percent-encoding", &percent_decode(s, false), s, next)?;
            if memchr::memchr(b'+', s).is_some() {
                self.layer("percent-encoding", &percent_decode(s, true), s, next)?;
            }
        }
        if memchr::memchr(b'&', s).is_some() {
            self.layer("HTML references", &html_unescape(s), s, next)?;
        }
        if let Some(decoded) = quoted_printable(s) {
            self.layer("quoted-printable", &decoded, s, next)?;
        }
        if memchr::memchr(0, s).is_some() {
            let narrowed: Vec<u8> = s.iter().copied().filter(|&b| b != 0).collect();
            self.layer("UTF-16", &narrowed, s, next)?;
        }
        for run in runs(s, |b| is_base64(b) || b.is_ascii_whitespace()) {
            for encoded in base64_runs(run) {
                for start in 0..4.min(encoded.len()) {
                    if let Some(bytes) = base64_at(&encoded[start..]) {
                        self.layer("base64", &bytes, s, next)?;
                    }
                }
            }
        }
        for run in runs(s, is_base32) {
            let run = trim_padding(run);
            if run.len() < 2 * MIN_ENCODED {
                continue;
            }
            for start in 0..8 {
                if let Some(bytes) = base32_at(&run[start..]) {
                    self.layer("base32", &bytes, s, next)?;
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
        for listed in byte_lists(s) {
            self.layer("a list of byte values", &listed, s, next)?;
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
            self.search(decoded, Kind::Bytes)?;
            if layer < MAX_LAYERS {
                if let Some((name, inflated)) = inflate(decoded, self.budget) {
                    self.charge(inflated.len())?;
                    self.layer(name, &inflated, decoded, layer + 1)?;
                }
            }
        }
        self.trail.pop();
        Ok(())
    }

    /// Look for every secret in `s` as it stands: the organization keys anywhere in it, the
    /// probed secrets anywhere in it, the other digests against its key-shaped tokens.
    fn search(&mut self, s: &[u8], kind: Kind) -> Result<(), Stop> {
        self.charge(s.len())?;
        let egress = self.egress;
        if let Some(m) = egress.needles.as_ref().and_then(|n| n.find(s)) {
            let held = egress.needle_keys[m.pattern().as_usize()].clone();
            return Err(self.found(held));
        }
        if let Some(held) = self.probe(s)? {
            return Err(self.found(held));
        }
        if kind == Kind::Normalised || !self.tokens {
            return Ok(());
        }
        match self.tokens(s, kind == Kind::Text)? {
            Some(held) => Err(self.found(held)),
            None => Ok(()),
        }
    }

    /// The probed secret that starts at some byte of `s`, confirmed by its digest.
    fn probe(&mut self, s: &[u8]) -> Result<Option<Held>, Stop> {
        let probes = self.probes;
        if probes.by_print.is_empty() || s.len() < PROBE {
            return Ok(None);
        }
        let seeds = print_seeds();
        for at in 0..=s.len() - PROBE {
            let print = print_of(&s[at..at + PROBE], seeds);
            if !probes.may_hold(print) {
                continue;
            }
            let Some(candidates) = probes.by_print.get(&print) else {
                continue;
            };
            for &(len, digest) in candidates {
                let Some(window) = s.get(at..at + len) else {
                    continue;
                };
                if !self.hashed.insert(self.seed.hash_one(window)) {
                    continue;
                }
                self.charge(window.len().max(HASH_COST))?;
                let d: [u8; 32] = Sha256::digest(window).into();
                if d == digest {
                    if let Some(held) = self.egress.digests.get(&d) {
                        return Ok(Some(held.clone()));
                    }
                }
            }
        }
        Ok(None)
    }

    /// The secret whose digest matches a key-shaped token of `s`: each of its lines (trimmed),
    /// its maximal runs of key characters (`[A-Za-z0-9_-]`); in text, also the runs of
    /// bearer-token characters (those and `.~+/=`) and of printable ASCII but quotes and
    /// brackets, and every span of at most `MAX_PIECES` pieces of a word between `-_./+~` (a
    /// word: a run of those and key characters, with the `=` after it: what stands between
    /// `=&?;:,`, quotes, brackets and white space); and every `lgk_` followed by 64 hex digits
    /// (a key `keys new` made), wherever it sits.
    fn tokens(&mut self, s: &[u8], text: bool) -> Result<Option<Held>, Stop> {
        if self.egress.digests.is_empty() {
            return Ok(None);
        }
        let wider = |class: fn(u8) -> bool| runs(s, class).filter(move |_| text);
        let candidates = s
            .split(|&b| b == b'\n')
            .map(<[u8]>::trim_ascii)
            .chain(runs(s, is_key_char))
            .chain(wider(|b| is_key_char(b) || b".~+/=".contains(&b)))
            .chain(wider(|b| {
                b.is_ascii_graphic() && !b"\"'`()<>[]{},;".contains(&b)
            }))
            .chain(generated_keys(s));
        for t in candidates {
            if let Some(held) = self.hash(t)? {
                return Ok(Some(held));
            }
        }
        if !text {
            return Ok(None);
        }
        for word in words(s) {
            let soft: Vec<usize> = word
                .iter()
                .enumerate()
                .filter(|&(_, &b)| is_soft(b))
                .map(|(i, _)| i)
                .collect();
            let starts = std::iter::once(0).chain(soft.iter().map(|&i| i + 1));
            for (a, start) in starts.enumerate() {
                for b in a..(a + MAX_PIECES).min(soft.len() + 1) {
                    let end = soft.get(b).copied().unwrap_or(word.len());
                    if start < end {
                        if let Some(held) = self.hash(&word[start..end])? {
                            return Ok(Some(held));
                        }
                    }
                }
            }
        }
        Ok(None)
    }

    /// The secret whose digest `t` is, once per distinct token.
    fn hash(&mut self, t: &[u8]) -> Result<Option<Held>, Stop> {
        if t.len() < MIN_TOKEN || t.len() > MAX_TOKEN || !self.hashed.insert(self.seed.hash_one(t))
        {
            return Ok(None);
        }
        self.charge(t.len().max(HASH_COST))?;
        let d: [u8; 32] = Sha256::digest(t).into();
        Ok(self.egress.digests.get(&d).cloned())
    }
}

/// The length of the prefix a probe fingerprints: the shortest token that is hashed.
const PROBE: usize = crate::config::PROBE_BYTES;
const _: () = assert!(PROBE == MIN_TOKEN);

/// The probes learnt by this process, shared by every config it loads (a reload keeps those of
/// the secrets it keeps). A new probe makes a new generation: an answer checked before it is
/// checked again before it is served (a cache hit, a call under way).
#[derive(Clone, Default)]
pub struct Seen(Arc<SeenInner>);

#[derive(Default)]
struct SeenInner {
    probes: RwLock<Arc<Probes>>,
    generation: AtomicU64,
}

impl fmt::Debug for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Seen")
            .field("secrets", &self.snapshot().known.len())
            .finish()
    }
}

impl Seen {
    fn snapshot(&self) -> Arc<Probes> {
        self.0
            .probes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Acquire)
    }

    fn knows(&self, digest: &[u8; 32]) -> bool {
        self.0
            .probes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .known
            .contains_key(digest)
    }

    fn learn(&self, digest: [u8; 32], probe: Option<Probe>) {
        self.update(|known| known.insert(digest, probe) != Some(probe));
    }

    fn retain(&self, held: &HashMap<[u8; 32], Held>) {
        self.update(|known| {
            let before = known.len();
            known.retain(|d, _| held.contains_key(d));
            known.len() != before
        });
    }

    /// Copy, change and swap the probes (rare: the first use of each key); a change that adds
    /// one is a new generation.
    fn update(&self, change: impl FnOnce(&mut HashMap<[u8; 32], Option<Probe>>) -> bool) {
        let mut slot = self.0.probes.write().unwrap_or_else(|p| p.into_inner());
        let mut known = slot.known.clone();
        let before = known.len();
        if !change(&mut known) {
            return;
        }
        let generation = match known.len() >= before {
            true => slot.generation + 1,
            false => slot.generation,
        };
        *slot = Arc::new(Probes::new(known, generation));
        self.0.generation.store(generation, Ordering::Release);
    }
}

/// The probes of one generation.
#[derive(Default)]
struct Probes {
    generation: u64,
    known: HashMap<[u8; 32], Option<Probe>>,
    by_print: HashMap<u32, Vec<(usize, [u8; 32])>>,
    /// One bit per value of a fingerprint's top 16 bits: most positions of a text are passed
    /// over on one bit test.
    filter: Vec<u64>,
}

impl Probes {
    fn new(known: HashMap<[u8; 32], Option<Probe>>, generation: u64) -> Probes {
        let mut by_print: HashMap<u32, Vec<(usize, [u8; 32])>> = HashMap::new();
        let mut filter = vec![0u64; 1 << 10];
        for (digest, probe) in &known {
            if let Some(p) = probe {
                by_print
                    .entry(p.print())
                    .or_default()
                    .push((p.secret_len(), *digest));
                let bit = (p.print() >> 16) as usize;
                filter[bit >> 6] |= 1 << (bit & 63);
            }
        }
        Probes {
            generation,
            known,
            by_print,
            filter,
        }
    }

    fn may_hold(&self, print: u32) -> bool {
        let bit = (print >> 16) as usize;
        self.filter
            .get(bit >> 6)
            .is_some_and(|w| w & (1 << (bit & 63)) != 0)
    }

    /// Whether a secret is found anywhere by its probe (one too short to have one is never
    /// searched for at all).
    fn probed(&self, digest: &[u8; 32]) -> bool {
        self.known.contains_key(digest)
    }
}

fn is_key_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// What joins the pieces of a key-shaped word.
fn is_soft(b: u8) -> bool {
    b"-_./+~".contains(&b)
}

fn is_base64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"+/-_".contains(&b)
}

fn is_base32(b: u8) -> bool {
    b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b)
}

fn rot13(b: u8) -> u8 {
    match b {
        b'a'..=b'z' => (b - b'a' + 13) % 26 + b'a',
        b'A'..=b'Z' => (b - b'A' + 13) % 26 + b'A',
        b => b,
    }
}

/// The maximal runs of bytes that `class` accepts.
fn runs(s: &[u8], class: impl Fn(u8) -> bool) -> impl Iterator<Item = &[u8]> {
    s.split(move |&b| !class(b)).filter(|r| !r.is_empty())
}

/// Key-shaped words: runs of key characters and `.~+/`, each with the `=` that follows it (the
/// padding of a base64 key), so that `api_key=<key>` and `?a=1&k=<key>&b=2` give the key.
fn words(s: &[u8]) -> impl Iterator<Item = &[u8]> {
    let in_word = |b: u8| is_key_char(b) || is_soft(b);
    let mut at = 0;
    std::iter::from_fn(move || {
        while at < s.len() && !in_word(s[at]) {
            at += 1;
        }
        if at == s.len() {
            return None;
        }
        let start = at;
        while at < s.len() && in_word(s[at]) {
            at += 1;
        }
        let padded = at + s[at..].iter().take_while(|&&b| b == b'=').count();
        Some(&s[start..padded])
    })
}

fn trim_padding(run: &[u8]) -> &[u8] {
    let end = run.iter().rposition(|&b| b != b'=').map_or(0, |p| p + 1);
    &run[..end]
}

/// The base64 in a run of base64 characters and white space: each piece between white space,
/// and, where pieces of one length follow each other (a shorter last one ending them), those
/// pieces joined: base64 wrapped in lines (MIME's 76 characters, PEM's 64) or broken by spaces
/// (every 4 characters, or any multiple of 4).
fn base64_runs(run: &[u8]) -> Vec<Vec<u8>> {
    let pieces: Vec<&[u8]> = runs(run, |b| !b.is_ascii_whitespace()).collect();
    let mut out: Vec<Vec<u8>> = pieces
        .iter()
        .map(|p| trim_padding(p))
        .filter(|p| p.len() >= MIN_ENCODED)
        .map(<[u8]>::to_vec)
        .collect();
    let mut i = 0;
    while i < pieces.len() {
        let width = pieces[i].len();
        let mut j = i + 1;
        while j < pieces.len() && pieces[j].len() == width {
            j += 1;
        }
        // A last, shorter piece ends a wrapped block.
        if j < pieces.len() && pieces[j].len() < width && j > i {
            j += 1;
        }
        // Encoders wrap at a multiple of 4 characters (MIME 76, PEM 64, groups of 4): words of
        // another length in ordinary text are not joined.
        if j - i >= 2 && width >= 4 && width.is_multiple_of(4) {
            let joined: Vec<u8> = pieces[i..j].concat();
            let joined = trim_padding(&joined);
            if joined.len() >= MIN_ENCODED {
                out.push(joined.to_vec());
            }
        }
        i = j.max(i + 1);
    }
    out
}

/// `lgk_` and 64 hex digits, wherever they are (see `tenant::new_key`).
fn generated_keys(s: &[u8]) -> impl Iterator<Item = &[u8]> {
    const LEN: usize = 4 + 64;
    static FINDER: OnceLock<memchr::memmem::Finder<'static>> = OnceLock::new();
    let finder = FINDER.get_or_init(|| memchr::memmem::Finder::new(b"lgk_"));
    finder.find_iter(s).filter_map(move |at| {
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

/// Base32 (RFC 4648's alphabet) read from the start of `run`, without padding, whatever its
/// last bits.
fn base32_at(run: &[u8]) -> Option<Vec<u8>> {
    static LENIENT: OnceLock<Option<data_encoding::Encoding>> = OnceLock::new();
    let encoding = LENIENT
        .get_or_init(|| {
            let mut spec = data_encoding::Specification::new();
            spec.symbols.push_str("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567");
            spec.check_trailing_bits = false;
            spec.encoding().ok()
        })
        .as_ref()?;
    // Lengths of 8n+1, 8n+3 and 8n+6 have a character too many.
    let len = match run.len() % 8 {
        1 | 3 | 6 => run.len() - 1,
        _ => run.len(),
    };
    encoding.decode(&run[..len]).ok()
}

/// A gzip or zlib stream (by its header) inflated, up to `MAX_INFLATED` bytes and what the
/// budget has left.
fn inflate(bytes: &[u8], budget: usize) -> Option<(&'static str, Vec<u8>)> {
    let limit = MAX_INFLATED.min(budget as u64);
    let mut out = Vec::new();
    let (name, read) = match bytes {
        [0x1f, 0x8b, 8, ..] => (
            "gzip",
            flate2::read::GzDecoder::new(bytes)
                .take(limit)
                .read_to_end(&mut out),
        ),
        [cmf, flg, ..]
            if cmf & 0x0f == 8
                && cmf >> 4 <= 7
                && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0 =>
        {
            (
                "zlib",
                flate2::read::ZlibDecoder::new(bytes)
                    .take(limit)
                    .read_to_end(&mut out),
            )
        }
        _ => return None,
    };
    // What was inflated before a stream turned out bad is checked all the same.
    let _ = read;
    (!out.is_empty()).then_some((name, out))
}

/// The bytes an array of numbers lists: each a byte (0 to 255), or else each a UTF-16 unit.
fn numbers(items: &[Node]) -> Option<Vec<u8>> {
    if items.len() < MIN_TOKEN {
        return None;
    }
    let mut units = Vec::with_capacity(items.len());
    for n in items {
        let Node::Literal(raw) = n else {
            return None;
        };
        units.push(raw.get().parse::<u16>().ok()?);
    }
    if units.iter().all(|&u| u <= 0xff) {
        return Some(units.iter().map(|&u| u as u8).collect());
    }
    Some(String::from_utf16_lossy(&units).into_bytes())
}

/// Byte values written one by one in text: hex pairs with separators (`5a:6b:39`, `5a 6b`,
/// `5a-6b`), `0x5a, 0x6b`, or decimal (`90, 107, 57`: a list of bytes printed): each run of at
/// least `MIN_TOKEN` of them, read both ways where both read.
fn byte_lists(s: &[u8]) -> Vec<Vec<u8>> {
    fn flush(run: &mut Vec<u8>, out: &mut Vec<Vec<u8>>) {
        if run.len() >= MIN_TOKEN {
            out.push(std::mem::take(run));
        }
        run.clear();
    }
    let (mut out, mut hex, mut dec) = (Vec::new(), Vec::new(), Vec::new());
    let mut at = 0;
    while at < s.len() {
        let start = at;
        while at < s.len() && s[at].is_ascii_alphanumeric() {
            at += 1;
        }
        let token = &s[start..at];
        let digits = token
            .strip_prefix(b"0x")
            .or_else(|| token.strip_prefix(b"0X"));
        let as_hex = match digits {
            Some(d) if (1..=2).contains(&d.len()) => hex_value(d),
            None if token.len() == 2 => hex_value(token),
            _ => None,
        };
        let as_dec =
            (!token.is_empty() && token.len() <= 3 && token.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(token).ok()?.parse::<u8>().ok())
                .flatten();
        for (value, run) in [(as_hex, &mut hex), (as_dec, &mut dec)] {
            match value {
                Some(b) => run.push(b),
                None => flush(run, &mut out),
            }
        }
        // One or two of `,:;-` and white space between two values keep the list going.
        let gap = at;
        while at < s.len() && !s[at].is_ascii_alphanumeric() && at - gap < 3 {
            at += 1;
        }
        let separator = &s[gap..at];
        if !(1..=2).contains(&separator.len())
            || !separator.iter().all(|b| b",:;- \t\r\n".contains(b))
        {
            flush(&mut hex, &mut out);
            flush(&mut dec, &mut out);
            while at < s.len() && !s[at].is_ascii_alphanumeric() {
                at += 1;
            }
        }
    }
    flush(&mut hex, &mut out);
    flush(&mut dec, &mut out);
    out
}

fn hex_value(digits: &[u8]) -> Option<u8> {
    u8::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

/// `s` with what hides a secret from a plain search dropped: white space (a line break in a
/// wrapped sentence, the line joining a document's strings), NULs (UTF-16 text), zero-width and
/// bidirectional marks, the replacement character (what an invalid byte became) and the like;
/// and fullwidth forms folded to ASCII. `None` when there is none of them.
fn normalise(s: &[u8]) -> Option<Vec<u8>> {
    let hidden = |i: usize| -> Option<(usize, Option<u8>)> {
        match s[i..] {
            [b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c | 0, ..] => Some((1, None)),
            // U+00A0 no-break space, U+00AD soft hyphen.
            [0xc2, 0xa0 | 0xad, ..] => Some((2, None)),
            // U+180E.
            [0xe1, 0xa0, 0x8e, ..] => Some((3, None)),
            // U+2000 to U+200F (spaces, zero-width, marks), U+2028 to U+202F, U+205F to U+206F.
            [0xe2, 0x80, 0x80..=0x8f | 0xa8..=0xaf, ..] => Some((3, None)),
            [0xe2, 0x81, 0x9f..=0xaf, ..] => Some((3, None)),
            // U+3000 ideographic space.
            [0xe3, 0x80, 0x80, ..] => Some((3, None)),
            // U+FEFF zero-width no-break space, U+FFFD replacement character.
            [0xef, 0xbb, 0xbf, ..] | [0xef, 0xbf, 0xbd, ..] => Some((3, None)),
            // U+FF01 to U+FF5E: fullwidth forms of `!` to `~`.
            [0xef, 0xbc, c @ 0x81..=0xbf, ..] => Some((3, Some(c - 0x80 + 0x20))),
            [0xef, 0xbd, c @ 0x80..=0x9e, ..] => Some((3, Some(c - 0x80 + 0x60))),
            _ => None,
        }
    };
    let first = (0..s.len()).find(|&i| hidden(i).is_some())?;
    let mut out = Vec::with_capacity(s.len());
    out.extend_from_slice(&s[..first]);
    let mut i = first;
    while i < s.len() {
        match hidden(i) {
            Some((n, kept)) => {
                out.extend(kept);
                i += n;
            }
            None => {
                out.push(s[i]);
                i += 1;
            }
        }
    }
    Some(out)
}

/// Backslash escapes as JSON, JavaScript, C and Python write them (`\/`, `\"`, `\n`, `\uXXXX`
/// with surrogate pairs, `\u{…}`, `\xHH`, octal `\132`), read leniently: text that was not, or
/// not wholly, decoded as a JSON string. Hand-written: the JSON parsers refuse a fragment or a
/// JavaScript escape.
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
            b'0'..=b'7' => {
                // Up to three octal digits, up to 255.
                let mut c = u32::from(e - b'0');
                while i < s.len()
                    && matches!(s[i], b'0'..=b'7')
                    && c * 8 + u32::from(s[i] - b'0') <= 0xff
                {
                    c = c * 8 + u32::from(s[i] - b'0');
                    i += 1;
                }
                push_char(&mut out, c);
            }
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

/// Percent-encoding: `%XX` in either case, JavaScript's `escape()` form `%uXXXX` (surrogate
/// pairs joined), and `+` as a space when `plus` is set. Hand-written: `percent_encoding` reads
/// no `%u`.
fn percent_decode(s: &[u8], plus: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let hex_at = |at: usize, n: usize| -> Option<u32> {
        let digits = std::str::from_utf8(s.get(at..at + n)?).ok()?;
        u32::from_str_radix(digits, 16).ok()
    };
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' if matches!(s.get(i + 1), Some(b'u' | b'U')) && hex_at(i + 2, 4).is_some() => {
                let hi = hex_at(i + 2, 4).unwrap_or(0xfffd);
                let lo = (s.get(i + 6..i + 8) == Some(b"%u"))
                    .then(|| hex_at(i + 8, 4))
                    .flatten()
                    .filter(|lo| (0xDC00..=0xDFFF).contains(lo));
                let c = match (hi, lo) {
                    (0xD800..=0xDBFF, Some(lo)) => {
                        i += 6;
                        0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                    }
                    _ => hi,
                };
                let c = char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER);
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                i += 6;
            }
            b'%' if hex_at(i + 1, 2).is_some() && s[i + 1].is_ascii_hexdigit() => {
                out.push(hex_at(i + 1, 2).unwrap_or(0) as u8);
                i += 3;
            }
            b'+' if plus => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// Quoted-printable (MIME): `=XX` and soft line breaks (`=` at the end of a line). `None` when
/// `s` holds neither.
fn quoted_printable(s: &[u8]) -> Option<Vec<u8>> {
    let escape_at = |i: usize| -> Option<(usize, Option<u8>)> {
        match s.get(i + 1..)? {
            [b'\r', b'\n', ..] => Some((3, None)),
            [b'\n', ..] => Some((2, None)),
            [h, l, ..] if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => {
                Some((3, hex_value(&[*h, *l])))
            }
            _ => None,
        }
    };
    let first = memchr::memchr_iter(b'=', s).find(|&i| escape_at(i).is_some())?;
    let mut out = Vec::with_capacity(s.len());
    out.extend_from_slice(&s[..first]);
    let mut i = first;
    while i < s.len() {
        match (s[i] == b'=').then(|| escape_at(i)).flatten() {
            Some((n, byte)) => {
                out.extend(byte);
                i += n;
            }
            None => {
                out.push(s[i]);
                i += 1;
            }
        }
    }
    Some(out)
}

/// Each backslash dropped, the character after it kept (`\\` is one backslash).
fn strip_slashes(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => out.extend(bytes.next()),
            _ => out.push(b),
        }
    }
    out
}

/// The named references `html_unescape` decodes.
const NAMED: [(&str, char); 34] = [
    ("amp", '&'),
    ("lt", '<'),
    ("gt", '>'),
    ("quot", '"'),
    ("apos", '\''),
    ("sol", '/'),
    ("bsol", '\\'),
    ("plus", '+'),
    ("equals", '='),
    ("excl", '!'),
    ("num", '#'),
    ("dollar", '$'),
    ("percnt", '%'),
    ("lpar", '('),
    ("rpar", ')'),
    ("ast", '*'),
    ("comma", ','),
    ("period", '.'),
    ("colon", ':'),
    ("semi", ';'),
    ("quest", '?'),
    ("commat", '@'),
    ("lsqb", '['),
    ("rsqb", ']'),
    ("Hat", '^'),
    ("lowbar", '_'),
    ("grave", '`'),
    ("lcub", '{'),
    ("rcub", '}'),
    ("verbar", '|'),
    ("hyphen", '-'),
    ("dash", '-'),
    ("nbsp", ' '),
    ("Tab", '\t'),
];
// The references HTML reads without a `;`.
const LEGACY: [(&str, char); 4] = [("amp", '&'), ("lt", '<'), ("gt", '>'), ("quot", '"')];

/// HTML character references: decimal and hex (`&#43;`, `&#x2B;`, and without the `;`, as
/// browsers read them), and the named ones of ASCII punctuation (`&amp;`, `&sol;`, `&plus;`,
/// `&equals;`, …; `&amp`, `&lt`, `&gt` and `&quot` without the `;` too).
fn html_unescape(s: &[u8]) -> Vec<u8> {
    let reference = |i: usize| -> Option<(char, usize)> {
        let rest = &s[i + 1..];
        if let Some(num) = rest.strip_prefix(b"#") {
            let (radix, digits_at) = match num.first() {
                Some(b'x' | b'X') => (16, 2),
                _ => (10, 1),
            };
            let digits = s[i + 1 + digits_at..]
                .iter()
                .take(8)
                .take_while(|b| match radix {
                    16 => b.is_ascii_hexdigit(),
                    _ => b.is_ascii_digit(),
                })
                .count();
            if digits == 0 {
                return None;
            }
            let start = i + 1 + digits_at;
            let code =
                u32::from_str_radix(std::str::from_utf8(&s[start..start + digits]).ok()?, radix)
                    .ok()?;
            let end = start + digits;
            let end = if s.get(end) == Some(&b';') {
                end + 1
            } else {
                end
            };
            return Some((
                char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER),
                end,
            ));
        }
        let name_len = rest
            .iter()
            .take(8)
            .take_while(|b| b.is_ascii_alphabetic())
            .count();
        let name = std::str::from_utf8(&rest[..name_len]).ok()?;
        if rest.get(name_len) == Some(&b';') {
            let c = NAMED.iter().find(|(n, _)| *n == name)?.1;
            return Some((c, i + 1 + name_len + 1));
        }
        LEGACY
            .iter()
            .find(|(n, _)| name.starts_with(n))
            .map(|(n, c)| (*c, i + 1 + n.len()))
    };
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match (s[i] == b'&').then(|| reference(i)).flatten() {
            Some((c, end)) => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                i = end;
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
    use crate::config::{NamedKey, OrgApiKey};

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
            rate: crate::config::Rate::per_second(1),
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
            face_mode: None,
        };
        let admin = admin.map(AdminToken::new);
        Egress::new(
            &keys,
            &[tenant],
            admin.as_ref(),
            IntCounter::new("echoes", "echoes").expect("counter"),
        )
    }

    /// The trace collector's header value is held as a key is: in a path, a request id or an
    /// answer, as it is or encoded.
    #[test]
    fn a_collector_header_is_a_secret_too() {
        let e = Egress::sharing(
            &OrgKeys {
                keys: Vec::new(),
                default: None,
            },
            &[b"collector-api-key-123".as_slice()],
            &[],
            None,
            IntCounter::new("echoes", "echoes").expect("counter"),
            Seen::default(),
        );
        assert!(e.holds_secret(b"/x/collector-api-key-123"));
        assert!(e.holds_secret(b"/x/collector%2Dapi%2Dkey%2D123"));
        assert!(!e.holds_secret(b"/x/collector"));
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
                // An encoder writes a `%` around the key as `%25` too.
                3 => format!(
                    "{}{percent}{}",
                    before.replace('%', "%25"),
                    after.replace('%', "%25")
                ),
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
    fn what_software_writes_when_it_echoes_a_key_is_found() {
        use std::io::Write;
        let e = egress();
        let b64 = base64::engine::general_purpose::STANDARD;
        let request = format!(
            "--b\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n{}\r\n--b\r\nContent-Disposition: form-data; name=\"api_key\"\r\n\r\n{KEY}\r\n--b--\r\n",
            "x".repeat(200)
        );
        // MIME base64 (76 a line), with the key at every offset against the line breaks.
        let mut bodies: Vec<String> = (0..80)
            .map(|pad| {
                let dump = b64.encode(format!("{}{request}", "y".repeat(pad)));
                let wrapped: Vec<&str> = dump
                    .as_bytes()
                    .chunks(76)
                    .map(|c| std::str::from_utf8(c).expect("ascii"))
                    .collect();
                serde_json::json!({"result": true, "debug": wrapped.join("\n") + "\n"}).to_string()
            })
            .collect();
        let each = |f: &dyn Fn(char) -> String| -> String { KEY.chars().map(f).collect() };
        let (head, tail) = KEY.split_at(7);
        let utf16: Vec<u8> = KEY.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(KEY.as_bytes()).expect("gzip");
        let gz = gz.finish().expect("gzip");
        let mut four = KEY.to_string();
        for _ in 0..4 {
            four = b64.encode(four);
        }
        for d in [
            b64.encode(format!("k={KEY}"))
                .as_bytes()
                .chunks(4)
                .map(|c| String::from_utf8_lossy(c).to_string())
                .collect::<Vec<_>>()
                .join(" "),
            each(&|c| format!("&#{}", c as u32)),
            each(&|c| format!("&#X{:X}", c as u32)),
            each(&|c| format!("\\{:o}", c as u32)),
            each(&|c| format!("%u{:04x}", c as u32)),
            each(&|c| format!("{c}\u{200b}")),
            each(&|c| format!("{c}\u{fffd}")),
            each(&|c| char::from_u32(c as u32 + 0xfee0).expect("char").to_string()),
            String::from_utf8(utf16.clone()).expect("ascii"),
            b64.encode(&utf16),
            b64.encode(&gz),
            four,
            data_encoding::BASE32.encode(KEY.as_bytes()),
            KEY.bytes()
                .map(|b| format!("{b:02X}"))
                .collect::<Vec<_>>()
                .join(":"),
            KEY.bytes()
                .map(|b| format!("0x{b:02x}"))
                .collect::<Vec<_>>()
                .join(", "),
            "k=Org=2FSecret=2BKey=3D42".to_string(),
            KEY.chars().rev().collect(),
            "Bet/Frperg+Xrl=42".to_string(),
            format!("{head}\n{tail}"),
        ] {
            bodies.push(serde_json::json!({"result": true, "d": d}).to_string());
        }
        bodies.push(serde_json::json!({"a": head, "b": tail}).to_string());
        bodies.push(serde_json::json!({"d": {head: 1, tail: 2}}).to_string());
        bodies.push(
            serde_json::json!({"d": KEY.chars().map(String::from).collect::<Vec<_>>()}).to_string(),
        );
        bodies.push(serde_json::json!({"d": KEY.bytes().collect::<Vec<_>>()}).to_string());
        bodies.push(serde_json::json!({"d": KEY.encode_utf16().collect::<Vec<_>>()}).to_string());
        for body in &bodies {
            assert!(withheld(&e, body), "{body}");
        }
        // An invalid byte inside the key (read as U+FFFD).
        let mut raw = format!("{{\"d\": \"{head}").into_bytes();
        raw.push(0xff);
        raw.extend_from_slice(format!("{tail}\"}}").as_bytes());
        let a = UpstreamAnswer {
            status: 200,
            head: http::HeaderMap::new(),
            body: Bytes::from(raw),
        };
        assert_eq!(e.check(&a).err(), Some(Withheld::SecretEcho));
    }

    #[test]
    fn digest_held_secrets_are_found_in_ordinary_contexts() {
        let dotted = "beta.key.0002+x/Q==";
        let e = egress_with(
            &[KEY],
            &[dotted, "alpha-key-0001"],
            Some("adm1n-T0ken-never-print"),
        );
        let b64 = base64::engine::general_purpose::STANDARD;
        for text in [
            format!("api_key={dotted}"),
            format!("?a=1&api_key={dotted}&b=2"),
            "api_key=beta.key.0002%2Bx%2FQ%3D%3D".to_string(),
            b64.encode(format!("api_key={dotted}")),
            "tenant_alpha-key-0001".to_string(),
            "x-alpha-key-0001".to_string(),
            "alpha-key-0001_suffix".to_string(),
            "admin_token_adm1n-T0ken-never-print".to_string(),
            "Bearer-adm1n-T0ken-never-print".to_string(),
            // The admin token's probe is known: found glued to anything.
            "xadm1n-T0ken-never-printz".to_string(),
        ] {
            let body = serde_json::json!({"result": true, "d": text}).to_string();
            assert!(withheld(&e, &body), "{body}");
            // The same in a verdict stored in the fleet's store.
            assert!(e.check_stored(200, body.as_bytes(), Source::Store).is_err());
        }
        // A tenant key glued to other text is found once it authenticated a request.
        let body = r#"{"d": "xalpha-key-0001z"}"#;
        assert!(!withheld(&e, body));
        e.learn(&TenantKey::new("alpha-key-0001"));
        assert!(withheld(&e, body));
        assert!(!withheld(&e, r#"{"d": "alpha-key-0002", "e": "beta.key"}"#));
    }

    #[test]
    fn a_request_id_that_is_a_secret_is_told() {
        let e = egress_with(&[KEY], &["alpha-key-0001"], Some("adm1n-T0ken-never-print"));
        for id in [
            "alpha-key-0001",
            "adm1n-T0ken-never-print",
            "Org/Secret+Key=42",
        ] {
            assert!(e.holds_secret(id.as_bytes()), "{id}");
        }
        for id in [
            "3f2a9c1e-7b4d-4e5f-8a9b-0c1d2e3f4a5b",
            "req-0001",
            "alpha-key-0002",
        ] {
            assert!(!e.holds_secret(id.as_bytes()), "{id}");
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
