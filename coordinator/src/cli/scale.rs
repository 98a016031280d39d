//! `guildhall scale STAGE +N|-N|N`: scales a stage by hand through a
//! running coordinator's actuator (`POST /api/stages/{stage}/scale`): `+1`
//! and `-2` are steps from the stage's live workers, `5` a count. A bad
//! stage or count, an unknown stage: one line, exit status 2; the
//! coordinator unreachable or refusing (401, 409 without an actuator, 503):
//! exit status 1.

use super::ClientArgs;
use super::client::{ClientError, request};
use crate::config::ConfigError;
use clap::Args;
use guildhall_proto::Stage;
use serde_json::{Value, json};

/// `guildhall scale`.
#[derive(Debug, Clone, Args)]
pub struct ScaleArgs {
    /// API access.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The stage.
    pub stage: String,
    /// `+1`, `-1` (a step from the live workers) or `5` (a count).
    #[arg(allow_hyphen_values = true)]
    pub workers: String,
}

/// The stage and the request body, or why not.
pub fn parse(args: &ScaleArgs) -> Result<(Stage, Value), ConfigError> {
    let stage = Stage::new(args.stage.clone()).map_err(|e| ConfigError(format!("stage: {e}")))?;
    let text = args.workers.trim();
    let bad = || {
        ConfigError(format!(
            "workers: expected +N or -N (a step, 1 to 1000) or N (a count, 0 to 10000), got '{}'",
            text.chars().take(40).collect::<String>()
        ))
    };
    let body = match text
        .strip_prefix('+')
        .map(|t| (1, t))
        .or_else(|| text.strip_prefix('-').map(|t| (-1, t)))
    {
        Some((sign, digits)) => {
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let n: i64 = digits.parse().map_err(|_| bad())?;
            if !(1..=1000).contains(&n) {
                return Err(bad());
            }
            json!({ "delta": sign * n })
        }
        None => {
            let n: u32 = text.parse().map_err(|_| bad())?;
            if n > 10_000 {
                return Err(bad());
            }
            json!({ "workers": n })
        }
    };
    Ok((stage, body))
}

/// Runs the command.
pub async fn run(args: &ScaleArgs) -> anyhow::Result<String> {
    let (stage, body) = parse(args)?;
    let path = format!("/api/stages/{stage}/scale");
    let answer = request(&args.client, reqwest::Method::POST, &path, Some(body))
        .await
        .map_err(ClientError::into_command_error)?;
    if args.client.json {
        return Ok(format!("{answer:#}\n"));
    }
    let how = if answer["dry_run"] == true {
        "dry run: logged only".to_owned()
    } else {
        format!(
            "through the {}",
            answer["actuator"].as_str().unwrap_or("actuator")
        )
    };
    Ok(format!(
        "{stage}: {} -> {} workers asked ({how})\n",
        answer["from"], answer["to"]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        args: ScaleArgs,
    }

    fn parsed(v: &[&str]) -> Result<(Stage, Value), ConfigError> {
        let t = T::try_parse_from(std::iter::once("t").chain(v.iter().copied())).expect("flags");
        parse(&t.args)
    }

    #[test]
    fn a_step_or_a_count_and_a_valid_stage() {
        assert_eq!(parsed(&["s", "+1"]).expect("valid").1, json!({"delta": 1}));
        assert_eq!(parsed(&["s", "-2"]).expect("valid").1, json!({"delta": -2}));
        assert_eq!(parsed(&["s", "5"]).expect("valid").1, json!({"workers": 5}));
        assert_eq!(parsed(&["s", "0"]).expect("valid").1, json!({"workers": 0}));
        for bad in [
            &["s", "+0"][..],
            &["s", "-0"],
            &["s", "+1001"],
            &["s", "10001"],
            &["s", "many"],
            &["s", "1.5"],
            &["s", "++1"],
            &["s", ""],
            &["a b", "+1"],
        ] {
            let e = parsed(bad).expect_err("refused");
            assert!(!e.0.contains('\n'), "{e}");
        }
    }
}
