//! Workload identities: SPIFFE IDs of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<sa>`,
//! one per Kubernetes service account, as Istio issues them.

use std::fmt;

/// A workload identity. Every part is non-empty and free of `/`, so the URI form is unambiguous.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error(
        "{0:?} is not a SPIFFE identity of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Malformed(String),
    #[error("identity part {part} {value:?} is invalid: {why}")]
    Part {
        part: &'static str,
        value: String,
        why: &'static str,
    },
}

impl Identity {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        for (part, value) in [
            ("trust domain", trust_domain),
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            check_part(part, value)?;
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// Parses a URI SAN as found in a peer's certificate.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let malformed = || IdentityError::Malformed(uri.to_owned());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(malformed)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => Self::new(td, ns, sa),
            _ => Err(malformed()),
        }
    }
}

fn check_part(part: &'static str, value: &str) -> Result<(), IdentityError> {
    let bad = |why| IdentityError::Part {
        part,
        value: value.to_owned(),
        why,
    };
    if value.is_empty() {
        return Err(bad("it is empty"));
    }
    if value.len() > 253 {
        return Err(bad("it is longer than 253 bytes"));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
    if !value.chars().all(allowed) {
        return Err(bad(
            "only ASCII letters, digits, '-', '.' and '_' are allowed",
        ));
    }
    Ok(())
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_uri_form() {
        let id = Identity::new("cluster.local", "default", "sleep").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(Identity::parse(&id.to_string()).unwrap(), id);
    }

    #[test]
    fn rejects_what_is_not_an_istio_identity() {
        for bad in [
            "https://cluster.local/ns/default/sa/sleep",
            "spiffe://cluster.local/ns/default",
            "spiffe://cluster.local/ns/default/sa/sleep/extra",
            "spiffe://cluster.local/sa/default/ns/sleep",
            "spiffe:///ns/default/sa/sleep",
            "spiffe://cluster.local/ns/de fault/sa/sleep",
            "",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
