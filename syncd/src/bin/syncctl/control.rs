//! `syncctl pause|resume|priority|rescan|revert`: on this node, or with
//! `--fleet` (pause, resume, priority) signed with an operator's key and
//! published to every node carrying the directories (issue 11).

use std::path::PathBuf;

use sync_proto::admin as pba;
use sync_proto::admin::admin_client::AdminClient;
use tonic::transport::Channel;

use super::{Failure, Targets, print_json, rpc_error};

/// Directories to steer, here or fleet-wide.
#[derive(clap::Args)]
pub(crate) struct Steer {
    #[command(flatten)]
    targets: Targets,
    /// Apply on every node that carries the directories, restarts
    /// included, until the next fleet control: signed with an operator
    /// certificate (`syncd pki issue --operator NAME`). Needs [tls].
    #[arg(long, conflicts_with = "all")]
    fleet: bool,
    /// The operator certificate (PEM), with --fleet.
    #[arg(long, env = "SYNCD_OPERATOR_CERT")]
    operator_cert: Option<PathBuf>,
    /// The operator's key (PEM), with --fleet.
    #[arg(long, env = "SYNCD_OPERATOR_KEY")]
    operator_key: Option<PathBuf>,
}

impl From<Targets> for Steer {
    fn from(targets: Targets) -> Steer {
        Steer {
            targets,
            fleet: false,
            operator_cert: None,
            operator_key: None,
        }
    }
}

/// Controls for `dirs`, signed by the operator whose files `s` names.
fn sign(
    s: &Steer,
    action: &str,
    priority: &str,
) -> anyhow::Result<(Vec<sync_proto::pb::Control>, Vec<u8>, String)> {
    let (Some(cert), Some(key)) = (&s.operator_cert, &s.operator_key) else {
        anyhow::bail!(
            "--fleet signs with an operator certificate: give --operator-cert and --operator-key \
             (or SYNCD_OPERATOR_CERT and SYNCD_OPERATOR_KEY); `syncd pki issue --operator NAME` makes them"
        );
    };
    let op = syncd::tls::control::Operator::load(cert, key)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let controls = s
        .targets
        .dirs
        .iter()
        .map(|d| op.sign(d, action, priority, now))
        .collect();
    Ok((controls, op.cert().to_vec(), op.name().to_string()))
}

pub(crate) async fn control(
    client: &mut AdminClient<Channel>,
    action: &str,
    priority: &str,
    s: Steer,
    json: bool,
) -> Result<(), Failure> {
    let (controls, operator_certificate, operator) = if s.fleet {
        sign(&s, action, priority)?
    } else {
        Default::default()
    };
    let r = client
        .control(pba::ControlRequest {
            action: action.into(),
            dirs: s.targets.dirs,
            all: s.targets.all,
            priority: priority.into(),
            controls,
            operator_certificate,
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    if json {
        print_json(&r)?;
        return Ok(());
    }
    let past = match action {
        "pause" => "paused".to_string(),
        "resume" => "resumed".to_string(),
        "rescan" => "rescanning".to_string(),
        "priority" => format!("priority {priority}"),
        _ => "reverting".to_string(),
    };
    if s.fleet {
        println!(
            "{past} on every node carrying: {} (signed by operator {operator}; see `syncctl fleet`)",
            r.affected.join(", ")
        );
    } else {
        println!("{past}: {}", r.affected.join(", "));
    }
    Ok(())
}
