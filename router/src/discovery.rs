//! Engine discovery by DNS: a name (e.g. a Kubernetes headless service)
//! resolving to one address per engine pod, re-resolved periodically.
//! New addresses get a scheduler; addresses that disappear stop receiving
//! requests, finish the ones they have, and are then dropped.

use std::collections::BTreeSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// Turns `host:port` into addresses. The default asks the system resolver;
/// tests give a scripted one.
pub trait Resolver: Send + Sync + 'static {
    fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>>;
}

/// The system resolver (`getaddrinfo`, so `/etc/hosts` and DNS).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        Ok((host, port).to_socket_addrs()?.collect())
    }
}

/// Where to find engines by name.
#[derive(Clone)]
pub struct EngineDiscovery {
    pub host: String,
    pub port: u16,
    pub interval: Duration,
    pub resolver: Arc<dyn Resolver>,
}

impl std::fmt::Debug for EngineDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineDiscovery")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("interval", &self.interval)
            .finish()
    }
}

impl EngineDiscovery {
    /// Parses `host:port` (the system resolver, `interval` between lookups).
    pub fn parse(spec: &str, interval: Duration) -> Result<Self, String> {
        let (host, port) = spec
            .rsplit_once(':')
            .ok_or_else(|| format!("--engine-dns `{spec}`: expected HOST:PORT"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("--engine-dns `{spec}`: `{port}` is not a port"))?;
        if host.is_empty() {
            return Err(format!("--engine-dns `{spec}`: empty host"));
        }
        Ok(EngineDiscovery {
            host: host.trim_start_matches('[').trim_end_matches(']').to_string(),
            port,
            interval,
            resolver: Arc::new(SystemResolver),
        })
    }

    /// Engine URLs the name resolves to now (sorted, deduplicated).
    pub async fn lookup(&self) -> std::io::Result<BTreeSet<String>> {
        let (resolver, host, port) = (self.resolver.clone(), self.host.clone(), self.port);
        let addrs = tokio::task::spawn_blocking(move || resolver.resolve(&host, port))
            .await
            .map_err(std::io::Error::other)??;
        Ok(addrs.into_iter().map(|a| format!("http://{a}")).collect())
    }
}

/// What changes when the name now resolves to `resolved`: URLs to add and
/// discovered URLs to retire.
pub fn reconcile(known: &BTreeSet<String>, resolved: &BTreeSet<String>) -> (Vec<String>, Vec<String>) {
    let add = resolved.difference(known).cloned().collect();
    let retire = known.difference(resolved).cloned().collect();
    (add, retire)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_reconcile() {
        let d = EngineDiscovery::parse("engine.default.svc:50061", Duration::from_secs(5)).unwrap();
        assert_eq!((d.host.as_str(), d.port), ("engine.default.svc", 50061));
        let d = EngineDiscovery::parse("[::1]:7", Duration::from_secs(5)).unwrap();
        assert_eq!(d.host, "::1");
        assert!(EngineDiscovery::parse("engine", Duration::from_secs(5))
            .unwrap_err()
            .contains("HOST:PORT"));
        assert!(EngineDiscovery::parse("engine:http", Duration::from_secs(5))
            .unwrap_err()
            .contains("not a port"));
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let (add, retire) = reconcile(&set(&["a", "b"]), &set(&["b", "c"]));
        assert_eq!((add, retire), (vec!["c".to_string()], vec!["a".to_string()]));
    }
}
