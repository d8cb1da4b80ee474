//! What a test needs to run nats-server with TLS and authentication: certificates made for the
//! test (a CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and a
//! second CA nobody trusts), NKey users, and `.creds` files of an operator, account and user
//! minted here (no `nsc`), with the configuration blocks that make nats-server accept them.

use std::path::{Path, PathBuf};

use nkeys::KeyPair;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair as CertKey, KeyUsagePurpose,
};
use serde_json::{Value, json};

/// Certificates and keys in a temporary folder, as PEM files.
pub struct Pki {
    dir: tempfile::TempDir,
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// The server's certificate (127.0.0.1 and localhost) and key.
    pub server: (PathBuf, PathBuf),
    /// A client certificate (CN `sagaflow-client`) and key, for mutual TLS.
    pub client: (PathBuf, PathBuf),
    /// A CA that signed nothing here: a client trusting only it refuses the server.
    pub other_ca: PathBuf,
}

impl Pki {
    /// Makes the certificates (P-256 keys).
    pub fn generate() -> Pki {
        let dir = tempfile::tempdir().expect("a folder for the certificates");
        let (ca, issuer) = authority(dir.path(), "ca", "sagaflow test CA");
        let server = leaf(
            dir.path(),
            "server",
            "nats-server",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
            &issuer,
        );
        let client = leaf(
            dir.path(),
            "client",
            "sagaflow-client",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            &issuer,
        );
        let (other_ca, _) = authority(dir.path(), "other-ca", "an authority nobody trusts");
        Pki {
            dir,
            ca,
            server,
            client,
            other_ca,
        }
    }

    /// The folder holding the files (for secrets a test writes next to them).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// nats-server's `tls` block: its certificate, and with `verify_clients` a client
    /// certificate signed by the CA is required.
    pub fn tls_block(&self, verify_clients: bool) -> String {
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: {verify_clients}\n  timeout: 5\n}}\n",
            self.server.0, self.server.1, self.ca
        )
    }
}

fn authority(dir: &Path, file: &str, name: &str) -> (PathBuf, Issuer<'static, CertKey>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = CertKey::generate().expect("a CA key");
    let cert = params.self_signed(&key).expect("a self-signed CA");
    let path = dir.join(format!("{file}.pem"));
    std::fs::write(&path, cert.pem()).expect("write the CA");
    (path, Issuer::new(params, key))
}

fn leaf(
    dir: &Path,
    file: &str,
    name: &str,
    hosts: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, CertKey>,
) -> (PathBuf, PathBuf) {
    let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("certificate parameters");
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let key = CertKey::generate().expect("a key");
    let cert = params
        .signed_by(&key, issuer)
        .expect("a signed certificate");
    let cert_path = dir.join(format!("{file}.pem"));
    let key_path = dir.join(format!("{file}-key.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("write the certificate");
    std::fs::write(&key_path, key.serialize_pem()).expect("write the key");
    (cert_path, key_path)
}

/// A new NKey user: its seed (`SU...`, what the client holds) and its public key (`U...`,
/// what the server's `authorization` block names).
pub fn nkey_user() -> (String, String) {
    let user = KeyPair::new_user();
    (user.seed().expect("a user seed"), user.public_key())
}

/// An operator, its system account and one account with JetStream, for decentralized
/// authentication with `.creds` files, all minted here.
pub struct Operator {
    operator: KeyPair,
    system: KeyPair,
    account: KeyPair,
    operator_jwt_file: PathBuf,
}

impl Operator {
    /// A new operator whose JWT is written to `dir`.
    pub fn new(dir: &Path) -> Operator {
        let operator = KeyPair::new_operator();
        let system = KeyPair::new_account();
        let account = KeyPair::new_account();
        let claims = json!({
            "type": "operator",
            "version": 2,
            "system_account": system.public_key(),
        });
        let jwt = mint(
            &operator.public_key(),
            "sagaflow-test-operator",
            claims,
            &operator,
        );
        let operator_jwt_file = dir.join("operator.jwt");
        std::fs::write(&operator_jwt_file, jwt).expect("write the operator JWT");
        Operator {
            operator,
            system,
            account,
            operator_jwt_file,
        }
    }

    /// The server configuration that trusts this operator, with its accounts preloaded in a
    /// memory resolver (the account with JetStream without limits).
    pub fn server_block(&self) -> String {
        let unlimited = json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
        });
        let mut with_jetstream = unlimited.clone();
        for key in ["mem_storage", "disk_storage", "streams", "consumer"] {
            with_jetstream[key] = json!(-1);
        }
        let system_jwt = mint(
            &self.system.public_key(),
            "SYS",
            json!({"type": "account", "version": 2, "limits": unlimited}),
            &self.operator,
        );
        let account_jwt = mint(
            &self.account.public_key(),
            "SAGAFLOW",
            json!({"type": "account", "version": 2, "limits": with_jetstream}),
            &self.operator,
        );
        format!(
            "operator: {:?}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{system_jwt}\"\n  {}: \"{account_jwt}\"\n}}\n",
            self.operator_jwt_file,
            self.system.public_key(),
            self.system.public_key(),
            self.account.public_key(),
        )
    }

    /// A `.creds` file, written to `path`, of a new user of the account with every permission.
    pub fn user_creds(&self, path: &Path) {
        let user = KeyPair::new_user();
        let claims = json!({
            "type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1,
        });
        let jwt = mint(
            &user.public_key(),
            "sagaflow-test-user",
            claims,
            &self.account,
        );
        let seed = user.seed().expect("a user seed");
        let creds = format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        );
        std::fs::write(path, creds).expect("write the creds file");
    }
}

/// A JWT of `subject` with `nats` claims, signed by `issuer` as nats-server expects.
fn mint(subject: &str, name: &str, nats: Value, issuer: &KeyPair) -> String {
    use data_encoding::BASE64URL_NOPAD;
    let issued = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let claims = json!({
        "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        "iat": issued,
        "iss": issuer.public_key(),
        "sub": subject,
        "name": name,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
        BASE64URL_NOPAD.encode(claims.to_string().as_bytes())
    );
    let signature = issuer.sign(signed.as_bytes()).expect("sign the JWT");
    format!("{signed}.{}", BASE64URL_NOPAD.encode(&signature))
}
