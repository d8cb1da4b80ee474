//! Secret payload fields: sealed into envelopes where they enter the system, opened only by
//! whoever holds the key (see `docs/protocol.md`, section 17).
//!
//! A field a saga declares secret ([`SagaSpec::secret_input`](crate::SagaSpec::secret_input),
//! [`StepSpec::secret_output`](crate::StepSpec::secret_output)) travels and is stored as an
//! [`Envelope`]: AES-256-GCM under a key the engine does not need, with a random 96-bit nonce and
//! the field's name as associated data (an envelope moved to another field does not open). The
//! engine stores, forwards and hands envelopes on as they are; the SDK worker opens them for the
//! handler and seals the secret fields of what the handler returns.
//!
//! Keys are [`SecretKeys`]: one or more AES-256 keys, each with an id. The first key seals; every
//! key opens, so a key is rotated by putting a new one first and keeping the old ones until no
//! saga holds an envelope sealed with them.

use std::fmt;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ProtocolError;

/// The member that makes a JSON object an envelope: `{"$sagaflow_secret": {...}}`.
pub const ENVELOPE_MEMBER: &str = "$sagaflow_secret";
/// The envelope format version this library writes and reads.
pub const ENVELOPE_VERSION: u32 = 1;
/// The one algorithm of envelope version 1 (the name JOSE gives it).
pub const ALGORITHM: &str = "A256GCM";
/// What is shown in place of a secret value to whoever does not reveal it.
pub const REDACTED: &str = "«secret»";

const NONCE_BYTES: usize = 12;
const KEY_BYTES: usize = 32;
const TAG_BYTES: usize = 16;

/// A sealed secret value, as it appears in the JSON of an input or an output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// The envelope format version, [`ENVELOPE_VERSION`].
    pub v: u32,
    /// The cipher, [`ALGORITHM`].
    pub alg: String,
    /// The id of the key that sealed it.
    pub kid: String,
    /// The 12-byte nonce, base64 (standard alphabet, padded).
    pub nonce: String,
    /// The ciphertext of the value's compact JSON text followed by the 16-byte tag, base64.
    pub ct: String,
}

impl Envelope {
    /// The envelope `value` holds, when it is one: `None` when `value` is not an object with
    /// the [`ENVELOPE_MEMBER`], `Some(Err(reason))` when it is one but malformed.
    pub fn of(value: &Value) -> Option<Result<Envelope, String>> {
        let inner = value.as_object()?.get(ENVELOPE_MEMBER)?;
        if value.as_object().is_some_and(|object| object.len() != 1) {
            return Some(Err(format!(
                "an envelope is an object with the single member `{ENVELOPE_MEMBER}`"
            )));
        }
        Some(
            Envelope::deserialize(inner)
                .map_err(|error| format!("malformed envelope: {error}"))
                .and_then(|envelope| envelope.check().map(|()| envelope)),
        )
    }

    /// The envelope as JSON, `{"$sagaflow_secret": {...}}`.
    pub fn to_value(&self) -> Value {
        let mut object = Map::with_capacity(1);
        // Infallible: a struct of strings and a number always serializes.
        object.insert(
            ENVELOPE_MEMBER.to_string(),
            serde_json::to_value(self).unwrap_or(Value::Null),
        );
        Value::Object(object)
    }

    fn check(&self) -> Result<(), String> {
        if self.v != ENVELOPE_VERSION {
            return Err(format!(
                "envelope version {} is not known here (this build reads version {ENVELOPE_VERSION})",
                self.v
            ));
        }
        if self.alg != ALGORITHM {
            return Err(format!(
                "algorithm `{}` is not known here (this build reads `{ALGORITHM}`)",
                self.alg
            ));
        }
        Ok(())
    }
}

/// Whether `value` is an envelope (well-formed or not).
pub fn is_envelope(value: &Value) -> bool {
    value
        .as_object()
        .is_some_and(|object| object.contains_key(ENVELOPE_MEMBER))
}

/// `value` with every envelope in it, at any depth, replaced by [`REDACTED`]: what is shown to
/// whoever does not reveal secrets.
pub fn redact(value: &Value) -> Value {
    let mut copy = value.clone();
    redact_in_place(&mut copy);
    copy
}

/// Replaces every envelope in `value`, at any depth, by [`REDACTED`].
pub fn redact_in_place(value: &mut Value) {
    match value {
        Value::Object(_) if is_envelope(value) => *value = Value::String(REDACTED.to_string()),
        Value::Object(object) => object.values_mut().for_each(redact_in_place),
        Value::Array(items) => items.iter_mut().for_each(redact_in_place),
        _ => {}
    }
}

/// Whether one of the members of the object `value` is an envelope: what is opened for a
/// handler (only members are sealed), found without looking deeper.
pub fn has_sealed_member(value: &Value) -> bool {
    value
        .as_object()
        .is_some_and(|object| object.values().any(is_envelope))
}

/// Whether `value` holds an envelope at any depth.
pub fn holds_envelope(value: &Value) -> bool {
    match value {
        Value::Object(object) => {
            object.contains_key(ENVELOPE_MEMBER) || object.values().any(holds_envelope)
        }
        Value::Array(items) => items.iter().any(holds_envelope),
        _ => false,
    }
}

/// One key: its id and its cipher.
struct SecretKey {
    id: String,
    cipher: Aes256Gcm,
}

/// The keys that seal and open secret fields: the first seals, all of them open.
///
/// Read from text with one key per line, `ID:BASE64` (32 bytes of key, standard base64); blank
/// lines and lines starting with `#` are skipped, and entries may also be separated by commas
/// (for an environment variable). Ids are letters, digits, `-`, `_` and `.`, at most 64.
/// [`SecretKeys::generate_line`] makes a new entry.
pub struct SecretKeys {
    keys: Vec<SecretKey>,
}

impl fmt::Debug for SecretKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKeys")
            .field("ids", &self.ids())
            .finish()
    }
}

impl SecretKeys {
    /// Reads keys from `text`; `origin` names where it came from, for errors.
    pub fn parse(text: &str, origin: &str) -> Result<SecretKeys, ProtocolError> {
        let invalid = |reason: String| ProtocolError::SecretKeys {
            origin: origin.to_string(),
            reason,
        };
        let mut keys: Vec<SecretKey> = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            for entry in line.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                let Some((id, encoded)) = entry.split_once(':') else {
                    return Err(invalid(format!(
                        "line {}: an entry is `ID:BASE64KEY` (make one with `sagaflow keygen`)",
                        number + 1
                    )));
                };
                let id = id.trim();
                if !is_key_id(id) {
                    return Err(invalid(format!(
                        "line {}: key id `{id}` is not 1 to 64 letters, digits, `-`, `_` or `.`",
                        number + 1
                    )));
                }
                let bytes = BASE64.decode(encoded.trim()).map_err(|_| {
                    invalid(format!(
                        "line {}: the key of `{id}` is not standard base64",
                        number + 1
                    ))
                })?;
                if bytes.len() != KEY_BYTES {
                    return Err(invalid(format!(
                        "line {}: the key of `{id}` is {} bytes; an AES-256 key is {KEY_BYTES}",
                        number + 1,
                        bytes.len()
                    )));
                }
                if keys.iter().any(|key| key.id == id) {
                    return Err(invalid(format!(
                        "line {}: key id `{id}` appears twice",
                        number + 1
                    )));
                }
                let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| {
                    invalid(format!(
                        "line {}: the key of `{id}` is unusable",
                        number + 1
                    ))
                })?;
                keys.push(SecretKey {
                    id: id.to_string(),
                    cipher,
                });
            }
        }
        if keys.is_empty() {
            return Err(invalid(
                "no key in it; make one with `sagaflow keygen`".to_string(),
            ));
        }
        Ok(SecretKeys { keys })
    }

    /// Reads keys from the file at `path`.
    pub fn from_file(path: &std::path::Path) -> Result<SecretKeys, ProtocolError> {
        let origin = format!("secret key file {}", path.display());
        let text = std::fs::read_to_string(path).map_err(|error| ProtocolError::SecretKeys {
            origin: origin.clone(),
            reason: format!("cannot read it: {error}"),
        })?;
        SecretKeys::parse(&text, &origin)
    }

    /// A new random key as a key file line, `ID:BASE64`.
    pub fn generate_line(id: &str) -> Result<String, ProtocolError> {
        if !is_key_id(id) {
            return Err(ProtocolError::SecretKeys {
                origin: "a new key".to_string(),
                reason: format!("key id `{id}` is not 1 to 64 letters, digits, `-`, `_` or `.`"),
            });
        }
        let key = Aes256Gcm::generate_key(OsRng);
        Ok(format!("{id}:{}", BASE64.encode(key)))
    }

    /// The ids of the keys, the sealing one first.
    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|key| key.id.as_str()).collect()
    }

    /// Seals `value`, the value of field `field`, with the first key.
    pub fn seal(&self, field: &str, value: &Value) -> Result<Value, ProtocolError> {
        let Some(key) = self.keys.first() else {
            return Err(ProtocolError::SecretKeys {
                origin: "the keys given".to_string(),
                reason: "no key to seal with".to_string(),
            });
        };
        let plaintext = serde_json::to_vec(value).map_err(|error| ProtocolError::SecretField {
            field: field.to_string(),
            kid: key.id.clone(),
            reason: format!("cannot write the value as JSON: {error}"),
        })?;
        let nonce = Aes256Gcm::generate_nonce(OsRng);
        let ciphertext = key
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: &plaintext,
                    aad: field.as_bytes(),
                },
            )
            .map_err(|_| ProtocolError::SecretField {
                field: field.to_string(),
                kid: key.id.clone(),
                reason: "the cipher refused to seal it".to_string(),
            })?;
        Ok(Envelope {
            v: ENVELOPE_VERSION,
            alg: ALGORITHM.to_string(),
            kid: key.id.clone(),
            nonce: BASE64.encode(nonce),
            ct: BASE64.encode(ciphertext),
        }
        .to_value())
    }

    /// Opens `value`, the envelope found in field `field`, with the key it names.
    pub fn open(&self, field: &str, value: &Value) -> Result<Value, ProtocolError> {
        let failed = |kid: &str, reason: String| ProtocolError::SecretField {
            field: field.to_string(),
            kid: kid.to_string(),
            reason,
        };
        let envelope = match Envelope::of(value) {
            None => return Err(failed("none", "the value is not an envelope".to_string())),
            Some(Err(reason)) => {
                let kid = value
                    .pointer(&format!("/{}/kid", ENVELOPE_MEMBER.replace('~', "~0")))
                    .and_then(Value::as_str)
                    .unwrap_or("none");
                return Err(failed(kid, reason));
            }
            Some(Ok(envelope)) => envelope,
        };
        let kid = envelope.kid.as_str();
        let key = self.keys.iter().find(|key| key.id == kid).ok_or_else(|| {
            failed(
                kid,
                format!(
                    "no key with this id among those given ({}); give the key file that holds it",
                    self.ids().join(", ")
                ),
            )
        })?;
        let nonce: [u8; NONCE_BYTES] = BASE64
            .decode(&envelope.nonce)
            .ok()
            .and_then(|nonce| nonce.try_into().ok())
            .ok_or_else(|| {
                failed(
                    kid,
                    format!("the nonce is not {NONCE_BYTES} bytes of base64"),
                )
            })?;
        let ciphertext = BASE64
            .decode(&envelope.ct)
            .ok()
            .filter(|ct| ct.len() >= TAG_BYTES)
            .ok_or_else(|| {
                failed(
                    kid,
                    "the ciphertext is not base64 of at least a tag".to_string(),
                )
            })?;
        let plaintext = key
            .cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &ciphertext,
                    aad: field.as_bytes(),
                },
            )
            .map_err(|_| {
                failed(
                    kid,
                    "it does not authenticate: it was altered, or sealed for another field or \
                     under another key with this id"
                        .to_string(),
                )
            })?;
        serde_json::from_slice(&plaintext)
            .map_err(|error| failed(kid, format!("the opened value is not JSON: {error}")))
    }

    /// Seals the members of the object `value` named in `fields` that are present and not
    /// sealed yet. A `value` that is not an object is left alone.
    pub fn seal_fields(&self, value: &mut Value, fields: &[String]) -> Result<(), ProtocolError> {
        let Some(object) = value.as_object_mut() else {
            return Ok(());
        };
        for field in fields {
            if let Some(member) = object.get_mut(field)
                && !is_envelope(member)
            {
                *member = self.seal(field, member)?;
            }
        }
        Ok(())
    }

    /// Opens every envelope among the members of the object `value`; `value` is unchanged when
    /// one fails to open.
    pub fn open_fields(&self, value: &mut Value) -> Result<(), ProtocolError> {
        let Some(object) = value.as_object() else {
            return Ok(());
        };
        let mut opened = Vec::new();
        for (field, member) in object {
            if is_envelope(member) {
                opened.push((field.clone(), self.open(field, member)?));
            }
        }
        if let Some(object) = value.as_object_mut() {
            for (field, plain) in opened {
                object.insert(field, plain);
            }
        }
        Ok(())
    }

    /// `value` with every envelope it holds opened where these keys can, and shown as
    /// [`REDACTED`] where they cannot: what `--reveal` shows.
    pub fn reveal(&self, value: &Value) -> Value {
        let mut copy = value.clone();
        self.reveal_in_place(&mut copy, "");
        copy
    }

    fn reveal_in_place(&self, value: &mut Value, field: &str) {
        if is_envelope(value) {
            *value = self
                .open(field, value)
                .unwrap_or_else(|_| Value::String(REDACTED.to_string()));
            return;
        }
        match value {
            Value::Object(object) => object
                .iter_mut()
                .for_each(|(name, member)| self.reveal_in_place(member, name)),
            Value::Array(items) => items
                .iter_mut()
                .for_each(|item| self.reveal_in_place(item, field)),
            _ => {}
        }
    }
}

fn is_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn keys(ids: &[&str]) -> (SecretKeys, String) {
        let text = ids
            .iter()
            .map(|id| SecretKeys::generate_line(id).expect("a valid id"))
            .collect::<Vec<_>>()
            .join("\n");
        (SecretKeys::parse(&text, "test").expect("parses"), text)
    }

    #[test]
    fn a_sealed_value_opens_to_itself_and_shows_nothing_of_it() {
        let (keys, _) = keys(&["k1"]);
        let card = json!("4111-1111-1111-1111");
        let sealed = keys.seal("card", &card).expect("seals");
        assert!(!sealed.to_string().contains("4111"), "{sealed}");
        let envelope = Envelope::of(&sealed)
            .expect("an envelope")
            .expect("well formed");
        assert_eq!(
            (envelope.alg.as_str(), envelope.kid.as_str()),
            (ALGORITHM, "k1")
        );
        assert_eq!(keys.open("card", &sealed).expect("opens"), card);
        // Two seals of one value differ (fresh nonces).
        assert_ne!(keys.seal("card", &card).expect("seals"), sealed);
        // Any JSON value can be secret.
        let nested = json!({"number": "4111", "cvc": 123});
        let sealed = keys.seal("card", &nested).expect("seals");
        assert_eq!(keys.open("card", &sealed).expect("opens"), nested);
    }

    #[test]
    fn rotation_seals_with_the_first_key_and_opens_with_any() {
        let (old, old_text) = keys(&["2026-01"]);
        let sealed_before = old.seal("card", &json!("4111")).expect("seals");
        let (_, new_text) = keys(&["2026-12"]);
        let rotated = SecretKeys::parse(&format!("# rotated\n{new_text}\n\n{old_text}\n"), "test")
            .expect("parses");
        assert_eq!(rotated.ids(), ["2026-12", "2026-01"]);
        assert_eq!(
            rotated.open("card", &sealed_before).expect("opens"),
            json!("4111")
        );
        let sealed_after = rotated.seal("card", &json!("4242")).expect("seals");
        assert_eq!(Envelope::of(&sealed_after).unwrap().unwrap().kid, "2026-12");
        let error = old
            .open("card", &sealed_after)
            .expect_err("the old key alone cannot");
        let message = error.to_string();
        assert!(
            message.contains("`card`") && message.contains("2026-12"),
            "{message}"
        );
        // Comma-separated, as in an environment variable.
        let inline = SecretKeys::parse(&format!("{new_text},{old_text}"), "env").expect("parses");
        assert_eq!(inline.ids(), ["2026-12", "2026-01"]);
    }

    #[test]
    fn altered_misplaced_and_malformed_envelopes_do_not_open() {
        let (keys, _) = keys(&["k1"]);
        let sealed = keys.seal("card", &json!("4111")).expect("seals");
        let mut tampered = sealed.clone();
        let ct = tampered[ENVELOPE_MEMBER]["ct"]
            .as_str()
            .unwrap()
            .to_string();
        let mut bytes = BASE64.decode(ct).unwrap();
        bytes[0] ^= 1;
        tampered[ENVELOPE_MEMBER]["ct"] = json!(BASE64.encode(bytes));
        let failures = [
            ("card", tampered, "does not authenticate"),
            ("iban", sealed.clone(), "does not authenticate"),
            (
                "card",
                json!({ENVELOPE_MEMBER: {"v": 1, "alg": "A256GCM", "kid": "k1", "nonce": "AA", "ct": "AA"}}),
                "nonce",
            ),
            (
                "card",
                json!({ENVELOPE_MEMBER: {"v": 1, "alg": "ROT13", "kid": "k1", "nonce": "", "ct": ""}}),
                "ROT13",
            ),
            ("card", json!({ENVELOPE_MEMBER: "junk"}), "malformed"),
            (
                "card",
                json!({ENVELOPE_MEMBER: sealed[ENVELOPE_MEMBER], "extra": 1}),
                "single member",
            ),
        ];
        for (field, value, expected) in failures {
            let message = keys.open(field, &value).expect_err("refused").to_string();
            assert!(
                message.contains(&format!("`{field}`")) && message.contains(expected),
                "{message}"
            );
        }
        let unknown = SecretKeys::parse(&SecretKeys::generate_line("k2").unwrap(), "t").unwrap();
        let message = unknown
            .open("card", &sealed)
            .expect_err("refused")
            .to_string();
        assert!(
            message.contains("`k1`") && message.contains("k2"),
            "{message}"
        );
    }

    #[test]
    fn fields_are_sealed_by_name_and_every_envelope_is_redacted_or_revealed() {
        let (keys, _) = keys(&["k1"]);
        let mut input = json!({"card": "4111", "cvc": 123, "sku": "A-1"});
        keys.seal_fields(&mut input, &["card".into(), "cvc".into(), "absent".into()])
            .expect("seals");
        assert!(is_envelope(&input["card"]) && is_envelope(&input["cvc"]));
        assert_eq!(input["sku"], "A-1");
        let shown = redact(&json!({"input": input, "list": [input["card"]]}));
        assert_eq!(
            shown,
            json!({"input": {"card": REDACTED, "cvc": REDACTED, "sku": "A-1"}, "list": [REDACTED]})
        );
        assert_eq!(
            keys.reveal(&input),
            json!({"card": "4111", "cvc": 123, "sku": "A-1"})
        );
        let mut opened = input.clone();
        keys.open_fields(&mut opened).expect("opens");
        assert_eq!(opened, json!({"card": "4111", "cvc": 123, "sku": "A-1"}));
        // Sealing twice leaves an envelope alone.
        let before = input.clone();
        keys.seal_fields(&mut input, &["card".into()])
            .expect("seals");
        assert_eq!(input, before);
    }

    #[test]
    fn key_text_that_is_wrong_says_what_is_wrong() {
        for (text, expected) in [
            ("", "no key"),
            ("k1", "ID:BASE64KEY"),
            ("bad id:AAAA", "key id"),
            ("k1:not base64!", "base64"),
            ("k1:AAAA", "3 bytes"),
        ] {
            let message = SecretKeys::parse(text, "the file")
                .expect_err("refused")
                .to_string();
            assert!(
                message.contains("the file") && message.contains(expected),
                "{text}: {message}"
            );
        }
        let line = SecretKeys::generate_line("k1").unwrap();
        let message = SecretKeys::parse(&format!("{line}\n{line}"), "f")
            .expect_err("refused")
            .to_string();
        assert!(message.contains("twice"), "{message}");
        // The keys never show in debug output.
        let keys = SecretKeys::parse(&line, "f").unwrap();
        let shown = format!("{keys:?}");
        assert!(!shown.contains(line.split_once(':').unwrap().1), "{shown}");
    }
}
