//! CurveZMQ keys (RFC 26) for a broker running with `[security] curve = true`.
//!
//! Such a broker serves only clients whose public key is among its client
//! certificates; any other peer never completes the handshake and gets
//! nothing (its streams time out). A client needs three keys, all 40-character
//! z85 text: its own secret and public key, and the broker's public key.
//! [`CurveKeys::from_files`] reads them from the certificate files that
//! `tts-broker keys` (pyzmq's `zmq.auth`) writes: `NAME.key_secret` holds
//! `public-key = "…"` and `secret-key = "…"`, the broker's `broker.key` its
//! `public-key = "…"`.

use std::fmt;
use std::path::Path;

use crate::error::Error;

/// The keys a client needs to talk to a broker with CURVE: its own pair and the broker's public key.
///
/// Keys are kept in z85 text, as the certificate files hold them; `Debug`
/// never prints the secret one.
#[derive(Clone, PartialEq, Eq)]
pub struct CurveKeys {
    secret: String,
    public: String,
    server: String,
}

impl fmt::Debug for CurveKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CurveKeys")
            .field("public", &self.public)
            .field("secret", &"<hidden>")
            .field("server", &self.server)
            .finish()
    }
}

/// True when the libzmq this crate is linked with was built with CURVE
/// (Debian's libzmq5 is, through libsodium).
pub fn curve_available() -> bool {
    zmq::has("curve") == Some(true)
}

fn check_key(what: &str, key: &str) -> Result<String, Error> {
    let key = key.trim();
    if key.len() != 40 {
        return Err(Error::Curve(format!(
            "{what}: a z85 key has 40 characters, got {}",
            key.len()
        )));
    }
    // libzmq's decoder accepts any byte: check the z85 alphabet ourselves.
    const Z85: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";
    if let Some(c) = key.chars().find(|c| !Z85.contains(*c)) {
        return Err(Error::Curve(format!("{what}: {c:?} is not z85 text")));
    }
    Ok(key.to_string())
}

/// The value of `name = "…"` in a zmq.auth certificate (`public-key`, `secret-key`), if present.
fn certificate_field(text: &str, name: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let rest = line.strip_prefix(name)?.trim_start();
            let value = rest.strip_prefix('=')?.trim();
            Some(value.trim_matches(|c| c == '"' || c == '\'').to_string())
        })
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| Error::Curve(format!("cannot read certificate {}: {e}", path.display())))
}

impl CurveKeys {
    /// Keys given as z85 text: the client's secret and public key, and the broker's public key.
    pub fn new(secret: &str, public: &str, server: &str) -> Result<CurveKeys, Error> {
        Ok(CurveKeys {
            secret: check_key("secret key", secret)?,
            public: check_key("public key", public)?,
            server: check_key("broker public key", server)?,
        })
    }

    /// Read the client's secret certificate (`NAME.key_secret`) and the
    /// broker's public one (`broker.key`), in zmq.auth's format.
    pub fn from_files(
        secret_certificate: impl AsRef<Path>,
        broker_certificate: impl AsRef<Path>,
    ) -> Result<CurveKeys, Error> {
        let (own, broker) = (secret_certificate.as_ref(), broker_certificate.as_ref());
        let text = read(own)?;
        let secret = certificate_field(&text, "secret-key").ok_or_else(|| {
            Error::Curve(format!(
                "{}: no secret-key (give the NAME.key_secret file, not NAME.key)",
                own.display()
            ))
        })?;
        let public = certificate_field(&text, "public-key")
            .ok_or_else(|| Error::Curve(format!("{}: no public-key", own.display())))?;
        let server = certificate_field(&read(broker)?, "public-key")
            .ok_or_else(|| Error::Curve(format!("{}: no public-key", broker.display())))?;
        CurveKeys::new(&secret, &public, &server)
    }

    /// The client's public key (z85): what the broker's `client_keys` directory must hold.
    pub fn public_key(&self) -> &str {
        &self.public
    }

    /// The broker's public key (z85) this client will accept.
    pub fn server_key(&self) -> &str {
        &self.server
    }

    /// Make `sock` a CURVE client of the broker; before `connect`.
    pub(crate) fn apply(&self, sock: &zmq::Socket) -> Result<(), Error> {
        if !curve_available() {
            return Err(Error::Curve(
                "this libzmq was built without CURVE (zmq_has(\"curve\") is false)".into(),
            ));
        }
        let decode = |k: &str| zmq::z85_decode(k).map_err(|e| Error::Curve(format!("bad z85 key: {e}")));
        sock.set_curve_serverkey(&decode(&self.server)?)?;
        sock.set_curve_publickey(&decode(&self.public)?)?;
        sock.set_curve_secretkey(&decode(&self.secret)?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUBLIC: &str = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7";
    const SECRET: &str = "JTKVSB%%)wK0E.X)V>+}o?pNmC{O&4W4b!Ni{Lh6";

    #[test]
    fn debians_libzmq_has_curve() {
        assert!(
            curve_available(),
            "libzmq without CURVE: the secure broker cannot be reached"
        );
    }

    #[test]
    fn reads_zmq_auth_certificates() {
        let dir = std::env::temp_dir().join(format!("tts-curve-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("c1.key_secret");
        let public = dir.join("broker.key");
        std::fs::write(
            &secret,
            format!("#   ****  Generated by pyzmq  ****\n\nmetadata\ncurve\n    public-key = \"{PUBLIC}\"\n    secret-key = \"{SECRET}\"\n"),
        )
        .unwrap();
        std::fs::write(&public, format!("metadata\ncurve\n    public-key = \"{PUBLIC}\"\n")).unwrap();
        let keys = CurveKeys::from_files(&secret, &public).unwrap();
        assert_eq!((keys.public_key(), keys.server_key()), (PUBLIC, PUBLIC));
        assert!(!format!("{keys:?}").contains(SECRET), "Debug prints the secret key");
        // The public certificate has no secret key: a clear error, not a silent plain connection.
        let err = CurveKeys::from_files(&public, &public).unwrap_err().to_string();
        assert!(err.contains("no secret-key"), "{err}");
        let err = CurveKeys::from_files(dir.join("missing"), &public)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read certificate"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_malformed_keys() {
        assert!(CurveKeys::new(SECRET, PUBLIC, PUBLIC).is_ok());
        assert!(CurveKeys::new("short", PUBLIC, PUBLIC)
            .unwrap_err()
            .to_string()
            .contains("40 characters"));
        let bad = "~".repeat(40);
        assert!(CurveKeys::new(SECRET, PUBLIC, &bad)
            .unwrap_err()
            .to_string()
            .contains("not z85"));
    }

    #[test]
    fn keys_reach_the_socket() {
        let ctx = zmq::Context::new();
        let sock = ctx.socket(zmq::DEALER).unwrap();
        CurveKeys::new(SECRET, PUBLIC, PUBLIC).unwrap().apply(&sock).unwrap();
        assert_eq!(sock.get_curve_serverkey().unwrap(), zmq::z85_decode(PUBLIC).unwrap());
        assert_eq!(sock.get_mechanism().unwrap(), zmq::Mechanism::ZMQ_CURVE);
    }
}
