//! A throwaway PostgreSQL for the tests and the writer benchmark.
//!
//! Where the database comes from, in order:
//! 1. `EMS_TEST_DATABASE_URL` (a role that may `CREATE DATABASE`): each
//!    test gets its own database there.
//! 2. Otherwise, when the PostgreSQL 15 server binaries are installed
//!    (`/usr/lib/postgresql/15/bin`, or `EMS_PG_BIN`), a private cluster is
//!    created with `initdb` in a temp dir and started on a free loopback
//!    port (trust auth, unix socket in the temp dir). Run as root, the
//!    binaries run as the `postgres` OS user through `runuser` (initdb
//!    refuses root) and the temp dir is handed to that user.
//! 3. Otherwise: a loud SKIP and the test passes — unless
//!    `EMS_REQUIRE_POSTGRES=1` (CI), where it fails ([`crate::require`]).
//!
//! A check that needs the private cluster itself (its files, its TLS, a
//! restart) skips the same way when an external server was given.
//!
//! Clean-up: a static is never dropped, so instead each cluster starts a
//! small watcher shell (its own process group, stdio closed) that polls the
//! test process id every second and, once the process is gone (finished,
//! panicked or killed), runs `pg_ctl stop -m immediate` and removes the
//! temp dir. Nothing is left running after the test binary exits.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::require::{self, Feature};

/// Default location of the server binaries (Debian's postgresql-15).
pub const DEFAULT_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A running private cluster.
#[derive(Debug)]
pub struct Cluster {
    /// Temp root: data dir, log, socket, certificates.
    pub root: PathBuf,
    /// `root/data`.
    pub data: PathBuf,
    /// Loopback port.
    pub port: u16,
    /// Superuser URL of the `postgres` database.
    pub admin_url: String,
    /// CA certificate (PEM) the server's certificate is signed by, when
    /// the cluster was started with TLS.
    pub tls_ca: Option<PathBuf>,
    /// The server binaries.
    bin: PathBuf,
    /// Whether commands must run as the `postgres` OS user.
    as_postgres: bool,
}

/// Settings for a private cluster.
#[derive(Debug, Clone, Copy)]
pub struct ClusterOptions {
    /// `fsync` (off is faster for tests; the benchmark keeps it on).
    pub fsync: bool,
    /// Serve TLS with a freshly made CA (needs the `openssl` command).
    pub tls: bool,
}

/// Whether PostgreSQL is mandatory (`EMS_REQUIRE_POSTGRES=1`, set by CI).
pub fn required() -> bool {
    require::required(Feature::Postgres)
}

/// Reports that a PostgreSQL test cannot run: panics when PostgreSQL is
/// required, else a loud SKIP (see [`crate::require`]); returns `None`.
pub fn unavailable<T>(why: &str) -> Option<T> {
    require::skipped(Feature::Postgres, why)
}

/// The server binaries, if installed.
pub fn bin_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("EMS_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BIN));
    dir.join("initdb").exists().then_some(dir)
}

/// The external server's URL, when `EMS_TEST_DATABASE_URL` names one.
pub fn external_url() -> Option<String> {
    std::env::var("EMS_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

/// The shared private cluster, or why it could not start.
struct Shared {
    cluster: Result<Cluster, String>,
    /// Why the cluster runs without TLS, when it does.
    no_tls: Option<String>,
}

static SHARED: OnceLock<Shared> = OnceLock::new();

/// Superuser URL of the database server the tests share: the external one
/// or a private cluster started once per test binary. `None` = skip.
pub fn server_url() -> Option<String> {
    if let Some(url) = external_url() {
        return Some(url);
    }
    shared_cluster().map(|c| c.admin_url.clone())
}

/// The shared private cluster, for checks that need the cluster itself
/// (its files on disk, its TLS). When an external server was given with
/// `EMS_TEST_DATABASE_URL`, nothing is started: the check is skipped
/// (a failure under `EMS_REQUIRE_POSTGRES=1`) with `what` it needs.
pub fn local_cluster(what: &str) -> Option<&'static Cluster> {
    if external_url().is_some() {
        return unavailable(&format!(
            "{what} needs the private cluster, and EMS_TEST_DATABASE_URL points to an \
             external server (unset it to run this check)"
        ));
    }
    shared_cluster()
}

/// The shared private cluster with TLS, for the TLS checks: skipped (a
/// failure under `EMS_REQUIRE_POSTGRES=1`) when the cluster had to start
/// without TLS, with the reason.
pub fn tls_cluster(what: &str) -> Option<(&'static Cluster, &'static Path)> {
    let c = local_cluster(what)?;
    match (&c.tls_ca, SHARED.get().and_then(|s| s.no_tls.as_deref())) {
        (Some(ca), _) => Some((c, ca.as_path())),
        (None, why) => unavailable(&format!(
            "{what} needs a cluster with TLS, and it started without: {}",
            why.unwrap_or("unknown reason")
        )),
    }
}

/// The shared private cluster (TLS on when `openssl` works), or `None`
/// (after a SKIP) when it cannot run here.
pub fn shared_cluster() -> Option<&'static Cluster> {
    if bin_dir().is_none() {
        let dir = std::env::var("EMS_PG_BIN").unwrap_or_else(|_| DEFAULT_BIN.to_string());
        return unavailable(&format!(
            "EMS_TEST_DATABASE_URL is not set and {dir}/initdb is missing"
        ));
    }
    let shared = SHARED.get_or_init(|| {
        match Cluster::start(ClusterOptions {
            fsync: false,
            tls: true,
        }) {
            Ok(c) => Shared {
                cluster: Ok(c),
                no_tls: None,
            },
            Err(e) => {
                // The TLS checks report this; the others run without TLS.
                eprintln!("starting a TLS cluster failed ({e}); trying without TLS");
                Shared {
                    cluster: Cluster::start(ClusterOptions {
                        fsync: false,
                        tls: false,
                    }),
                    no_tls: Some(e),
                }
            }
        }
    });
    match &shared.cluster {
        Ok(c) => Some(c),
        Err(e) => unavailable(&format!("the private cluster did not start: {e}")),
    }
}

/// A private cluster of its own (e.g. one a test restarts), or `None`
/// after a SKIP (a failure under `EMS_REQUIRE_POSTGRES=1`) when the server
/// binaries are missing or it does not start.
pub fn own_cluster(opts: ClusterOptions, what: &str) -> Option<Cluster> {
    if bin_dir().is_none() {
        return unavailable(&format!("{what} needs the PostgreSQL server binaries"));
    }
    match Cluster::start(opts) {
        Ok(c) => Some(c),
        Err(e) => unavailable(&format!("{what}: the private cluster did not start: {e}")),
    }
}

/// A database of its own for one test; dropped (with `FORCE`) at the end.
#[derive(Debug)]
pub struct TestDb {
    /// URL of the new database.
    pub url: String,
    /// Its name.
    pub name: String,
    /// URL of the server's `postgres` database (to drop it).
    admin_url: String,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.admin_url, postgres::NoTls) {
            let _ = c.batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ));
        }
    }
}

static DB_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Creates a fresh database on the server at `admin_url`.
pub fn create_db(admin_url: &str) -> TestDb {
    let name = format!(
        "ems_t_{}_{}",
        std::process::id(),
        DB_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let mut c = postgres::Client::connect(admin_url, postgres::NoTls)
        .unwrap_or_else(|e| panic!("cannot connect to the test server: {e}"));
    c.batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    TestDb {
        url: with_dbname(admin_url, &name),
        name,
        admin_url: admin_url.to_string(),
    }
}

/// A fresh database on the shared server, or `None` (skip).
pub fn fresh_db() -> Option<TestDb> {
    server_url().map(|u| create_db(&u))
}

/// `url` with its database name replaced by `name`.
pub fn with_dbname(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let authority_start = base[after_scheme..]
        .rfind('@')
        .map_or(after_scheme, |i| after_scheme + i + 1);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{name}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

fn euid() -> u32 {
    std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
}

fn id_of(flag: &str) -> Result<u32, String> {
    let out = Command::new("id")
        .args([flag, "postgres"])
        .output()
        .map_err(|e| format!("id: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| "there is no `postgres` OS user to run the server as".to_string())
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| format!("chown {}: {e}", path.display()))?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path).map_err(|e| e.to_string())? {
            chown_tree(&entry.map_err(|e| e.to_string())?.path(), uid, gid)?;
        }
    }
    Ok(())
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

static CLUSTER_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Cluster {
    /// initdb + start a new private cluster.
    pub fn start(opts: ClusterOptions) -> Result<Cluster, String> {
        let bin = bin_dir().ok_or("PostgreSQL server binaries not found")?;
        let root = std::env::temp_dir().join(format!(
            "ems-pg-{}-{}",
            std::process::id(),
            CLUSTER_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).map_err(|e| format!("mkdir {}: {e}", root.display()))?;
        let as_postgres = euid() == 0;
        let mut c = Cluster {
            data: root.join("data"),
            root,
            port: 0,
            admin_url: String::new(),
            tls_ca: None,
            bin,
            as_postgres,
        };
        // From here on the watcher removes the dir whatever happens.
        c.spawn_watcher()?;
        if opts.tls {
            c.make_certificates()?;
        }
        if as_postgres {
            chown_tree(&c.root, id_of("-u")?, id_of("-g")?)?;
        }
        c.run(
            "initdb",
            &[
                "-D",
                path_str(&c.data)?,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        let mut conf = format!(
            "\n# ems test cluster\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nmax_connections = 200\n\
             fsync = {}\nfull_page_writes = {}\nlog_min_messages = warning\n",
            path_str(&c.root)?,
            if opts.fsync { "on" } else { "off" },
            if opts.fsync { "on" } else { "off" },
        );
        if c.tls_ca.is_some() {
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{0}/server.crt'\nssl_key_file = '{0}/server.key'\n",
                path_str(&c.root)?
            ));
        }
        let conf_path = c.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).map_err(|e| e.to_string())?;
        text.push_str(&conf);
        // The free port may be taken by someone else before the server
        // binds it: then try another (a later `port` line wins).
        let log = c.root.join("server.log");
        let mut last_err = String::new();
        for _attempt in 0..3 {
            c.port = free_port()?;
            text.push_str(&format!("port = {}\n", c.port));
            std::fs::write(&conf_path, &text).map_err(|e| e.to_string())?;
            match c.run(
                "pg_ctl",
                &[
                    "-D",
                    path_str(&c.data)?,
                    "-l",
                    path_str(&log)?,
                    "-w",
                    "-t",
                    "120",
                    "start",
                ],
            ) {
                Ok(()) => {
                    last_err.clear();
                    break;
                }
                Err(e) => last_err = format!("{e}; server log: {}", c.log_tail()),
            }
        }
        if !last_err.is_empty() {
            return Err(last_err);
        }
        c.admin_url = format!("postgres://postgres@127.0.0.1:{}/postgres", c.port);
        Ok(c)
    }

    /// `pg_ctl restart -m fast`: every connection is cut, committed data
    /// stays.
    pub fn restart(&self) -> Result<(), String> {
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.data)?,
                "-l",
                path_str(&self.root.join("server.log"))?,
                "-w",
                "-t",
                "120",
                "-m",
                "fast",
                "restart",
            ],
        )
    }

    /// Every byte on disk of database `dbname` plus the WAL, after a
    /// checkpoint.
    pub fn raw_bytes_of(&self, dbname: &str) -> Option<Vec<u8>> {
        let mut c = postgres::Client::connect(&self.admin_url, postgres::NoTls).ok()?;
        c.batch_execute("CHECKPOINT").ok()?;
        let oid: postgres::types::Oid = c
            .query_one("SELECT oid FROM pg_database WHERE datname = $1", &[&dbname])
            .ok()?
            .get(0);
        let mut all = Vec::new();
        for dir in [
            self.data.join("base").join(oid.to_string()),
            self.data.join("pg_wal"),
        ] {
            for e in std::fs::read_dir(dir).ok()?.flatten() {
                if e.path().is_file() {
                    all.extend(std::fs::read(e.path()).ok()?);
                }
            }
        }
        Some(all)
    }

    /// Runs a server binary (as `postgres` when we are root).
    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        // Output to a file, not a pipe: a daemon inheriting a pipe would
        // keep `output()` waiting forever.
        let out_path = self.root.join(format!("{tool}.out"));
        let out = std::fs::File::create(&out_path).map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let status = cmd
            .args(args)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| format!("{tool}: {e}"))?;
        if !status.success() {
            let text = std::fs::read_to_string(&out_path).unwrap_or_default();
            return Err(format!("{tool} failed ({status}): {}", text.trim()));
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join(" | ")
    }

    /// Stops the cluster and removes the temp dir once this process is
    /// gone (see the module docs).
    fn spawn_watcher(&self) -> Result<(), String> {
        let pid = std::process::id();
        let run_as = if self.as_postgres {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             {run_as}'{bin}/pg_ctl' -D '{data}' stop -m immediate >/dev/null 2>&1; \
             rm -rf '{root}'",
            bin = path_str(&self.bin)?,
            data = path_str(&self.data)?,
            root = path_str(&self.root)?,
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map(|_| ())
            .map_err(|e| format!("cannot start the clean-up watcher: {e}"))
    }

    /// A CA and a server certificate for 127.0.0.1/localhost; PostgreSQL
    /// wants the key readable by its owner only.
    fn make_certificates(&mut self) -> Result<(), String> {
        let r = &self.root;
        crate::certs::make_server_certificates(r)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(r.join("server.key"), std::fs::Permissions::from_mode(0o600))
            .map_err(|e| e.to_string())?;
        self.tls_ca = Some(r.join("ca.crt"));
        Ok(())
    }
}

fn path_str(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("non-UTF-8 path {}", p.display()))
}
