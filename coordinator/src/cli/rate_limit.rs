//! `guildhall rate-limit STAGE RATE|off`: sets or lifts a stage's rate
//! limit through a running coordinator (`PUT /api/stages/{stage}/rate-limit`).
//! A bad rate, a bad or unknown stage: one line, exit status 2; the
//! coordinator unreachable or failing (401, 503, 504): exit status 1.

use super::ClientArgs;
use super::client::{ClientError, request};
use crate::config::ConfigError;
use clap::Args;
use guildhall_proto::{Rate, Stage};
use serde_json::json;

/// `guildhall rate-limit`.
#[derive(Debug, Clone, Args)]
pub struct RateLimitArgs {
    /// API access.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The stage.
    pub stage: String,
    /// Most tasks the whole stage starts: `50/s`, `30/min`, `1/h`; `off`
    /// lifts the limit.
    #[arg(allow_hyphen_values = true)]
    pub rate: String,
}

/// The stage and the limit (`None`: off), or why not.
pub fn parse(args: &RateLimitArgs) -> Result<(Stage, Option<Rate>), ConfigError> {
    let stage = Stage::new(args.stage.clone()).map_err(|e| ConfigError(format!("stage: {e}")))?;
    let rate = match args.rate.trim() {
        "off" | "none" => None,
        r => Some(r.parse::<Rate>().map_err(|e| ConfigError(e.to_string()))?),
    };
    Ok((stage, rate))
}

/// Runs the command.
pub async fn run(args: &RateLimitArgs) -> anyhow::Result<String> {
    let (stage, rate) = parse(args)?;
    let path = format!("/api/stages/{stage}/rate-limit");
    let body = json!({ "limit": rate.map(|r| r.to_string()) });
    // An unknown stage is the coordinator's 400: exit status 2.
    let answer = request(&args.client, reqwest::Method::PUT, &path, Some(body))
        .await
        .map_err(ClientError::into_command_error)?;
    if args.client.json {
        return Ok(format!("{answer:#}\n"));
    }
    Ok(match rate {
        Some(r) => format!("{stage}: at most {r}\n"),
        None => format!("{stage}: no rate limit\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        args: RateLimitArgs,
    }

    fn parsed(v: &[&str]) -> Result<(Stage, Option<Rate>), ConfigError> {
        let t = T::try_parse_from(std::iter::once("t").chain(v.iter().copied())).expect("flags");
        parse(&t.args)
    }

    #[test]
    fn a_rate_or_off_and_a_valid_stage() {
        assert_eq!(
            parsed(&["s", "50/s"]).expect("valid").1,
            Some("50/s".parse().expect("rate"))
        );
        assert_eq!(parsed(&["s", "off"]).expect("valid").1, None);
        for bad in [
            &["s", "0/s"][..],
            &["s", "fast"],
            &["a b", "5/s"],
            &["s", "-1/s"],
        ] {
            let e = parsed(bad).expect_err("refused");
            assert!(!e.0.contains('\n'), "{e}");
        }
    }
}
