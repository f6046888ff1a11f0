//! `[kafka.security]`: TLS and SASL for every client of a process, typed
//! for the common cases and mapped to librdkafka's properties
//! ([`SecuritySettings::properties`]); `[kafka.options]` can still set any
//! other property.
//!
//! Secrets (`password`, `client_key_password`, `oauthbearer.client_secret`)
//! come from the file, the environment (`CONVEYOR__KAFKA__SECURITY__PASSWORD`)
//! or a `*_file` next to them, and are never printed: `Debug` shows `***`
//! and `conveyor config check` prints `"***"`.
//!
//! librdkafka is built with OpenSSL (rdkafka's `ssl-vendored` feature), so
//! TLS, SCRAM-SHA-256/512 and PLAIN are in the build. GSSAPI (Kerberos)
//! needs Cyrus SASL and OAUTHBEARER's OIDC client needs libcurl: neither is
//! built in, and librdkafka refuses them when the clients are created,
//! which stops the command with its message.
//! A vendored OpenSSL does not know where the system's certificate
//! authorities are: `ca_file` defaults to librdkafka's `probe`, which finds
//! the usual bundle paths, so public clusters verify out of the box.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// A secret string: `Debug` never shows it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// A secret holding `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value, for handing to librdkafka only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether no secret is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `***` when set, for printing.
    fn redacted(&self) -> Secret {
        if self.0.is_empty() {
            Secret::default()
        } else {
            Secret("***".into())
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

/// How clients talk to the brokers (librdkafka's `security.protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// No TLS, no authentication.
    #[default]
    Plaintext,
    /// TLS, no SASL (with a client certificate: mutual TLS).
    Ssl,
    /// SASL without TLS (credentials in the clear: test clusters only).
    SaslPlaintext,
    /// SASL over TLS: Confluent Cloud, MSK with SCRAM, Aiven, Redpanda Cloud.
    SaslSsl,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Plaintext => "plaintext",
            Protocol::Ssl => "ssl",
            Protocol::SaslPlaintext => "sasl_plaintext",
            Protocol::SaslSsl => "sasl_ssl",
        }
    }

    fn tls(self) -> bool {
        matches!(self, Protocol::Ssl | Protocol::SaslSsl)
    }

    fn sasl(self) -> bool {
        matches!(self, Protocol::SaslPlaintext | Protocol::SaslSsl)
    }
}

/// The SASL mechanism (librdkafka's `sasl.mechanisms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Mechanism {
    /// Username and password in the clear (inside TLS): Confluent Cloud API keys.
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM with SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM with SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    /// OAuth 2 bearer tokens from an OIDC token endpoint (client credentials).
    #[serde(rename = "OAUTHBEARER")]
    OauthBearer,
}

impl Mechanism {
    fn as_str(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha512 => "SCRAM-SHA-512",
            Mechanism::OauthBearer => "OAUTHBEARER",
        }
    }
}

/// `[kafka.security.oauthbearer]`: OIDC client credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OauthSettings {
    /// The token endpoint URL.
    pub token_endpoint: String,
    /// The client id.
    pub client_id: String,
    /// The client secret (or `client_secret_file`).
    pub client_secret: Secret,
    /// A file holding the client secret.
    pub client_secret_file: String,
    /// Scopes to ask for, space-separated; empty: none.
    pub scope: String,
}

/// `[kafka.security]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySettings {
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub protocol: Protocol,
    /// With `sasl_*`: `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512` or
    /// `OAUTHBEARER`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<Mechanism>,
    /// SASL PLAIN/SCRAM user name.
    pub username: String,
    /// SASL PLAIN/SCRAM password (or `password_file`).
    pub password: Secret,
    /// A file holding the password (a trailing newline is ignored).
    pub password_file: String,
    /// PEM file of the certificate authorities that signed the brokers'
    /// certificates; empty: the system's bundle (librdkafka's `probe`).
    pub ca_file: String,
    /// Whether the broker's certificate must name the host connected to.
    pub verify_hostname: bool,
    /// Mutual TLS: this client's certificate (PEM).
    pub client_cert_file: String,
    /// Mutual TLS: this client's private key (PEM).
    pub client_key_file: String,
    /// Mutual TLS: the private key's password, if it has one.
    pub client_key_password: Secret,
    /// OAUTHBEARER settings.
    pub oauthbearer: OauthSettings,
}

impl Default for SecuritySettings {
    fn default() -> Self {
        SecuritySettings {
            protocol: Protocol::Plaintext,
            sasl_mechanism: None,
            username: String::new(),
            password: Secret::default(),
            password_file: String::new(),
            ca_file: String::new(),
            verify_hostname: true,
            client_cert_file: String::new(),
            client_key_file: String::new(),
            client_key_password: Secret::default(),
            oauthbearer: OauthSettings::default(),
        }
    }
}

/// Every librdkafka property this section sets (for refusing them in
/// `kafka.options`, where they would be ambiguous).
pub const PROPERTIES: &[&str] = &[
    "security.protocol",
    "sasl.mechanisms",
    "sasl.mechanism",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.endpoint.identification.algorithm",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.key.password",
    "sasl.oauthbearer.method",
    "sasl.oauthbearer.token.endpoint.url",
    "sasl.oauthbearer.client.id",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.scope",
];

impl SecuritySettings {
    /// librdkafka properties for this section.
    pub fn properties(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![("security.protocol", self.protocol.as_str().to_owned())];
        if self.protocol.tls() {
            let ca = if self.ca_file.is_empty() {
                "probe".to_owned()
            } else {
                self.ca_file.clone()
            };
            out.push(("ssl.ca.location", ca));
            let algorithm = if self.verify_hostname {
                "https"
            } else {
                "none"
            };
            out.push(("ssl.endpoint.identification.algorithm", algorithm.into()));
            if !self.client_cert_file.is_empty() {
                out.push(("ssl.certificate.location", self.client_cert_file.clone()));
                out.push(("ssl.key.location", self.client_key_file.clone()));
                if !self.client_key_password.is_empty() {
                    out.push(("ssl.key.password", self.client_key_password.expose().into()));
                }
            }
        }
        if self.protocol.sasl() {
            if let Some(mechanism) = self.sasl_mechanism {
                out.push(("sasl.mechanisms", mechanism.as_str().into()));
                if mechanism == Mechanism::OauthBearer {
                    let o = &self.oauthbearer;
                    out.push(("sasl.oauthbearer.method", "oidc".into()));
                    out.push((
                        "sasl.oauthbearer.token.endpoint.url",
                        o.token_endpoint.clone(),
                    ));
                    out.push(("sasl.oauthbearer.client.id", o.client_id.clone()));
                    out.push((
                        "sasl.oauthbearer.client.secret",
                        o.client_secret.expose().into(),
                    ));
                    if !o.scope.is_empty() {
                        out.push(("sasl.oauthbearer.scope", o.scope.clone()));
                    }
                } else {
                    out.push(("sasl.username", self.username.clone()));
                    out.push(("sasl.password", self.password.expose().into()));
                }
            }
        }
        out
    }

    /// Reads the `*_file` secrets into their fields. An error names the key.
    pub fn read_secret_files(&mut self) -> Result<(), (String, String)> {
        let read = |key: &str, path: &str| -> Result<Secret, (String, String)> {
            std::fs::read_to_string(path)
                .map(|s| Secret(s.trim_end_matches(['\n', '\r']).to_owned()))
                .map_err(|e| {
                    (
                        format!("kafka.security.{key}"),
                        format!("cannot read {path}: {e}"),
                    )
                })
        };
        if !self.password_file.is_empty() {
            if !self.password.is_empty() {
                return Err((
                    "kafka.security.password_file".into(),
                    "set either password or password_file, not both".into(),
                ));
            }
            self.password = read("password_file", &self.password_file)?;
        }
        let o = &mut self.oauthbearer;
        if !o.client_secret_file.is_empty() {
            if !o.client_secret.is_empty() {
                return Err((
                    "kafka.security.oauthbearer.client_secret_file".into(),
                    "set either client_secret or client_secret_file, not both".into(),
                ));
            }
            o.client_secret = read("oauthbearer.client_secret_file", &o.client_secret_file)?;
        }
        Ok(())
    }

    /// This section with every secret shown as `***`.
    pub fn redacted(&self) -> SecuritySettings {
        let mut s = self.clone();
        s.password = s.password.redacted();
        s.client_key_password = s.client_key_password.redacted();
        s.oauthbearer.client_secret = s.oauthbearer.client_secret.redacted();
        s
    }

    /// Every problem, each with its key under `kafka.security`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut bad = |key: &str, why: &str| {
            out.push((format!("kafka.security.{key}"), why.to_owned()));
        };
        match (self.protocol.sasl(), self.sasl_mechanism) {
            (true, None) => bad(
                "sasl_mechanism",
                "required with sasl_plaintext and sasl_ssl: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER",
            ),
            (false, Some(_)) => bad(
                "sasl_mechanism",
                "only used with protocol sasl_plaintext or sasl_ssl",
            ),
            (true, Some(Mechanism::OauthBearer)) => {
                let o = &self.oauthbearer;
                if !(o.token_endpoint.starts_with("https://") || o.token_endpoint.starts_with("http://")) {
                    bad("oauthbearer.token_endpoint", "required with OAUTHBEARER: the OIDC token endpoint URL");
                }
                if o.client_id.is_empty() {
                    bad("oauthbearer.client_id", "required with OAUTHBEARER");
                }
                if o.client_secret.is_empty() {
                    bad("oauthbearer.client_secret", "required with OAUTHBEARER (or client_secret_file)");
                }
            }
            (true, Some(_)) => {
                if self.username.is_empty() {
                    bad("username", "required with PLAIN and SCRAM");
                }
                if self.password.is_empty() {
                    bad("password", "required with PLAIN and SCRAM (or password_file)");
                }
            }
            (false, None) => {}
        }
        let tls_only = |key: &str, value: &str, bad: &mut dyn FnMut(&str, &str)| {
            if !value.is_empty() && !self.protocol.tls() {
                bad(key, "only used with protocol ssl or sasl_ssl");
            }
        };
        tls_only("ca_file", &self.ca_file, &mut bad);
        tls_only("client_cert_file", &self.client_cert_file, &mut bad);
        tls_only("client_key_file", &self.client_key_file, &mut bad);
        if self.client_cert_file.is_empty() != self.client_key_file.is_empty() {
            bad(
                "client_key_file",
                "mutual TLS needs both client_cert_file and client_key_file",
            );
        }
        for (key, path) in [
            ("ca_file", &self.ca_file),
            ("client_cert_file", &self.client_cert_file),
            ("client_key_file", &self.client_key_file),
        ] {
            if !path.is_empty() && !Path::new(path).is_file() {
                bad(key, &format!("{path}: no such file"));
            }
        }
        out
    }
}

/// What a librdkafka error during connection means, when it is one that
/// retrying cannot fix: a message naming the cause and the setting to
/// check. `reason` is librdkafka's text for it.
pub fn fatal_connection_error(
    code: Option<rdkafka::types::RDKafkaErrorCode>,
    reason: &str,
) -> Option<String> {
    use rdkafka::types::RDKafkaErrorCode as E;
    let lower = reason.to_ascii_lowercase();
    match code? {
        E::Authentication | E::SaslAuthenticationFailed => Some(format!(
            "authentication failed: {reason}; check kafka.security.username and password (or password_file) and sasl_mechanism"
        )),
        E::SSL => {
            if lower.contains("hostname") || lower.contains("host name") || lower.contains("does not match") {
                Some(format!(
                    "TLS: the broker's certificate does not name the host connected to: {reason}; check kafka.brokers (use a name the certificate holds) or kafka.security.verify_hostname"
                ))
            } else if lower.contains("verify failed") || lower.contains("unknown ca") || lower.contains("self-signed") || lower.contains("unable to get") {
                // OpenSSL says the same for an unknown authority and for a
                // certificate that names another host.
                Some(format!(
                    "TLS: the broker's certificate could not be verified: {reason}; check kafka.security.ca_file \
                     (the authority that signed the brokers' certificates) and that kafka.brokers names a host \
                     the certificate holds (or kafka.security.verify_hostname)"
                ))
            } else {
                Some(format!(
                    "TLS handshake failed: {reason}; check kafka.security (protocol, ca_file, client_cert_file)"
                ))
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scram() -> SecuritySettings {
        SecuritySettings {
            protocol: Protocol::SaslSsl,
            sasl_mechanism: Some(Mechanism::ScramSha512),
            username: "alice".into(),
            password: Secret::new("s3cr3t-pw"),
            client_key_password: Secret::new("k3y-pw"),
            oauthbearer: OauthSettings {
                client_secret: Secret::new("cl13nt-s3cr3t"),
                ..OauthSettings::default()
            },
            ..SecuritySettings::default()
        }
    }

    #[test]
    fn sasl_ssl_maps_to_librdkafka_with_the_system_bundle_by_default() {
        let props = scram().properties();
        let get = |k: &str| props.iter().find(|(p, _)| *p == k).map(|(_, v)| v.as_str());
        assert_eq!(get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(get("sasl.username"), Some("alice"));
        assert_eq!(get("sasl.password"), Some("s3cr3t-pw"));
        assert_eq!(get("ssl.ca.location"), Some("probe"));
        assert_eq!(get("ssl.endpoint.identification.algorithm"), Some("https"));
        let plain = SecuritySettings::default().properties();
        assert_eq!(plain, vec![("security.protocol", "plaintext".to_owned())]);
    }

    #[test]
    fn no_secret_shows_in_debug_or_redacted_output() {
        let s = scram();
        let debug = format!("{s:?}");
        let shown = toml::to_string(&s.redacted()).unwrap();
        for secret in ["s3cr3t-pw", "k3y-pw", "cl13nt-s3cr3t"] {
            assert!(!debug.contains(secret), "{debug}");
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("password = \"***\""), "{shown}");
        assert!(shown.contains("client_key_password = \"***\""), "{shown}");
        assert!(shown.contains("client_secret = \"***\""), "{shown}");
    }

    #[test]
    fn problems_name_their_keys() {
        let s = SecuritySettings {
            protocol: Protocol::SaslSsl,
            ..SecuritySettings::default()
        };
        assert_eq!(s.problems()[0].0, "kafka.security.sasl_mechanism");
        let s = SecuritySettings {
            protocol: Protocol::SaslSsl,
            sasl_mechanism: Some(Mechanism::Plain),
            ca_file: "/no/such/ca.pem".into(),
            ..SecuritySettings::default()
        };
        let keys: Vec<String> = s.problems().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            vec![
                "kafka.security.username",
                "kafka.security.password",
                "kafka.security.ca_file"
            ]
        );
        let s = SecuritySettings {
            client_cert_file: "c.pem".into(),
            ..SecuritySettings::default()
        };
        let problems = s.problems();
        assert!(problems
            .iter()
            .any(|(k, w)| k == "kafka.security.client_cert_file"
                && w.contains("only used with protocol ssl")));
    }

    #[test]
    fn secret_files_are_read_and_not_both() {
        let path = std::env::temp_dir().join(format!("conveyor-pw-{}", std::process::id()));
        std::fs::write(&path, "from-file\n").unwrap();
        let mut s = SecuritySettings {
            password_file: path.display().to_string(),
            ..SecuritySettings::default()
        };
        s.read_secret_files().unwrap();
        assert_eq!(s.password.expose(), "from-file");
        let mut both = s.clone();
        both.password = Secret::new("x");
        assert_eq!(
            both.read_secret_files().unwrap_err().0,
            "kafka.security.password_file"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn connection_errors_name_the_setting_to_check() {
        use rdkafka::types::RDKafkaErrorCode as E;
        let auth = fatal_connection_error(
            Some(E::Authentication),
            "SASL SCRAM-SHA-512 mechanism handshake failed: invalid-proof",
        )
        .unwrap();
        assert!(
            auth.starts_with("authentication failed") && auth.contains("kafka.security.username"),
            "{auth}"
        );
        let ca = fatal_connection_error(
            Some(E::SSL),
            "SSL handshake failed: error:0A000086:SSL routines::certificate verify failed",
        )
        .unwrap();
        assert!(
            ca.contains("could not be verified") && ca.contains("kafka.security.ca_file"),
            "{ca}"
        );
        let host = fatal_connection_error(
            Some(E::SSL),
            "Certificate verification failed: hostname mismatch",
        )
        .unwrap();
        assert!(host.contains("does not name the host"), "{host}");
        assert_eq!(
            fatal_connection_error(Some(E::AllBrokersDown), "1/1 brokers are down"),
            None
        );
    }
}
