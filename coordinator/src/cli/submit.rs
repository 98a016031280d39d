//! `guildhall submit`: publish one task straight to the broker (no
//! coordinator needed).

use super::{ConfigError, SubmitArgs};
use crate::submit::{Submitted, Submitter};
use guildhall_broker::{Publisher, connect, topology};
use guildhall_proto::{AgentId, Stage, TaskId};
use std::io::Read;

/// Runs `submit`; the output to print.
pub async fn run(args: &SubmitArgs) -> anyhow::Result<String> {
    let (url, names) = args.broker.validate()?;
    let stage =
        Stage::new(args.stage.as_str()).map_err(|e| ConfigError(format!("--stage: {e}")))?;
    let id = args
        .id
        .as_deref()
        .map(TaskId::new)
        .transpose()
        .map_err(|e| ConfigError(format!("--id: {e}")))?;
    let payload = read_payload(&args.payload)?;
    let suffix = format!("{:08x}", rand::random::<u32>());
    let conn = connect(&url, &format!("guildhall-submit/{suffix}")).await?;
    let publisher = Publisher::open(&conn).await?;
    if args.declare {
        topology::declare_stage(publisher.channel(), &names, &stage).await?;
    }
    let submitter = Submitter::new(AgentId::new(format!("submit-{suffix}"))?, names);
    let result = submitter.submit(&publisher, stage, id, &payload).await;
    let _ = conn.close(200, "done".into()).await;
    let Submitted { id, stage, .. } = result?;
    Ok(if args.json {
        format!(
            "{}\n",
            serde_json::json!({ "id": id.as_str(), "stage": stage.as_str() })
        )
    } else {
        format!("{id}\n")
    })
}

fn read_payload(arg: &str) -> anyhow::Result<Vec<u8>> {
    match arg.strip_prefix('@') {
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            Ok(buf)
        }
        Some(path) => std::fs::read(path).map_err(|e| anyhow::anyhow!("--payload @{path}: {e}")),
        None => Ok(arg.as_bytes().to_vec()),
    }
}
