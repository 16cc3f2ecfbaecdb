//! PostgreSQL for tests: a real server, a fresh database per test, and a TCP proxy a
//! test can cut or stall to play a database outage.
//!
//! The server comes from `CALLMEBACK_TEST_DATABASE_URL` (a superuser URL), or, when
//! that is unset, from `scripts/postgres.sh`, which finds or starts one (installing
//! Debian's package on a bare machine). Each [`TestDb`] is `CREATE DATABASE
//! test_<random>` on it, dropped again when the test ends.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use prometheus::proto::MetricType;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OnceCell, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

/// Environment variable holding a superuser URL of the test server.
pub const TEST_DATABASE_URL_ENV: &str = "CALLMEBACK_TEST_DATABASE_URL";

static ADMIN_URL: OnceCell<String> = OnceCell::const_new();

/// The superuser URL of the test server, starting one if needed (once per process).
pub async fn admin_url() -> String {
    ADMIN_URL
        .get_or_init(|| async {
            if let Ok(url) = std::env::var(TEST_DATABASE_URL_ENV)
                && !url.trim().is_empty()
            {
                return url.trim().to_owned();
            }
            tokio::task::spawn_blocking(run_script)
                .await
                .expect("postgres.sh runner panicked")
        })
        .await
        .clone()
}

fn run_script() -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/postgres.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run scripts/postgres.sh");
    assert!(
        out.status.success(),
        "scripts/postgres.sh failed ({}); set {TEST_DATABASE_URL_ENV} to a superuser URL instead",
        out.status
    );
    let url = String::from_utf8(out.stdout).expect("postgres.sh prints a URL");
    let url = url.trim().lines().last().unwrap_or_default().to_owned();
    assert!(url.starts_with("postgres"), "postgres.sh printed `{url}`");
    url
}

/// A database of its own for one test, dropped when this value is.
pub struct TestDb {
    /// URL of the test database.
    pub url: String,
    /// Its name.
    pub name: String,
    admin: String,
}

impl TestDb {
    /// Creates `test_<random>` on the test server.
    pub async fn create() -> TestDb {
        let admin = admin_url().await;
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin)
            .await
            .expect("connect to the test PostgreSQL server");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE");
        let _ = conn.close().await;
        TestDb {
            url: with_database(&admin, &name),
            name,
            admin,
        }
    }

    /// A plain connection to the test database (for assertions).
    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url)
            .await
            .expect("connect to the test database")
    }

    /// The server's address (what a proxy forwards to).
    pub fn server_addr(&self) -> SocketAddr {
        let opts = PgConnectOptions::from_str(&self.url).expect("test URL parses");
        let host = match opts.get_host() {
            "localhost" => "127.0.0.1",
            h => h,
        };
        format!("{host}:{}", opts.get_port())
            .parse()
            .expect("the test server listens on an IP address")
    }

    /// The database's URL, but reaching the server through `addr` (a proxy).
    pub fn url_via(&self, addr: SocketAddr) -> String {
        with_authority_host(&self.url, &addr.to_string())
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop is synchronous: a short-lived runtime on its own thread does the cleanup.
        let admin = self.admin.clone();
        let name = self.name.clone();
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    if let Ok(mut conn) = PgConnection::connect(&admin).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&mut conn)
                                .await;
                        let _ = conn.close().await;
                    }
                });
            }
        });
        let _ = cleanup.join();
    }
}

/// `url` with its database (path) replaced.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{db}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// `url` with its `host:port` replaced (credentials and database kept).
pub fn with_authority_host(url: &str, host_port: &str) -> String {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[authority_start..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let userinfo = authority.rsplit_once('@').map(|(u, _)| u);
    let new_authority = match userinfo {
        Some(u) => format!("{u}@{host_port}"),
        None => host_port.to_owned(),
    };
    format!(
        "{}{new_authority}{}",
        &url[..authority_start],
        &rest[authority_end..]
    )
}

const MODE_PASS: u8 = 0;
const MODE_CUT: u8 = 1;
const MODE_STALL: u8 = 2;

/// A TCP proxy in front of the database that a test controls: pass traffic, cut
/// every connection (a database that went away), or stall (a database that hangs).
pub struct CuttableProxy {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    /// Bumped on every mode change; connection tasks re-check their mode.
    changes: watch::Sender<u8>,
    _stop: DropGuard,
}

impl CuttableProxy {
    /// Listens on `127.0.0.1:0` and forwards to `target`.
    pub async fn start(target: SocketAddr) -> CuttableProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let mode = Arc::new(AtomicU8::new(MODE_PASS));
        let (changes, _) = watch::channel(MODE_PASS);
        let stop = CancellationToken::new();
        let task_mode = mode.clone();
        let task_changes = changes.clone();
        let task_stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = task_stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((client, _)) = accepted else { continue };
                let mode = task_mode.clone();
                let changes = task_changes.subscribe();
                let stop = task_stop.clone();
                tokio::spawn(serve(client, target, mode, changes, stop));
            }
        });
        CuttableProxy {
            addr,
            mode,
            changes,
            _stop: stop.drop_guard(),
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection; new ones are closed at once (the database is gone).
    pub fn cut(&self) {
        self.set(MODE_CUT);
    }

    /// Holds every connection open but forwards nothing (the database hangs).
    pub fn stall(&self) {
        self.set(MODE_STALL);
    }

    /// Forwards again (the database is back).
    pub fn restore(&self) {
        self.set(MODE_PASS);
    }

    fn set(&self, m: u8) {
        self.mode.store(m, Ordering::SeqCst);
        self.changes.send_replace(m);
    }
}

async fn serve(
    mut client: TcpStream,
    target: SocketAddr,
    mode: Arc<AtomicU8>,
    mut changes: watch::Receiver<u8>,
    stop: CancellationToken,
) {
    match mode.load(Ordering::SeqCst) {
        MODE_CUT => {
            let _ = client.shutdown().await;
            return;
        }
        MODE_STALL => {
            // Hold the socket until the mode changes or the proxy stops.
            tokio::select! {
                () = stop.cancelled() => {}
                _ = changes.changed() => {}
            }
            return;
        }
        _ => {}
    }
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let pump = async {
        tokio::select! {
            _ = tokio::io::copy(&mut cr, &mut sw) => {}
            _ = tokio::io::copy(&mut sr, &mut cw) => {}
        }
    };
    // Any mode change ends a forwarding connection: cut closes it; a stalled
    // connection stops forwarding (held open until the next change).
    let first_change = async {
        let _ = changes.changed().await;
        *changes.borrow()
    };
    tokio::select! {
        () = stop.cancelled() => {}
        () = pump => {}
        m = first_change => {
            if m == MODE_STALL {
                tokio::select! {
                    () = stop.cancelled() => {}
                    _ = changes.changed() => {}
                }
            }
        }
    }
}

/// The value of a metric sample in the pod's registry (0 when absent), matching
/// every given label.
pub fn metric_value(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for family in registry.gather() {
        if family.name() != name {
            continue;
        }
        for m in family.get_metric() {
            let matches = labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            });
            if !matches {
                continue;
            }
            total += match family.get_field_type() {
                MetricType::COUNTER => m.get_counter().get_value(),
                MetricType::GAUGE => m.get_gauge().get_value(),
                MetricType::HISTOGRAM => m.get_histogram().get_sample_count() as f64,
                _ => 0.0,
            };
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    // URL surgery keeps credentials and query and replaces only what is asked.
    #[test]
    fn url_rewrites_keep_the_rest() {
        let u = "postgres://a:b@127.0.0.1:5432/postgres?sslmode=disable";
        assert_eq!(
            with_database(u, "test_x"),
            "postgres://a:b@127.0.0.1:5432/test_x?sslmode=disable"
        );
        assert_eq!(
            with_authority_host(u, "127.0.0.1:9999"),
            "postgres://a:b@127.0.0.1:9999/postgres?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:1", "d"), "postgres://h:1/d");
    }
}
