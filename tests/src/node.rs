//! A private RabbitMQ node for one test, beside the machine's own
//! `rabbit@localhost` (which is never touched): its own node name, ports,
//! data, logs, config and env file, started as the `rabbitmq` user (so it
//! shares the Erlang cookie), **stopped and deleted when dropped**, a failed
//! test included.
//!
//! A node from [`spawn_rabbitmq_node`] has one AMQP listener, TLS
//! (`listeners.tcp = none`), and serves its management API over https only,
//! both with the certificates the test gives; [`NodeTls::require_client_cert`]
//! makes it ask clients for a certificate signed by the same CA (mutual
//! TLS). A node from [`spawn_plain_rabbitmq_node`] has a plain-TCP listener
//! and an http management API instead (for tests about something else than
//! TLS: a broker restart). [`crate::cluster`] joins three plain nodes into a
//! cluster with the pieces here ([`RabbitNode::kill`], [`RabbitNode::start`],
//! [`RabbitNode::shut_down`]).
//!
//! Needs root (to start the server as `rabbitmq`) and RabbitMQ 3.x at
//! `/usr/lib/rabbitmq`. One node starts in 10-20 s on a 2-core machine.

use crate::certs::CertFiles;
use crate::{TestNs, free_port};
use anyhow::{Context, bail};
use guildhall_broker::Management;
use guildhall_broker::tls::CaBundle;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The server script of Debian's package.
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// Longest a node may take to answer on its management API.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a killed node's processes may take to be gone.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The certificates a node serves with.
#[derive(Debug, Clone)]
pub struct NodeTls {
    /// The CA that signed `server` (and, with `require_client_cert`, the
    /// certificates clients must present).
    pub ca: PathBuf,
    /// The node's certificate (for 127.0.0.1) and key.
    pub server: CertFiles,
    /// Refuse AMQP clients without a certificate the CA signed
    /// (`ssl_options.fail_if_no_peer_cert`). The management API never asks.
    pub require_client_cert: bool,
}

/// A running private node; stopped, and its files deleted, on drop.
pub struct RabbitNode {
    /// Its Erlang node name (`gh<label><hex>@localhost`).
    pub name: String,
    /// The AMQP listener's port (127.0.0.1): TLS, plain TCP for a plain node.
    pub amqp_port: u16,
    /// The management API's port (127.0.0.1): https, http for a plain node.
    pub management_port: u16,
    /// The CA clients must trust; `None` for a plain node (no TLS).
    pub ca: Option<PathBuf>,
    /// Everything of the node's: config, certificates, data, logs.
    dir: PathBuf,
    /// Where its log is copied when it is dropped.
    keep_log: PathBuf,
    /// The ports given at start, to start it again the same way.
    ports: (u16, u16),
    /// `runuser ... rabbitmq-server`, leader of a process group of its own;
    /// `None` while the node is stopped.
    server: Option<Child>,
    /// The Erlang VM's pid, from the pid file, once known.
    beam: Option<u32>,
}

impl RabbitNode {
    /// `amqps://guest:guest@127.0.0.1:<port>/%2f` (a TLS node's URL).
    pub fn amqps_url(&self) -> String {
        format!("amqps://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` (a plain node's URL).
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// `https://guest:guest@127.0.0.1:<port>` (`http` for a plain node).
    pub fn management_url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://guest:guest@127.0.0.1:{}", self.management_port)
    }

    /// Kills the node (SIGKILL: a crash, what a quorum queue must survive)
    /// and starts it again on the same data, ports and name.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.start().await
    }

    /// The Erlang VM's pid (from the node's pid file), `None` while the
    /// node is stopped or before the VM wrote it.
    pub fn pid(&self) -> Option<u32> {
        self.beam
    }

    /// The node's Erlang name (`gh...@localhost`), as `rabbitmqctl -n`
    /// takes it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the node's server has been started and not stopped since.
    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// SIGKILLs the node (a crash: no goodbye to its peers, its clients'
    /// connections just break) and waits until its processes are gone. Its
    /// data stays; [`RabbitNode::start`] starts it again. Nothing if it is
    /// not running.
    pub fn kill(&mut self) {
        self.stop("KILL", STOP_TIMEOUT);
    }

    /// Stops the node gracefully (SIGTERM to the VM: RabbitMQ stops its
    /// apps, tells its peers, and exits), waiting up to `timeout` before a
    /// SIGKILL. Nothing if it is not running.
    pub fn shut_down(&mut self, timeout: Duration) {
        self.stop("TERM", timeout);
    }

    /// Starts a stopped node again on the same data, ports and name, and
    /// waits until it answers on its management API.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        self.launch()?;
        self.wait_started().await
    }

    /// Starts the server of a stopped node (nothing if it runs), without
    /// waiting for it: [`RabbitNode::wait_started`] does.
    pub(crate) fn launch(&mut self) -> anyhow::Result<()> {
        if self.server.is_none() {
            self.beam = None;
            let _ = std::fs::remove_file(self.dir.join("node.pid"));
            self.server = Some(launch(&self.dir, &self.name, self.ports)?);
        }
        Ok(())
    }

    /// Launches the node again if its server exited (a failed boot); whether
    /// it did.
    pub(crate) fn relaunch_if_exited(&mut self) -> anyhow::Result<bool> {
        let exited = self
            .server
            .as_mut()
            .is_some_and(|s| matches!(s.try_wait(), Ok(Some(_))));
        if exited {
            self.server = None;
            self.launch()?;
        }
        Ok(exited)
    }

    /// A management API client that trusts the node's CA (plain http for
    /// a plain node).
    pub fn management(&self) -> anyhow::Result<Management> {
        match &self.ca {
            None => Ok(Management::new(&self.management_url(), "/")?),
            Some(ca) => {
                let ca = CaBundle::load(ca, "node CA")?;
                Ok(Management::with_ca(&self.management_url(), "/", Some(&ca))?)
            }
        }
    }

    /// The node's log so far (for failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    fn log_file(&self) -> PathBuf {
        self.dir.join("log").join(format!("{}.log", self.name))
    }

    /// The server's own output and the last lines of the node's log, for
    /// a failure message.
    pub(crate) fn failure_output(&self) -> String {
        let out = std::fs::read_to_string(self.dir.join("server.out")).unwrap_or_default();
        format!("{out}\n{}", tail(&self.log_text(), 40))
    }

    /// Stops the node: `sig` (`KILL`, or `TERM` for a graceful stop) to
    /// the VM, then, once the VM is gone or after `timeout`, SIGKILL to the
    /// VM and the whole process group (the runuser and script wrappers,
    /// `erl_child_setup`); waits up to [`STOP_TIMEOUT`] for them to be gone.
    /// Nothing if the node is not running.
    fn stop(&mut self, sig: &str, timeout: Duration) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        // The pid file names the VM even if the node never answered.
        let beam = self
            .beam
            .take()
            .or_else(|| read_pid(&self.dir.join("node.pid")));
        let beam_gone = || beam.is_none_or(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        let signal = |sig: &str, targets: &[String]| {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg("--")
                .args(targets)
                .stderr(Stdio::null())
                .status();
        };
        let group = format!("-{}", server.id());
        let mut all = vec![group.clone()];
        all.extend(beam.map(|pid| pid.to_string()));
        match (sig, beam) {
            (_, None) | ("KILL", _) => signal("KILL", &all),
            (sig, Some(pid)) => {
                signal(sig, &[pid.to_string()]);
                let deadline = Instant::now() + timeout;
                while !beam_gone() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                }
                signal("KILL", &all);
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let gone = |server: &mut Child| beam_gone() && matches!(server.try_wait(), Ok(Some(_)));
        while !gone(&mut server) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if !gone(&mut server) {
            eprintln!(
                "warning: the private node {} (pid {beam:?}) is still there {STOP_TIMEOUT:?} after SIGKILL",
                self.name
            );
        }
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::copy(self.log_file(), &self.keep_log);
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!(
                "warning: could not remove the node's files {}: {e}",
                self.dir.display()
            );
        }
    }
}

/// Starts a private node with TLS listeners only and waits until its
/// management API answers over https. Its log is copied to the test's log
/// directory when it stops.
pub async fn spawn_rabbitmq_node(
    ns: &TestNs,
    label: &str,
    tls: &NodeTls,
) -> anyhow::Result<RabbitNode> {
    let mut node = create_node(ns, label, Some(tls), "")?;
    node.wait_started().await?;
    Ok(node)
}

/// A private node like [`spawn_rabbitmq_node`]'s but with a plain-TCP AMQP
/// listener and an http management API (for tests about something else
/// than TLS: a broker restart). Needs root too.
pub async fn spawn_plain_rabbitmq_node(ns: &TestNs, label: &str) -> anyhow::Result<RabbitNode> {
    let mut node = create_node(ns, label, None, "")?;
    node.wait_started().await?;
    Ok(node)
}

/// Writes a private node's files, with TLS listeners only (`tls`) or plain
/// ones (`None`) and `extra_config` (`rabbitmq.conf` lines) after them, and
/// starts its server without waiting for it ([`RabbitNode::wait_started`]
/// does). Its log is copied to `<test log dir>/rabbitmq-<label>.log` when it
/// is dropped.
pub(crate) fn create_node(
    ns: &TestNs,
    label: &str,
    tls: Option<&NodeTls>,
    extra_config: &str,
) -> anyhow::Result<RabbitNode> {
    if !Path::new(SERVER).exists() {
        bail!("{SERVER} not found: a private RabbitMQ node needs the rabbitmq-server package");
    }
    let name = format!("gh{label}{:08x}@localhost", rand::random::<u32>());
    let dir = std::env::temp_dir()
        .join("guildhall-nodes")
        .join(name.replace('@', "-"));
    std::fs::create_dir_all(dir.join("mnesia"))?;
    std::fs::create_dir_all(dir.join("log"))?;
    let (amqp_port, management_port, dist_port) = (free_port(), free_port(), free_port());
    let d = dir.display();
    let config = match tls {
        Some(tls) => {
            // The node reads its certificates as the rabbitmq user: copies it owns.
            for (from, to) in [
                (&tls.ca, "ca.pem"),
                (&tls.server.cert, "server.pem"),
                (&tls.server.key, "server.key"),
            ] {
                std::fs::copy(from, dir.join(to))
                    .with_context(|| format!("copy {} for the node", from.display()))?;
            }
            format!(
                "listeners.tcp = none\n\
                 listeners.ssl.default = 127.0.0.1:{amqp_port}\n\
                 ssl_options.cacertfile = {d}/ca.pem\n\
                 ssl_options.certfile = {d}/server.pem\n\
                 ssl_options.keyfile = {d}/server.key\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = {}\n\
                 management.ssl.port = {management_port}\n\
                 management.ssl.ip = 127.0.0.1\n\
                 management.ssl.cacertfile = {d}/ca.pem\n\
                 management.ssl.certfile = {d}/server.pem\n\
                 management.ssl.keyfile = {d}/server.key\n",
                tls.require_client_cert
            )
        }
        None => format!(
            "listeners.tcp.default = 127.0.0.1:{amqp_port}\n\
             loopback_users = none\n\
             management.tcp.port = {management_port}\n\
             management.tcp.ip = 127.0.0.1\n"
        ),
    };
    std::fs::write(dir.join("rabbitmq.conf"), config + extra_config)?;
    // Not rabbitmq_prometheus: its fixed port 15692 is the system node's.
    std::fs::write(dir.join("enabled_plugins"), "[rabbitmq_management].\n")?;
    // The system env file sets NODENAME=rabbit@localhost, which would win.
    std::fs::write(
        dir.join("rabbitmq-env.conf"),
        "ERL_EPMD_ADDRESS=127.0.0.1\n\
         export ERL_FLAGS=\"-kernel inet_dist_use_interface {127,0,0,1}\"\n",
    )?;
    let chown = Command::new("chown")
        .args(["-R", "rabbitmq:rabbitmq"])
        .arg(&dir)
        .status()
        .context("chown")?;
    if !chown.success() {
        bail!(
            "cannot give {d} to the rabbitmq user (a private node must run as rabbitmq to share its Erlang cookie; the tests need root for that)"
        );
    }
    // RABBITMQ_NODE_PORT: the plain listener's port (the config names it
    // too); a TLS node's is not listened on (`listeners.tcp = none`).
    let node_port = if tls.is_some() {
        free_port()
    } else {
        amqp_port
    };
    let server = launch(&dir, &name, (node_port, dist_port))?;
    Ok(RabbitNode {
        name,
        amqp_port,
        management_port,
        ca: tls.map(|_| dir.join("ca.pem")),
        keep_log: ns.log_dir.join(format!("rabbitmq-{label}.log")),
        dir,
        server: Some(server),
        beam: None,
        ports: (node_port, dist_port),
    })
}

/// Starts the server of a node whose files are in `dir`.
fn launch(dir: &Path, name: &str, (node_port, dist_port): (u16, u16)) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.out"))?;
    let path = |f: &str| dir.join(f);
    Command::new("runuser")
        .args(["-u", "rabbitmq", "--", SERVER])
        .env("RABBITMQ_NODENAME", name)
        .env("RABBITMQ_NODE_PORT", node_port.to_string())
        .env("RABBITMQ_DIST_PORT", dist_port.to_string())
        .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
        .env("RABBITMQ_LOG_BASE", path("log"))
        .env("RABBITMQ_PID_FILE", path("node.pid"))
        .env("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins"))
        .env("RABBITMQ_CONF_ENV_FILE", path("rabbitmq-env.conf"))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .context("cannot start runuser -u rabbitmq -- rabbitmq-server")
}

impl RabbitNode {
    /// Waits until the node answers on its management API (an error at
    /// once if it is stopped or its server exits).
    pub(crate) async fn wait_started(&mut self) -> anyhow::Result<()> {
        let node = self;
        let management = node.management()?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if node.beam.is_none() {
                node.beam = read_pid(&node.dir.join("node.pid"));
            }
            let Some(server) = node.server.as_mut() else {
                bail!("the node {} is stopped", node.name);
            };
            if let Ok(Some(status)) = server.try_wait() {
                bail!(
                    "the node {} exited at start ({status}):\n{}",
                    node.name,
                    node.failure_output()
                );
            }
            if node.beam.is_some() && management.check().await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let url = node.management_url().replace("guest:guest@", "");
                bail!(
                    "the node {} did not answer on {url} within {START_TIMEOUT:?}:\n{}",
                    node.name,
                    node.failure_output()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .read_to_string(&mut text)
        .ok()?;
    text.trim().parse().ok()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
