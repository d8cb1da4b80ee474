//! `sagaflow start`: start a saga through the engine's NATS start subject.

use crate::common::print_text;
use std::time::Duration;

use anyhow::{Context, bail};
use sagaflow_sdk::keys::SecretKeyArgs;
use sagaflow_sdk::nats::NatsArgs;
use sagaflow_sdk::protocol::{
    EngineAnswer, PROTOCOL_VERSION, StartRequest, WhileUnreachable, names,
};

/// Options of `sagaflow start`.
#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// The saga's name, e.g. place_order.
    saga: String,
    /// The input, as JSON.
    #[arg(long)]
    input: String,
    /// Starting is idempotent on this key: the same key returns the same saga.
    #[arg(long)]
    key: Option<String>,
    /// Seal this member of the input before it leaves this process (repeat it, or separate
    /// with commas, for several): the members the saga declares secret, which the engine
    /// refuses in clear. `sagaflow show ID --schema` marks them `x-sagaflow-secret`.
    #[arg(long, value_delimiter = ',', value_name = "FIELD")]
    seal: Vec<String>,
    /// The keys that seal the --seal members (the first key seals).
    #[command(flatten)]
    keys: SecretKeyArgs,
    /// A definition version (the latest registered when absent).
    #[arg(long)]
    version: Option<u32>,
    /// The NATS server the engine listens on; for a cluster, several of its servers separated
    /// by commas (nats://10.0.0.1:4222,nats://10.0.0.2:4222): one that answers is used.
    #[arg(
        long,
        env = "SAGAFLOW_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    #[command(flatten)]
    nats: NatsArgs,
    /// How long to wait for an engine to answer.
    #[arg(long, default_value_t = 10)]
    timeout_secs: u64,
}

pub async fn run(args: StartArgs) -> anyhow::Result<()> {
    // The input may hold secrets: never repeat it in a message.
    let mut input: serde_json::Value = serde_json::from_str(&args.input)
        .map_err(|error| anyhow::anyhow!("--input is not valid JSON: {error}"))?;
    if !args.seal.is_empty() {
        let Some(keys) = args.keys.keys()? else {
            bail!(
                "--seal needs the keys to seal with: give --secret-keys FILE (or set \
                 SAGAFLOW_SECRET_KEYS_FILE or SAGAFLOW_SECRET_KEYS)"
            );
        };
        if let Some(missing) = args
            .seal
            .iter()
            .find(|field| input.get(field.as_str()).is_none())
        {
            bail!("--seal {missing}: the input has no member `{missing}` to seal");
        }
        keys.seal_fields(&mut input, &args.seal)?;
    }
    let request = StartRequest {
        v: PROTOCOL_VERSION,
        saga: args.saga,
        version: args.version,
        input,
        key: args.key,
    };
    let timeout = Duration::from_secs(args.timeout_secs);
    let client = sagaflow_sdk::protocol::connect_with(
        &args.nats_url,
        &args.nats.security()?,
        "sagaflow-cli",
        WhileUnreachable::Fail,
        |options| options.request_timeout(Some(timeout)),
    )
    .await?;
    let answer = client
        .request(names::START_SUBJECT, serde_json::to_vec(&request)?.into())
        .await
        .context("no engine answered on sagaflow.start; is `sagaflow serve` running?")?;
    match serde_json::from_slice::<EngineAnswer>(&answer.payload)
        .context("the engine's answer is not a protocol message")?
    {
        EngineAnswer::Ok {
            saga_id: Some(id), ..
        } => {
            print_text(id)?;
            Ok(())
        }
        EngineAnswer::Ok { saga_id: None, .. } => bail!("the engine answered without a saga id"),
        EngineAnswer::Error { code, message, .. } => bail!("refused ({code}): {message}"),
    }
}
