//! The data plane through the private Apache: proxied requests for one
//! host and for random live hosts among 100k routes against a static
//! `ProxyPass` to the same backend, floods of unknown and pending token
//! hosts (the static waiting page), redeems through Apache, and whether
//! `[P]` rewrites reuse backend connections under several worker setups.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use satellite_core::Config;

use crate::backend::Backend;
use crate::frontends;
use crate::load::{self, Pick, Throughput};
use crate::stores::StoreKind;
use crate::web::{WebSite, DOMAIN, STATIC_HOST};
use crate::write_path::{burst_of, pending, populate};
use crate::{ms, Report, Sample};

const BACKENDS: usize = 3;

pub struct Options {
    pub routes: usize,
    pub threads: usize,
    pub seconds: f64,
    pub proxy: bool,
    pub flood: bool,
    pub reuse: bool,
    pub redeem: bool,
}

/// A cheap, well-spread pseudo-random index (no need for a CSPRNG here).
fn spread(thread: usize, i: u64, n: usize) -> usize {
    let mut x = (thread as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ i.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 29;
    (x % n as u64) as usize
}

/// Routes take turns among three backends: two "notebooks" on one node
/// (127.0.0.3, two ports) and one on a node whose address has the first
/// one's as a string prefix (127.0.0.33). Each answers with its own
/// address, so a reused connection that carried a request to the wrong
/// backend shows as an error.
struct Run<'a> {
    site: &'a WebSite,
    backends: &'a [Backend; BACKENDS],
    options: &'a Options,
    /// The store's name in the rows.
    on: &'static str,
}

/// A store's site after its rows, left running (CGI, shipped config) for
/// [`compare`].
pub struct Prepared {
    site: WebSite,
    backends: [Backend; BACKENDS],
    on: &'static str,
}

impl Run<'_> {
    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.options.seconds)
    }

    fn backend_counts(&self) -> (u64, u64) {
        self.backends.iter().fold((0, 0), |(c, r), b| {
            let (bc, br) = b.counts();
            (c + bc, r + br)
        })
    }

    /// A load run, with the backends' (connections, requests) during it.
    fn measure(&self, name: &str, pick: Pick<'_>, expect: u16) -> (Throughput, (u64, u64)) {
        let before = self.backend_counts();
        let result = load::run(
            &self.site.tls,
            self.options.threads,
            self.duration(),
            pick,
            "/",
            expect,
        );
        let after = self.backend_counts();
        let backend = (after.0 - before.0, after.1 - before.1);
        eprintln!(
            "  {name}: {:.0} req/s, {} errors{}, {} client connections, backend {} connections for {} requests",
            result.per_second(),
            result.errors,
            result
                .first_error
                .as_deref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default(),
            result.connections,
            backend.0,
            backend.1
        );
        (result, backend)
    }

    /// Proxied requests for one routed host.
    fn one_host(&self, label: &str) -> (Throughput, (u64, u64)) {
        let port = self.site.port;
        let body = self.backends[0].body();
        self.measure(
            &format!("{label}: one routed host"),
            &|_, _| (format!("route-6-x.{DOMAIN}:{port}"), body.clone()),
            200,
        )
    }

    /// Proxied requests for hosts picked at random among the routes.
    fn random_hosts(&self, label: &str) -> (Throughput, (u64, u64)) {
        let port = self.site.port;
        let routes = self.options.routes;
        let bodies: Vec<Vec<u8>> = self.backends.iter().map(Backend::body).collect();
        self.measure(
            &format!("{label}: random routed hosts"),
            &|t, i| {
                let n = spread(t, i, routes);
                (
                    format!("route-{n}-x.{DOMAIN}:{port}"),
                    bodies[n % BACKENDS].clone(),
                )
            },
            200,
        )
    }

    /// Token-shaped hosts that are not in the database (the waiting page).
    fn unknown_hosts(&self, label: &str) -> Throughput {
        let port = self.site.port;
        let waiting = b"<!DOCTYPE html>".to_vec();
        self.measure(
            &format!("{label}: unknown token hosts"),
            &|t, i| (format!("nope-{t}-{i}-zz.{DOMAIN}:{port}"), waiting.clone()),
            200,
        )
        .0
    }

    /// Static ProxyPass, one routed host, random routed hosts: req/s each,
    /// and backend connections per request of the dynamic rows.
    fn proxied(&self, label: &str, report: &mut Report, main_rows: bool) {
        let port = self.site.port;
        let routes = self.options.routes;
        let bodies: Vec<Vec<u8>> = self.backends.iter().map(Backend::body).collect();
        let (stat, stat_backend) = self.measure(
            &format!("{label}: static ProxyPass"),
            &|_, _| (format!("{STATIC_HOST}:{port}"), bodies[0].clone()),
            200,
        );
        let (one, one_backend) = self.one_host(label);
        let (random, random_backend) = self.random_hosts(label);
        let s = stat.per_second();
        let on = self.on;
        let per_conn = |(c, r): (u64, u64)| {
            if c == 0 {
                "-".to_owned()
            } else {
                format!("{:.1}", r as f64 / c as f64)
            }
        };
        let errors = |t: &Throughput| {
            if t.errors == 0 {
                String::new()
            } else {
                format!(", {} errors", t.errors)
            }
        };
        if main_rows {
            report.line(
                &format!("static ProxyPass in the same Apache (req/s), {on}"),
                "(ceiling)",
                "-",
                format!(
                    "{s:.0} req/s{} (backend: {} req/conn)",
                    errors(&stat),
                    per_conn(stat_backend)
                ),
            );
            report.line(
                &format!("proxied, one host / static, {on}"),
                ">= 0.8",
                "0.45",
                format!(
                    "{:.2} ({:.0} req/s{}; backend {} req/conn)",
                    one.per_second() / s,
                    one.per_second(),
                    errors(&one),
                    per_conn(one_backend)
                ),
            );
            report.line(
                &format!("proxied, random of {routes} hosts / static, {on}"),
                ">= 0.5",
                "0.02 (txt), 0.26 (dbm)",
                format!(
                    "{:.2} ({:.0} req/s{}; backend {} req/conn)",
                    random.per_second() / s,
                    random.per_second(),
                    errors(&random),
                    per_conn(random_backend)
                ),
            );
        } else {
            report.line(
                &format!("reuse: {label}, {on}"),
                "one host >= 0.8",
                "-",
                format!(
                    "one {:.2}, random {:.2} of static {s:.0} req/s; backend req/conn {} / {}{}{}",
                    one.per_second() / s,
                    random.per_second() / s,
                    per_conn(one_backend),
                    per_conn(random_backend),
                    errors(&one),
                    errors(&random),
                ),
            );
        }
    }

    fn floods(&self, report: &mut Report, pending_count: usize) {
        let port = self.site.port;
        let waiting = b"<!DOCTYPE html>".to_vec();
        let unknown = self.unknown_hosts(self.on);
        let (pending, _) = self.measure(
            "pending token hosts",
            &|t, i| {
                let n = spread(t, i, pending_count);
                (format!("wait-{n}-x.{DOMAIN}:{port}"), waiting.clone())
            },
            200,
        );
        let (junk, _) = self.measure(
            "hosts that are not token-shaped",
            &|t, i| {
                let host = format!("junk{t}x{i}.{DOMAIN}:{port}");
                (host, b"Please see documentation".to_vec())
            },
            200,
        );
        let routes = self.options.routes;
        let on = self.on;
        for (name, t) in [
            ("unknown token hosts", &unknown),
            ("pending token hosts", &pending),
            ("non-token hosts (default message)", &junk),
        ] {
            report.line(
                &format!("flood of {name}, {routes} routes, {on}"),
                ">= 10k req/s",
                if name.starts_with("non") || on != "SQLite" {
                    "-"
                } else {
                    "107 (txt), 459 (dbm)"
                },
                format!(
                    "{:.0} req/s{}",
                    t.per_second(),
                    if t.errors > 0 {
                        format!(", {} errors", t.errors)
                    } else {
                        String::new()
                    }
                ),
            );
        }
    }
}

/// Worker setups tried for connection reuse on `[P]` rewrites, added at
/// server level next to the shipped config.
fn reuse_variants(backends: &[Backend; BACKENDS]) -> Vec<(&'static str, String)> {
    let per_backend: String = backends
        .iter()
        .map(|b| {
            format!(
                "<Proxy \"http://{}/\">\n    ProxySet keepalive=On\n</Proxy>\n",
                b.addr
            )
        })
        .collect();
    vec![
        ("a <Proxy> worker per backend (ProxySet)", per_backend),
        (
            "a <Proxy> worker per node address, any port",
            "<Proxy \"http://127.0.0.3\">\n    ProxySet keepalive=On\n</Proxy>\n\
             <Proxy \"http://127.0.0.33\">\n    ProxySet keepalive=On\n</Proxy>\n"
                .to_owned(),
        ),
        (
            "one wildcard worker <Proxy \"http://127.0.0.*\">",
            "<Proxy \"http://127.0.0.*\">\n    ProxySet keepalive=On\n</Proxy>\n".to_owned(),
        ),
        (
            "ProxyPassMatch worker with $1 as host:port (path never used)",
            "ProxyPassMatch \"^/\\.satellite-never/(127\\.0\\.0\\.[0-9]+:[0-9]+)/(.*)$\" \"http://$1/$2\"\n"
                .to_owned(),
        ),
    ]
}

/// The private Apache on `store`: the proxy and flood rows, redeems
/// through Apache to the CGI program and then to `satellite serve`, and on
/// PostgreSQL a second frontend on the same database; the reuse rows on
/// SQLite only (they are about Apache's workers, not the lookup).
pub fn run(
    programs: &Path,
    options: &Options,
    store: StoreKind,
    report: &mut Report,
) -> Result<Prepared> {
    let on = store.label();
    let url = store.new_database()?;
    let mut site = WebSite::install(programs, url.as_deref())?;
    let backends = [
        Backend::start("127.0.0.3")?,
        Backend::start("127.0.0.3")?,
        Backend::start("127.0.0.33")?,
    ];
    let config = Config::load_file(&site.config_file())?;
    let targets: Vec<(IpAddr, u16)> = backends
        .iter()
        .map(|b| (b.addr.ip(), b.addr.port()))
        .collect();
    let filled = populate(&config, options.routes, "route", &|i| targets[i % BACKENDS])?;
    eprintln!(
        "  {on}: {} live routes to {}, {} and {} written in {:.1} s",
        options.routes,
        backends[0].addr,
        backends[1].addr,
        backends[2].addr,
        filled.as_secs_f64()
    );
    let backend = backends[0].addr;
    let pending_count = 1000;
    pending(&config, pending_count, "wait")?;
    let redeem_tokens = pending(&config, 100, "redeem")?;
    let serve_tokens = pending(&config, 100, "serve")?;
    // Redeemed from 127.0.0.1 (the client's address) for this port.
    let notebook = Backend::start("127.0.0.1")?;
    site.start(backend, "")?;
    let run = Run {
        site: &site,
        backends: &backends,
        options,
        on,
    };
    if options.proxy {
        run.proxied("shipped config", report, true);
    }
    if options.flood {
        run.floods(report, pending_count);
    }
    let routes = options.routes;
    if options.redeem {
        let sample = frontends::redeem_series(&site, &redeem_tokens, 50002)?;
        report_redeems(
            report,
            &format!("redeem through Apache (CGI) p50/p95, {routes} routes, {on}"),
            "p50 <= 10 ms",
            sample,
        );
    }
    let second = match (&url, options.redeem) {
        (Some(url), true) => {
            let mut b = WebSite::install(programs, Some(url))?;
            b.start(backend, "")?;
            let tokens = pending(&config, 100, "cross")?;
            let sample = frontends::redeem_to_first_proxied(&site, &b, &notebook, &tokens)?;
            report_redeems(
                report,
                &format!(
                    "redeem (CGI) on A -> first proxied 200 on B p50/p99, {routes} routes, {on}"
                ),
                "p50 <= 10 ms",
                sample,
            );
            Some(b)
        }
        _ => None,
    };
    if options.reuse && store == StoreKind::Sqlite {
        for (label, extra) in reuse_variants(&backends) {
            if let Err(why) = site.start(backend, &extra) {
                report.line(
                    &format!("reuse: {label}"),
                    "-",
                    "-",
                    format!(
                        "Apache refused it: {}",
                        format!("{why:#}").lines().next().unwrap_or("")
                    ),
                );
                continue;
            }
            let run = Run {
                site: &site,
                backends: &backends,
                options,
                on,
            };
            run.proxied(label, report, false);
        }
    }
    if options.redeem {
        let (serve, serve_url) = frontends::start_serve(programs, &site)?;
        site.serve_url = Some(serve_url);
        site.start(backend, "")?;
        let sample = frontends::redeem_series(&site, &serve_tokens, 50002)?;
        report_redeems(
            report,
            &format!("redeem through Apache (serve) p50/p95, {routes} routes, {on}"),
            "p50 <= 5 ms",
            sample,
        );
        let tokens = pending(&config, 200, "burstserve")?;
        let (finished, errors, mut sample) = burst_of(&tokens, Duration::from_secs(1), |token| {
            frontends::redeem_once(&site, token, 50002).is_ok()
        });
        let p95 = if sample.latencies.is_empty() {
            "-".to_owned()
        } else {
            ms(sample.percentile(0.95))
        };
        report.line(
            &format!(
                "200 redeems started within 1 s through Apache (serve), {routes} routes, {on}"
            ),
            "<= 1.5 s, 0 errors",
            "-",
            format!(
                "{:.2} s, {errors} errors (each: p95 {p95} ms)",
                finished.as_secs_f64()
            ),
        );
        if let Some(b) = &second {
            let tokens = pending(&config, 100, "crossserve")?;
            let sample = frontends::redeem_to_first_proxied(&site, b, &notebook, &tokens)?;
            report_redeems(
                report,
                &format!(
                    "redeem (serve) on A -> first proxied 200 on B p50/p99, {routes} routes, {on}"
                ),
                "p50 <= 10 ms",
                sample,
            );
        }
        drop(serve);
        site.serve_url = None;
    }
    drop(second);
    site.start(backend, "")?;
    Ok(Prepared { site, backends, on })
}

/// A row of redeem latencies: p50 and p95, or p99 when the name says so.
fn report_redeems(report: &mut Report, name: &str, goal: &str, mut sample: Sample) {
    let tail = if name.contains("p99") { 0.99 } else { 0.95 };
    report.line(
        name,
        goal,
        "-",
        format!(
            "{} / {} ms",
            ms(sample.percentile(0.5)),
            ms(sample.percentile(tail))
        ),
    );
}

/// Rounds of [`compare`]: the stores take turns, so that the neighbours'
/// load, which moves by a factor of 2 within minutes, falls on both.
const ROUNDS: usize = 3;

/// The PostgreSQL lookup against SQLite's: one host, random hosts and
/// unknown hosts, on each site in turn, [`ROUNDS`] times; the ratio of
/// each round and their median.
pub fn compare(sqlite: &Prepared, postgres: &Prepared, options: &Options, report: &mut Report) {
    let rates = |p: &Prepared| {
        let run = Run {
            site: &p.site,
            backends: &p.backends,
            options,
            on: p.on,
        };
        let label = format!("compared, {}", p.on);
        // The PostgreSQL server's CPU per proxied request: why a lookup
        // through it costs more than SQLite's in-process read when every
        // core is busy.
        let before = (p.on == StoreKind::Postgres.label())
            .then(crate::stores::pg_server_cpu)
            .flatten();
        let one = run.one_host(&label).0;
        let server = before
            .zip(crate::stores::pg_server_cpu())
            .map(|(b, a)| a.saturating_sub(b) / (one.requests.max(1) as u32));
        (
            [
                one.per_second(),
                run.random_hosts(&label).0.per_second(),
                run.unknown_hosts(&label).per_second(),
            ],
            server,
        )
    };
    let mut server_cpu = Vec::new();
    // Which store goes first alternates too: a load that rises or falls
    // within a round then favours neither.
    let rounds: Vec<([f64; 3], [f64; 3])> = (0..ROUNDS)
        .map(|round| {
            let ((lite, _), (pg, server)) = if round % 2 == 0 {
                let lite = rates(sqlite);
                (lite, rates(postgres))
            } else {
                let pg = rates(postgres);
                (rates(sqlite), pg)
            };
            server_cpu.extend(server.map(ms));
            (lite, pg)
        })
        .collect();
    for (k, (name, goal)) in [
        ("proxied, one host: PostgreSQL / SQLite", ">= 0.9"),
        ("proxied, random hosts: PostgreSQL / SQLite", ">= 0.9"),
        ("unknown token hosts: PostgreSQL / SQLite", ">= 0.8"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut ratios: Vec<f64> = rounds.iter().map(|(l, p)| p[k] / l[k]).collect();
        let each: Vec<String> = rounds
            .iter()
            .map(|(l, p)| format!("{:.2} ({:.0}/{:.0})", p[k] / l[k], p[k], l[k]))
            .collect();
        ratios.sort_by(f64::total_cmp);
        report.line(
            &format!("{name}, {} routes, alternating rounds", options.routes),
            goal,
            "-",
            format!(
                "median {:.2}; rounds {} req/s",
                ratios[ratios.len() / 2],
                each.join(", ")
            ),
        );
    }
    report.line(
        "PostgreSQL server CPU per proxied request (one host), per round",
        "-",
        "-",
        format!("{} ms", server_cpu.join(", ")),
    );
}
