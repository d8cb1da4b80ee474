//! Declaring a saga: steps, kinds, policies and handlers, checked when built.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde_json::Value;

use crate::handler::{Compensate, StepContext, StepHandler};
use crate::json;
use crate::protocol::sealed::has_sealed_member;
use crate::protocol::{SecretKeys, StepCommand, StepOutcome, StepReply};
use crate::secret::{open_members, secret_properties};
use crate::{Direction, RetryPolicy, SagaSpec, SdkError, StepError, StepKind, StepSpec};

/// The attempt timeout a step gets unless it says otherwise.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The JSON Schema (draft 2020-12) of `T`, as a step definition carries it
/// ([`StepSpec::input_schema`], [`StepSpec::output_schema`]).
///
/// The draft is named rather than left to the crate's default, so that a later `schemars`
/// release changing its default cannot change the definitions workers register (a changed
/// schema under the same version is refused as a changed definition).
pub fn schema_of<T: JsonSchema>() -> Value {
    SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value()
}

/// One step being declared: its spec plus the handler that runs it.
pub struct Step {
    spec: StepSpec,
    runner: Arc<dyn ErasedStep>,
}

impl Step {
    /// A step undone by `handler.compensate` when a later step before the pivot fails.
    pub fn compensatable<H: Compensate>(name: impl Into<String>, handler: H) -> Self {
        Self::new(
            name.into(),
            StepKind::Compensatable,
            RetryPolicy::default(),
            Arc::new(WithCompensation(Arc::new(handler))),
        )
        .with_schemas::<H>()
    }

    /// The go/no-go step. If it fails permanently, the steps before it are compensated; once it
    /// succeeds, the saga only moves forward.
    pub fn pivot<H: StepHandler>(name: impl Into<String>, handler: H) -> Self {
        Self::new(
            name.into(),
            StepKind::Pivot,
            RetryPolicy::default(),
            Arc::new(ForwardOnly(Arc::new(handler))),
        )
        .with_schemas::<H>()
    }

    /// A step after the pivot: never compensated, retried without limit by default (until it
    /// succeeds or an operator steps in). A permanent error makes the saga stuck.
    pub fn retriable<H: StepHandler>(name: impl Into<String>, handler: H) -> Self {
        let forever = RetryPolicy::builder().unlimited_attempts().build();
        Self::new(
            name.into(),
            StepKind::Retriable,
            // The default builder with unlimited attempts is always valid.
            forever.unwrap_or_default(),
            Arc::new(ForwardOnly(Arc::new(handler))),
        )
        .with_schemas::<H>()
    }

    fn new(name: String, kind: StepKind, retry: RetryPolicy, runner: Arc<dyn ErasedStep>) -> Self {
        Step {
            spec: StepSpec {
                name,
                kind,
                retry,
                compensation_retry: RetryPolicy::default(),
                timeout: Some(DEFAULT_STEP_TIMEOUT),
                input_schema: None,
                output_schema: None,
                secret_output: Vec::new(),
            },
            runner,
        }
    }

    fn with_schemas<H: StepHandler>(mut self) -> Self {
        let output = schema_of::<H::Output>();
        self.spec.secret_output = secret_properties(&output);
        self.spec.input_schema = Some(schema_of::<H::Input>());
        self.spec.output_schema = Some(output);
        self
    }

    /// Declares member `field` of the step's output secret, for an `Output` type that cannot
    /// say so with [`Secret`](crate::Secret) (a `serde_json::Value`, say). Members typed
    /// `Secret<T>` are declared already.
    pub fn secret_output(mut self, field: impl Into<String>) -> Self {
        let field = field.into();
        if !self.spec.secret_output.contains(&field) {
            self.spec.secret_output.push(field);
        }
        self
    }

    /// How failed forward attempts are retried.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.spec.retry = policy;
        self
    }

    /// How failed compensation attempts are retried before the saga becomes stuck.
    pub fn compensation_retry(mut self, policy: RetryPolicy) -> Self {
        self.spec.compensation_retry = policy;
        self
    }

    /// How long one attempt may run before it counts as a retryable failure.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.spec.timeout = Some(timeout);
        self
    }

    /// No per-attempt timeout: the engine waits for the reply as long as it takes.
    pub fn without_timeout(mut self) -> Self {
        self.spec.timeout = None;
        self
    }
}

/// Collects steps into a [`Saga`].
pub struct SagaBuilder {
    name: String,
    version: u32,
    steps: Vec<Step>,
    deadline: Option<Duration>,
    secret_input: Vec<String>,
}

impl SagaBuilder {
    /// Declares member `field` of the saga's input secret, for `Input` types that cannot say so
    /// with [`Secret`](crate::Secret). Members any step's `Input` types `Secret<T>` are declared
    /// already.
    pub fn secret_input(mut self, field: impl Into<String>) -> Self {
        self.secret_input.push(field.into());
        self
    }

    /// Appends a step.
    pub fn step(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    /// Gives up (and compensates) when the pivot has not succeeded this long after the start.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Checks the definition against the saga model ([`SagaSpec::validate`] lists the rules)
    /// and returns it.
    pub fn build(self) -> Result<Saga, SdkError> {
        let (specs, runners): (Vec<StepSpec>, _) =
            self.steps.into_iter().map(|s| (s.spec, s.runner)).unzip();
        // Every step reads the one saga input: a member one step's type marks secret is secret.
        let mut secret_input = self.secret_input;
        for schema in specs.iter().filter_map(|step| step.input_schema.as_ref()) {
            secret_input.extend(secret_properties(schema));
        }
        secret_input.sort();
        secret_input.dedup();
        let spec = SagaSpec {
            name: self.name,
            version: self.version,
            steps: specs,
            deadline: self.deadline,
            secret_input,
        };
        spec.validate()?;
        Ok(Saga { spec, runners })
    }
}

/// A saga definition with its handlers: what a worker (or the embedded runtime) registers.
#[derive(Clone)]
pub struct Saga {
    spec: SagaSpec,
    runners: Vec<Arc<dyn ErasedStep>>,
}

impl std::fmt::Debug for Saga {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Saga").field("spec", &self.spec).finish()
    }
}

/// One attempt to run, as a runtime hands it to [`Saga::run`].
#[derive(Debug, Clone)]
pub struct StepRequest {
    /// The step's index in the saga.
    pub step: usize,
    /// The attempt's context.
    pub ctx: StepContext,
    /// The saga input, which the step reads as its `Input` type.
    pub input: Value,
    /// For a compensation, the step's recorded output (`None` when the outcome was unknown).
    pub output: Option<Value>,
}

impl Saga {
    /// Starts declaring a saga called `name` at definition `version`.
    pub fn builder(name: impl Into<String>, version: u32) -> SagaBuilder {
        SagaBuilder {
            name: name.into(),
            version,
            steps: Vec::new(),
            deadline: None,
            secret_input: Vec::new(),
        }
    }

    /// The definition as data.
    pub fn spec(&self) -> &SagaSpec {
        &self.spec
    }

    /// Whether the saga declares secret input or output fields: who serves it needs keys.
    pub fn declares_secrets(&self) -> bool {
        !self.secret_fields().is_empty()
    }

    /// The secret fields, as `input.card` and `output.STEP.FIELD`, for messages.
    pub fn secret_fields(&self) -> Vec<String> {
        let input = self.spec.secret_input.iter().map(|f| format!("input.{f}"));
        let outputs = self.spec.steps.iter().flat_map(|step| {
            step.secret_output
                .iter()
                .map(move |f| format!("output.{}.{f}", step.name))
        });
        input.chain(outputs).collect()
    }

    /// Checks that `input` deserializes into the `Input` type of every step, so a saga whose
    /// input is wrong is refused before it starts rather than failing half-way.
    pub fn validate_input(&self, input: &Value) -> Result<(), SdkError> {
        self.spec
            .steps
            .iter()
            .zip(&self.runners)
            .try_for_each(|(spec, runner)| runner.check_input(input, &spec.name))
    }

    /// Checks that `output` deserializes into the `Output` type of step `step` (used when an
    /// operator supplies a step's output by hand).
    pub fn validate_output(&self, step: &str, output: &Value) -> Result<(), SdkError> {
        let index = self
            .spec
            .step_index(step)
            .ok_or_else(|| SdkError::UnknownStep {
                saga: self.spec.name.clone(),
                step: step.to_string(),
                known: self.spec.step_names(),
            })?;
        self.runners[index].check_output(output, step)
    }

    /// Runs one attempt: the forward action (returning its output as JSON) or the compensation
    /// (returning `null`). Data that does not fit the handler's types is a permanent error.
    pub fn run(&self, request: StepRequest) -> BoxFuture<'static, Result<Value, StepError>> {
        let Some(runner) = self.runners.get(request.step).cloned() else {
            let error = StepError::permanent(
                "unknown_step",
                format!(
                    "saga `{}` v{} has no step number {}",
                    self.spec.name, self.spec.version, request.step
                ),
            );
            return Box::pin(async move { Err(error) });
        };
        match request.ctx.direction {
            Direction::Forward => runner.execute(request.ctx, request.input),
            Direction::Compensate => runner.compensate(request.ctx, request.input, request.output),
        }
    }
}

impl Saga {
    /// Runs the attempt `command` describes and answers it, as a worker does. A handler that
    /// panics is reported as a retryable failure; the worker itself keeps going.
    ///
    /// With `keys`, the envelopes among the members of the input and of the earlier outputs
    /// are opened for the handler, and the step's secret output members are sealed before the
    /// reply; an envelope that does not open (altered, malformed, under a key not given) is a
    /// permanent `secret_unreadable` error naming the field and the key.
    pub async fn handle(
        &self,
        command: &StepCommand,
        worker: &str,
        keys: Option<&SecretKeys>,
    ) -> StepReply {
        let outcome = match self.spec.steps.get(command.step_index) {
            Some(spec) if spec.name == command.step => self.handle_step(command, spec, keys).await,
            _ => StepOutcome::Failed {
                error: StepError::permanent(
                    "unknown_step",
                    format!(
                        "saga `{}` v{} has no step `{}` at position {}",
                        self.spec.name, self.spec.version, command.step, command.step_index
                    ),
                ),
            },
        };
        StepReply::to(command, worker, outcome)
    }

    async fn handle_step(
        &self,
        command: &StepCommand,
        spec: &StepSpec,
        keys: Option<&SecretKeys>,
    ) -> StepOutcome {
        let (request, opened) = match opened_request(command, keys) {
            Ok(opened) => opened,
            Err(error) => return StepOutcome::Failed { error },
        };
        let outcome = self.run_and_seal(request, command, spec, keys).await;
        match outcome {
            // A message must not carry a secret the handler (or serde, quoting a value that
            // does not fit its type) put in it: the history keeps it in clear.
            StepOutcome::Failed { mut error } if !opened.is_empty() => {
                error.message = scrub(&error.message, &opened);
                StepOutcome::Failed { error }
            }
            outcome => outcome,
        }
    }

    async fn run_and_seal(
        &self,
        request: StepRequest,
        command: &StepCommand,
        spec: &StepSpec,
        keys: Option<&SecretKeys>,
    ) -> StepOutcome {
        let sealed = match tokio::spawn(self.run(request)).await {
            Ok(Ok(output)) => seal_output(output, spec, command.direction, keys),
            other => other,
        };
        match sealed {
            Ok(Ok(output)) => match crate::protocol::json_len(&output) {
                // Retryable, not permanent: the step may have taken effect, so when
                // the retries give up it is compensated (by its forward key).
                size if size > crate::protocol::names::MAX_OUTPUT_BYTES => StepOutcome::Failed {
                    error: StepError::retryable(
                        "output_too_large",
                        format!(
                            "step `{}` returned {size} bytes of output, over the \
                                         {} byte limit (every later command carries it); \
                                         return a reference to the data instead",
                            command.step,
                            crate::protocol::names::MAX_OUTPUT_BYTES
                        ),
                    ),
                },
                _ => StepOutcome::Succeeded { output },
            },
            Ok(Err(error)) => StepOutcome::Failed { error },
            Err(join_error) => StepOutcome::Failed {
                error: StepError::retryable(
                    "handler_panicked",
                    format!("the step handler panicked: {join_error}"),
                ),
            },
        }
    }
}

/// The request `command` makes, its envelopes opened with `keys`, and the text of every value
/// opened (to keep it out of error messages).
fn opened_request(
    command: &StepCommand,
    keys: Option<&SecretKeys>,
) -> Result<(StepRequest, Vec<String>), StepError> {
    let mut ctx = StepContext::for_command(command);
    let mut input = command.input.clone();
    let mut opened = Vec::new();
    let unreadable = |error: crate::protocol::ProtocolError| {
        StepError::permanent("secret_unreadable", error.to_string())
    };
    if has_sealed_member(&command.input) {
        open_members(keys, &mut input).map_err(unreadable)?;
        opened.extend(opened_texts(&command.input, &input));
    }
    if command.outputs.values().any(has_sealed_member) {
        let mut outputs = command.outputs.clone();
        for (step, output) in outputs.iter_mut() {
            open_members(keys, output).map_err(unreadable)?;
            opened.extend(opened_texts(&command.outputs[step], output));
        }
        ctx.outputs = std::sync::Arc::new(outputs);
    }
    let output = ctx.outputs.get(&command.step).cloned();
    let request = StepRequest {
        step: command.step_index,
        ctx,
        input,
        output,
    };
    Ok((request, opened))
}

/// The text of each member of `opened` that was an envelope in `sealed`: a string as it is,
/// another value as JSON.
fn opened_texts(sealed: &Value, opened: &Value) -> Vec<String> {
    let (Some(sealed), Some(opened)) = (sealed.as_object(), opened.as_object()) else {
        return Vec::new();
    };
    sealed
        .iter()
        .filter(|(_, member)| crate::protocol::sealed::is_envelope(member))
        .filter_map(|(name, _)| opened.get(name))
        .map(|value| match value {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        })
        .filter(|text| text.len() >= 3)
        .collect()
}

/// `message` with every text of `secrets` in it replaced by `«secret»`.
fn scrub(message: &str, secrets: &[String]) -> String {
    secrets.iter().fold(message.to_string(), |message, secret| {
        message.replace(secret.as_str(), crate::protocol::sealed::REDACTED)
    })
}

/// A forward action's `output` with the step's secret members sealed.
fn seal_output(
    mut output: Value,
    spec: &StepSpec,
    direction: Direction,
    keys: Option<&SecretKeys>,
) -> Result<Result<Value, StepError>, tokio::task::JoinError> {
    if direction == Direction::Compensate || spec.secret_output.is_empty() {
        return Ok(Ok(output));
    }
    let Some(keys) = keys else {
        // The worker runtime refuses to start without keys for such a step; a runtime that
        // does not check lands here, after the effect: permanent, so the step is compensated.
        return Ok(Err(StepError::permanent(
            "secret_keys_missing",
            format!(
                "step `{}` returns secret fields ({}) and this process has no key to seal them; \
                 give it the key file (--secret-keys or SAGAFLOW_SECRET_KEYS_FILE)",
                spec.name,
                spec.secret_output.join(", ")
            ),
        )));
    };
    Ok(keys
        .seal_fields(&mut output, &spec.secret_output)
        .map(|()| output)
        .map_err(|error| StepError::permanent("secret_unreadable", error.to_string())))
}

/// A handler with its types erased to JSON, so steps of different types sit in one list.
trait ErasedStep: Send + Sync {
    fn execute(
        &self,
        ctx: StepContext,
        input: Value,
    ) -> BoxFuture<'static, Result<Value, StepError>>;
    fn compensate(
        &self,
        ctx: StepContext,
        input: Value,
        output: Option<Value>,
    ) -> BoxFuture<'static, Result<Value, StepError>>;
    fn check_input(&self, input: &Value, step: &str) -> Result<(), SdkError>;
    fn check_output(&self, output: &Value, step: &str) -> Result<(), SdkError>;
}

struct ForwardOnly<H>(Arc<H>);
struct WithCompensation<H>(Arc<H>);

fn execute_typed<H: StepHandler>(
    handler: Arc<H>,
    ctx: StepContext,
    input: Value,
) -> BoxFuture<'static, Result<Value, StepError>> {
    Box::pin(async move {
        let typed: H::Input = json::from_value(input, "saga input", &ctx.step)?;
        let output = handler.execute(&ctx, typed).await?;
        Ok(json::to_value(&output, &ctx.step)?)
    })
}

fn check<T: serde::de::DeserializeOwned>(
    value: &Value,
    what: &str,
    step: &str,
) -> Result<(), SdkError> {
    json::from_value::<T>(value.clone(), what, step).map(drop)
}

impl<H: StepHandler> ErasedStep for ForwardOnly<H> {
    fn execute(
        &self,
        ctx: StepContext,
        input: Value,
    ) -> BoxFuture<'static, Result<Value, StepError>> {
        execute_typed(self.0.clone(), ctx, input)
    }

    fn compensate(
        &self,
        ctx: StepContext,
        _input: Value,
        _output: Option<Value>,
    ) -> BoxFuture<'static, Result<Value, StepError>> {
        let error = StepError::permanent(
            "not_compensatable",
            format!("step `{}` has no compensation", ctx.step),
        );
        Box::pin(async move { Err(error) })
    }

    fn check_input(&self, input: &Value, step: &str) -> Result<(), SdkError> {
        check::<H::Input>(input, "saga input", step)
    }

    fn check_output(&self, output: &Value, step: &str) -> Result<(), SdkError> {
        check::<H::Output>(output, "output", step)
    }
}

impl<H: Compensate> ErasedStep for WithCompensation<H> {
    fn execute(
        &self,
        ctx: StepContext,
        input: Value,
    ) -> BoxFuture<'static, Result<Value, StepError>> {
        execute_typed(self.0.clone(), ctx, input)
    }

    fn compensate(
        &self,
        ctx: StepContext,
        input: Value,
        output: Option<Value>,
    ) -> BoxFuture<'static, Result<Value, StepError>> {
        let handler = self.0.clone();
        Box::pin(async move {
            let typed_input: H::Input = json::from_value(input, "saga input", &ctx.step)?;
            let typed_output: Option<H::Output> = match output {
                Some(value) => Some(json::from_value(value, "recorded output", &ctx.step)?),
                None => None,
            };
            handler.compensate(&ctx, typed_input, typed_output).await?;
            Ok(Value::Null)
        })
    }

    fn check_input(&self, input: &Value, step: &str) -> Result<(), SdkError> {
        check::<H::Input>(input, "saga input", step)
    }

    fn check_output(&self, output: &Value, step: &str) -> Result<(), SdkError> {
        check::<H::Output>(output, "output", step)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::Value;
    use uuid::Uuid;

    use super::*;
    use crate::protocol::{PROTOCOL_VERSION, StepCommand, StepOutcome, names};
    use crate::{Direction, ErrorClass};

    /// Returns a string of the length it is given.
    struct Echo;

    impl StepHandler for Echo {
        type Input = usize;
        type Output = String;

        async fn execute(&self, _ctx: &StepContext, length: usize) -> Result<String, StepError> {
            Ok("x".repeat(length))
        }
    }

    fn command(length: usize) -> StepCommand {
        StepCommand {
            v: PROTOCOL_VERSION,
            command_id: "c".into(),
            saga_id: Uuid::from_u128(7),
            saga: "echo".into(),
            saga_version: 1,
            partition: 0,
            epoch: 1,
            reply_to: names::reply_subject(0, "echo"),
            step_index: 0,
            step: "echo".into(),
            direction: Direction::Forward,
            attempt: 1,
            idempotency_key: "k".into(),
            forward_key: "k".into(),
            deadline: None,
            input: Value::from(length),
            outputs: BTreeMap::new(),
        }
    }

    #[test]
    fn the_definition_carries_the_step_types_as_json_schema() {
        let saga = Saga::builder("echo", 1)
            .step(Step::pivot("echo", Echo))
            .build()
            .expect("valid saga");
        let step = &saga.spec().steps[0];
        let input = step.input_schema.as_ref().expect("an input schema");
        let output = step.output_schema.as_ref().expect("an output schema");
        assert_eq!(
            input["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{input}"
        );
        assert_eq!(input["type"], "integer", "{input}");
        assert_eq!(output["type"], "string", "{output}");
        // The schemas survive the definition's wire form.
        let text = serde_json::to_string(saga.spec()).expect("serializes");
        let read: SagaSpec = serde_json::from_str(&text).expect("parses");
        assert_eq!(&read, saga.spec());
    }

    #[derive(serde::Deserialize, schemars::JsonSchema)]
    struct Payment {
        card: crate::Secret<String>,
    }

    #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    struct Receipt {
        token: crate::Secret<String>,
        last4: String,
    }

    /// Returns a token made from the card, secret, and its last four digits, not.
    struct Tokenize;

    impl StepHandler for Tokenize {
        type Input = Payment;
        type Output = Receipt;

        async fn execute(
            &self,
            _ctx: &StepContext,
            payment: Payment,
        ) -> Result<Receipt, StepError> {
            let card = payment.card.expose();
            if card.ends_with("0000") {
                return Err(StepError::permanent(
                    "declined",
                    format!("card {card} declined"),
                ));
            }
            Ok(Receipt {
                token: crate::Secret::new(format!("tok-{card}")),
                last4: card[card.len() - 4..].to_string(),
            })
        }
    }

    #[tokio::test]
    async fn secret_members_are_opened_for_the_handler_and_sealed_in_its_output() {
        let saga = Saga::builder("pay", 1)
            .step(Step::pivot("tokenize", Tokenize))
            .build()
            .expect("valid saga");
        assert_eq!(saga.spec().secret_input, ["card"]);
        assert_eq!(saga.spec().steps[0].secret_output, ["token"]);
        let keys = SecretKeys::parse(&SecretKeys::generate_line("k1").unwrap(), "test").unwrap();
        let mut pay = command(0);
        pay.saga = "pay".into();
        pay.step = "tokenize".into();
        pay.input = serde_json::json!({"card": "4111-1111"});
        keys.seal_fields(&mut pay.input, &["card".into()]).unwrap();

        let reply = saga.handle(&pay, "w1", Some(&keys)).await;
        let StepOutcome::Succeeded { output } = reply.outcome else {
            panic!("failed: {:?}", reply.outcome);
        };
        assert_eq!(output["last4"], "1111");
        assert!(
            crate::protocol::sealed::is_envelope(&output["token"]),
            "{output}"
        );
        assert!(!output.to_string().contains("tok-"), "{output}");
        assert_eq!(
            keys.open("token", &output["token"]).unwrap(),
            "tok-4111-1111"
        );

        // A secret the handler quotes in its error is scrubbed from the message.
        let mut declined = pay.clone();
        declined.input = serde_json::json!({"card": "4000-0000"});
        keys.seal_fields(&mut declined.input, &["card".into()])
            .unwrap();
        let reply = saga.handle(&declined, "w1", Some(&keys)).await;
        let StepOutcome::Failed { error } = reply.outcome else {
            panic!("a declined card succeeded");
        };
        assert_eq!(error.message, "card «secret» declined");

        // What does not open is a permanent error naming the field and the key, not a retry.
        let mut tampered = pay.clone();
        tampered.input["card"]["$sagaflow_secret"]["ct"] =
            serde_json::json!("AAAAAAAAAAAAAAAAAAAAAAAA");
        let other = SecretKeys::parse(&SecretKeys::generate_line("k9").unwrap(), "test").unwrap();
        let mut malformed = pay.clone();
        malformed.input["card"]["$sagaflow_secret"]["nonce"] = serde_json::json!("short");
        for (what, command, keys) in [
            ("tampered", &tampered, Some(&keys)),
            ("unknown key", &pay, Some(&other)),
            ("no keys", &pay, None),
            ("malformed", &malformed, Some(&keys)),
        ] {
            let reply = saga.handle(command, "w1", keys).await;
            let StepOutcome::Failed { error } = reply.outcome else {
                panic!("{what}: the step ran");
            };
            assert_eq!(
                (error.code.as_str(), error.class),
                ("secret_unreadable", ErrorClass::Permanent),
                "{what}"
            );
            assert!(
                error.message.contains("`card`") && error.message.contains("`k1`"),
                "{what}: {}",
                error.message
            );
        }
    }

    #[tokio::test]
    async fn an_output_over_the_limit_is_a_retryable_failure() {
        let saga = Saga::builder("echo", 1)
            .step(Step::pivot("echo", Echo))
            .build()
            .expect("valid saga");
        // The JSON string adds its two quotes.
        let fits = saga
            .handle(&command(names::MAX_OUTPUT_BYTES - 2), "w1", None)
            .await;
        assert!(matches!(fits.outcome, StepOutcome::Succeeded { .. }));
        let over = saga
            .handle(&command(names::MAX_OUTPUT_BYTES - 1), "w1", None)
            .await;
        let StepOutcome::Failed { error } = over.outcome else {
            panic!("an output over the limit succeeded");
        };
        assert_eq!(error.code, "output_too_large");
        assert_eq!(error.class, ErrorClass::Retryable);
        assert!(error.message.contains("262145 bytes"), "{}", error.message);
    }
}
