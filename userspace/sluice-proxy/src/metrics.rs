//! Prometheus metrics: Istio's TCP metrics with Istio's names and labels (so dashboards and
//! Kiali keep working), and sluice's own counters, in the text exposition format.
//!
//! Label values come from the mesh file (workload names, namespaces, identities, service
//! hostnames) or a fixed set (`unknown`, reporters, flags), so the number of series is bounded
//! by the size of the mesh, never by traffic.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Istio's labels of a TCP connection.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Labels {
    /// `source` (the client's proxy) or `destination` (the server's).
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    /// `mutual_tls` through HBONE, `none` for plaintext.
    pub connection_security_policy: &'static str,
    /// `-` for a connection that was carried; Envoy's flags otherwise (`UF`: upstream failure).
    pub response_flags: &'static str,
}

pub const UNKNOWN: &str = "unknown";

impl Labels {
    /// Labels with every peer field unknown.
    pub fn new(reporter: &'static str, connection_security_policy: &'static str) -> Self {
        let unknown = || UNKNOWN.to_owned();
        Self {
            reporter,
            source_workload: unknown(),
            source_workload_namespace: unknown(),
            source_principal: unknown(),
            destination_workload: unknown(),
            destination_workload_namespace: unknown(),
            destination_principal: unknown(),
            destination_service: unknown(),
            connection_security_policy,
            response_flags: "-",
        }
    }

    fn render(&self) -> String {
        let pairs = [
            ("reporter", self.reporter),
            ("source_workload", &self.source_workload),
            ("source_workload_namespace", &self.source_workload_namespace),
            ("source_principal", &self.source_principal),
            ("destination_workload", &self.destination_workload),
            (
                "destination_workload_namespace",
                &self.destination_workload_namespace,
            ),
            ("destination_principal", &self.destination_principal),
            ("destination_service", &self.destination_service),
            ("request_protocol", "tcp"),
            (
                "connection_security_policy",
                self.connection_security_policy,
            ),
            ("response_flags", self.response_flags),
        ];
        let inner: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        format!("{{{}}}", inner.join(","))
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counters {
    opened: u64,
    closed: u64,
    /// Istio's `sent_bytes`: server → client.
    sent: u64,
    /// Istio's `received_bytes`: client → server.
    received: u64,
}

/// Istio's four TCP counters per label set.
#[derive(Debug, Default)]
pub struct TcpMetrics {
    series: Mutex<BTreeMap<Labels, Counters>>,
}

impl TcpMetrics {
    fn with(&self, labels: &Labels, f: impl FnOnce(&mut Counters)) {
        let mut series = self
            .series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match series.get_mut(labels) {
            Some(counters) => f(counters),
            None => f(series.entry(labels.clone()).or_default()),
        }
    }

    pub fn opened(&self, labels: &Labels) {
        self.with(labels, |c| c.opened += 1);
    }

    /// A connection ended; `received` went client → server, `sent` server → client.
    pub fn closed(&self, labels: &Labels, received: u64, sent: u64) {
        self.with(labels, |c| {
            c.closed += 1;
            c.received += received;
            c.sent += sent;
        });
    }

    /// The four Istio metrics in the text format.
    pub fn render(&self, out: &mut String) {
        let series = self
            .series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        type Get = fn(&Counters) -> u64;
        let metrics: [(&str, &str, Get); 4] = [
            (
                "istio_tcp_connections_opened_total",
                "TCP connections opened.",
                |c| c.opened,
            ),
            (
                "istio_tcp_connections_closed_total",
                "TCP connections closed.",
                |c| c.closed,
            ),
            (
                "istio_tcp_sent_bytes_total",
                "Bytes sent to the client (server to client).",
                |c| c.sent,
            ),
            (
                "istio_tcp_received_bytes_total",
                "Bytes received from the client (client to server).",
                |c| c.received,
            ),
        ];
        for (name, help, get) in metrics {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, counters) in series.iter() {
                let _ = writeln!(out, "{name}{} {}", labels.render(), get(counters));
            }
        }
    }
}

/// A counter family with one label, in the text format.
pub fn counter_family(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (value, count) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{}\"}} {count}", escape(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_per_label_set_and_rendered_in_the_text_format() {
        let m = TcpMetrics::default();
        let mut a = Labels::new("destination", "mutual_tls");
        a.source_principal = "spiffe://cluster.local/ns/default/sa/sleep".into();
        let b = Labels::new("source", "none");
        m.opened(&a);
        m.opened(&a);
        m.closed(&a, 100, 7);
        m.opened(&b);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("# TYPE istio_tcp_connections_opened_total counter"));
        let line = |metric: &str, reporter: &str| {
            out.lines()
                .find(|l| l.starts_with(metric) && l.contains(&format!("reporter=\"{reporter}\"")))
                .map(|l| l.rsplit(' ').next().unwrap_or("").to_owned())
        };
        assert_eq!(
            line("istio_tcp_connections_opened_total", "destination").as_deref(),
            Some("2")
        );
        assert_eq!(
            line("istio_tcp_connections_closed_total", "destination").as_deref(),
            Some("1")
        );
        assert_eq!(
            line("istio_tcp_received_bytes_total", "destination").as_deref(),
            Some("100")
        );
        assert_eq!(
            line("istio_tcp_sent_bytes_total", "destination").as_deref(),
            Some("7")
        );
        assert_eq!(
            line("istio_tcp_connections_opened_total", "source").as_deref(),
            Some("1")
        );
        assert!(out.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\""));
        assert!(out.contains("request_protocol=\"tcp\""));
    }

    #[test]
    fn label_values_are_escaped() {
        let mut l = Labels::new("source", "none");
        l.destination_service = "a\"b\\c".into();
        assert!(l.render().contains(r#"destination_service="a\"b\\c""#));
    }
}
