//! The shared fixture: the test kit (scratch directories, users, moto, counted skips), the
//! paths of the real binaries, one harness that runs them ([`Agent`] for `pier-agent run` and `deploy-local`, [`pier`] for the
//! controller), a way to look at what they printed, and a way to say a test was skipped.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

pub use pier_testkit::*;

/// Path of the `pier-agent` binary (`cargo build --workspace --bins` builds it; the test
/// command does that first).
pub fn agent_bin() -> PathBuf {
    built_bin("pier-agent")
}

/// Path of the `pier` controller binary.
pub fn pier_bin() -> PathBuf {
    built_bin("pier")
}

/// A binary of this workspace, from the target directory this test binary was built in
/// (`target/PROFILE/deps/e2e-HASH` → `target/PROFILE/NAME`). The binaries live in other
/// packages than this test, so cargo does not hand us their paths; a missing one is a clear
/// failure, not a skip.
fn built_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/PROFILE/deps");
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is not built: run `cargo build --workspace --bins` before the end-to-end tests \
         (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// One of the bundles in `appspec-examples/`.
pub fn example(name: &str) -> PathBuf {
    repo_root().join("appspec-examples").join(name)
}

/// The captured result of running a binary.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from_output(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panics with everything the command printed unless it exited 0.
    #[track_caller]
    pub fn success(self) -> Run {
        assert_eq!(
            self.code, 0,
            "expected success\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Panics unless the command exited with `code`.
    #[track_caller]
    pub fn code(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "unexpected exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// stdout and stderr together, for assertions that do not care which stream.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `bin` with `args`, no stdin, and captures its output.
pub fn run(bin: &Path, args: &[&str]) -> Run {
    run_cmd(Command::new(bin).args(args))
}

/// Runs a prepared command and captures its output.
pub fn run_cmd(cmd: &mut Command) -> Run {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    Run::from_output(out)
}

/// Runs the real `pier` with moto's endpoint and test credentials in its environment, and
/// none of the variables that would give it a default transport or status sink.
pub fn pier(args: &[&str]) -> Run {
    pier_via(moto_endpoint(), args)
}

/// Runs the real `pier` as [`pier`] does, reaching SQS and S3 at `endpoint` instead.
pub fn pier_via(endpoint: &str, args: &[&str]) -> Run {
    run_cmd(
        Command::new(pier_bin())
            .args(args)
            .env("AWS_ENDPOINT_URL", endpoint)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env_remove("PIER_STATUS_BUCKET")
            .env_remove("PIER_STATUS_DIR")
            .env_remove("PIER_TRANSPORT")
            .env_remove("PIER_SPOOL_DIR")
            .env_remove("PIER_QUEUE_URL_TEMPLATE")
            .env_remove("PIER_SIGNING_KEY"),
    )
}

/// How an [`Agent`] takes commands when it runs as a daemon.
#[derive(Clone, Debug)]
enum Transport {
    /// None configured: enough for `deploy-local`.
    None,
    /// The spool directory `ROOT/spool`.
    Spool,
    /// An SQS queue on moto: this URL, or (`None`) the queue `pier-HOST`, created on start.
    Sqs(Option<String>),
}

/// Builds an [`Agent`]: see [`Agent::builder`].
pub struct AgentBuilder {
    dir: PathBuf,
    host: Option<String>,
    transport: Transport,
    config: String,
    own_mount: Option<PathBuf>,
    endpoint: Option<String>,
    hook_env: Vec<(String, String)>,
}

impl AgentBuilder {
    /// The agent's host id (`host_id`); without one the agent works out its own.
    pub fn host(mut self, id: &str) -> AgentBuilder {
        self.host = Some(id.to_string());
        self
    }

    /// Takes commands from the spool directory `ROOT/spool` ([`Agent::spool`]).
    pub fn spool(mut self) -> AgentBuilder {
        self.transport = Transport::Spool;
        self
    }

    /// Takes commands from the SQS queue at `url` on moto.
    pub fn sqs(mut self, url: &str) -> AgentBuilder {
        self.transport = Transport::Sqs(Some(url.to_string()));
        self
    }

    /// Takes commands from its own SQS queue on moto, `pier-HOST`, which it creates on start.
    pub fn sqs_own_queue(mut self) -> AgentBuilder {
        self.transport = Transport::Sqs(None);
        self
    }

    /// Reaches SQS and S3 at `url` (`aws.endpoint_url`) instead of moto's own address: a
    /// proxy in front of moto, say.
    pub fn endpoint(mut self, url: &str) -> AgentBuilder {
        self.endpoint = Some(url.to_string());
        self
    }

    /// Gives every hook the variable `name` = `value` (`hooks.env.set`).
    pub fn hook_env(mut self, name: &str, value: &str) -> AgentBuilder {
        self.hook_env.push((name.to_string(), value.to_string()));
        self
    }

    /// More configuration: YAML appended to the file as it is (top-level keys other than
    /// `root_dir`, `host_id`, `hooks` and `transport`).
    pub fn config(mut self, yaml: &str) -> AgentBuilder {
        self.config.push_str(yaml);
        self
    }

    /// Runs the daemon in a private mount namespace with a tmpfs over `dir`, so that this
    /// agent sees its own copy of `dir` as a separate machine would (its installs there are
    /// seen through [`RunningAgent::host_path`]).
    pub fn own_mount(mut self, dir: &Path) -> AgentBuilder {
        self.own_mount = Some(dir.to_path_buf());
        self
    }

    /// Writes the configuration file and returns the agent, not yet running.
    pub fn build(self) -> Agent {
        let root = self.dir.join("root");
        let mut yaml = format!("root_dir: {}\n", root.display());
        if let Some(host) = &self.host {
            yaml.push_str(&format!("host_id: {host}\n"));
        }
        // A hook gets 1 s between SIGTERM and SIGKILL, so no stop waits long on one.
        yaml.push_str("hooks:\n  kill_grace_seconds: 1\n");
        if !self.hook_env.is_empty() {
            yaml.push_str("  env:\n    set:\n");
            for (name, value) in &self.hook_env {
                yaml.push_str(&format!("      {name}: {value:?}\n"));
            }
        }
        let spool = root.join("spool");
        match &self.transport {
            Transport::None => {}
            Transport::Spool => yaml.push_str(&format!(
                "transport:\n  type: spool\n  spool_dir: {}\n",
                spool.display()
            )),
            Transport::Sqs(url) => {
                yaml.push_str("transport:\n  type: sqs\n");
                match url {
                    Some(url) => yaml.push_str(&format!("  queue_url: {url}\n")),
                    None => yaml.push_str("  create_queue: true\n"),
                }
                yaml.push_str(&format!(
                    "aws:\n  region: us-east-1\n  endpoint_url: {}\n",
                    self.endpoint.as_deref().unwrap_or(moto_endpoint())
                ));
            }
        }
        yaml.push_str(&self.config);
        std::fs::create_dir_all(&self.dir).unwrap();
        let config = self.dir.join("agent.yml");
        std::fs::write(&config, yaml).unwrap();
        Agent {
            dir: self.dir,
            config,
            root,
            spool: matches!(self.transport, Transport::Spool).then_some(spool),
            own_mount: self.own_mount,
        }
    }

    /// Writes the configuration and starts `pier-agent run` with it.
    pub fn spawn(self) -> RunningAgent {
        self.build().start()
    }
}

/// One host's `pier-agent`, as the tests run it: a configuration file `DIR/agent.yml` naming
/// its deployment root `DIR/root` and how it takes commands. From it a test starts the daemon
/// ([`Agent::start`], as often as it likes) or runs `deploy-local` ([`Agent::deploy_local`]).
///
/// ```ignore
/// let agent = Agent::builder(scratch.path().join("web-1")).host("web-1").spool().build();
/// agent.submit(&command);
/// let running = agent.start();
/// assert_eq!(running.terminate(Duration::from_secs(30)), 0);
/// ```
#[derive(Clone, Debug)]
pub struct Agent {
    dir: PathBuf,
    config: PathBuf,
    root: PathBuf,
    spool: Option<PathBuf>,
    own_mount: Option<PathBuf>,
}

impl Agent {
    /// An agent whose configuration, deployment root and logs live in `dir`.
    pub fn builder(dir: impl Into<PathBuf>) -> AgentBuilder {
        AgentBuilder {
            dir: dir.into(),
            host: None,
            transport: Transport::None,
            config: String::new(),
            own_mount: None,
            endpoint: None,
            hook_env: Vec::new(),
        }
    }

    /// The configuration file (a test may rewrite it and send SIGHUP).
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The deployment root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The spool directory the daemon takes commands from.
    pub fn spool(&self) -> &Path {
        self.spool
            .as_deref()
            .expect("the agent was built with .spool()")
    }

    /// Drops `command` into the spool as `DEPLOYMENT_ID.json`, as a controller would.
    pub fn submit(&self, command: &pier_protocol::Command) {
        pier_transport::spool::Spool::submit(
            self.spool(),
            &format!("{}.json", command.deployment_id),
            &command.to_json(),
        )
        .unwrap();
    }

    /// Starts `pier-agent run` with test credentials for moto and its log on stderr, into a
    /// file of its own ([`RunningAgent::log`]).
    pub fn start(&self) -> RunningAgent {
        use std::sync::atomic::{AtomicU32, Ordering};
        static RUNS: AtomicU32 = AtomicU32::new(0);
        let log = self.dir.join(format!(
            "agent-{}.log",
            RUNS.fetch_add(1, Ordering::Relaxed)
        ));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = match &self.own_mount {
            None => {
                let mut cmd = Command::new(agent_bin());
                cmd.args(["run", "-c"]).arg(&self.config);
                cmd
            }
            Some(dir) => {
                let mut cmd = Command::new("unshare");
                cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg(r#"mount -t tmpfs pier-e2e "$1" && exec "$2" run -c "$3""#)
                    .arg("sh")
                    .arg(dir)
                    .arg(agent_bin())
                    .arg(&self.config);
                cmd
            }
        };
        let child = cmd
            .env("PIER_LOG_STDERR", "1")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start pier-agent run");
        RunningAgent { child, log }
    }

    /// `pier-agent deploy-local -c CONFIG -l BUNDLE`, for a test to add to and run.
    pub fn deploy_local_cmd(&self, bundle: &Path) -> Command {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("deploy-local")
            .arg("-c")
            .arg(&self.config)
            .arg("-l")
            .arg(bundle);
        cmd
    }

    /// Runs `pier-agent deploy-local` on `bundle` with `extra` arguments.
    pub fn deploy_local(&self, bundle: &Path, extra: &[&str]) -> Run {
        run_cmd(self.deploy_local_cmd(bundle).args(extra))
    }
}

/// A running `pier-agent run`. Dropping it stops the agent: SIGTERM, then SIGKILL if it has
/// not exited within 10 s.
pub struct RunningAgent {
    child: Child,
    log: PathBuf,
}

impl RunningAgent {
    /// The agent's process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Whether the agent process is still running (not exited, not a zombie).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything the agent has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// SIGTERM, then wait (bounded) for a clean exit; returns the exit code.
    pub fn terminate(&mut self, bound: Duration) -> i32 {
        self.signal(Signal::SIGTERM);
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(
                t.elapsed() < bound,
                "agent did not stop within {bound:?} of SIGTERM\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `path` as this agent's host sees it (through its own mount namespace, if it has one).
    pub fn host_path(&self, path: &Path) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.pid())).join(path.strip_prefix("/").unwrap())
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), Signal::SIGTERM);
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (up to a minute) until the SQS queue `name` exists: agents create their queues as
/// they start.
pub async fn wait_for_queue(sqs: &aws_sdk_sqs::Client, name: &str) {
    let t = Instant::now();
    while sqs.get_queue_url().queue_name(name).send().await.is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{name} never appeared"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
