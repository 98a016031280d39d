//! `guildhall schedule add | list | remove | pause | resume`: cron schedules
//! through a running coordinator's `/api/schedules`.
//!
//! Input is checked here first (name, cron expression, time zone, priority,
//! payload size): a mistake is one line and exit status 2, as is the
//! coordinator's 400 or 404 answer. An unreachable coordinator is status 1.

use super::ClientArgs;
use super::client::{ClientError, request};
use super::render::Table;
use crate::cli::ConfigError;
use clap::{Args, Subcommand};
use guildhall_core::core::scheduling::schedules::Parsed;
use guildhall_proto::{MAX_SCHEDULE_PAYLOAD, Missed, Priority, Stage};
use serde_json::{Value, json};

/// `guildhall schedule ACTION ...`.
#[derive(Debug, Clone, Args)]
pub struct ScheduleArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: ScheduleAction,
}

/// The schedule commands.
#[derive(Debug, Clone, Subcommand)]
pub enum ScheduleAction {
    /// Create or replace a schedule.
    Add(AddArgs),
    /// List the schedules with their next ticks.
    List(ClientArgs),
    /// Remove a schedule.
    Remove(NameArgs),
    /// Pause a schedule: it fires nothing until resumed.
    Pause(NameArgs),
    /// Resume a paused schedule (the ticks of the pause follow --missed).
    Resume(NameArgs),
}

/// A schedule and the API to reach it through.
#[derive(Debug, Clone, Args)]
pub struct NameArgs {
    /// API access.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The schedule's name.
    pub name: String,
}

/// `guildhall schedule add NAME --cron EXPR --stage S --payload @file|TEXT`.
#[derive(Debug, Clone, Args)]
pub struct AddArgs {
    /// API access.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The schedule's name (letters, digits, `_`, `-`; at most 64).
    pub name: String,
    /// Cron expression: 5 fields (`0 3 * * *`), or 6 with seconds first.
    #[arg(long)]
    pub cron: String,
    /// The stage each tick's task is submitted to.
    #[arg(long)]
    pub stage: String,
    /// The payload of each task: text, or `@file` to read a file.
    #[arg(long, default_value = "")]
    pub payload: String,
    /// IANA time zone the expression is read in.
    #[arg(long, default_value = "UTC")]
    pub timezone: String,
    /// Priority of each task, 0-9 (higher first).
    #[arg(long, default_value = "0")]
    pub priority: String,
    /// Ticks missed while no coordinator ran (or while paused): run-all,
    /// run-once or skip.
    #[arg(long, default_value = "run-all")]
    pub missed: String,
    /// Create it paused.
    #[arg(long)]
    pub paused: bool,
}

fn bad(msg: impl std::fmt::Display) -> anyhow::Error {
    ConfigError(msg.to_string()).into()
}

fn name_of(name: &str) -> anyhow::Result<Stage> {
    Stage::new(name).map_err(|e| bad(format!("schedule name: {e}")))
}

/// An API error answer (400, 404) is the user's input: status 2.
fn api(e: ClientError) -> anyhow::Error {
    e.into_command_error()
}

/// Runs a schedule command; what to print.
pub async fn run(args: &ScheduleArgs) -> anyhow::Result<String> {
    let post = reqwest::Method::POST;
    match &args.action {
        ScheduleAction::Add(a) => {
            let name = name_of(&a.name)?;
            let stage = Stage::new(a.stage.as_str()).map_err(bad)?;
            let priority: Priority = a.priority.parse().map_err(bad)?;
            let missed: Missed = a.missed.parse().map_err(bad)?;
            Parsed::new(&a.cron, &a.timezone).map_err(bad)?;
            let payload = match a.payload.strip_prefix('@') {
                Some(path) => std::fs::read(path)
                    .map_err(|e| bad(format!("cannot read payload file {path}: {e}")))?,
                None => a.payload.clone().into_bytes(),
            };
            if payload.len() > MAX_SCHEDULE_PAYLOAD {
                return Err(bad(format!(
                    "payload of {} bytes exceeds a schedule's {MAX_SCHEDULE_PAYLOAD}-byte limit",
                    payload.len()
                )));
            }
            let payload = match String::from_utf8(payload) {
                Ok(text) => json!({ "payload": text }),
                Err(e) => {
                    use base64::Engine as _;
                    json!({ "payload_base64":
                        base64::engine::general_purpose::STANDARD.encode(e.into_bytes()) })
                }
            };
            let mut body = json!({
                "name": name.as_str(),
                "cron": a.cron,
                "stage": stage.as_str(),
                "timezone": a.timezone,
                "priority": priority.get(),
                "missed": missed.as_str(),
                "paused": a.paused,
            });
            if let (Some(b), Some(p)) = (body.as_object_mut(), payload.as_object()) {
                b.extend(p.clone());
            }
            let answer = request(&a.client, post, "/api/schedules", Some(body))
                .await
                .map_err(api)?;
            if a.client.json {
                return Ok(format!("{answer:#}\n"));
            }
            let next = answer["schedule"]["next_ticks_ms"][0]
                .as_u64()
                .map_or_else(|| "-".into(), stamp);
            Ok(format!("schedule {name} set; next tick {next}\n"))
        }
        ScheduleAction::List(client) => {
            let answer = request(client, reqwest::Method::GET, "/api/schedules", None)
                .await
                .map_err(api)?;
            if client.json {
                return Ok(format!("{answer:#}\n"));
            }
            Ok(render(&answer))
        }
        ScheduleAction::Remove(n) => {
            let name = name_of(&n.name)?;
            let path = format!("/api/schedules/{name}");
            let answer = request(&n.client, reqwest::Method::DELETE, &path, None)
                .await
                .map_err(api)?;
            if n.client.json {
                return Ok(format!("{answer:#}\n"));
            }
            Ok(format!("schedule {name} removed\n"))
        }
        ScheduleAction::Pause(n) | ScheduleAction::Resume(n) => {
            let action = if matches!(args.action, ScheduleAction::Pause(_)) {
                "pause"
            } else {
                "resume"
            };
            let name = name_of(&n.name)?;
            let path = format!("/api/schedules/{name}/{action}");
            let answer = request(&n.client, post, &path, None).await.map_err(api)?;
            if n.client.json {
                return Ok(format!("{answer:#}\n"));
            }
            Ok(format!("schedule {name} {action}d\n"))
        }
    }
}

/// `2026-12-07T03:00:00Z` for a Unix time in ms.
fn stamp(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

fn render(answer: &Value) -> String {
    let empty = Vec::new();
    let list = answer["schedules"].as_array().unwrap_or(&empty);
    if list.is_empty() {
        return "no schedules\n".into();
    }
    let mut t = Table::new(&[
        "NAME", "CRON", "TIMEZONE", "STAGE", "PRIO", "MISSED", "STATE", "LAST", "NEXT",
    ]);
    for s in list {
        let text = |k: &str| s[k].as_str().unwrap_or("-").to_owned();
        let time = |v: &Value| v.as_u64().map_or_else(|| "-".into(), stamp);
        t.row(vec![
            text("name"),
            text("cron"),
            text("timezone"),
            text("stage"),
            s["priority"].to_string(),
            text("missed"),
            if s["paused"] == json!(true) {
                "paused"
            } else {
                "active"
            }
            .into(),
            time(&s["last_tick_ms"]),
            time(&s["next_ticks_ms"][0]),
        ]);
    }
    t.render()
}
