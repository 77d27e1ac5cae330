//! Keys and signatures: ed25519 over a domain-separated message, so a signed ledger record can never be
//! passed off as an entry (or a record of another format version).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

const PUBLIC_PREFIX: &str = "ed25519:";
const PRIVATE_PREFIX: &str = "ed25519-private:";

/// A public key whose signatures are believed (`trusted_keys`), in its one text form `ed25519:BASE64`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

/// The writer's private key (`KKPIPE_SIGNING_KEY`).
pub(crate) struct PrivateKey(SigningKey);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey({})", self.public())
    }
}

fn bytes32(text: &str) -> Option<[u8; 32]> {
    B64.decode(text.trim()).ok()?.try_into().ok()
}

impl PublicKey {
    pub fn parse(text: &str) -> Result<PublicKey, String> {
        let b = text
            .strip_prefix(PUBLIC_PREFIX)
            .and_then(bytes32)
            .ok_or_else(|| format!("`{text}` is not a public key of the form `ed25519:BASE64` (32 bytes)"))?;
        VerifyingKey::from_bytes(&b).map(PublicKey).map_err(|_| format!("`{text}` is not a valid ed25519 public key"))
    }

    /// Whether `signature` is this key's over `kind` + `body`.
    pub fn verifies(&self, kind: &str, body: &[u8], signature: &[u8]) -> bool {
        let Ok(sig) = Signature::from_slice(signature) else { return false };
        self.0.verify_strict(&message(kind, body), &sig).is_ok()
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", B64.encode(self.0.as_bytes()))
    }
}

impl PrivateKey {
    /// A new key from the operating system's randomness.
    pub(crate) fn generate() -> PrivateKey {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).expect("the operating system's random source");
        PrivateKey(SigningKey::from_bytes(&seed))
    }

    pub(crate) fn parse(text: &str) -> Result<PrivateKey, String> {
        text.trim()
            .strip_prefix(PRIVATE_PREFIX)
            .and_then(bytes32)
            .map(|b| PrivateKey(SigningKey::from_bytes(&b)))
            .ok_or_else(|| {
                "is not a private key of the form `ed25519-private:BASE64` (see `kkpipe remote keygen`)".into()
            })
    }

    pub(crate) fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub(crate) fn sign(&self, kind: &str, body: &[u8]) -> Vec<u8> {
        self.0.sign(&message(kind, body)).to_bytes().to_vec()
    }

    pub(crate) fn to_text(&self) -> String {
        format!("{PRIVATE_PREFIX}{}", B64.encode(self.0.to_bytes()))
    }
}

/// What is signed: the format's name and version, the kind of object, then its body.
fn message(kind: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + 32);
    m.extend_from_slice(b"kkpipe-remote\0v1\0");
    m.extend_from_slice(kind.as_bytes());
    m.push(0);
    m.extend_from_slice(body);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_kind_body_and_key() {
        let k = PrivateKey::generate();
        let other = PrivateKey::generate();
        let sig = k.sign("entry", b"body");
        assert!(k.public().verifies("entry", b"body", &sig));
        assert!(!k.public().verifies("ledger", b"body", &sig));
        assert!(!k.public().verifies("entry", b"bodY", &sig));
        assert!(!other.public().verifies("entry", b"body", &sig));
    }

    #[test]
    fn keys_round_trip_through_their_text_forms() {
        let k = PrivateKey::generate();
        let again = PrivateKey::parse(&k.to_text()).unwrap();
        assert_eq!(again.public(), k.public());
        assert_eq!(PublicKey::parse(&k.public().to_string()).unwrap(), k.public());
        assert!(PublicKey::parse("ed25519:AAAA").is_err());
        assert!(PublicKey::parse(&k.to_text()).is_err());
        assert!(PrivateKey::parse(&k.public().to_string()).is_err());
    }
}
