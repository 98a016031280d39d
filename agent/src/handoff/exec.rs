//! Exec hand-off: one `sh -c COMMAND` process per task.
//!
//! The payload goes to stdin; the task's id, stage, attempt, idempotency key,
//! priority, `TRACEPARENT` and, on a child task, `GUILDHALL_PARENT` go in
//! the environment; stdout (at most 64 MiB) is the next payload, or a
//! fan-out if its first line is `#guildhall-fan-out` ([`super::fanout`]). The process leads its own process group, so a timeout kills
//! everything it started.
//!
//! | what happened | outcome |
//! |---|---|
//! | exit 0 | success, stdout is the result |
//! | exit 0, stdout starting with a `#guildhall-fan-out` line | a fan-out (a bad one: permanent, class `invalid_fan_out`) |
//! | exit 65 (`EX_DATAERR`) | permanent failure, class `exit_65` |
//! | any other exit code `n` | retryable, class `exit_<n>` |
//! | killed by signal `n` | retryable, class `signal_<n>` |
//! | stdout over 64 MiB | retryable, class `output_too_large` (group killed) |
//! | no exit within the task timeout | retryable, class `timeout` (group killed; a supervised worker is restarted instead and the task given back) |
//! | cannot start `sh` | retryable, class `spawn` |
//!
//! The error is the last non-empty line of stderr (of which the last 4 KiB
//! are kept). Stderr lines `@progress 0.5 some message` are progress reports,
//! not errors.
//!
//! The task is over when the process exits, not when its output pipes close:
//! a background child it left (`(sleep 50 &); echo done`) holds them open.
//! After the exit, what is already in the pipes is read for at most
//! [`OUTPUT_GRACE`], then the agent stops reading: output a background child
//! writes later is lost (its writes fail with `EPIPE`, or `SIGPIPE` kills
//! it). Such a child is left running after a success; the task timeout
//! kills the whole process group, background children included.

use super::{Failure, NextStage, Outcome, Progress, ProgressSink, TaskInput};
use crate::pgroup::GroupGuard;
use guildhall_proto::headers::{EXIT_PERMANENT_FAILURE, env};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Largest stdout taken as the next payload.
pub const MAX_OUTPUT_BYTES: usize = 64 << 20;

/// Bytes of stderr kept to find the error line.
pub const STDERR_TAIL_BYTES: usize = 4096;

/// How long output is still read after the process exited (see the module
/// docs).
pub const OUTPUT_GRACE: Duration = Duration::from_millis(150);

/// Shortest interval between two progress reports of one task.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Runs a shell command per task.
#[derive(Debug)]
pub struct ExecWorker {
    /// The command line given to `sh -c`.
    command: String,
    /// Longest a process may run before its group is killed.
    timeout: Duration,
}

impl ExecWorker {
    /// A worker running `command`, killing it after `timeout`.
    pub fn new(command: String, timeout: Duration) -> Self {
        Self { command, timeout }
    }

    /// Runs the command for one task.
    pub async fn handle(&self, task: &TaskInput, progress: &ProgressSink) -> Outcome {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(&self.command)
            .env(env::TASK_ID, task.task_id.as_str())
            .env(env::STAGE, task.stage.as_str())
            .env(env::ATTEMPT, task.attempt.to_string())
            .env(env::IDEMPOTENCY_KEY, &task.idempotency_key)
            .env(env::PRIORITY, task.priority.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        match &task.traceparent {
            Some(tp) => cmd.env(env::TRACEPARENT, tp),
            None => cmd.env_remove(env::TRACEPARENT),
        };
        match &task.parent {
            Some(parent) => cmd.env(env::PARENT, parent.as_str()),
            None => cmd.env_remove(env::PARENT),
        };
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(err) => {
                return Outcome::Failure(Failure::retryable(
                    "spawn",
                    format!("cannot start `sh -c {}`: {err}", self.command),
                ));
            }
        };
        // Dropping the guard (this future cancelled) kills the whole group.
        let group = GroupGuard::new(child.id());
        let tail = Mutex::new(StderrTail::new(progress));
        let (stdin, stdout, stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let payload = task.payload.as_slice();
        let mut out = Vec::new();
        let mut too_large = false;
        let result = {
            let write = async move {
                if let Some(mut stdin) = stdin {
                    // A worker that exits without reading its input is not an
                    // error here; its exit status tells.
                    let _ = stdin.write_all(payload).await;
                }
            };
            let read_out = async {
                too_large = read_stdout(stdout, &group, &mut out).await.is_err();
            };
            let read_err = read_stderr(stderr, &tail);
            let io =
                futures_lite::future::zip(futures_lite::future::zip(write, read_out), read_err);
            let mut io = std::pin::pin!(io);
            let run = async {
                tokio::select! {
                    status = child.wait() => (status, true),
                    _ = &mut io => (child.wait().await, false),
                }
            };
            let result = tokio::time::timeout(self.timeout, run).await;
            // The process is gone; what it wrote is in the pipes. Only a
            // child it left in the background can keep them open (the
            // grace does not count against the task timeout).
            if let Ok((_, true)) = result
                && tokio::time::timeout(OUTPUT_GRACE, &mut io).await.is_err()
            {
                tracing::debug!(
                    task = %task.task_id,
                    "the process exited but its output stays open (a background child): stopped reading"
                );
            }
            result.map(|(status, _)| status)
        };
        if let Ok(mut tail) = tail.lock() {
            tail.finish();
        }
        let last_line = tail.lock().map(|t| t.last_line()).unwrap_or_default();
        let out = if too_large {
            Err(OutputTooLarge)
        } else {
            Ok(out)
        };
        match result {
            Ok(status) => {
                group.disarm();
                match status {
                    Ok(status) => map_exit(status, out, last_line),
                    Err(err) => {
                        Outcome::Failure(Failure::retryable("wait", format!("wait failed: {err}")))
                    }
                }
            }
            Err(_) => {
                group.kill();
                let _ = child.wait().await;
                let mut error = format!(
                    "no exit after {}; process group killed",
                    humantime::format_duration(self.timeout)
                );
                if let Some(line) = last_line {
                    error.push_str("; last stderr line: ");
                    error.push_str(&line);
                }
                Outcome::Failure(Failure::timeout(error))
            }
        }
    }
}

/// Output over the cap: the group was killed and the output dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputTooLarge;

/// Reads stdout into `out` until it closes (or until this future is
/// dropped: `out` keeps what was read).
async fn read_stdout(
    stdout: Option<impl AsyncRead + Unpin>,
    group: &GroupGuard,
    out: &mut Vec<u8>,
) -> Result<(), OutputTooLarge> {
    let Some(mut stdout) = stdout else {
        return Ok(());
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stdout.read(&mut buf).await {
            Ok(0) | Err(_) => return Ok(()),
            Ok(n) => {
                if out.len() + n > MAX_OUTPUT_BYTES {
                    // It would block writing the rest forever: stop it now.
                    group.kill();
                    return Err(OutputTooLarge);
                }
                out.extend_from_slice(&buf[..n]);
            }
        }
    }
}

async fn read_stderr(stderr: Option<impl AsyncRead + Unpin>, tail: &Mutex<StderrTail<'_>>) {
    let Some(mut stderr) = stderr else {
        return;
    };
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Ok(mut tail) = tail.lock() {
                    tail.push(&buf[..n]);
                }
            }
        }
    }
    if let Ok(mut tail) = tail.lock() {
        tail.finish();
    }
}

/// The end of a task's stderr, split into lines; progress lines are reported
/// instead of kept.
struct StderrTail<'a> {
    /// The last [`STDERR_TAIL_BYTES`] of non-progress output.
    kept: Vec<u8>,
    /// The line being read (its first [`STDERR_TAIL_BYTES`] only).
    line: Vec<u8>,
    /// Where progress goes.
    progress: &'a ProgressSink,
    /// When progress was last reported, to bound the event rate.
    last_progress: Option<Instant>,
}

impl<'a> StderrTail<'a> {
    fn new(progress: &'a ProgressSink) -> Self {
        Self {
            kept: Vec::new(),
            line: Vec::new(),
            progress,
            last_progress: None,
        }
    }

    fn push(&mut self, mut bytes: &[u8]) {
        while let Some(nl) = bytes.iter().position(|b| *b == b'\n') {
            self.extend_line(&bytes[..nl]);
            self.end_line();
            bytes = &bytes[nl + 1..];
        }
        self.extend_line(bytes);
    }

    fn finish(&mut self) {
        if !self.line.is_empty() {
            self.end_line();
        }
    }

    fn extend_line(&mut self, bytes: &[u8]) {
        let room = STDERR_TAIL_BYTES.saturating_sub(self.line.len());
        self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        if let Some(progress) = parse_progress(&String::from_utf8_lossy(&line)) {
            let due = self
                .last_progress
                .is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL);
            if due {
                self.last_progress = Some(Instant::now());
                (self.progress)(progress);
            }
            return;
        }
        self.kept.extend_from_slice(&line);
        self.kept.push(b'\n');
        if self.kept.len() > STDERR_TAIL_BYTES {
            let cut = self.kept.len() - STDERR_TAIL_BYTES;
            self.kept.drain(..cut);
        }
    }

    /// The last non-empty line kept, trimmed.
    fn last_line(&self) -> Option<String> {
        String::from_utf8_lossy(&self.kept)
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_owned)
    }
}

/// Reads `@progress 0.5 some message` (fraction and message both optional).
pub fn parse_progress(line: &str) -> Option<Progress> {
    let rest = line.trim().strip_prefix("@progress")?;
    if !rest.is_empty() && !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let rest = rest.trim();
    let (first, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let (fraction, message) = match first.parse::<f32>() {
        Ok(f) if f.is_finite() => (Some(f.clamp(0.0, 1.0)), after.trim()),
        _ => (None, rest),
    };
    let message = (!message.is_empty()).then(|| message.chars().take(200).collect());
    Some(Progress { fraction, message })
}

/// Maps how the process ended to an outcome (see the module docs).
pub fn map_exit(
    status: ExitStatus,
    stdout: Result<Vec<u8>, OutputTooLarge>,
    last_stderr_line: Option<String>,
) -> Outcome {
    let out = match stdout {
        Ok(out) => out,
        Err(OutputTooLarge) => {
            return Outcome::Failure(Failure::retryable(
                "output_too_large",
                format!("stdout over {MAX_OUTPUT_BYTES} bytes; process group killed"),
            ));
        }
    };
    let described = |what: String| last_stderr_line.clone().unwrap_or(what);
    match (status.code(), status.signal()) {
        (Some(0), _) => super::fanout::from_exec(&out).unwrap_or(Outcome::Success {
            payload: out,
            next: NextStage::Default,
            priority: None,
        }),
        (Some(EXIT_PERMANENT_FAILURE), _) => Outcome::Failure(Failure::permanent(
            format!("exit_{EXIT_PERMANENT_FAILURE}"),
            described(format!("exited with code {EXIT_PERMANENT_FAILURE}")),
        )),
        (Some(code), _) => Outcome::Failure(Failure::retryable(
            format!("exit_{code}"),
            described(format!("exited with code {code}")),
        )),
        (None, Some(signal)) => Outcome::Failure(Failure::retryable(
            format!("signal_{signal}"),
            described(format!("killed by signal {signal}")),
        )),
        (None, None) => Outcome::Failure(Failure::retryable(
            "exit_unknown",
            described(format!("ended without exit code or signal ({status})")),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn task(payload: &[u8]) -> TaskInput {
        TaskInput {
            task_id: "T-1".parse().unwrap(),
            stage: "build".parse().unwrap(),
            attempt: 2,
            idempotency_key: "T-1/build/2".into(),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            priority: Default::default(),
            payload: payload.to_vec(),
            parent: None,
        }
    }

    fn no_progress() -> ProgressSink {
        Arc::new(|_| {})
    }

    async fn run(command: &str, timeout: Duration) -> Outcome {
        ExecWorker::new(command.into(), timeout)
            .handle(&task(b"hello"), &no_progress())
            .await
    }

    fn failure(outcome: Outcome) -> Failure {
        match outcome {
            Outcome::Failure(f) => f,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    const LONG: Duration = Duration::from_secs(20);

    #[tokio::test]
    async fn exit_zero_is_success_with_stdout_as_the_result() {
        assert_eq!(
            run("tr a-z A-Z", LONG).await,
            Outcome::Success {
                payload: b"HELLO".to_vec(),
                next: NextStage::Default,
                priority: None,
            }
        );
    }

    #[tokio::test]
    async fn the_environment_names_the_task() {
        let out = run(
            r#"printf '%s|%s|%s|%s|%s' "$GUILDHALL_TASK_ID" "$GUILDHALL_STAGE" "$GUILDHALL_ATTEMPT" "$GUILDHALL_IDEMPOTENCY_KEY" "$TRACEPARENT""#,
            LONG,
        )
        .await;
        let Outcome::Success { payload, .. } = out else {
            panic!("{out:?}")
        };
        assert_eq!(
            String::from_utf8(payload).unwrap(),
            "T-1|build|2|T-1/build/2|00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
    }

    #[tokio::test]
    async fn a_child_task_knows_its_parent_and_a_marker_line_fans_out() {
        let mut child = task(b"");
        child.parent = Some("P-1".parse().unwrap());
        let out = ExecWorker::new(
            r#"printf '#guildhall-fan-out join=merge\n{"payload":"%s"}\n' "$GUILDHALL_PARENT""#
                .into(),
            LONG,
        )
        .handle(&child, &no_progress())
        .await;
        let Outcome::FanOut(f) = out else {
            panic!("{out:?}")
        };
        assert_eq!(f.children[0].payload, b"P-1");
        assert_eq!(
            f.join,
            super::super::fanout::Join::Stage("merge".parse().unwrap())
        );
        // Without a parent, the variable is not inherited from the agent.
        let out = run(r#"printf '%s' "${GUILDHALL_PARENT-unset}""#, LONG).await;
        let Outcome::Success { payload, .. } = out else {
            panic!("{out:?}")
        };
        assert_eq!(payload, b"unset");
    }

    #[tokio::test]
    async fn exit_65_is_permanent_with_the_last_stderr_line_as_error() {
        let f = failure(
            run(
                "echo first >&2; echo 'bad input: x' >&2; echo >&2; exit 65",
                LONG,
            )
            .await,
        );
        assert_eq!(f, Failure::permanent("exit_65", "bad input: x"));
    }

    #[tokio::test]
    async fn other_exit_codes_are_retryable() {
        let f = failure(run("cat >/dev/null; exit 3", LONG).await);
        assert_eq!(f, Failure::retryable("exit_3", "exited with code 3"));
    }

    #[tokio::test]
    async fn a_signal_is_retryable() {
        let f = failure(run("kill -TERM $$", LONG).await);
        assert_eq!(f, Failure::retryable("signal_15", "killed by signal 15"));
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_process_group() {
        let dir = std::env::temp_dir().join(format!("gh-exec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("grandchild.pid");
        let command = format!(
            "sleep 30 & echo $! > {}; echo 'still working' >&2; wait",
            pidfile.display()
        );
        let started = Instant::now();
        let f = failure(run(&command, Duration::from_millis(500)).await);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(f.class, "timeout");
        assert!(f.retryable && f.timed_out);
        assert!(f.error.contains("still working"), "{}", f.error);
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The background `sleep` was in the group: it must be gone (or a zombie
        // waiting for its new parent to reap it).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            if stat.is_empty() || state == Some("Z") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "grandchild {pid} still alive: {stat}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn success_is_the_exit_not_the_pipes_closing() {
        // The background `sleep` holds stdout and stderr open for 50 s.
        let started = Instant::now();
        let out = run("(sleep 50 >&2 &); echo done", Duration::from_secs(10)).await;
        assert_eq!(
            out,
            Outcome::Success {
                payload: b"done\n".to_vec(),
                next: NextStage::Default,
                priority: None,
            }
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn output_written_before_the_exit_is_all_read_despite_a_background_child() {
        // More than a pipe buffer, written by the process itself, plus a
        // failure's stderr line: all there although the pipes stay open.
        let out = run(
            "(sleep 50 &); head -c 200000 /dev/zero | tr '\\0' x; echo ok",
            Duration::from_secs(10),
        )
        .await;
        let Outcome::Success { payload, .. } = out else {
            panic!("{out:?}")
        };
        assert_eq!(payload.len(), 200_003);
        let f = failure(
            run(
                "(sleep 50 &); echo 'the real reason' >&2; exit 3",
                Duration::from_secs(10),
            )
            .await,
        );
        assert_eq!(f, Failure::retryable("exit_3", "the real reason"));
    }

    #[tokio::test]
    async fn progress_lines_are_reported_not_kept_as_errors() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink: ProgressSink = {
            let seen = seen.clone();
            Arc::new(move |p| seen.lock().unwrap().push(p))
        };
        let out = ExecWorker::new(
            "echo 'real error' >&2; echo '@progress 0.5 half way' >&2; exit 1".into(),
            LONG,
        )
        .handle(&task(b""), &sink)
        .await;
        assert_eq!(failure(out).error, "real error");
        assert_eq!(
            *seen.lock().unwrap(),
            [Progress {
                fraction: Some(0.5),
                message: Some("half way".into())
            }]
        );
    }

    #[test]
    fn progress_lines_parse() {
        assert_eq!(
            parse_progress("@progress 0.25"),
            Some(Progress {
                fraction: Some(0.25),
                message: None
            })
        );
        assert_eq!(
            parse_progress("@progress 7 over"),
            Some(Progress {
                fraction: Some(1.0),
                message: Some("over".into())
            })
        );
        assert_eq!(
            parse_progress("@progress loading model"),
            Some(Progress {
                fraction: None,
                message: Some("loading model".into())
            })
        );
        assert_eq!(parse_progress("@progressive"), None);
        assert_eq!(parse_progress("error"), None);
    }

    #[tokio::test]
    async fn a_missing_shell_command_is_exit_127() {
        let f = failure(run("definitely-not-a-command-xyz", LONG).await);
        assert_eq!(f.class, "exit_127");
        assert!(f.error.contains("not found"), "{}", f.error);
    }

    #[tokio::test]
    async fn output_over_the_cap_is_a_retryable_failure() {
        let f = failure(run("cat >/dev/null; head -c 70000000 /dev/zero", LONG).await);
        assert_eq!(f.class, "output_too_large");
        assert!(f.retryable);
    }
}
