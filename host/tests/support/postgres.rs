//! A throwaway PostgreSQL server for tests and benchmarks: `initdb` into a temp dir, `pg_ctl
//! start` on a free loopback port with fsync off, stopped and removed on drop.
//!
//! PostgreSQL refuses to run as root: when the tests run as root, the server runs as the
//! `postgres` user (`runuser -u postgres --`). Binaries come from `pg_config --bindir`
//! (Debian's `postgresql` package; `just test` installs it when absent).
#![allow(dead_code)]

use anyhow::{bail, Context as _, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    stopped: bool,
    /// Serves TLS with `server.crt` and `server.key` in its directory.
    ssl: bool,
    /// `name=value` settings after the defaults.
    settings: Vec<String>,
}

impl Postgres {
    pub fn start() -> Result<Postgres> {
        Postgres::start_with(&[])
    }

    /// A server with `settings` (`name=value`) over the defaults (fsync off, commits that do
    /// not wait for the WAL): e.g. `synchronous_commit=on`, where a test crashes the server.
    pub fn start_with(settings: &[&str]) -> Result<Postgres> {
        let out = Command::new("pg_config").arg("--bindir").output().context(
            "running pg_config; install PostgreSQL (Debian: apt-get install -y postgresql)",
        )?;
        if !out.status.success() {
            bail!("pg_config --bindir failed");
        }
        let bin = PathBuf::from(String::from_utf8(out.stdout)?.trim());
        let dir = tempfile::Builder::new().prefix("pg-").tempdir()?;
        if is_root() {
            // The server's user must own its directory and reach it.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
        }
        let port = super::broker::free_port();
        let pg = Postgres {
            dir,
            bin,
            port,
            stopped: true,
            ssl: false,
            settings: settings.iter().map(|s| s.to_string()).collect(),
        };
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        let mut pg = pg;
        pg.resume()?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `postgres://` URL of database `db` (see [`Postgres::create_database`]).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A new empty database; its URL.
    pub fn create_database(&self, name: &str) -> Result<String> {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
            ])
            .arg("postgres")
            .args(["-v", "ON_ERROR_STOP=1", "-qc"])
            .arg(format!("CREATE DATABASE \"{name}\""))
            .output()?;
        if !out.status.success() {
            bail!("createdb {name}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(self.url(name))
    }

    /// Stops the server (fast shutdown: sessions are cut), keeping its data.
    pub fn stop(&mut self) -> Result<()> {
        self.halt("fast")
    }

    /// Kills the server as a crash would (immediate shutdown): what it had not written out of
    /// its WAL buffers is lost; it recovers from its WAL at [`Postgres::resume`].
    pub fn crash(&mut self) -> Result<()> {
        self.halt("immediate")
    }

    fn halt(&mut self, mode: &str) -> Result<()> {
        let data = self.data();
        self.run(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", mode, "-w", "stop"],
        )?;
        self.stopped = true;
        Ok(())
    }

    /// Starts the stopped server again on the same port.
    pub fn resume(&mut self) -> Result<()> {
        let data = self.data();
        let log = self.dir.path().join("server.log");
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        for setting in &self.settings {
            options += &format!(" -c {setting}");
        }
        if self.ssl {
            let dir = self.dir.path().display();
            options += &format!(
                " -c ssl=on -c ssl_cert_file={dir}/server.crt -c ssl_key_file={dir}/server.key"
            );
        }
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .with_context(|| {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            format!("starting PostgreSQL; its log:\n{log}")
        })?;
        self.stopped = false;
        Ok(())
    }

    /// Runs one of the server's programs, as `postgres` when we are root.
    fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let path = self.bin.join(program);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .with_context(|| format!("running {}", path.display()))?;
        if !out.status.success() {
            bail!(
                "{program} {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Restarts the server serving TLS with the certificate `cert_pem` and its key.
    pub fn enable_ssl(&mut self, cert_pem: &str, key_pem: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        for (name, pem) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let file = self.dir.path().join(name);
            std::fs::write(&file, pem)?;
            // The server refuses a key others can read, and must be able to read it itself.
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
            if is_root() {
                let status = Command::new("chown").arg("postgres").arg(&file).status()?;
                anyhow::ensure!(status.success(), "chown postgres {}", file.display());
            }
        }
        self.stop()?;
        self.ssl = true;
        self.resume()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if !self.stopped {
            let data = self.data();
            let _ = self.run(
                "pg_ctl",
                &[
                    "-D",
                    data.to_str().unwrap(),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
            );
        }
    }
}
