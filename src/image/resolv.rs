//! A container's /etc/resolv.conf when it has a network (`--net`), made as Docker makes it:
//! the host's, without the nameservers the container cannot reach (loopback ones: the host's
//! local resolver is not in the VM; IPv6 ones: the container gets an IPv4 address only), and
//! Google's public resolvers when none is left; or, with `--dns`, those nameservers with the
//! host's search domains and options. Without a network the image's own file stays.

use std::net::IpAddr;

/// Where the host's resolver configuration is.
const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";
/// systemd-resolved's list of the real upstream servers, for a host whose /etc/resolv.conf
/// names only its local stub (Docker reads it in that case too).
const SYSTEMD_RESOLV_CONF: &str = "/run/systemd/resolve/resolv.conf";
const SYSTEMD_STUB: &str = "127.0.0.53";
/// Docker's nameservers for a container that would have none.
const DEFAULT_NAMESERVERS: [&str; 2] = ["8.8.8.8", "8.8.4.4"];

/// The host's resolver configuration, if it has one.
pub fn host_resolv_conf() -> Option<String> {
    let text = std::fs::read_to_string(HOST_RESOLV_CONF).ok()?;
    let servers = nameservers(&text);
    if !servers.is_empty() && servers.iter().all(|s| *s == SYSTEMD_STUB) {
        if let Ok(upstream) = std::fs::read_to_string(SYSTEMD_RESOLV_CONF) {
            return Some(upstream);
        }
    }
    Some(text)
}

/// The `nameserver` lines' addresses, as written.
fn nameservers(text: &str) -> Vec<&str> {
    text.lines().filter_map(nameserver).collect()
}

fn nameserver(line: &str) -> Option<&str> {
    let mut words = line.split_whitespace();
    (words.next() == Some("nameserver"))
        .then(|| words.next())
        .flatten()
}

/// Whether the container can reach `server` over its IPv4 network.
fn reachable(server: &str) -> bool {
    // An address with a zone (`fe80::1%eth0`) is IPv6 too.
    match server.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => !v4.is_loopback(),
        _ => false,
    }
}

/// The container's resolv.conf, from the host's (`host`, if it has one) and `--dns`.
pub fn container_resolv_conf(host: Option<&str>, dns: &[IpAddr]) -> String {
    let host = host.unwrap_or_default();
    let mut out = String::new();
    if dns.is_empty() {
        let mut kept = 0;
        for line in host.lines() {
            match nameserver(line) {
                Some(server) if !reachable(server) => continue,
                Some(_) => kept += 1,
                None => {}
            }
            out.push_str(line);
            out.push('\n');
        }
        if kept == 0 {
            for server in DEFAULT_NAMESERVERS {
                out.push_str(&format!("nameserver {server}\n"));
            }
        }
        return out;
    }
    for server in dns {
        out.push_str(&format!("nameserver {server}\n"));
    }
    // The host's search domains and options still hold (Docker keeps them unless told).
    for line in host.lines() {
        let keyword = line.split_whitespace().next();
        if matches!(keyword, Some("search" | "domain" | "options")) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "# the host's\nnameserver 127.0.0.1\nnameserver 10.0.2.3\n\
                        nameserver ::1\nnameserver 2001:db8::53\nsearch example.test\n\
                        options ndots:2\n";

    #[test]
    fn loopback_and_ipv6_nameservers_are_dropped_and_the_rest_kept() {
        assert_eq!(
            container_resolv_conf(Some(HOST), &[]),
            "# the host's\nnameserver 10.0.2.3\nsearch example.test\noptions ndots:2\n"
        );
    }

    #[test]
    fn a_host_with_only_local_resolvers_gives_dockers_defaults() {
        let host = "nameserver 127.0.0.53\nsearch lan\n";
        assert_eq!(
            container_resolv_conf(Some(host), &[]),
            "search lan\nnameserver 8.8.8.8\nnameserver 8.8.4.4\n"
        );
        assert_eq!(
            container_resolv_conf(None, &[]),
            "nameserver 8.8.8.8\nnameserver 8.8.4.4\n"
        );
    }

    #[test]
    fn dns_replaces_the_nameservers_and_keeps_search_and_options() {
        let dns: Vec<IpAddr> = ["192.0.2.53", "192.0.2.54"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(
            container_resolv_conf(Some(HOST), &dns),
            "nameserver 192.0.2.53\nnameserver 192.0.2.54\nsearch example.test\noptions ndots:2\n"
        );
        assert_eq!(
            container_resolv_conf(None, &dns[..1]),
            "nameserver 192.0.2.53\n"
        );
    }

    #[test]
    fn nameserver_lines_are_read_by_their_words() {
        assert_eq!(
            nameservers("  nameserver\t10.0.0.1 \n#nameserver 1.1.1.1\nnameserver\n"),
            ["10.0.0.1"]
        );
        assert!(!reachable("fe80::1%eth0"));
        assert!(!reachable("127.1.2.3"));
        assert!(reachable("10.0.0.1"));
    }
}
