//! Routes: which aliases Apache proxies to which `host:port`, validated,
//! rendered as one `<VirtualHost>` per alias (vhost routing) or as the
//! `alias target` listing `satellite render` shows for map routing, and
//! written (through [`crate::files`]) so that Apache never reads a
//! half-written file.
//!
//! Every value is validated again here, whatever the database says, before
//! it is written: this is the one place where a bad string becomes an
//! outage or an open proxy.

use std::fmt::Write as _;
use std::net::IpAddr;

use chrono::{DateTime, Utc};

use crate::config::Config;
use crate::error::Result;
use crate::store::{ProxyState, RouteRow};
use crate::token::is_valid_alias;

/// A validated route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub alias: String,
    pub host: IpAddr,
    pub port: u16,
    /// The row's `modified`: the route lives until it plus the TTL.
    pub modified: DateTime<Utc>,
    /// Still `mapped`: flip to `proxied` once the route is live.
    pub pending_flip: bool,
}

impl Route {
    /// `10.0.0.5:8888`, or `[2001:db8::5]:8888`.
    pub fn target(&self) -> String {
        match self.host {
            IpAddr::V4(v4) => format!("{v4}:{}", self.port),
            IpAddr::V6(v6) => format!("[{v6}]:{}", self.port),
        }
    }
}

/// The routes to publish, and the rows refused on the way.
#[derive(Debug, Default)]
pub struct RouteSet {
    pub routes: Vec<Route>,
    pub refused: Vec<(String, String)>,
}

impl RouteSet {
    pub fn from_rows(rows: &[RouteRow], config: &Config) -> Self {
        let mut set = RouteSet::default();
        for row in rows {
            match validate(row, config) {
                Ok(route) => set.routes.push(route),
                Err(why) => set.refused.push((row.alias.clone(), why)),
            }
        }
        set
    }

    /// The aliases to flip to `proxied` once these routes are live.
    pub fn to_flip(&self) -> Vec<String> {
        self.routes
            .iter()
            .filter(|r| r.pending_flip)
            .map(|r| r.alias.clone())
            .collect()
    }

    /// One line per refused row, for the logs. The alias is printed only
    /// when it is not a valid token shape (then it is no live secret either).
    pub fn refusal_lines(&self) -> Vec<String> {
        self.refused
            .iter()
            .map(|(alias, why)| {
                let name = if is_valid_alias(alias) {
                    format!(
                        "token-id {}",
                        crate::token::log_id(&crate::token::alias_compare_hash(alias.as_bytes()))
                    )
                } else {
                    format!("alias {alias:?}")
                };
                format!("route for {name} not written: {why}")
            })
            .collect()
    }
}

/// A row may become a route only if its alias is a token's shape, its host
/// a parsed IP inside `tgtipmask` and its port 1024-65535.
pub fn validate(row: &RouteRow, config: &Config) -> Result<Route, String> {
    if !is_valid_alias(&row.alias) {
        return Err("alias is not of the form [a-z0-9]+(-[a-z0-9]+)*".into());
    }
    let host_text = row.dsthost.as_deref().unwrap_or("");
    let host: IpAddr = host_text
        .parse()
        .map_err(|_| format!("host {host_text:?} is not an IP address"))?;
    if !config.tgtipmask.contains(host) {
        return Err(format!("host {host} is outside tgtipmask"));
    }
    let port_text = row.dstport.as_deref().unwrap_or("");
    let port = port_text
        .parse::<u16>()
        .ok()
        .filter(|p| *p >= 1024)
        .ok_or_else(|| format!("port {port_text:?} is not 1024-65535"))?;
    let modified = row
        .modified
        .as_deref()
        .and_then(crate::store::parse_sql_timestamp)
        .ok_or_else(|| format!("modified {:?} is not a timestamp", row.modified))?;
    Ok(Route {
        alias: row.alias.clone(),
        modified,
        host: crate::ipmask::canonical_ip(host),
        port,
        pending_flip: row.state == ProxyState::Mapped,
    })
}

/// Map routing's routes as text, `<alias> <host>:<port>` a line, by alias:
/// what the `routes` table should hold (`satellite render`).
pub fn render_map(routes: &[Route]) -> String {
    let mut out = String::from("# Routes of map routing, as the routes table holds them.\n");
    for route in routes {
        let _ = writeln!(out, "{} {}", route.alias, route.target());
    }
    out
}

/// One `<VirtualHost>` per route: the original template's shape with its
/// faults fixed (websocket target without a double slash, the scheme the
/// user sees forwarded, `ProxyPassReverse`, no short idle timeout), plus a
/// retry page while the backend is not listening yet.
/// Each route's vhost passes the request target through as the client sent
/// it (`nocanon`, encoded slashes kept, `//` not merged) and tunnels
/// websockets itself (`upgrade=websocket`, also over HTTP/2): see
/// docs/paths.md for why that leaves the authority ours.
pub fn render_vhosts(routes: &[Route], config: &Config) -> String {
    let mut out = String::new();
    for (i, route) in routes.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let target = route.target();
        let _ = write!(
            out,
            "<VirtualHost *:{listen}>\n\
             \x20   ServerName {alias}.{ext}\n\
             \x20   SSLEngine on\n\
             \x20   Header always set Referrer-Policy \"no-referrer\"\n\
             \x20   RequestHeader set X-Forwarded-Proto \"https\"\n\
             {preserve}\
             \x20   ProxyTimeout 86400\n\
             \x20   Alias \"/.satellite\" \"{html}/satellite\"\n\
             \x20   ProxyPass \"/.satellite/\" \"!\"\n\
             \x20   ErrorDocument 502 /.satellite/retry.html\n\
             \x20   ErrorDocument 503 /.satellite/retry.html\n\
             \x20   AllowEncodedSlashes NoDecode\n\
             \x20   MergeSlashes Off\n\
             \x20   ProxyPass \"/\" \"http://{target}/\" nocanon upgrade=websocket\n\
             \x20   ProxyPassReverse \"/\" \"http://{target}/\"\n\
             </VirtualHost>\n",
            listen = config.listenport,
            alias = route.alias,
            ext = config.extbasename,
            html = config.htmldir.display(),
            preserve = if config.preserve_host {
                "    ProxyPreserveHost On\n"
            } else {
                ""
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::EnvOverrides;

    fn config() -> Config {
        Config::from_toml(
            "extbasename = \"expanse-user-content.sdsc.edu\"\n\
             tgtipmask = [\"10.21.0.0/16\", \"2001:db8::/32\"]\n\
             htmldir = \"/var/www/satellite/html\"",
            Path::new("/var/www/satellite/etc"),
            &EnvOverrides::none(),
        )
        .unwrap()
    }

    fn row(alias: &str, host: &str, port: &str, state: ProxyState) -> RouteRow {
        RouteRow {
            alias: alias.into(),
            modified: Some("2026-01-01 00:00:00".into()),
            dsthost: Some(host.into()),
            dstport: Some(port.into()),
            state,
        }
    }

    fn two_routes() -> RouteSet {
        RouteSet::from_rows(
            &[
                row("able-acorn-zoo", "10.21.3.4", "8888", ProxyState::Proxied),
                row("zen-yak-bat", "2001:db8::5", "50123", ProxyState::Mapped),
            ],
            &config(),
        )
    }

    #[test]
    fn map_snapshot() {
        assert_eq!(
            render_map(&two_routes().routes),
            "# Routes of map routing, as the routes table holds them.\n\
             able-acorn-zoo 10.21.3.4:8888\n\
             zen-yak-bat [2001:db8::5]:50123\n"
        );
        assert_eq!(two_routes().to_flip(), ["zen-yak-bat"]);
    }

    #[test]
    fn vhost_snapshot() {
        let expected = r#"<VirtualHost *:443>
    ServerName able-acorn-zoo.expanse-user-content.sdsc.edu
    SSLEngine on
    Header always set Referrer-Policy "no-referrer"
    RequestHeader set X-Forwarded-Proto "https"
    ProxyTimeout 86400
    Alias "/.satellite" "/var/www/satellite/html/satellite"
    ProxyPass "/.satellite/" "!"
    ErrorDocument 502 /.satellite/retry.html
    ErrorDocument 503 /.satellite/retry.html
    AllowEncodedSlashes NoDecode
    MergeSlashes Off
    ProxyPass "/" "http://10.21.3.4:8888/" nocanon upgrade=websocket
    ProxyPassReverse "/" "http://10.21.3.4:8888/"
</VirtualHost>

<VirtualHost *:443>
    ServerName zen-yak-bat.expanse-user-content.sdsc.edu
    SSLEngine on
    Header always set Referrer-Policy "no-referrer"
    RequestHeader set X-Forwarded-Proto "https"
    ProxyTimeout 86400
    Alias "/.satellite" "/var/www/satellite/html/satellite"
    ProxyPass "/.satellite/" "!"
    ErrorDocument 502 /.satellite/retry.html
    ErrorDocument 503 /.satellite/retry.html
    AllowEncodedSlashes NoDecode
    MergeSlashes Off
    ProxyPass "/" "http://[2001:db8::5]:50123/" nocanon upgrade=websocket
    ProxyPassReverse "/" "http://[2001:db8::5]:50123/"
</VirtualHost>
"#;
        let config = config();
        assert_eq!(render_vhosts(&two_routes().routes, &config), expected);
        assert_eq!(render_vhosts(&[], &config), "");
    }

    #[test]
    fn rows_that_could_break_apache_are_refused() {
        let config = config();
        let cases = [
            row(
                "evil\n<Directory />",
                "10.21.3.4",
                "8888",
                ProxyState::Mapped,
            ),
            row("Upper-Case", "10.21.3.4", "8888", ProxyState::Mapped),
            row("a-b-c", "10.21.3.4 /", "8888", ProxyState::Mapped),
            row("a-b-c", "10.21.3.4/32", "8888", ProxyState::Mapped),
            row("a-b-c", "192.0.2.1", "8888", ProxyState::Mapped),
            row("a-b-c", "evil.org", "8888", ProxyState::Mapped),
            row("a-b-c", "10.21.3.4", "80", ProxyState::Mapped),
            row("a-b-c", "10.21.3.4", "65536", ProxyState::Mapped),
            row("a-b-c", "10.21.3.4", "8888 [P]", ProxyState::Mapped),
        ];
        let set = RouteSet::from_rows(&cases, &config);
        assert!(set.routes.is_empty(), "{:?}", set.routes);
        assert_eq!(set.refused.len(), cases.len());
        assert!(set.refusal_lines()[0].contains("alias \"evil\\n<Directory />\""));
    }
}
