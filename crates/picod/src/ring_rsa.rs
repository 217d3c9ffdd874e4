//! RS256/384/512 signatures checked with ring, plugged into jsonwebtoken as its crypto provider:
//! jsonwebtoken still parses the token, picks and checks the algorithm and validates every claim;
//! only the RSA arithmetic moves. A token's whole verify, measured through PicoD on this project's
//! machines, took ~0.43 ms with RustCrypto's verifier (which also re-parses the key each time) and
//! takes ~0.13 ms with ring's; every session's first request pays it (verified tokens are
//! cached). Every other algorithm is RustCrypto's, as before (PicoD accepts only RS256/384/512
//! anyway).
//!
//! Keys must be RSA 2048–8192 bits (ring's floor); the Router's identity is RSA-2048.

use jsonwebtoken::crypto::{CryptoProvider, JwtVerifier};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::signature::{self, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind};
use ring::signature::{
    RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_2048_8192_SHA384, RSA_PKCS1_2048_8192_SHA512,
    RsaParameters, RsaPublicKeyComponents, UnparsedPublicKey,
};

/// jsonwebtoken's default provider with RS256/384/512 verification done by ring. Installed once by
/// PicoD's `main` (`CryptoProvider::install_default`).
pub fn provider() -> CryptoProvider {
    let default = &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER;
    CryptoProvider {
        signer_factory: default.signer_factory,
        verifier_factory: new_verifier,
        key_utils: default.key_utils.clone(),
    }
}

/// Refuses a key ring would refuse for every token (anything but RSA of 2048–8192 bits), so that
/// PicoD fails at start with the reason instead of answering every request 401.
pub fn check_key(key: &DecodingKey) -> Result<(), String> {
    let bits = match key.kind() {
        DecodingKeyKind::SecretOrDer(der) => {
            modulus_bits(modulus_of(der).ok_or("not a DER RSA public key (PKCS#1)")?)
        }
        DecodingKeyKind::RsaModulusExponent { n, .. } => modulus_bits(n),
    };
    if (2048..=8192).contains(&bits) {
        Ok(())
    } else {
        Err(format!(
            "an RSA key of {bits} bits; 2048 to 8192 are accepted"
        ))
    }
}

/// The modulus of a PKCS#1 `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }`,
/// read by hand: only its length matters here (ring parses the key for real on every verify), and
/// RustCrypto's parser would make its code resident in every idle PicoD (~0.1 MiB measured).
fn modulus_of(der: &[u8]) -> Option<&[u8]> {
    /// One DER element with tag `tag` at the start of `b`: (its content, what follows it).
    fn element(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (&t, rest) = b.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = match first {
            0..=0x7f => (usize::from(first), rest),
            0x81..=0x84 => {
                let n = usize::from(first & 0x7f);
                let (bytes, rest) = (rest.get(..n)?, rest.get(n..)?);
                (
                    bytes.iter().fold(0usize, |a, b| a << 8 | usize::from(*b)),
                    rest,
                )
            }
            _ => return None,
        };
        (t == tag).then_some(())?;
        Some((rest.get(..len)?, rest.get(len..)?))
    }
    let (seq, _) = element(der, 0x30)?;
    let (modulus, _) = element(seq, 0x02)?;
    Some(modulus)
}

fn modulus_bits(n: &[u8]) -> usize {
    let n = &n[n.iter().take_while(|b| **b == 0).count()..];
    n.first()
        .map_or(0, |top| n.len() * 8 - top.leading_zeros() as usize)
}

fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    let params: &'static RsaParameters = match alg {
        Algorithm::RS256 => &RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &RSA_PKCS1_2048_8192_SHA512,
        _ => {
            return (jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.verifier_factory)(
                alg, key,
            );
        }
    };
    if key.family() != AlgorithmFamily::Rsa {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(RingRsa {
        alg: *alg,
        params,
        key: key.kind().clone(),
    }))
}

/// One token's verifier: the key as jsonwebtoken holds it (PKCS#1 DER, or modulus and exponent).
struct RingRsa {
    alg: Algorithm,
    params: &'static RsaParameters,
    key: DecodingKeyKind,
}

impl Verifier<Vec<u8>> for RingRsa {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
        let checked = match &self.key {
            DecodingKeyKind::SecretOrDer(der) => {
                UnparsedPublicKey::new(self.params, der).verify(msg, sig)
            }
            DecodingKeyKind::RsaModulusExponent { n, e } => {
                RsaPublicKeyComponents { n, e }.verify(self.params, msg, sig)
            }
        };
        checked.map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for RingRsa {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    const KEY: &[u8] = include_bytes!("../tests/data/router.key.pem");
    const PUB: &[u8] = include_bytes!("../tests/data/router.pub.pem");
    const OTHER_PUB: &[u8] = include_bytes!("../tests/data/other.pub.pem");

    fn token(alg: Algorithm) -> String {
        let key = EncodingKey::from_rsa_pem(KEY).unwrap();
        jsonwebtoken::encode(&Header::new(alg), &serde_json::json!({"exp": 1}), &key).unwrap()
    }

    /// (message, signature) of a compact token, as jsonwebtoken hands them to a verifier.
    fn parts(t: &str) -> (Vec<u8>, Vec<u8>) {
        use base64::Engine;
        let (msg, sig) = t.rsplit_once('.').unwrap();
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .unwrap();
        (msg.as_bytes().to_vec(), sig)
    }

    fn verifies(alg: Algorithm, key: &DecodingKey, msg: &[u8], sig: &Vec<u8>) -> bool {
        new_verifier(&alg, key).unwrap().verify(msg, sig).is_ok()
    }

    #[test]
    fn accepts_the_keys_signatures_and_nothing_else() {
        let key = DecodingKey::from_rsa_pem(PUB).unwrap();
        let other = DecodingKey::from_rsa_pem(OTHER_PUB).unwrap();
        for alg in [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512] {
            let (msg, sig) = parts(&token(alg));
            assert!(verifies(alg, &key, &msg, &sig), "{alg:?}");
            assert!(!verifies(alg, &other, &msg, &sig), "{alg:?}: another key");
            let mut tampered = msg.clone();
            *tampered.last_mut().unwrap() ^= 1;
            assert!(!verifies(alg, &key, &tampered, &sig), "{alg:?}: message");
            let mut bad = sig.clone();
            bad[10] ^= 1;
            assert!(!verifies(alg, &key, &msg, &bad), "{alg:?}: signature");
        }
        // The hash is the algorithm's: an RS256 signature is not an RS512 one.
        let (msg, sig) = parts(&token(Algorithm::RS256));
        assert!(!verifies(Algorithm::RS512, &key, &msg, &sig));
    }

    #[test]
    fn modulus_and_exponent_keys_verify_too() {
        let key = DecodingKey::from_rsa_pem(PUB).unwrap();
        let DecodingKeyKind::SecretOrDer(der) = key.kind() else {
            panic!("PEM keys are DER")
        };
        let components = (jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER
            .key_utils
            .rsa_pub_components_from_public_key)(der)
        .unwrap();
        let raw = DecodingKey::from_rsa_raw_components(&components.0, &components.1);
        let (msg, sig) = parts(&token(Algorithm::RS256));
        assert!(verifies(Algorithm::RS256, &raw, &msg, &sig));
    }

    #[test]
    fn keys_outside_2048_to_8192_bits_are_refused() {
        let key = DecodingKey::from_rsa_pem(PUB).unwrap();
        assert_eq!(check_key(&key), Ok(()));
        let short = include_bytes!("../tests/data/short.pub.pem");
        let short = DecodingKey::from_rsa_pem(short).unwrap();
        assert_eq!(
            check_key(&short).unwrap_err(),
            "an RSA key of 1024 bits; 2048 to 8192 are accepted"
        );
        assert_eq!(modulus_bits(&[0, 0, 0b0100_0000, 0]), 15);
        for bad in [
            &[][..],
            &[0x30],
            &[0x30, 0x05, 0x02, 0x01],
            &[0x31, 0x03, 0x02, 0x01, 0x01],
        ] {
            assert_eq!(modulus_of(bad), None, "{bad:?}");
        }
        assert_eq!(
            modulus_of(&[0x30, 0x03, 0x02, 0x01, 0x7f]),
            Some(&[0x7f][..])
        );
    }

    #[test]
    fn non_rsa_keys_and_algorithms_are_refused() {
        let hmac = DecodingKey::from_secret(b"secret");
        assert!(new_verifier(&Algorithm::RS256, &hmac).is_err());
        // Other algorithms go to RustCrypto, which refuses an RSA key for HMAC.
        let key = DecodingKey::from_rsa_pem(PUB).unwrap();
        assert!(new_verifier(&Algorithm::HS256, &key).is_err());
    }
}
